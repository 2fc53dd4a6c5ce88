"""Recovery: distil the low-rank student back towards its dense teacher (PELA Eq. 7).

    from lowrank_cli import recover
    result = recover("deit_lr.safetensors", "deit_base", "imagenet/", output="deit_lr_rec.safetensors", steps=2000)
    result.accuracy        # {"teacher": {...}, "before": {...}, "after": {...}} on imagenet/val
    result.summary()       # what `lrc recover --json` prints

Single process, or data parallel under torchrun (the same call: see lowrank_cli.distributed):

    torchrun --standalone --nproc_per_node 8 -m lowrank_cli recover deit_lr.safetensors --teacher deit_base \\
        --data imagenet/ --steps 2000 -o deit_lr_rec.safetensors

The pieces: the options (training/options.py), the student and teacher (training/teacher.py), the data of each
kind (data/modality.py), the loss (training/losses.py), one step (training/step.py), the loop with its saves and
signals (training/trainer.py). AdamW with a cosine schedule after a linear warm-up, gradient clipping, bf16
autocast on CUDA (float32 on the CPU). `resume=True` continues exactly: the data order comes from (seed, epoch),
each image's augmentation from (seed, epoch, index) and the model's own randomness from (seed, step, rank).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_cli import distributed
from lowrank_cli.checkpoint.format import record_recovery
from lowrank_cli.data.modality import check_model, modality_for
from lowrank_cli.data.sampling import default_workers
from lowrank_cli.errors import EnvironmentProblem, InputError, OutputError, UsageError
from lowrank_cli.evaluation.accuracy import check_classes, evaluate
from lowrank_cli.models.structure import innermost_blocks
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
    read_train_state,
    train_state_path,
)
from lowrank_cli.training.step import Distiller, compile_hooked, params_reached
from lowrank_cli.training.teacher import load_pair, name_of
from lowrank_cli.training.trainer import ProgressFn, Trainer

# ---------------------------------------------------------------------------------------------- the API


def recover(
    student: Any,
    teacher: Any,
    data: str | os.PathLike,
    *,
    output: str | os.PathLike,
    options: RecoverOptions | None = None,
    progress: ProgressFn | None = None,
    log: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
    resume_command: str | None = None,
    on_step: Callable[[int, nn.Module], bool | None] | None = None,
    **option_values: Any,
) -> RecoverResult:
    """Distil `student` (an lrc checkpoint, or a dense MODEL with `kappa` or `rank`) towards `teacher` on `data`.

    student / teacher: MODEL source strings (any that `lrc` accepts) or `LoadedModel`s. data: an ImageFolder
    root (train/<class>/..., optional val/<class>/...), a class tree, a flat folder of unlabelled images (then
    distillation only), or for text models a .txt / .jsonl file or folder of them. The options are those of
    `RecoverOptions` (training/options.py), given as keywords (`steps=2000, lr=1e-4`) or as one `options` object;
    exactly one of `steps` and `epochs` is needed. `augment=False` trains on the evaluation preprocessing, for
    images where crops and mirror images change the class (digits, text, small centred objects). The output
    checkpoint keeps the student's lrc metadata and adds `recovery` (settings and the accuracy measured on the
    val split, when there is one with labels). Training states go to `<output stem>.train.safetensors` every
    `save_every` steps and metrics to `<output stem>.metrics.jsonl` every `log_every` steps. `on_step(step,
    model)` is called after each step; returning True stops the run as SIGINT does (for tests and notebooks).
    `resume_command` is the command printed on interruption. `teacher` None: a dense student factorized on the fly
    is its own teacher. `method="progressive"` (PC-LoRA, training/progressive.py) fades the dense student's weights
    out while its factors learn (`init`, `decay`, `decay_end`, `lora_alpha`); the output is the same kind of file.
    """
    unknown = sorted(set(option_values) - RecoverOptions.names())
    if unknown:
        raise TypeError(f"recover() got unexpected keyword argument(s): {', '.join(unknown)}")
    opts = options if options is not None else RecoverOptions(**option_values)
    if options is not None and option_values:
        raise TypeError("give the options as keywords or as one RecoverOptions, not both")
    opts.check()
    log = log or (lambda msg: None)
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=2))
    output = Path(output)
    state_path = train_state_path(output)
    _check_outputs(output, state_path, opts)
    ctx = distributed.setup(opts.device)
    workers = default_workers(ctx.local_world_size) if opts.num_workers is None else opts.num_workers
    try:
        return _Run(ctx, opts, workers, log, warn, progress, resume_command, on_step).run(
            student, teacher, Path(data).expanduser(), output, state_path)
    except torch.cuda.OutOfMemoryError:
        raise EnvironmentProblem(
            f"out of GPU memory at `batch_size` {opts.batch_size}: use a smaller `batch_size` with a larger "
            "`grad_accum` (same images per step)"
        ) from None
    finally:
        distributed.teardown(ctx)


def _check_outputs(output: Path, state_path: Path, opts: RecoverOptions) -> None:
    """The output and the training state of an earlier run, checked before anything is loaded."""
    from lowrank_cli.atomic import check_output

    check_output(output, force=opts.force)
    if opts.resume and not state_path.is_file():
        raise InputError(f"`resume=True`: there is no training state '{state_path}' to continue (it is written every "
                         "`save_every` steps, and removed when a run finishes): start without `resume=True`")
    if not opts.resume and state_path.exists():
        if not opts.force:
            raise OutputError(f"the training state of an earlier, unfinished run is at '{state_path}': continue it "
                              "with `resume=True`, or pass `force=True` to start again")
        state_path.unlink(missing_ok=True)  # starting again: a later resume must not find the old run


@dataclass
class _Data:
    """The training data of a run and what was decided about it."""

    modality: Any
    train: Any
    val: Any
    use_labels: bool = False
    input_size: tuple[int, ...] = ()


class _Run:
    """One call of `recover`, in its phases: data, models, loss, optimizer and state, evaluation, training, output."""

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
        train, val = modality.find(data, evaluate=opts.evaluate_accuracy)
        fixed = opts.fixed_for_resume(self.ctx.world_size, len(train))
        saved_state = self._saved_state(state_path, fixed)
        s, t, pairs, dense = load_pair(student, teacher, opts, device=dev, log=self.log, warn=self.warn)
        raw, tea = s.model, t.model
        self.method = Progressive.from_options(opts) if opts.method == "progressive" else None
        if self.method is not None:  # the loss's pairs become the progressive layers; the dense linears go
            layers = dict(self.method.swap_in(raw, dense))
            pairs, dense = [(name, layers[name], weight) for name, _, weight in pairs], {}
        check_model(modality, tea, name_of(t), data)
        save_dtype = next(raw.parameters()).dtype
        raw.to(device=dev, dtype=torch.float32).train()
        tea.to(device=dev, dtype=torch.float32).eval().requires_grad_(False)
        modality.prepare(t, tokenizer=opts.tokenizer, max_length=opts.max_length)
        d = _Data(modality, train, val, input_size=modality.input_size(tea))
        blocks = innermost_blocks(raw)
        loss = self._loss(d, raw, tea, blocks, pairs, name_of(s))
        loader, sampler = modality.loader(train, tea, batch_size=opts.batch_size, seed=opts.seed, rank=self.ctx.rank,
                                          world_size=self.ctx.world_size, num_workers=self.workers,
                                          pin_memory=dev.type == "cuda", augment=opts.augment)
        total = opts.steps if opts.steps is not None else max(
            1, math.ceil(opts.epochs * sampler.batches_per_epoch / opts.grad_accum))
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
        accuracy = self._accuracy_before(d, raw, tea, state)
        metrics = self._start_metrics(output, state)
        settings = self._settings(d, t, data, total, warmup, named)
        trainer = self._trainer(d, raw, tea, loss, blocks, loader, sampler, state, optimizer, named, state_path,
                                metrics, total, warmup)
        try:
            trainer.run()
        finally:
            trainer.distiller.close()
        if self.method is not None:
            self.method.finish(raw)  # W_res dropped: LowRankLinear layers from here on
        raw.eval()
        if d.val is not None:
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

    def _saved_state(self, state_path: Path, fixed: dict[str, Any]) -> TrainState | None:
        if not self.opts.resume:
            return None
        if not distributed.all_ranks(self.ctx, state_path.is_file()):
            raise InputError(f"`resume=True`: '{state_path}' is not visible to every process: put the output on a "
                             "file system that all nodes share")
        saved, _ = read_train_state(state_path)
        check_fingerprint(saved.fingerprint, fixed, state_path)
        return saved

    def _loss(self, d: _Data, raw: nn.Module, tea: nn.Module, blocks: list[str], pairs, student_name: str):
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
        if d.val is not None and (problem := check_classes(tea, d.val, "the teacher")):
            self.warn(f"accuracy not measured: {problem}")
            d.val = None
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

    def _accuracy_before(self, d: _Data, raw, tea, state: TrainState) -> dict[str, dict[str, Any] | None]:
        """Accuracy of the teacher and of the student before training (a resumed run reuses the first run's)."""
        accuracy: dict[str, dict[str, Any] | None] = {"teacher": None, "before": None, "after": None}
        why = "`evaluate_accuracy=False`" if not self.opts.evaluate_accuracy else "no labelled val/ split that fits the model"
        self.log(d.modality.describe(d.train, d.val, why))
        if d.val is not None:
            accuracy["teacher"] = state.extra.get("teacher") or self._evaluate(tea, d.val, "eval teacher", tea)
            accuracy["before"] = state.extra.get("before") or self._evaluate(raw, d.val, "eval before", tea)
            state.extra.update(teacher=accuracy["teacher"], before=accuracy["before"])
        return accuracy

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

    def _settings(self, d: _Data, t, data: Path, total: int, warmup: int, named) -> dict[str, Any]:
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
        if not d.modality.augments:
            settings["augment"] = False
        return settings

    def _trainer(self, d: _Data, raw, tea, loss, blocks, loader, sampler, state, optimizer, named, state_path,
                 metrics, total, warmup) -> Trainer:
        forward, teacher_forward = raw, tea
        if self.opts.compile:
            forward, teacher_forward = compile_hooked(raw), compile_hooked(tea)
        if self.ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel

            dev = self.ctx.device
            # The residuals never change and start equal on every rank: no buffer broadcast each step.
            forward = DistributedDataParallel(forward, device_ids=[dev.index] if dev.type == "cuda" else None,
                                              broadcast_buffers=self.method is None)
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
        if self.resume_command:
            return self.resume_command + (f" --lr {lr:g}" if lr is not None else "")
        return f"recover(..., resume=True{f', lr={lr:g}' if lr is not None else ''})"
