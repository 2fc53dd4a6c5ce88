"""Multi-task mode shared as a strategy of the one loop: one set of adapters (or every weight) trained on every
task's batches, one head per task. The tasks' batches come in one stream (data.multitask_loader: `schedule`
orders them), each batch running its task's head (training.task_heads) and loss; held-out scores per task and
their overall, which picks the best state; one multi-task checkpoint at the end."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowrank_cli import distributed
from lowrank_cli.checkpoint.format import record_finetune
from lowrank_cli.data.modality import check_model
from lowrank_cli.data.multitask_loader import MultiTaskLoader
from lowrank_cli.data.task_data import check_same_modality
from lowrank_cli.data.tasks import TaskSpec
from lowrank_cli.errors import UsageError
from lowrank_cli.evaluation.task_scores import overall_score
from lowrank_cli.models.heads import Head
from lowrank_cli.training.callbacks import held_out_eval, kept_last, measured_before
from lowrank_cli.training.heldout import TasksScorer
from lowrank_cli.training.multitask_options import DEFAULT_SCHEDULE
from lowrank_cli.training.parallel import distribution
from lowrank_cli.training.result import MultitaskResult
from lowrank_cli.training.strategy import RunData, training_loader
from lowrank_cli.training.task_heads import TaskHeads
from lowrank_cli.training.task_loss import MultiTaskLoss, TaskLoss
from lowrank_cli.training.task_run import read_task
from lowrank_cli.training.teacher import name_of
from lowrank_cli.training.tuning import Tuned, adapt, every, finetune_settings, load_tuned, task_scorer


@dataclass
class TasksData:
    """Every task's data (RunData with its Task), in the order of `specs`."""

    specs: list[TaskSpec]
    tasks: list[RunData]

    @property
    def samples(self) -> int:
        return sum(d.samples for d in self.tasks)

    @property
    def unit(self) -> str:
        return self.tasks[0].unit

    @property
    def sample_name(self) -> str:
        return self.tasks[0].sample_name

    @property
    def modality(self) -> Any:
        return self.tasks[0].modality


class SharedStrategy:
    """`finetune_tasks` with mode shared (its options: training.multitask_options.MultitaskOptions)."""

    api, phase = "finetune_tasks", "finetune tasks"
    def __init__(self, opts: Any, model: Any, specs: list[TaskSpec]):
        self.opts, self.source_model, self.specs = opts, model, specs
        # A batch runs one task's head: the others get no gradient in that step.
        self.distribution = distribution(opts, find_unused_parameters=True)

    @property
    def schedule_name(self) -> str:
        return self.opts.schedule or DEFAULT_SCHEDULE

    def read_data(self, env: Any) -> TasksData:
        datas = [read_task(spec, self.opts)[0] for spec in self.specs]  # every task's data, before any model loads
        check_same_modality(self.specs, [d.modality for d in datas])
        for d in datas[1:]:
            d.modality = datas[0].modality  # one tokenizer (or image setting) for the one model
        return TasksData(self.specs, datas)

    def fixed_for_resume(self, env: Any, data: TasksData) -> dict[str, Any]:
        return {**self.opts.fixed_for_resume(env.ctx.world_size, data.samples),
                "tasks": [str(s) for s in self.specs], "schedule": self.schedule_name}

    def load_models(self, env: Any, data: TasksData) -> Tuned:
        loaded = load_tuned(env, self.opts, self.source_model)
        save_dtype = next(loaded.model.parameters()).dtype
        for d in data.tasks:
            check_model(d.modality, loaded.model, name_of(loaded), d.task.data, role="the model")
        heads = TaskHeads.build(loaded, [(s.name, d.task.classes, d.task.regression)
                                         for s, d in zip(self.specs, data.tasks)], seed=self.opts.seed)
        record_finetune(loaded.model, data.tasks[0].task.record(), spec=loaded.spec, source=loaded.source)
        tuned = adapt(env, self.opts, loaded, heads.head, data.modality, save_dtype=save_dtype)
        tuned.heads, tuned.on_batch = heads, (lambda batch: heads.use(batch.task))
        return tuned

    def loss(self, env: Any, data: TasksData, m: Tuned) -> MultiTaskLoss:
        return MultiTaskLoss({s.name: TaskLoss(regression=d.task.regression, label_smoothing=self.opts.label_smoothing)
                              for s, d in zip(self.specs, data.tasks)}, m.heads.state)

    def loader(self, env: Any, data: TasksData, m: Tuned, total: int) -> tuple[Any, Any]:
        loaders = {s.name: training_loader(env, self.opts, d, m.model, m.input_size, total)
                   for s, d in zip(self.specs, data.tasks)}
        stream = MultiTaskLoader(loaders, schedule=self.schedule_name, seed=self.opts.seed)
        return stream, stream

    def method_callbacks(self, schedule: Any) -> list[Any]:
        return []

    def trainable(self, env: Any, data: TasksData, m: Tuned, loss: Any) -> list[tuple[str, nn.Parameter]]:
        return m.named

    def changeable_on_resume(self, data: TasksData, m: Tuned, schedule: Any) -> dict[str, Any]:
        return self.opts.changeable_on_resume(total=schedule.total, warmup=schedule.warmup,
                                              data=";".join(map(str, self.specs)))

    def before_training(self, setup: Any) -> None:
        for spec, d in zip(self.specs, setup.data.tasks):
            setup.env.log(f"{spec.name}: " + d.modality.describe(d.train, d.val, d.why_not_scored(self.opts)))

    def held_out(self, setup: Any) -> Any:
        """Every task scored every `eval_every` steps (default once an epoch) with its head; the overall picks
        the best state."""
        o, datas = self.opts, setup.data.tasks
        missing = [s.name for s, d in zip(self.specs, datas) if d.val is None]
        if missing and len(missing) < len(datas) or (missing and o.keep == "best"):
            raise UsageError(f"task(s) {', '.join(missing)} have no held-out data, and the overall score needs "
                             "every task's: give `val_fraction` (or their ImageFolders a val/ split)")
        if missing:
            return None
        scorer = TasksScorer({s.name: task_scorer(setup, d, d.task) for s, d in zip(self.specs, datas)},
                             setup.models.heads)
        held = held_out_eval(scorer, every=every(o, setup.data.samples, setup.ctx.world_size, setup.schedule.total),
                             keep=o.keep or "best", state=setup.state, saved=setup.store.extra_tensors,
                             total=setup.schedule.total, log=setup.env.log)
        before = measured_before(setup.state, lambda: scorer.per_task("eval before"))
        setup.env.log(f"Held-out: every task's, overall every {held.every} steps; keeping the {o.keep or 'best'} "
                      f"state; before: overall {overall_score(before):.4g}")
        return held

    def after_training(self, setup: Any, trainer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """(what was kept, every task's scores after): the best state back, the adapters merged, then scored."""
        held = setup.held_out
        kept = held.restore_best(setup.model) if held is not None else kept_last(setup.schedule.total)
        setup.model.eval()
        setup.models.method.merge(setup.model)
        return kept, (held.scorer.per_task("eval after") if held is not None else {})

    def write(self, setup: Any, trainer: Any, ended: tuple[dict[str, Any], dict[str, Any]]) -> MultitaskResult:
        """Record every task, write the checkpoint (the first task's head in place, every head beside it)."""
        from lowrank_cli.checkpoint.tasks import write_multitask

        kept, after = ended
        m, raw = setup.models, setup.model
        before = (setup.state.extra.get("held_out_before") if setup.held_out is not None else None) or {}
        stored = {s.name: m.heads.tensors(s.name) for s in self.specs}
        first = self.specs[0].name
        m.heads.use(first)  # the model says it is the first task's, as its head is
        m.heads.install(first)
        record_finetune(raw, self._first_record(setup, kept, before, after), spec=m.loaded.spec,
                        source=m.loaded.source)
        record = self._record(setup, kept, before, after)

        def write() -> None:
            write_multitask(setup.env.output, raw, record, stored,
                            dtype=m.save_dtype if m.save_dtype != torch.float32 else None)
            setup.store.remove()

        distributed.on_main(setup.ctx, write)
        setup.env.log(f"Wrote {setup.env.output} (shared: {len(self.specs)} tasks)")
        return MultitaskResult(raw.eval(), setup.env.output, "shared", after, before, record)

    def _first_record(self, setup: Any, kept: dict, before: dict, after: dict) -> dict[str, Any]:
        """`lrc.finetune` of the model the file gives as a MODEL: the first task's."""
        m, state, d, name = setup.models, setup.state, setup.data.tasks[0], self.specs[0].name
        first = finetune_settings(setup, d, d.task, Head(m.heads.head.modules, m.heads.outputs[name]),
                                  teacher=False)
        first.update(task_name=name, samples_seen=state.images_seen, seconds=round(state.seconds, 3), merged=True,
                     multitask="shared", scores={"before": before.get(name), "after": after.get(name), "kept": kept})
        return first

    def _record(self, setup: Any, kept: dict, before: dict, after: dict) -> dict[str, Any]:
        """`lrc.multitask`: every task with its head, and the run."""
        from lowrank_cli.training.task_combine import multitask_record

        m, state = setup.models, setup.state
        records = [{"task": d.task.record()["task"], "classes": d.task.classes, "adapters": m.method.config.record(),
                    "head": {"modules": m.heads.head.modules, "outputs": m.heads.outputs[s.name]},
                    "finetune": {"data": str(s.path.resolve()), "pairs": bool(getattr(d.train, "pairs", False)),
                                 "scores": {"kept": kept}, "trainable_parameters": m.trained,
                                 "parameters": m.parameters, "train_samples": len(d.train),
                                 "steps": setup.schedule.total}}
                   for s, d in zip(self.specs, setup.data.tasks)]
        record = multitask_record(self.specs, records, self.opts, before, after, {})
        record.update(kept=kept, seconds=round(state.seconds, 3), samples_seen=state.images_seen)
        return record
