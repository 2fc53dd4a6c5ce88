"""Multi-task mode shared: one set of adapters (or every weight) trained on every task's batches, one head per
task. FinetuneRun's machinery (optimizer, resume, signals, DDP, compile, metrics, the best state) with the tasks'
batches in one stream (data.multitask_loader: `schedule` orders them), each batch running its task's head
(training.task_heads) and loss; held-out scores per task and their overall, which picks the best state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_cli import distributed
from lowrank_cli.data.multitask_loader import MultiTaskLoader
from lowrank_cli.data.task_data import check_same_modality
from lowrank_cli.data.tasks import TaskSpec
from lowrank_cli.errors import UsageError
from lowrank_cli.evaluation.task_scores import overall_score, score_loader
from lowrank_cli.models.heads import Head
from lowrank_cli.training.finetune_run import FinetuneRun, Task
from lowrank_cli.training.heldout import KeepBest, Score, restore_best
from lowrank_cli.training.multitask_options import DEFAULT_SCHEDULE
from lowrank_cli.training.recovery_run import RunData
from lowrank_cli.training.result import MultitaskResult
from lowrank_cli.training.state import read_extra_tensors
from lowrank_cli.training.task_heads import TaskHeads
from lowrank_cli.training.task_loss import MultiTaskLoss, TaskLoss
from lowrank_cli.training.task_run import read_task
from lowrank_cli.training.teacher import load_participant


class AllTasks:
    """Stands for the training data of every task where a run needs its size."""

    def __init__(self, datas: list[RunData]):
        self.size = sum(len(d.train) for d in datas)

    def __len__(self) -> int:
        return self.size


class SharedRun(FinetuneRun):
    api = "finetune_tasks"
    phase = "finetune tasks"
    unused_parameters = True  # a batch runs one task's head: the others get no gradient in that step

    def __init__(self, *args: Any, specs: list[TaskSpec], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.specs = specs

    def run(self, model: Any, output: Path, state_path: Path) -> MultitaskResult:
        opts = self.opts
        read = [read_task(spec, opts) for spec in self.specs]  # every task's data, before any model loads
        datas, tasks = [d for d, _ in read], [t for _, t in read]
        check_same_modality(self.specs, [d.modality for d in datas])
        for d in datas[1:]:
            d.modality = datas[0].modality  # one tokenizer (or image setting) for the one model
        whole = RunData(datas[0].modality, AllTasks(datas), None, use_labels=True)
        fixed = {**opts.fixed_for_resume(self.ctx.world_size, len(whole.train)),
                 "tasks": [str(s) for s in self.specs], "schedule": opts.schedule or DEFAULT_SCHEDULE}
        saved_state = self._saved_state(state_path, fixed)
        loaded = load_participant(model, "model", opts.arch, opts.model_args, self.log, opts.library)
        save_dtype = next(loaded.model.parameters()).dtype
        heads = self._heads(loaded, datas, tasks)
        raw = loaded.model.to(dtype=torch.float32)
        method, named = self._adapt(raw, heads.head)
        raw.to(device=self.ctx.device).train()
        whole.modality.prepare(loaded, tokenizer=opts.tokenizer, max_length=opts.max_length)
        whole.input_size = whole.modality.input_size(raw)
        for d in datas:
            d.input_size = whole.input_size
        loss = MultiTaskLoss({s.name: TaskLoss(regression=t.regression, label_smoothing=opts.label_smoothing)
                              for s, t in zip(self.specs, tasks)}, heads.state)
        total = self._total_steps(len(whole.train))
        stream = MultiTaskLoader({s.name: self._loader(d, raw, total) for s, d in zip(self.specs, datas)},
                                 schedule=opts.schedule or DEFAULT_SCHEDULE, seed=opts.seed)
        warmup, groups, optimizer = self._optimizer(named, total)
        changeable = opts.changeable_on_resume(total=total, warmup=warmup, data=";".join(map(str, self.specs)))
        state = self._state(state_path, saved_state, raw, optimizer, groups, [n for n, _ in named], fixed,
                            changeable, total, warmup)
        for spec, d in zip(self.specs, datas):
            self.log(f"{spec.name}: " + d.modality.describe(d.train, d.val, self._why_no_accuracy(d)))
        metrics = self._start_metrics(output, state)
        trainer = self._trainer(whole, raw, None, loss, [], stream, stream, state, optimizer, named, state_path,
                                metrics, total, warmup)
        trainer.phase = self.phase
        trainer.distiller.on_batch = lambda batch: heads.use(batch.task)
        measure = self._held_out_tasks(datas, tasks, heads, trainer, state, state_path, total)
        try:
            trainer.run()
        finally:
            trainer.distiller.close()
        kept = restore_best(trainer, self.log)
        raw.eval()
        method.merge(raw)
        after = measure("eval after") if measure is not None else {}
        return self._finish(raw, loaded, heads, method, datas, tasks, state, trainer, metrics, kept, after, total,
                            warmup, output, state_path, save_dtype)

    def _heads(self, loaded: Any, datas: list[RunData], tasks: list[Task]) -> TaskHeads:
        from lowrank_cli.checkpoint.format import record_finetune
        from lowrank_cli.data.modality import check_model
        from lowrank_cli.training.teacher import name_of

        for d, t in zip(datas, tasks):
            check_model(d.modality, loaded.model, name_of(loaded), t.data, role="the model")
        heads = TaskHeads.build(loaded, [(s.name, t.classes, t.regression) for s, t in zip(self.specs, tasks)],
                                seed=self.opts.seed)
        record_finetune(loaded.model, tasks[0].record(), spec=loaded.spec, source=loaded.source)
        return heads

    def _held_out_tasks(self, datas: list[RunData], tasks: list[Task], heads: TaskHeads, trainer: Any, state: Any,
                        state_path: Path, total: int):
        """Every task scored every `eval_every` steps (default once an epoch) with its head; the overall picks
        the best state. Returns `measure(phase) -> {task: scores}`, or None without held-out data."""
        o = self.opts
        missing = [s.name for s, d in zip(self.specs, datas) if d.val is None]
        if missing and len(missing) < len(datas) or (missing and o.keep == "best"):
            raise UsageError(f"task(s) {', '.join(missing)} have no held-out data, and the overall score needs "
                             "every task's: give `val_fraction` (or their ImageFolders a val/ split)")
        if missing:
            return None
        loaders = {s.name: None if d.modality.name == "images" else d.modality.held_out_loader(
            d.val, trainer.model, batch_size=o.eval_batch_size or o.batch_size, num_workers=self.workers)
            for s, d in zip(self.specs, datas)}

        def measure(phase: str) -> dict[str, dict[str, float]]:
            found, current = {}, heads.state.current
            for spec, d, task in zip(self.specs, datas, tasks):
                heads.use(spec.name)
                if loaders[spec.name] is None:
                    r = self._evaluate(trainer.model, d.val, f"{phase} {spec.name}", trainer.model)
                    found[spec.name] = {"val_top1": r["top1"], "val_top5": r["top5"]}
                else:
                    r = score_loader(trainer.model, loaders[spec.name], self.ctx.device, task.regression)
                    found[spec.name] = {f"val_{k}": v for k, v in r.items() if k != "samples"}
            heads.use(current)
            return found

        def flat(step: int) -> dict[str, float]:
            per = measure("eval")
            return {**{f"{k}_{name}": v for name, s in per.items() for k, v in s.items()},
                    "val_overall": overall_score(per)}

        per_epoch = max(1, len(AllTasks(datas)) // (o.batch_size * self.ctx.world_size) // o.grad_accum)
        trainer.evaluate, trainer.eval_every = flat, o.eval_every or min(per_epoch, total)
        if (o.keep or "best") == "best":
            saved = read_extra_tensors(state_path) if o.resume and state.step > 0 else {}
            best = {k[len("best."):]: v for k, v in saved.items() if k.startswith("best.")}
            trainer.best = KeepBest(Score("val_overall", True), state.extra.get("best"), best)
        before = state.extra.get("held_out_before") or measure("eval before")
        state.extra["held_out_before"] = before
        self.before = before
        self.log(f"Held-out: every task's, overall every {trainer.eval_every} steps; keeping the {o.keep or 'best'} "
                 f"state; before: overall {overall_score(before):.4g}")
        return measure

    def _finish(self, raw: nn.Module, loaded: Any, heads: TaskHeads, method: Any, datas: list[RunData],
                tasks: list[Task], state: Any, trainer: Any, metrics: Path, kept: dict[str, Any],
                after: dict[str, Any], total: int, warmup: int, output: Path, state_path: Path,
                save_dtype: torch.dtype) -> MultitaskResult:
        """Record every task, write the checkpoint (the first task's head in place, every head beside it)."""
        from lowrank_cli.checkpoint.format import record_finetune
        from lowrank_cli.checkpoint.tasks import write_multitask
        from lowrank_cli.training.task_combine import multitask_record

        before = getattr(self, "before", {}) or {}
        trained, parameters = self.counts
        stored = {s.name: heads.tensors(s.name) for s in self.specs}
        heads.use(self.specs[0].name)  # the model says it is the first task's, as its head is
        heads.install(self.specs[0].name)
        first = self._settings_of(datas[0], tasks[0], loaded, None, method, Head(heads.head.modules,
                                  heads.outputs[self.specs[0].name]), total, warmup, "")
        name = self.specs[0].name
        first.update(task_name=name, samples_seen=state.images_seen, seconds=round(state.seconds, 3), merged=True,
                     multitask="shared", scores={"before": before.get(name), "after": after.get(name), "kept": kept})
        record_finetune(raw, first, spec=loaded.spec, source=loaded.source)
        records = [{"task": t.record()["task"], "classes": t.classes, "adapters": method.config.record(),
                    "head": {"modules": heads.head.modules, "outputs": heads.outputs[s.name]},
                    "finetune": {"data": str(s.path.resolve()), "pairs": bool(getattr(d.train, "pairs", False)),
                                 "scores": {"kept": kept}, "trainable_parameters": trained, "parameters": parameters,
                                 "train_samples": len(d.train), "steps": total}}
                   for s, d, t in zip(self.specs, datas, tasks)]
        record = multitask_record(self.specs, records, self.opts, before, after, {})
        record.update(kept=kept, seconds=round(state.seconds, 3), samples_seen=state.images_seen)

        def write() -> None:
            write_multitask(output, raw, record, stored,
                            dtype=save_dtype if save_dtype != torch.float32 else None)
            state_path.unlink(missing_ok=True)

        distributed.on_main(self.ctx, write)
        self.log(f"Wrote {output} (shared: {len(self.specs)} tasks)")
        return MultitaskResult(raw.eval(), output, "shared", after, before, record)
