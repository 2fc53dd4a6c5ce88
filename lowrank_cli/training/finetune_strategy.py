"""Fine-tuning as a strategy of the one loop: labelled data, the model with a new head and the method's adapters
(training.tuning), the task loss (with an optional teacher's logits), held-out scores with the best state kept,
then merge and write (or the adapters alone).

Where the data comes from and what is said of the output is a small `source`: `DataFile` for `finetune`, and
training.task_run.TaskOfRun for one task of a multi-task run whose tasks train apart (it also makes the adapters
orthogonal, mode orthogonal, and records the task).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_cli import distributed
from lowrank_cli.adapters.files import weights_hash, write_adapter_file
from lowrank_cli.checkpoint.format import move_record, record_finetune
from lowrank_cli.data.modality import check_model
from lowrank_cli.data.sampling import derive_seed, seeded
from lowrank_cli.data.task_data import task_modality_for, task_of
from lowrank_cli.errors import InputError
from lowrank_cli.models.heads import Head, replace_head
from lowrank_cli.training.callbacks import held_out_eval, kept_last, measured_before
from lowrank_cli.training.parallel import distribution
from lowrank_cli.training.result import FinetuneResult
from lowrank_cli.training.setup import loss_summary, write_checkpoint
from lowrank_cli.training.strategy import RunData, Task, training_loader
from lowrank_cli.training.task_loss import TaskLoss
from lowrank_cli.training.teacher import load_participant, name_of
from lowrank_cli.training.tuning import Tuned, adapt, check_keep, every, finetune_settings, load_tuned, task_scorer


class DataFile:
    """`finetune`'s data: a labelled file or folder; held-out data from `val_data`, a val/ split or `val_fraction`."""

    api, phase = "finetune", "finetune"

    def __init__(self, path: Path):
        self.path = path

    def read(self, opts: Any) -> RunData:
        modality = task_modality_for(self.path)
        train, val, val_from = modality.find(self.path, evaluate=opts.evaluate_accuracy, seed=opts.seed,
                                             val_data=None if opts.val_data is None else Path(opts.val_data),
                                             val_fraction=opts.val_fraction)
        classes, regression = task_of(train)
        return RunData(modality, train, val, use_labels=True, val_from=val_from, task=Task(classes, regression,
                       self.path), why_no_accuracy="no held-out data: give `val_data`, a val/ split or `val_fraction`")

    def configure(self, config: Any) -> Any:
        return config

    def settings(self, opts: Any, d: RunData) -> dict[str, Any]:
        return {}

    def wrote(self, log: Any, output: Path, merged: bool) -> None:
        log(f"Wrote {output}" if merged else f"Wrote {output} (adapters and head; apply them with load(base, "
            "adapters=...))")


class FinetuneStrategy:
    """One fine-tuning (its options: training.options.FinetuneOptions, `lr` already resolved) of `model`."""

    def __init__(self, opts: Any, model: Any, source: Any):
        self.opts, self.source_model, self.source = opts, model, source
        self.distribution = distribution(opts)
        self.api, self.phase = source.api, source.phase

    def read_data(self, env: Any) -> RunData:
        return self.source.read(self.opts)

    def fixed_for_resume(self, env: Any, d: RunData) -> dict[str, Any]:
        return self.opts.fixed_for_resume(env.ctx.world_size, d.samples)

    def load_models(self, env: Any, d: RunData) -> Tuned:
        opts = self.opts
        loaded = load_tuned(env, opts, self.source_model)
        save_dtype, base = next(loaded.model.parameters()).dtype, weights_hash(loaded.model)
        head = self._new_head(loaded, d)
        tuned = adapt(env, opts, loaded, head, d.modality, save_dtype=save_dtype, base=base,
                      configure=self.source.configure)
        tuned.teacher = self._teacher(env, d)
        return tuned

    def _new_head(self, loaded: Any, d: RunData) -> Head:
        """A head sized to the task (recorded at once, so that class checks see the new classes)."""
        task = d.task
        check_model(d.modality, loaded.model, name_of(loaded), task.data, role="the model")
        old = loaded.model
        with seeded(derive_seed(self.opts.seed, "head")):  # the same new head for every method and run
            head = replace_head(loaded, task.outputs, classes=task.classes, regression=task.regression)
        if loaded.model is not old:
            move_record(old, loaded.model, head.renamed)
        record_finetune(loaded.model, task.record(), spec=loaded.spec, source=loaded.source)
        return head

    def _teacher(self, env: Any, d: RunData) -> nn.Module | None:
        """The optional teacher: a model already fine-tuned on this task (same kind of data, same outputs)."""
        opts, task = self.opts, d.task
        if opts.teacher is None:
            return None
        t = load_participant(opts.teacher, "teacher", None, None, env.log, opts.library)
        check_model(d.modality, t.model, name_of(t), task.data)
        config = getattr(t.model, "config", None)
        found = getattr(config, "num_labels", None) if config is not None else getattr(t.model, "num_classes", None)
        if found != task.outputs:
            raise InputError(f"the teacher {name_of(t)} has {found} outputs and the task {task.outputs}: the teacher "
                             "must be a model already fine-tuned on this task (same classes, in the same order)")
        env.log(f"Teacher: {name_of(t)} (logit distillation, gamma {opts.kd_weight:g})")
        return t.model.to(device=env.ctx.device, dtype=torch.float32).eval().requires_grad_(False)

    def loss(self, env: Any, d: RunData, m: Tuned) -> TaskLoss:
        o = self.opts
        return TaskLoss(regression=d.task.regression, gamma=o.kd_weight, temperature=o.temperature,
                        label_smoothing=o.label_smoothing)

    def loader(self, env: Any, d: RunData, m: Tuned, total: int) -> tuple[Any, Any]:
        return training_loader(env, self.opts, d, m.model, m.input_size, total)

    def method_callbacks(self, schedule: Any) -> list[Any]:
        return []

    def trainable(self, env: Any, d: RunData, m: Tuned, loss: Any) -> list[tuple[str, nn.Parameter]]:
        return m.named

    def changeable_on_resume(self, d: RunData, m: Tuned, schedule: Any) -> dict[str, Any]:
        return self.opts.changeable_on_resume(total=schedule.total, warmup=schedule.warmup,
                                              data=str(d.task.data.resolve()))

    def before_training(self, setup: Any) -> None:
        d = setup.data
        setup.env.log(d.modality.describe(d.train, d.val, d.why_not_scored(self.opts)))

    def held_out(self, setup: Any) -> Any:
        """Score on held-out data every `eval_every` steps (default: once per epoch) and keep the best state."""
        o, d = self.opts, setup.data
        check_keep(o, d)
        if d.val is None:
            return None
        scorer = task_scorer(setup, d, d.task)
        held = held_out_eval(scorer, every=every(o, d.samples, setup.ctx.world_size, setup.schedule.total),
                             keep=o.keep or "best", state=setup.state, saved=setup.store.extra_tensors,
                             total=setup.schedule.total, log=setup.env.log)
        before = measured_before(setup.state, lambda: scorer("eval before"))
        metric = scorer.score.name
        setup.env.log(f"Held-out: {d.val_from} ({len(d.val)} samples), {metric} every {held.every} steps; keeping "
                      f"the {o.keep or 'best'} state; before: {metric} {before[metric]:.4g}")
        return held

    def after_training(self, setup: Any, trainer: Any) -> dict[str, Any]:
        """Put the best state back (keep best), merge the adapters (unless `merge` is False), score what is written."""
        held, d = setup.held_out, setup.data
        kept = held.restore_best(setup.model) if held is not None else kept_last(setup.schedule.total)
        setup.model.eval()
        if self.opts.merge:
            setup.models.method.merge(setup.model)
        if held is None:
            return {"kept": kept}
        return {"data": d.val_from, "samples": len(d.val), "metric": held.scorer.score.name, "every": held.every,
                "before": setup.state.extra["held_out_before"], "after": held.scorer("eval after"), "kept": kept}

    def write(self, setup: Any, trainer: Any, scores: dict[str, Any]) -> FinetuneResult:
        d, m, state = setup.data, setup.models, setup.state
        losses = loss_summary(setup, trainer.history)
        settings = finetune_settings(setup, d, d.task, m.head, teacher=m.teacher is not None)
        settings.update(self.source.settings(self.opts, d))
        settings.update(scores=scores, samples_seen=state.images_seen, seconds=round(state.seconds, 3),
                        final_losses={k: v["last"] for k, v in losses.items()})
        self._output(setup, settings)
        return FinetuneResult(
            model=m.model, output=setup.env.output, steps=setup.schedule.total, resumed_from=trainer.resumed_from,
            samples_seen=state.images_seen, seconds=state.seconds, trainable=settings["trainable_parameters"],
            parameters=settings["parameters"], scores=scores, losses=losses, history=trainer.history,
            metrics=setup.metrics, settings=settings)

    def _output(self, setup: Any, settings: dict[str, Any]) -> None:
        """The model (adapters merged), or with `merge` False the adapters and head alone (an adapter file)."""
        m, output = setup.models, setup.env.output
        record_finetune(m.model, settings, spec=m.loaded.spec, source=m.loaded.source)
        if self.opts.merge:
            write_checkpoint(setup)
        else:
            record = {"method": settings["method"], "adapters": settings["adapters"], "head": settings["head"],
                      "task": settings["task"], "classes": settings["classes"], "base": settings["base"],
                      "finetune": settings}

            def write() -> None:
                write_adapter_file(output, m.model, m.method, m.head.modules, record)
                setup.store.remove()

            distributed.on_main(setup.ctx, write)
        self.source.wrote(setup.env.log, output, self.opts.merge)
