"""One fine-tuning, phase by phase: labelled data, the model with its new head, the method's adapters, the task
loss, the recovery's own machinery for the rest (RecoveryRun: resume, optimizer state, metrics, the trainer with
its saves and signals), held-out scores with the best state kept, then merge and write (or the adapters alone)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lowrank_cli import distributed
from lowrank_cli.adapters.base import AdapterConfig, Method
from lowrank_cli.adapters.files import weights_hash, write_adapter_file
from lowrank_cli.adapters.methods import DEFAULT_RANK, LOW_RANK_ADAPTERS, method_for
from lowrank_cli.adapters.targets import adapter_targets, norm_names
from lowrank_cli.checkpoint.format import move_record, record_finetune
from lowrank_cli.data.modality import check_model
from lowrank_cli.data.sampling import derive_seed, seeded
from lowrank_cli.data.task_data import task_modality_for, task_of
from lowrank_cli.errors import InputError, UsageError
from lowrank_cli.evaluation.task_scores import score_loader
from lowrank_cli.models.heads import Head, replace_head
from lowrank_cli.training.heldout import KeepBest, Score, restore_best
from lowrank_cli.training.recovery_run import RecoveryRun, RunData
from lowrank_cli.training.result import FinetuneResult
from lowrank_cli.training.schedule import param_groups
from lowrank_cli.training.state import read_extra_tensors
from lowrank_cli.training.task_loss import TaskLoss
from lowrank_cli.training.teacher import load_participant, name_of


@dataclass
class Task:
    classes: list[str] | None
    regression: bool
    data: Path

    @property
    def outputs(self) -> int:
        return 1 if self.regression else len(self.classes)

    def record(self) -> dict[str, Any]:
        return {"task": "regression" if self.regression else "classification", "classes": self.classes}


@dataclass
class HeldOutScores:
    measure: Callable[[str], dict[str, float]]  # phase -> {"val_...": value}
    metric: str
    every: int
    before: dict[str, float]


class FinetuneRun(RecoveryRun):
    """One call of `finetune` (its options: training.options.FinetuneOptions, `lr` already resolved)."""

    api = "finetune"  # what the resume hint calls
    phase = "finetune"  # what the progress bar calls the training steps

    def run(self, model: Any, data: Path, output: Path, state_path: Path) -> FinetuneResult:
        opts = self.opts
        d, task = self._task_data(data)  # a wrong data file fails before any model is loaded
        fixed = opts.fixed_for_resume(self.ctx.world_size, len(d.train))
        saved_state = self._saved_state(state_path, fixed)
        loaded = load_participant(model, "model", opts.arch, opts.model_args, self.log, opts.library)
        save_dtype, base = next(loaded.model.parameters()).dtype, weights_hash(loaded.model)
        head = self._new_head(loaded, d, task)
        raw = loaded.model.to(dtype=torch.float32)
        method, named = self._adapt(raw, head)  # on the CPU: seeded the same way on any device
        raw.to(device=self.ctx.device).train()
        d.modality.prepare(loaded, tokenizer=opts.tokenizer, max_length=opts.max_length)
        d.input_size = d.modality.input_size(raw)
        teacher = self._teacher(d, task)
        loss = TaskLoss(regression=task.regression, gamma=opts.kd_weight, temperature=opts.temperature,
                        label_smoothing=opts.label_smoothing)
        total = self._total_steps(len(d.train))
        loader, sampler = self._loader(d, raw, total)
        warmup, groups, optimizer = self._optimizer(named, total)
        changeable = opts.changeable_on_resume(total=total, warmup=warmup, data=str(data.resolve()))
        state = self._state(state_path, saved_state, raw, optimizer, groups, [n for n, _ in named], fixed,
                            changeable, total, warmup)
        self.log(d.modality.describe(d.train, d.val, self._why_no_accuracy(d)))
        metrics = self._start_metrics(output, state)
        trainer = self._trainer(d, raw, teacher, loss, [], loader, sampler, state, optimizer, named, state_path,
                                metrics, total, warmup)
        trainer.phase = self.phase
        held = self._held_out(d, task, trainer, state, state_path, total)
        try:
            trainer.run()
        finally:
            trainer.distiller.close()
        scores = self._scores_after(trainer, held, d, method)
        settings = self._settings_of(d, task, loaded, teacher, method, head, total, warmup, base)
        settings.update(scores=scores, samples_seen=state.images_seen, seconds=round(state.seconds, 3),
                        final_losses={k: v["last"] for k, v in self._losses(metrics if self.main else None,
                                                                             trainer.history, loss).items()})
        self._output(raw, loaded, method, head, settings, output, state_path, save_dtype)
        return FinetuneResult(
            model=raw, output=output, steps=total, resumed_from=trainer.resumed_from, samples_seen=state.images_seen,
            seconds=state.seconds, trainable=settings["trainable_parameters"], parameters=settings["parameters"],
            scores=scores, losses=self._losses(metrics if self.main else None, trainer.history, loss),
            history=trainer.history, metrics=metrics, settings=settings)

    # -- set-up ------------------------------------------------------------------------------------------

    def _optimizer(self, named: list[tuple[str, nn.Parameter]], total: int) -> tuple[int, list[dict], Any]:
        """(warm-up steps, parameter groups, AdamW) of a fine-tuning of `total` steps."""
        o = self.opts
        warmup = o.warmup_steps if o.warmup_steps is not None else int(round(o.warmup_fraction * total))
        groups = param_groups(named, o.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=o.lr, fused=True if self.ctx.device.type == "cuda" else None)
        return min(warmup, max(total - 1, 0)), groups, optimizer

    def _task_data(self, data: Path) -> tuple[RunData, Task]:
        o = self.opts
        modality = task_modality_for(data)
        train, val, val_from = modality.find(data, evaluate=o.evaluate_accuracy, seed=o.seed,
                                             val_data=None if o.val_data is None else Path(o.val_data),
                                             val_fraction=o.val_fraction)
        classes, regression = task_of(train)
        d = RunData(modality, train, val, use_labels=True, val_from=val_from,
                    why_no_accuracy="no held-out data: give `val_data`, a val/ split or `val_fraction`")
        return d, Task(classes, regression, data)

    def _new_head(self, loaded: Any, d: RunData, task: Task) -> Head:
        """A head sized to the task (recorded at once, so that class checks see the new classes)."""
        check_model(d.modality, loaded.model, name_of(loaded), task.data, role="the model")
        old = loaded.model
        with seeded(derive_seed(self.opts.seed, "head")):  # the same new head for every method and run
            head = replace_head(loaded, task.outputs, classes=task.classes, regression=task.regression)
        if loaded.model is not old:
            move_record(old, loaded.model, head.renamed)
        record_finetune(loaded.model, task.record(), spec=loaded.spec, source=loaded.source)
        return head

    def _teacher(self, d: RunData, task: Task) -> nn.Module | None:
        """The optional teacher: a model already fine-tuned on this task (same kind of data, same outputs)."""
        if self.opts.teacher is None:
            return None
        t = load_participant(self.opts.teacher, "teacher", None, None, self.log, self.opts.library)
        check_model(d.modality, t.model, name_of(t), task.data)
        config = getattr(t.model, "config", None)
        found = getattr(config, "num_labels", None) if config is not None else getattr(t.model, "num_classes", None)
        if found != task.outputs:
            raise InputError(f"the teacher {name_of(t)} has {found} outputs and the task {task.outputs}: the teacher "
                             "must be a model already fine-tuned on this task (same classes, in the same order)")
        self.log(f"Teacher: {name_of(t)} (logit distillation, gamma {self.opts.kd_weight:g})")
        return t.model.to(device=self.ctx.device, dtype=torch.float32).eval().requires_grad_(False)

    def _adapter_config(self, raw: nn.Module, head: Head) -> AdapterConfig:
        """The method's adapters and where they go (`targets`: adapters.targets; RLRR's norms)."""
        o = self.opts
        low = o.method in LOW_RANK_ADAPTERS
        targets = adapter_targets(raw, o.targets, head.modules) if o.method in ("lora", "dora", "rlrr") else []
        rank = (o.adapter_rank or DEFAULT_RANK) if low else None
        return AdapterConfig(o.method, rank, (o.adapter_alpha or float(rank)) if low else None, o.adapter_dropout,
                             tuple(targets), tuple(norm_names(raw, head.modules)) if o.method == "rlrr" else ())

    def _adapt(self, raw: nn.Module, head: Head) -> tuple[Method, list[tuple[str, nn.Parameter]]]:
        """Put the method's adapters on the model; freeze everything that does not train."""
        o = self.opts
        config = self._adapter_config(raw, head)
        targets = config.targets
        method = method_for(config)
        with seeded(derive_seed(o.seed, "adapters")):
            method.apply(raw)
        named = method.trainable(raw, head.modules)
        chosen = {n for n, _ in named}
        for name, p in raw.named_parameters():
            p.requires_grad_(name in chosen)
        trained, total = sum(p.numel() for _, p in named), sum(p.numel() for p in raw.parameters())
        self.counts = (trained, total)  # while training, adapters included (they are merged away at the end)
        where = (f"adapters on {len(targets)} linear(s){f' and {len(config.norms)} norm(s)' if config.norms else ''}"
                 f", the new head ({', '.join(head.modules)})" if targets else
                 "every parameter" if o.method == "full" else f"the new head ({', '.join(head.modules)})")
        self.log(f"Method {o.method}: {trained:,} trainable parameters of {total:,} ({100 * trained / total:.2f} %): "
                 f"{where}")
        return method, named

    def _held_out(self, d: RunData, task: Task, trainer: Any, state: Any, state_path: Path,
                  total: int) -> HeldOutScores | None:
        """Score on held-out data every `eval_every` steps (default: once per epoch) and keep the best state."""
        o = self.opts
        if o.keep == "best" and d.val is None:
            raise UsageError(f"`keep` best needs held-out data ({self._why_no_accuracy(d)}); or keep the last state")
        if d.val is None:
            return None
        images = d.modality.name == "images"
        metric = "val_top1" if images else "val_spearman" if task.regression else "val_accuracy"
        loader = None if images else d.modality.held_out_loader(d.val, trainer.model, batch_size=o.eval_batch_size
                                                                 or o.batch_size, num_workers=self.workers)

        def measure(phase: str) -> dict[str, float]:
            if images:
                result = self._evaluate(trainer.model, d.val, phase, trainer.model)
                return {"val_top1": result["top1"], "val_top5": result["top5"]}
            result = score_loader(trainer.model, loader, self.ctx.device, task.regression)
            return {f"val_{k}": v for k, v in result.items() if k != "samples"}

        per_epoch = max(1, len(d.train) // (o.batch_size * self.ctx.world_size) // o.grad_accum)
        every = o.eval_every or min(per_epoch, total)
        trainer.evaluate, trainer.eval_every = (lambda step: measure("eval")), every
        if (o.keep or "best") == "best":
            saved = read_extra_tensors(state_path) if o.resume and state.step > 0 else {}
            best = {k[len("best."):]: v for k, v in saved.items() if k.startswith("best.")}
            trainer.best = KeepBest(Score(metric, True), state.extra.get("best"), best)
        before = state.extra.get("held_out_before") or measure("eval before")
        state.extra["held_out_before"] = before
        self.log(f"Held-out: {d.val_from} ({len(d.val)} samples), {metric} every {every} steps; keeping the "
                 f"{o.keep or 'best'} state; before: {metric} {before[metric]:.4g}")
        return HeldOutScores(measure, metric, every, before)

    # -- output ------------------------------------------------------------------------------------------

    def _scores_after(self, trainer: Any, held: HeldOutScores | None, d: RunData, method: Method) -> dict[str, Any]:
        """Put the best state back (keep best), merge the adapters (unless `merge` is False), score what is written."""
        kept = restore_best(trainer, self.log)
        trainer.model.eval()
        if self.opts.merge:
            method.merge(trainer.model)
        if held is None:
            return {"kept": kept}
        after = held.measure("eval after")
        return {"data": d.val_from, "samples": len(d.val), "metric": held.metric, "every": held.every,
                "before": held.before, "after": after, "kept": kept}

    def _settings_of(self, d: RunData, task: Task, loaded: Any, teacher: Any, method: Method, head: Head,
                     total: int, warmup: int, base: str) -> dict[str, Any]:
        """What the output records of this fine-tuning (`lrc.finetune`) and `--json` prints."""
        o = self.opts
        trained, parameters = self.counts
        settings = {
            "method": o.method, "adapters": method.config.record(), "merged": o.merge, "head": head.record(),
            **task.record(), "data": str(task.data.resolve()), "train_samples": len(d.train), "steps": total,
            "lr": o.lr, "schedule": "warmup-cosine", "warmup_steps": warmup, "batch_size": o.batch_size,
            "grad_accum": o.grad_accum, "processes": self.ctx.world_size, "weight_decay": o.weight_decay,
            "clip_grad": o.clip_grad, "label_smoothing": o.label_smoothing, "augment": d.augment,
            "teacher": str(o.teacher) if teacher is not None else None, "gamma": o.kd_weight,
            "temperature": o.temperature, "trainable_parameters": trained, "parameters": parameters,
            "trainable_share": trained / parameters if parameters else 0.0, "seed": o.seed,
            "precision": "bf16" if self.ctx.device.type == "cuda" else "fp32", "compile": o.compile,
            "base": {"source": loaded.source, "sha256": base},
        }
        if d.modality.name == "texts":
            settings.update(d.modality.settings(0.0))
        return settings

    def _output(self, raw: nn.Module, loaded: Any, method: Method, head: Head, settings: dict[str, Any],
                output: Path, state_path: Path, save_dtype: torch.dtype) -> None:
        record_finetune(raw, settings, spec=loaded.spec, source=loaded.source)
        if self.opts.merge:
            self._write(raw, output, state_path, save_dtype)
            return
        record = {"method": settings["method"], "adapters": settings["adapters"], "head": settings["head"],
                  "task": settings["task"], "classes": settings["classes"], "base": settings["base"],
                  "finetune": settings}

        def write() -> None:
            write_adapter_file(output, raw, method, head.modules, record)
            state_path.unlink(missing_ok=True)

        distributed.on_main(self.ctx, write)
        self.log(f"Wrote {output} (adapters and head; apply them with load(base, adapters=...))")


