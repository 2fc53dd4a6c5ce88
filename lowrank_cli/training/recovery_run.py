"""One recovery, phase by phase: data, models, loss, optimizer and state, held-out evaluation, training, output."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_cli import distributed
from lowrank_cli.checkpoint.format import record_recovery
from lowrank_cli.data.augment import parse_level
from lowrank_cli.data.modality import check_model, modality_for
from lowrank_cli.errors import InputError, UsageError
from lowrank_cli.evaluation.accuracy import check_classes, evaluate
from lowrank_cli.models.structure import innermost_blocks
from lowrank_cli.training.heldout import HeldOut, HeldOutPhase
from lowrank_cli.training.losses import RecoveryLoss
from lowrank_cli.training.metrics import metrics_lines, metrics_path, truncate_metrics
from lowrank_cli.training.options import RecoverOptions
from lowrank_cli.training.progressive import Progressive, factorized_layer_types
from lowrank_cli.training.result import RecoverResult
from lowrank_cli.training.schedule import param_groups
from lowrank_cli.training.state import (
    TrainState,
    changed_options,
    check_fingerprint,
    load_train_state,
    read_extra_tensors,
    read_train_state,
)
from lowrank_cli.training.step import Distiller, compile_hooked, params_reached
from lowrank_cli.training.teacher import load_pair, name_of
from lowrank_cli.training.trainer import ProgressFn, Trainer, resume_hint

SKIPPED_WARNING = 0.01  # the share of unreadable training samples above which a run warns (once, at the end)


@dataclass
class RunData:
    """The training data of a run and what was decided about it."""

    modality: Any
    train: Any
    val: Any
    use_labels: bool = False
    input_size: tuple[int, ...] = ()
    val_from: str = ""
    augment: str = "none"
    augment_reason: str = ""
    why_no_accuracy: str = "no labelled val/ split"
    val_labels_fit: bool = True  # False: the held-out images are scored by distillation, not accuracy

    @property
    def labelled_val(self) -> bool:
        """Held-out images with labels: scored by accuracy (the teacher's too)."""
        return (self.val is not None and self.modality.name == "images" and self.val.labelled
                and self.val_labels_fit)


class RecoveryRun:
    """One call of `recover`, in its phases: data, models, loss, optimizer and state, evaluation, training, output."""

    api = "recover"  # what the resume hint calls
    unused_parameters = False  # DDP: True when a step may leave parameters without a gradient (a head per task)

    def __init__(self, ctx: distributed.DistContext, opts: RecoverOptions, workers: int, log, warn,
                 progress: ProgressFn | None, resume_command: str | None, on_step) -> None:
        self.ctx, self.opts, self.workers = ctx, opts, workers
        self.main = ctx.is_main
        self.log = log if self.main else (lambda msg: None)
        self.warn = warn if self.main else (lambda msg: None)
        self.progress = progress if (progress is not None and self.main) else (lambda *a: None)
        self.resume_command, self.on_step = resume_command, on_step
        self.method: Progressive | None = None  # the progressive method's state, when it is the method

    def run(self, student, teacher, data: Path, output: Path, state_path: Path) -> RecoverResult:
        opts, dev = self.opts, self.ctx.device
        # Data first: a wrong folder fails before any model is loaded.
        modality = modality_for(data)
        train, val, val_from = modality.find(data, evaluate=opts.evaluate_accuracy, seed=opts.seed,
                                             val_data=None if opts.val_data is None else Path(opts.val_data),
                                             val_fraction=opts.val_fraction)
        fixed = opts.fixed_for_resume(self.ctx.world_size, len(train))
        saved_state = self._saved_state(state_path, fixed)
        s, t, pairs, dense = load_pair(student, teacher, opts, device=dev, log=self.log, warn=self.warn)
        raw, tea = s.model, t.model
        self.method = Progressive.from_options(opts) if opts.method == "progressive" else None
        if self.method is not None:  # the loss's pairs become the progressive layers; the dense linears go
            layers = dict(self.method.swap_in(raw, dense))
            pairs = [(name, layers[name], weight) for name, _, weight in pairs]
        check_model(modality, tea, name_of(t), data)
        save_dtype = next(raw.parameters()).dtype
        raw.to(device=dev, dtype=torch.float32).train()
        tea.to(device=dev, dtype=torch.float32).eval().requires_grad_(False)
        modality.prepare(t, tokenizer=opts.tokenizer, max_length=opts.max_length)
        d = RunData(modality, train, val, input_size=modality.input_size(tea), val_from=val_from)
        blocks = innermost_blocks(raw)
        loss = self._loss(d, raw, tea, blocks, pairs, name_of(s))
        total = self._total_steps(len(train))
        loader, sampler = self._loader(d, tea, total)
        warmup = opts.warmup_steps if opts.warmup_steps is not None else int(round(opts.warmup_fraction * total))
        warmup = min(warmup, max(total - 1, 0))
        if self.method is not None:
            self.method.start(total)
        named = self._trainable(raw, tea, loss, blocks, d.input_size)
        groups = param_groups(named, opts.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=opts.lr, betas=(0.9, 0.999), fused=True if dev.type == "cuda" else None)
        changeable = opts.changeable_on_resume(total=total, warmup=warmup, teacher=name_of(t),
                                               data=str(data.resolve()))
        state = self._state(state_path, saved_state, raw, optimizer, groups, [n for n, _ in named], fixed,
                            changeable, total, warmup)
        if self.method is not None:  # the lambda of the saved step (a resumed run may have no step left to set it)
            self.method.before_step(state.step)
        accuracy = self._accuracy_before(d, raw, tea, state)
        metrics = self._start_metrics(output, state)
        settings = self._settings(d, t, data, total, warmup, named)
        trainer = self._trainer(d, raw, tea, loss, blocks, loader, sampler, state, optimizer, named, state_path,
                                metrics, total, warmup)
        phase = self._held_out_phase(d, tea, trainer, state, state_path, total)
        try:
            if phase is not None:
                phase.measure_before(trainer, state)
            trainer.run()
            kept = phase.restore_best(trainer) if phase is not None else None  # before the layers are converted
            if self.method is not None:
                self.method.finish(raw)  # W_res dropped: LowRankLinear layers from here on
            if phase is not None:  # scored as written
                settings.update(phase.finish(trainer, kept))
        finally:
            trainer.distiller.close()
        raw.eval()
        if state.skipped > SKIPPED_WARNING * (state.images_seen + state.skipped):
            self.warn(f"{state.skipped} of {state.images_seen + state.skipped} training samples were unreadable and "
                      "skipped (corrupt or truncated files): the run learnt from the rest; fix or remove those files")
        if d.labelled_val:
            accuracy["after"] = self._evaluate(raw, d.val, "eval after", tea)
        losses = self._losses(metrics if self.main else None, trainer.history, loss)
        record_recovery(raw, {**settings, "images_seen": state.images_seen, "skipped_images": state.skipped,
                              "seconds": round(state.seconds, 3), "accuracy": accuracy,
                              "final_losses": {k: v["last"] for k, v in losses.items()}},
                        spec=s.spec, source=s.source)
        self._write(raw, output, state_path, save_dtype)
        return RecoverResult(
            model=raw, output=output, steps=total, resumed_from=trainer.resumed_from, images_seen=state.images_seen,
            skipped=state.skipped, seconds=state.seconds, accuracy=accuracy, losses=losses, history=trainer.history,
            metrics=metrics, settings=settings,
        )

    # -- set-up ------------------------------------------------------------------------------------------

    def _total_steps(self, samples: int) -> int:
        if self.opts.steps is not None:
            return self.opts.steps
        per_epoch = max(1, samples // (self.opts.batch_size * self.ctx.world_size))  # whole global batches only
        return max(1, math.ceil(self.opts.epochs * per_epoch / self.opts.grad_accum))

    def _loader(self, d: RunData, tea: nn.Module, total: int):
        """The training batches, with the augmentation that fits the data (`auto`: from the images and the run)."""
        o = self.opts
        passes = total * o.batch_size * o.grad_accum * self.ctx.world_size / max(len(d.train), 1)
        d.augment, d.augment_reason = d.modality.augmentation(parse_level(o.augment), d.train, d.input_size, passes)
        if d.modality.augments:
            self.log(f"Augmentation: {d.augment} ({d.augment_reason})")
        return d.modality.loader(d.train, tea, batch_size=o.batch_size, seed=o.seed, rank=self.ctx.rank,
                                 world_size=self.ctx.world_size, num_workers=self.workers,
                                 pin_memory=self.ctx.device.type == "cuda", augment=d.augment)

    def _held_out_phase(self, d: RunData, tea, trainer: Trainer, state: TrainState, state_path: Path, total: int):
        """Held-out evaluation in the loop, when there is held-out data; None otherwise."""
        o = self.opts
        if o.keep == "best" and d.val is None:
            raise UsageError(f"`keep` best needs held-out data ({self._why_no_accuracy(d)}): give `val_data` or "
                             "`val_fraction`, or keep the last state")
        if d.val is None:
            return None
        labelled = d.labelled_val
        loader = None if labelled else d.modality.held_out_loader(d.val, tea, batch_size=o.eval_batch_size or
                                                                   o.batch_size, num_workers=self.workers)
        held = HeldOut(d.val, labelled_images=labelled, text=d.modality.name == "texts", loader=loader,
                       evaluate_images=lambda model, images, phase: self._evaluate(model, images, phase, tea))
        phase = HeldOutPhase(held, keep=o.keep or "best", eval_every=o.eval_every or max(1, total // 10),
                             source=d.val_from, log=self.log, device=self.ctx.device)
        saved = read_extra_tensors(state_path) if o.resume and state.step > 0 else {}
        phase.attach(trainer, state, saved)
        self.log(f"Held-out: {d.val_from} ({len(d.val)} samples), {held.score.name} every {phase.eval_every} steps; "
                 f"keeping the {phase.keep} state")
        return phase

    def _saved_state(self, state_path: Path, fixed: dict[str, Any]) -> TrainState | None:
        if not self.opts.resume:
            return None
        if not distributed.all_ranks(self.ctx, state_path.is_file()):
            raise InputError(f"`resume=True`: '{state_path}' is not visible to every process: put the output on a "
                             "file system that all nodes share")
        saved, _ = read_train_state(state_path)
        check_fingerprint(saved.fingerprint, fixed, state_path)
        return saved

    def _loss(self, d: RunData, raw: nn.Module, tea: nn.Module, blocks: list[str], pairs, student_name: str):
        """Eq. 7 with the terms the data allows: labels only when they fit the student, accuracy only when the
        val split fits the teacher."""
        weights = self.opts.weights
        if weights.alpha > 0 and not blocks:
            raise UsageError(f"{student_name} has no repeated transformer blocks to distil features from: use "
                             "`alpha` 0 with labels or `gamma` > 0")
        d.use_labels = d.modality.labelled(d.train)
        if d.use_labels and (problem := check_classes(raw, d.train, "the student")):
            self.warn(f"labels not used ({problem}): distillation only")
            d.use_labels = False
        if d.labelled_val and (problem := check_classes(tea, d.val, "the teacher")):
            self.warn(f"accuracy not measured: {problem}")
            d.val_labels_fit, d.why_no_accuracy = False, problem  # still held out: scored by distillation
        if not d.use_labels and not (weights.alpha or weights.gamma or weights.beta or weights.delta):
            raise UsageError("the data has no labels (or none that fit the model) and alpha, beta, gamma and delta "
                             "are 0: nothing to learn from; keep `alpha` 1")
        return RecoveryLoss(weights, use_labels=d.use_labels, pairs=[(layer, w) for _, layer, w in pairs])

    def _trainable(self, raw, tea, loss, blocks, input_size) -> list[tuple[str, nn.Parameter]]:
        """The student's parameters that train: those the loss reaches (all but the factorized layers' with
        freeze_dense). The others get requires_grad=False, which DDP needs and which spares AdamW the work."""
        reached = params_reached(raw, tea, loss, blocks, input_size, self.ctx.device)
        lowrank_prefixes = tuple(n + "." for n, m in raw.named_modules() if isinstance(m, factorized_layer_types()))
        named = []
        for name, p in raw.named_parameters():
            trains = name in reached and (not self.opts.freeze_dense or name.startswith(lowrank_prefixes))
            p.requires_grad_(trains)
            if trains:
                named.append((name, p))
        unreached = [n for n, _ in raw.named_parameters() if n not in reached]
        if unreached:
            self.log(f"Frozen (the loss does not reach them): {', '.join(unreached[:4])}"
                     f"{', ...' if len(unreached) > 4 else ''}")
        if not named:
            raise UsageError("no parameter of the student would train: check `freeze_dense` and the loss weights")
        return named

    def _state(self, state_path, saved, raw, optimizer, groups, param_names, fixed, changeable, total,
               warmup) -> TrainState:
        """A fresh state, or the interrupted run's (weights and optimizer loaded), with this call's schedule."""
        schedule = {"kind": "warmup-cosine", "lr": self.opts.lr, "warmup_steps": warmup, "total_steps": total}
        if saved is None:
            return TrainState(schedule=schedule, fingerprint={**fixed, **changeable})
        state = load_train_state(state_path, raw, optimizer, param_names)
        for option, then, now in changed_options(saved.fingerprint, changeable):
            self.warn(f"{option} was {then} in the interrupted run and is {now} now: the result will differ from "
                      "an uninterrupted run")
        state.schedule, state.fingerprint = schedule, {**fixed, **changeable}
        for group, fresh in zip(optimizer.param_groups, groups):  # the saved groups carry the old decay
            group["weight_decay"] = fresh["weight_decay"]
        if state.step >= total:
            self.log(f"The saved state is at step {state.step} of {total}: no training left")
        else:
            self.log(f"Resuming at step {state.step}/{total} (epoch {state.epoch}, batch {state.batch})")
        return state

    def _accuracy_before(self, d: RunData, raw, tea, state: TrainState) -> dict[str, dict[str, Any] | None]:
        """Accuracy of the teacher and of the student before training (a resumed run reuses the first run's)."""
        accuracy: dict[str, dict[str, Any] | None] = {"teacher": None, "before": None, "after": None}
        self.log(d.modality.describe(d.train, d.val, self._why_no_accuracy(d)))
        if d.labelled_val:
            accuracy["teacher"] = state.extra.get("teacher") or self._evaluate(tea, d.val, "eval teacher", tea)
            accuracy["before"] = state.extra.get("before") or self._evaluate(raw, d.val, "eval before", tea)
            state.extra.update(teacher=accuracy["teacher"], before=accuracy["before"])
        return accuracy

    def _why_no_accuracy(self, d: RunData) -> str:
        return "`evaluate_accuracy=False`" if not self.opts.evaluate_accuracy else d.why_no_accuracy

    def _evaluate(self, model, image_set, phase, transform_from):
        return evaluate(model, image_set, batch_size=self.opts.eval_batch_size or self.opts.batch_size,
                        device=self.ctx.device, num_workers=self.workers, transform_from=transform_from,
                        dist=self.ctx, progress=lambda done, total: self.progress(phase, done, total, ""))

    def _start_metrics(self, output: Path, state: TrainState) -> Path:
        """A fresh run starts the metrics log, a resumed one continues it from the resumed step."""
        metrics = metrics_path(output)
        if self.main:
            if self.opts.resume:
                truncate_metrics(metrics, state.step)
            else:
                from lowrank_cli.atomic import write_text

                write_text(metrics, "")
        return metrics

    def _settings(self, d: RunData, t, data: Path, total: int, warmup: int, named) -> dict[str, Any]:
        """What the checkpoint records of this recovery (`lrc.recovery`) and `--json` prints."""
        o = self.opts
        settings = {
            "teacher": t.source or {"id": name_of(t)}, "data": str(data.resolve()), "train_images": len(d.train),
            "labels": d.use_labels, "steps": total, "lr": o.lr, "schedule": "warmup-cosine", "warmup_steps": warmup,
            "batch_size": o.batch_size, "grad_accum": o.grad_accum, "processes": self.ctx.world_size,
            "images_per_step": o.batch_size * o.grad_accum * self.ctx.world_size, "alpha": o.alpha, "beta": o.beta,
            "gamma": o.gamma, "eps": o.eps, "temperature": o.temperature, "label_smoothing": o.label_smoothing,
            "weight_decay": o.weight_decay, "clip_grad": o.clip_grad, "freeze_dense": o.freeze_dense,
            "augment": o.augment, "trained_parameters": sum(p.numel() for _, p in named), "seed": o.seed,
            "precision": "bf16" if self.ctx.device.type == "cuda" else "fp32", "compile": o.compile,
            **(self.method.settings() if self.method is not None else {"method": "pela"}),
        }
        settings.update(d.modality.settings(o.delta))
        settings["augment"] = d.augment
        if d.modality.augments:
            settings["augment_reason"] = d.augment_reason
        if not d.labelled_val and d.modality.name == "images":
            settings["accuracy_not_measured"] = self._why_no_accuracy(d)
        return settings

    def _trainer(self, d: RunData, raw, tea, loss, blocks, loader, sampler, state, optimizer, named, state_path,
                 metrics, total, warmup) -> Trainer:
        forward, teacher_forward = raw, tea
        if self.opts.compile:
            forward = compile_hooked(raw)
            teacher_forward = compile_hooked(tea) if tea is not None else None
        if self.ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel

            dev = self.ctx.device
            # The residuals never change and start equal on every rank: no buffer broadcast each step.
            forward = DistributedDataParallel(forward, device_ids=[dev.index] if dev.type == "cuda" else None,
                                              broadcast_buffers=self.method is None,
                                              find_unused_parameters=self.unused_parameters)
        distiller = Distiller(raw, tea, loss, blocks, optimizer=optimizer, params=[p for _, p in named],
                              clip_grad=self.opts.clip_grad, device=self.ctx.device, input_size=d.input_size,
                              ctx=self.ctx, forward=forward, teacher_forward=teacher_forward)
        o = self.opts
        trainer = Trainer(distiller, loader, sampler, state, ctx=self.ctx, model=raw, optimizer=optimizer,
                          param_names=[n for n, _ in named], state_path=state_path, metrics=metrics, total=total,
                          grad_accum=o.grad_accum, lr=o.lr, warmup=warmup, save_every=o.save_every,
                          log_every=o.log_every, seed=o.seed, train_samples=len(d.train), unit=d.modality.unit,
                          progress=self.progress, resume_hint=self._resume_hint)
        if self.method is not None:
            trainer.before_step.append(self.method.before_step)
            trainer.may_keep = lambda: self.method.lam == 0  # a state that still leans on W_res is no output
            trainer.gauges["lambda"] = lambda: self.method.lam
        if self.on_step is not None:
            trainer.after_step.append(self.on_step)
        return trainer

    # -- output ------------------------------------------------------------------------------------------

    def _losses(self, metrics: Path | None, history: list[dict[str, Any]], loss: RecoveryLoss):
        """First and last logged value of each term (all of the run's lines, also those before a resume)."""
        lines = metrics_lines(metrics) if metrics is not None else history
        losses = {}
        for term in loss.active:
            values = [line[term] for line in lines if term in line]
            if values:
                losses[term] = {"first": values[0], "last": values[-1]}
        return losses

    def _write(self, raw: nn.Module, output: Path, state_path: Path, save_dtype: torch.dtype) -> None:
        def write() -> None:
            from lowrank_cli.checkpoint.io import save

            save(raw, output, force=True, dtype=save_dtype if save_dtype != torch.float32 else None)
            state_path.unlink(missing_ok=True)

        distributed.on_main(self.ctx, write)
        self.log(f"Wrote {output}")

    def _resume_hint(self, lr: float | None = None) -> str:
        return resume_hint(self.resume_command, self.api, lr)
