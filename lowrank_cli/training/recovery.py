"""Recovery: distil the low-rank student back towards its dense teacher (PELA Eq. 7).


    result = recover("deit_lr.safetensors", "deit_base", "imagenet/", output="deit_lr_rec.safetensors", steps=2000)
    result.accuracy        # {"teacher": {...}, "before": {...}, "after": {...}} on imagenet/val
    result.summary()       # what `lrc recover --json` prints

Single process, or data parallel under torchrun (the same call: see lowrank_cli.distributed):

    torchrun --standalone --nproc_per_node 8 -m lowrank_cli recover deit_lr.safetensors --teacher deit_base \\
        --data imagenet/ --steps 2000 -o deit_lr_rec.safetensors

One training step: the frozen teacher (eval mode, no gradients) and the student see the same micro-batch; forward
hooks on the innermost transformer blocks keep both models' block outputs, so the student runs forward once;
the loss is distill_loss.RecoveryLoss; AdamW with a cosine schedule after a linear warm-up, gradient clipping,
bf16 autocast on CUDA (float32 on the CPU).

A run is never lost. Every `save_every` steps the training state (weights, optimizer, step, data position) is
written atomically next to the output (train_state.py); SIGINT / SIGTERM finish the current step, save and
exit with the command that resumes; a non-finite loss stops before the optimizer step, so the last saved state
stays good. `resume=True` continues exactly: the data order comes from (seed, epoch), each image's augmentation
from (seed, epoch, index) and the model's own randomness (dropout, drop path) is reseeded every step from
(seed, step, rank), so a resumed run computes what the uninterrupted run would have, with any number of
data-loader workers.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_cli import distributed
from lowrank_cli.checkpoint.format import record_recovery, record_source
from lowrank_cli.data.images import Batch, find_images, train_loader
from lowrank_cli.data.sampling import EpochSampler, default_workers, derive_seed
from lowrank_cli.errors import EnvironmentProblem, InputError, Interrupted, OutputError, TrainingError, UsageError
from lowrank_cli.evaluation.accuracy import check_classes, evaluate, val_split
from lowrank_cli.layers.lowrank_linear import LowRankLinear
from lowrank_cli.models.inputs import data_config
from lowrank_cli.models.structure import innermost_blocks
from lowrank_cli.training.losses import LossWeights, RecoveryLoss
from lowrank_cli.training.metrics import metrics_lines, metrics_path, truncate_metrics
from lowrank_cli.training.schedule import lr_factor, param_groups
from lowrank_cli.training.signals import StopRequest
from lowrank_cli.training.state import (
    TrainState,
    changed_options,
    check_fingerprint,
    load_train_state,
    read_train_state,
    save_train_state,
    train_state_path,
)
from lowrank_cli.training.step import Distiller, compile_hooked, params_reached
from lowrank_cli.training.teacher import check_teacher, is_lowrank, load_participant, name_of

ProgressFn = Callable[[str, int, int, str], None]  # (phase, done, total, status)


# ---------------------------------------------------------------------------------------------- results


@dataclass
class RecoverResult:
    model: nn.Module  # the recovered student (plain nn.Module, on the training device, eval mode)
    output: Path
    steps: int
    resumed_from: int  # 0 for a fresh run
    images_seen: int  # over all ranks, all steps (also those before a resume)
    skipped: int  # unreadable training images met
    seconds: float  # training time, all attempts
    accuracy: dict[str, dict[str, Any] | None] = field(default_factory=dict)  # teacher, before, after
    losses: dict[str, dict[str, float]] = field(default_factory=dict)  # first / last logged value of each term
    history: list[dict[str, Any]] = field(default_factory=list)  # the metric lines logged by this call
    metrics: Path | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.images_seen / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary (the `--json` output of `lrc recover`)."""
        return {
            "output": str(self.output),
            "steps": self.steps,
            "resumed_from": self.resumed_from,
            "images_seen": self.images_seen,
            "skipped_images": self.skipped,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 1),
            "accuracy": self.accuracy,
            "losses": self.losses,
            "metrics": str(self.metrics) if self.metrics else None,
            "settings": self.settings,
        }


# ---------------------------------------------------------------------------------------------- seeds


# ---------------------------------------------------------------------------------------------- schedule


# ---------------------------------------------------------------------------------------------- the step


# ---------------------------------------------------------------------------------------------- checks


# ---------------------------------------------------------------------------------------------- signals


# ---------------------------------------------------------------------------------------------- metrics


# ---------------------------------------------------------------------------------------------- the API


def recover(
    student: Any,
    teacher: Any,
    data: str | os.PathLike,
    *,
    output: str | os.PathLike,
    steps: int | None = None,
    epochs: float | None = None,
    lr: float = 1e-4,
    batch_size: int = 64,
    grad_accum: int = 1,
    alpha: float = 1.0,
    beta: float = 0.0,
    gamma: float = 0.0,
    eps: float = 1e-3,
    temperature: float = 1.0,
    label_smoothing: float = 0.0,
    delta: float = 0.0,
    tokenizer: Any = None,
    max_length: int | None = None,
    library: str | None = None,
    warmup_steps: int | None = None,
    warmup_fraction: float = 0.05,
    weight_decay: float = 0.05,
    clip_grad: float = 1.0,
    freeze_dense: bool = False,
    augment: bool = True,
    kappa: float | None = None,
    rank_multiple: int = 8,
    arch: str | None = None,
    model_args: dict[str, Any] | None = None,
    save_every: int = 500,
    log_every: int = 10,
    resume: bool = False,
    force: bool = False,
    compile: bool = False,
    evaluate_accuracy: bool = True,
    eval_batch_size: int | None = None,
    device: str | torch.device | None = "auto",
    num_workers: int | None = None,
    seed: int = 0,
    progress: ProgressFn | None = None,
    log: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
    resume_command: str | None = None,
    on_step: Callable[[int, nn.Module], bool | None] | None = None,
) -> RecoverResult:
    """Distil `student` (an lrc checkpoint, or a dense MODEL with `kappa`) towards `teacher` on `data`.

    student / teacher: MODEL source strings (any that `lrc` accepts) or `LoadedModel`s. data: an ImageFolder
    root (train/<class>/..., optional val/<class>/...), a class tree, or a flat folder of unlabelled images
    (then distillation only). Exactly one of `steps` (optimizer steps) and `epochs` (passes over the training
    images; fractions allowed). `batch_size` is per process; each step uses batch_size x grad_accum x
    processes images; `num_workers` data-loading processes per training process (default: the CPUs per
    process, at most 8). The loss weights are PELA's (see distill_loss). `freeze_dense` trains only the
    factorized layers. `augment`: random resized crops and flips (timm's training transform, the default), or
    False for the evaluation preprocessing (resize + centre crop), for images where crops and mirror images
    change the class (digits, text, small centred objects). The output checkpoint keeps the student's lrc
    metadata and adds `recovery` (settings and the accuracy measured on the val split, when there is one with
    labels). Training states go to
    `<output stem>.train.safetensors` every `save_every` steps and metrics to `<output stem>.metrics.jsonl`
    every `log_every` steps. `on_step(step, model)` is called after each step; returning True stops the run
    as SIGINT does (for tests and notebooks). `resume_command` is the command printed on interruption.
    """
    log = log or (lambda msg: None)
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=2))
    weights = LossWeights(alpha, beta, gamma, eps, temperature, label_smoothing, delta)
    weights.check()
    _check_options(steps=steps, epochs=epochs, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
                   warmup_steps=warmup_steps, warmup_fraction=warmup_fraction, weight_decay=weight_decay,
                   clip_grad=clip_grad, save_every=save_every, log_every=log_every,
                   num_workers=0 if num_workers is None else num_workers, kappa=kappa)
    output = Path(output)
    state_path = train_state_path(output)
    from lowrank_cli.atomic import check_output

    check_output(output, force=force)
    if resume and not state_path.is_file():
        raise InputError(f"--resume: there is no training state '{state_path}' to continue (it is written every "
                         "--save-every steps, and removed when a run finishes): start without --resume")
    if not resume and state_path.exists():
        if not force:
            raise OutputError(f"the training state of an earlier, unfinished run is at '{state_path}': continue it "
                              "with --resume, or pass --force to start again")
        state_path.unlink(missing_ok=True)  # starting again: a later --resume must not find the old run
    ctx = distributed.setup(device)
    if num_workers is None:
        num_workers = default_workers(ctx.local_world_size)
    try:
        return _Run(ctx, log, warn, progress).run(
            student, teacher, Path(data).expanduser(), output=output, state_path=state_path, weights=weights,
            steps=steps, epochs=epochs, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
            warmup_steps=warmup_steps, warmup_fraction=warmup_fraction, weight_decay=weight_decay,
            clip_grad=clip_grad, freeze_dense=freeze_dense, augment=augment, kappa=kappa,
            rank_multiple=rank_multiple, arch=arch, model_args=model_args, library=library, tokenizer=tokenizer,
            max_length=max_length, save_every=save_every,
            log_every=log_every, resume=resume, compile=compile, evaluate_accuracy=evaluate_accuracy,
            eval_batch_size=eval_batch_size or batch_size, num_workers=num_workers, seed=seed,
            resume_command=resume_command, on_step=on_step,
        )
    except torch.cuda.OutOfMemoryError:
        raise EnvironmentProblem(
            f"out of GPU memory at --batch-size {batch_size}: use a smaller --batch-size with a larger --grad-accum "
            "(same images per step)"
        ) from None
    finally:
        distributed.teardown(ctx)


def _check_options(*, steps, epochs, lr, batch_size, grad_accum, warmup_steps, warmup_fraction, weight_decay,
                   clip_grad, save_every, log_every, num_workers, kappa) -> None:
    if (steps is None) == (epochs is None):
        raise UsageError("give the length of the recovery as --steps N or as --epochs E (one of them)")
    if steps is not None and steps < 1:
        raise UsageError(f"--steps must be at least 1, got {steps}")
    if epochs is not None and not (epochs > 0 and math.isfinite(epochs)):
        raise UsageError(f"--epochs must be a number > 0, got {epochs}")
    checks = [
        (lr > 0 and math.isfinite(lr), f"--lr must be a number > 0, got {lr}"),
        (batch_size >= 1, f"--batch-size must be at least 1, got {batch_size}"),
        (grad_accum >= 1, f"--grad-accum must be at least 1, got {grad_accum}"),
        (warmup_steps is None or warmup_steps >= 0, f"--warmup-steps must be 0 or more, got {warmup_steps}"),
        (0 <= warmup_fraction < 1, f"the warm-up fraction must be in [0, 1), got {warmup_fraction}"),
        (weight_decay >= 0, f"--weight-decay must be 0 or more, got {weight_decay}"),
        (clip_grad >= 0, f"--clip-grad must be 0 (off) or more, got {clip_grad}"),
        (save_every >= 1, f"--save-every must be at least 1, got {save_every}"),
        (log_every >= 1, f"--log-every must be at least 1, got {log_every}"),
        (num_workers >= 0, f"--workers must be 0 or more, got {num_workers}"),
        (kappa is None or kappa > 1, f"--kappa must be a number > 1, got {kappa}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


class _Run:
    """One call of `recover`, split into its phases (set-up, evaluation, training, output)."""

    def __init__(self, ctx: distributed.DistContext, log, warn, progress: ProgressFn | None):
        self.ctx = ctx
        self.main = ctx.is_main
        self.log = log if self.main else (lambda msg: None)
        self.warn = warn if self.main else (lambda msg: None)
        self.progress = progress if (progress is not None and self.main) else (lambda *a: None)
        self.unit = "img"  # what the progress bar counts per second: images, or texts

    # -- set-up ------------------------------------------------------------------------------------------

    def _models(self, student, teacher, *, kappa, rank_multiple, arch, model_args, library):
        from lowrank_cli.compress.factorization import factorize

        s = load_participant(student, "student", arch, model_args, self.log, library)
        t = load_participant(teacher, "teacher", arch, model_args, self.log, library)
        if kappa is not None:
            if s.checkpoint is not None or is_lowrank(s.model):
                raise UsageError(f"--kappa factorizes a dense student, but {name_of(s)} is already low-rank: leave out "
                                 "--kappa")
            self.log(f"Factorizing the student at kappa {kappa:g} (rank multiple {rank_multiple})")
            factorize(s.model, kappa=kappa, rank_multiple=rank_multiple, device=self.ctx.device, warn=self.warn)
            record_source(s.model, s.source)
        elif not is_lowrank(s.model):
            raise UsageError(f"the student {name_of(s)} has no low-rank layers: pass an lrc checkpoint (lrc factorize), "
                             "or factorize it on the fly with --kappa")
        if t.checkpoint is not None or is_lowrank(t.model):
            raise InputError(f"the teacher {name_of(t)} is a low-rank model: the teacher is the dense model the student "
                             "was factorized from")
        pairs = check_teacher(s.model, t.model, name_of(s), name_of(t), s.spec.architecture, t.spec.architecture)
        if s.spec.architecture != t.spec.architecture:
            self.warn(f"the teacher is {t.spec.architecture} and the student was made from {s.spec.architecture}: "
                      "the shapes agree, so distillation works, but check that this is the teacher you meant")
        return s, t, pairs

    def run(self, student, teacher, data: Path, *, output: Path, state_path: Path, weights: LossWeights, steps,
            epochs, lr, batch_size, grad_accum, warmup_steps, warmup_fraction, weight_decay, clip_grad,
            freeze_dense, augment, kappa, rank_multiple, arch, model_args, library, tokenizer, max_length,
            save_every, log_every, resume, compile, evaluate_accuracy, eval_batch_size, num_workers, seed,
            resume_command, on_step) -> RecoverResult:
        ctx, dev = self.ctx, self.ctx.device
        # Data first: a wrong folder fails before any model is loaded.
        from lowrank_cli.data.texts import find_texts, looks_like_text_data

        text = looks_like_text_data(data)
        self.unit = "texts" if text else "img"
        if text:
            train_set, val_set = find_texts(data), None
        else:
            train_set = find_images(data, "train")
            val_set = val_split(data, required=False, class_tree=False) if evaluate_accuracy else None
        hard = {
            "--batch-size": batch_size, "--grad-accum": grad_accum, "--seed": seed, "--freeze-dense": freeze_dense,
            "number of processes": ctx.world_size, "number of training images": len(train_set),
        }
        saved_state = None
        if resume:
            if not distributed.all_ranks(ctx, state_path.is_file()):
                raise InputError(f"--resume: '{state_path}' is not visible to every process: put the output on a "
                                 "file system that all nodes share")
            saved_state, _ = read_train_state(state_path)
            check_fingerprint(saved_state.fingerprint, hard, state_path)

        s, t, pairs = self._models(student, teacher, kappa=kappa, rank_multiple=rank_multiple, arch=arch,
                                   model_args=model_args, library=library)
        raw, tea = s.model, t.model
        from lowrank_cli.models.transformers_models import is_text_model

        if text != is_text_model(tea):
            raise UsageError(f"--data '{data}' holds {'texts' if text else 'images'} but the teacher {name_of(t)} is "
                             f"{'a text' if is_text_model(tea) else 'an image'} model: give it "
                             f"{'a .txt / .jsonl file or folder' if is_text_model(tea) else 'an image folder'}")
        save_dtype = next(raw.parameters()).dtype
        raw.to(device=dev, dtype=torch.float32).train()
        tea.to(device=dev, dtype=torch.float32).eval().requires_grad_(False)
        if text:
            from lowrank_cli.data.texts import load_tokenizer
            from lowrank_cli.models.inputs import default_max_length, position_limit

            if tokenizer is None:
                from lowrank_cli.models.hub import tokenizer_folder

                if t.files is None:
                    raise UsageError(f"no tokenizer for the text data: the teacher {name_of(t)} is not a transformers "
                                     "folder or Hub repo; pass --tokenizer DIR_OR_REPO")
                tokenizer = tokenizer_folder(t)
            tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
            longest = position_limit(tea)
            if max_length is not None and longest is not None and max_length > longest:
                raise UsageError(f"--max-length {max_length} is above the {longest} tokens the model's positions "
                                 "allow: lower it")
            max_length = max_length or default_max_length(tea, tok)
            input_size: tuple[int, ...] = (max_length,)
        else:
            if tokenizer is not None or max_length is not None:
                raise UsageError("--tokenizer and --max-length are for text data; the data here is images")
            input_size = tuple(data_config(tea)["input_size"])
        blocks = innermost_blocks(raw)
        if weights.alpha > 0 and not blocks:
            raise UsageError(f"{name_of(s)} has no repeated transformer blocks to distil features from: use --alpha 0 "
                             "with labels or --gamma > 0")

        use_labels = not text and train_set.labelled
        if use_labels and (problem := check_classes(raw, train_set, "the student")):
            self.warn(f"labels not used ({problem}): distillation only")
            use_labels = False
        if val_set is not None and (problem := check_classes(tea, val_set, "the teacher")):
            self.warn(f"accuracy not measured: {problem}")
            val_set = None
        if not use_labels and weights.alpha == 0 and weights.gamma == 0 and weights.beta == 0 and weights.delta == 0:
            raise UsageError("the data has no labels (or none that fit the model) and alpha, beta, gamma and delta "
                             "are 0: nothing to learn from; keep --alpha 1")
        loss = RecoveryLoss(weights, use_labels=use_labels, pairs=[(layer, w) for _, layer, w in pairs])

        from lowrank_cli.data.images import make_transform
        from lowrank_cli.models.inputs import image_mode

        if text:
            from lowrank_cli.data.texts import text_loader

            # Tokenising in the training process: fast tokenizers are Rust and the texts are in memory, and a
            # worker would need its own Ctrl-C handling.
            loader, sampler = text_loader(train_set, tok, batch_size=batch_size, max_length=max_length, shuffle=True,
                                          seed=seed, rank=ctx.rank, world_size=ctx.world_size, drop_last=True)
        else:
            loader, sampler = train_loader(train_set, make_transform(tea, training=augment), image_mode(tea),
                                           batch_size, seed=seed, rank=ctx.rank, world_size=ctx.world_size,
                                           num_workers=num_workers, pin_memory=dev.type == "cuda")
        per_epoch = sampler.batches_per_epoch
        total = steps if steps is not None else max(1, math.ceil(epochs * per_epoch / grad_accum))
        warmup = warmup_steps if warmup_steps is not None else int(round(warmup_fraction * total))
        warmup = min(warmup, max(total - 1, 0))

        named = self._trainable(raw, tea, loss, blocks, input_size, freeze_dense)
        param_names = [n for n, _ in named]
        params = [p for _, p in named]
        groups = param_groups(named, weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999),
                                      fused=True if dev.type == "cuda" else None)
        schedule = {"kind": "warmup-cosine", "lr": lr, "warmup_steps": warmup, "total_steps": total}
        soft = {"--steps": total, "--lr": lr, "--warmup-steps": warmup, "--weight-decay": weight_decay,
                "--clip-grad": clip_grad, "--alpha": weights.alpha, "--beta": weights.beta, "--gamma": weights.gamma,
                "--eps": weights.eps, "--temperature": weights.temperature,
                "--label-smoothing": weights.label_smoothing, "--augment": augment, "--teacher": name_of(t),
                "--data": str(data.resolve())}

        state = TrainState(schedule=schedule, fingerprint={**hard, **soft})
        if resume:
            state = load_train_state(state_path, raw, optimizer, param_names)
            for option, then, now in changed_options(saved_state.fingerprint, soft):
                self.warn(f"{option} was {then} in the interrupted run and is {now} now: the result will differ from "
                          "an uninterrupted run")
            state.schedule, state.fingerprint = schedule, {**hard, **soft}
            for group, fresh in zip(optimizer.param_groups, groups):
                group["weight_decay"] = fresh["weight_decay"]
            if state.step >= total:
                self.log(f"The saved state is at step {state.step} of {total}: no training left")
            else:
                self.log(f"Resuming at step {state.step}/{total} (epoch {state.epoch}, batch {state.batch})")
        resumed_from = state.step

        # Accuracy before (measured once; a resumed run reuses the first run's numbers).
        accuracy: dict[str, dict[str, Any] | None] = {"teacher": None, "before": None, "after": None}
        if val_set is not None:
            self.log(f"Data: {len(train_set)} training images"
                     f"{f' ({train_set.num_classes} classes)' if train_set.labelled else ' (no labels)'}, "
                     f"{len(val_set)} validation images")
            accuracy["teacher"] = state.extra.get("teacher") or self._evaluate(tea, val_set, "eval teacher",
                                                                             eval_batch_size, num_workers, tea)
            accuracy["before"] = state.extra.get("before") or self._evaluate(raw, val_set, "eval before",
                                                                           eval_batch_size, num_workers, tea)
            state.extra.update(teacher=accuracy["teacher"], before=accuracy["before"])
        elif text:
            skipped = f", {train_set.skipped} unusable record(s) skipped" if train_set.skipped else ""
            self.log(f"Data: {len(train_set)} training texts from {len(train_set.files)} file(s){skipped}, at most "
                     f"{max_length} tokens each; distillation only (no accuracy on text)")
        else:
            why = "--no-eval" if not evaluate_accuracy else "no labelled val/ split that fits the model"
            self.log(f"Data: {len(train_set)} training images"
                     f"{f' ({train_set.num_classes} classes)' if train_set.labelled else ' (no labels)'}; "
                     f"accuracy not measured ({why})")

        # Metrics log: a fresh run starts it, a resumed one continues it from the resumed step.
        metrics = metrics_path(output)
        if self.main:
            if resume:
                truncate_metrics(metrics, state.step)
            else:
                from lowrank_cli.atomic import write_text

                write_text(metrics, "")

        forward, teacher_forward = raw, tea
        if compile:
            forward, teacher_forward = compile_hooked(raw), compile_hooked(tea)
        if ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel

            forward = DistributedDataParallel(forward, device_ids=[dev.index] if dev.type == "cuda" else None)
        distiller = Distiller(raw, tea, loss, blocks, optimizer=optimizer, params=params, clip_grad=clip_grad,
                              device=dev, input_size=input_size, ctx=ctx, forward=forward,
                              teacher_forward=teacher_forward)
        settings = {
            "teacher": t.source or {"id": name_of(t)}, "data": str(data.resolve()), "train_images": len(train_set),
            "labels": use_labels, "steps": total, "lr": lr, "schedule": "warmup-cosine", "warmup_steps": warmup,
            "batch_size": batch_size, "grad_accum": grad_accum, "processes": ctx.world_size,
            "images_per_step": batch_size * grad_accum * ctx.world_size, "alpha": weights.alpha,
            "beta": weights.beta, "gamma": weights.gamma, "eps": weights.eps, "temperature": weights.temperature,
            "label_smoothing": weights.label_smoothing, "weight_decay": weight_decay, "clip_grad": clip_grad,
            "freeze_dense": freeze_dense, "augment": augment, "trained_parameters": sum(p.numel() for p in params),
            "seed": seed, "precision": "bf16" if dev.type == "cuda" else "fp32", "compile": compile,
        }
        if text:
            settings.update(data_kind="text", max_length=max_length, delta=weights.delta,
                            tokenizer=str(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else
                            type(tokenizer).__name__)
            settings["augment"] = False
        history: list[dict[str, Any]] = []
        try:
            self._train(distiller, loader, sampler, state, state_path=state_path, raw=raw, optimizer=optimizer,
                        param_names=param_names, total=total, per_epoch=per_epoch, grad_accum=grad_accum,
                        lr=lr, warmup=warmup, save_every=save_every, log_every=log_every, seed=seed,
                        metrics=metrics, history=history, train_images=len(train_set),
                        resume_command=resume_command, on_step=on_step)
        finally:
            distiller.close()

        # Accuracy after, the output checkpoint, and the training state is no longer needed.
        raw.eval()
        if val_set is not None:
            accuracy["after"] = self._evaluate(raw, val_set, "eval after", eval_batch_size, num_workers, tea)
        lines = metrics_lines(metrics) if self.main else history
        losses = {}
        if lines:
            for term in loss.active:
                values = [line[term] for line in lines if term in line]
                if values:
                    losses[term] = {"first": values[0], "last": values[-1]}
        recovery = {**settings, "images_seen": state.images_seen, "skipped_images": state.skipped,
                    "seconds": round(state.seconds, 3), "accuracy": accuracy,
                    "final_losses": {k: v["last"] for k, v in losses.items()}}
        record_recovery(raw, recovery, spec=s.spec, source=s.source)

        def write() -> None:
            from lowrank_cli.checkpoint.io import save

            save(raw, output, force=True, dtype=save_dtype if save_dtype != torch.float32 else None)
            state_path.unlink(missing_ok=True)

        distributed.on_main(ctx, write)
        self.log(f"Wrote {output}")
        return RecoverResult(
            model=raw, output=output, steps=total, resumed_from=resumed_from, images_seen=state.images_seen,
            skipped=state.skipped, seconds=state.seconds, accuracy=accuracy, losses=losses, history=history,
            metrics=metrics, settings=settings,
        )

    def _trainable(self, raw, tea, loss, blocks, input_size, freeze_dense) -> list[tuple[str, nn.Parameter]]:
        """The student's parameters that train: those the loss reaches (all but the factorized layers' with
        freeze_dense). The others get requires_grad=False, which DDP needs and which spares AdamW the work."""
        reached = params_reached(raw, tea, loss, blocks, input_size, self.ctx.device)
        lowrank_prefixes = tuple(n + "." for n, m in raw.named_modules() if isinstance(m, LowRankLinear))
        named = []
        for name, p in raw.named_parameters():
            trains = name in reached and (not freeze_dense or name.startswith(lowrank_prefixes))
            p.requires_grad_(trains)
            if trains:
                named.append((name, p))
        unreached = [n for n, _ in raw.named_parameters() if n not in reached]
        if unreached:
            self.log(f"Frozen (the loss does not reach them): {', '.join(unreached[:4])}"
                     f"{', ...' if len(unreached) > 4 else ''}")
        if not named:
            raise UsageError("no parameter of the student would train: check --freeze-dense and the loss weights")
        return named

    def _evaluate(self, model, image_set, phase, batch_size, num_workers, transform_from):
        result = evaluate(model, image_set, batch_size=batch_size, device=self.ctx.device, num_workers=num_workers,
                          transform_from=transform_from, dist=self.ctx,
                          progress=lambda done, total: self.progress(phase, done, total, ""))
        return result

    # -- training ----------------------------------------------------------------------------------------

    def _train(self, distiller: Distiller, loader, sampler: EpochSampler, state: TrainState, *, state_path, raw,
               optimizer, param_names, total, per_epoch, grad_accum, lr, warmup, save_every, log_every, seed,
               metrics, history, train_images, resume_command, on_step) -> None:
        ctx = self.ctx

        def batches() -> Iterator[tuple[int, int, Batch]]:
            """(epoch, micro-batches of that epoch consumed after this one, batch), from the saved position."""
            epoch, start = state.epoch, state.batch
            while True:
                sampler.set_epoch(epoch)
                sampler.set_start_batch(start)
                for position, batch in enumerate(loader, start + 1):
                    yield epoch, position, batch
                epoch, start = epoch + 1, 0

        def save() -> None:
            distributed.on_main(ctx, save_train_state, state_path, state, raw, optimizer, param_names)

        saved_at = state.step if state.step > 0 else -1
        interval: dict[str, float] = {}
        interval_steps, interval_images, interval_start = 0, 0, time.perf_counter()
        self.progress("recover", state.step, total, "")
        first_step = state.step + 1
        stream = batches()
        with StopRequest() as stop:
            while state.step < total:
                step_start = time.perf_counter()
                for group in optimizer.param_groups:
                    group["lr"] = lr * lr_factor(state.step, warmup, total)
                current_lr = optimizer.param_groups[0]["lr"]
                torch.manual_seed(derive_seed(seed, "step", state.step, ctx.rank))
                micro = [next(stream) for _ in range(grad_accum)]
                try:
                    stats = distiller.step([b for _, _, b in micro], step=state.step + 1)
                except TrainingError as e:
                    kept = (f"the last good training state (step {saved_at}) is kept in '{state_path}'; resume from it"
                            f" with a lower --lr (now {lr:g}): {self._resume_hint(resume_command, lr / 10)}"
                            if saved_at > 0 else "no training state was saved yet; start again with a lower --lr "
                            f"(now {lr:g})")
                    raise TrainingError(f"training stopped: {e}; {kept}") from None
                epoch, position, _ = micro[-1]
                if position >= per_epoch:
                    epoch, position = epoch + 1, 0
                state.step += 1
                state.epoch, state.batch = epoch, position
                state.images_seen += stats.images
                state.skipped += stats.skipped
                state.seconds += time.perf_counter() - step_start

                for name, value in stats.terms.items():
                    interval[name] = interval.get(name, 0.0) + value
                interval["grad_norm"] = interval.get("grad_norm", 0.0) + stats.grad_norm
                interval_steps += 1
                interval_images += stats.images
                # The first step of a call is logged too, so that a short or resumed run shows numbers at once.
                if state.step % log_every == 0 or state.step in (first_step, total):
                    elapsed = time.perf_counter() - interval_start
                    line = {"step": state.step, "epoch": round(state.images_seen / train_images, 4), "lr": current_lr,
                            **{k: v / interval_steps for k, v in interval.items()},
                            "images_per_s": round(interval_images / elapsed, 2) if elapsed > 0 else None,
                            "images": state.images_seen, "skipped": state.skipped, "seconds": round(state.seconds, 3)}
                    history.append(line)
                    if self.main:
                        with open(metrics, "a") as f:
                            f.write(json.dumps(line) + "\n")
                    status = " ".join(f"{k} {line[k]:.3g}" for k in distiller.terms) + (
                        f" | {line['images_per_s']:.0f} {self.unit}/s" if line["images_per_s"] else "")
                    self.progress("recover", state.step, total, status)
                    interval, interval_steps, interval_images = {}, 0, 0
                    interval_start = time.perf_counter()
                else:
                    self.progress("recover", state.step, total, None)

                if state.step % save_every == 0 or state.step == total:
                    save()
                    saved_at = state.step
                asked = bool(on_step(state.step, raw)) if on_step is not None else False
                if distributed.any_rank(ctx, asked or stop.signal is not None) and state.step < total:
                    if saved_at != state.step:
                        save()
                    why = stop.signal or "request"
                    raise Interrupted(
                        f"interrupted by {why} at step {state.step}/{total}; the training state is saved in "
                        f"'{state_path}'. Resume with: {self._resume_hint(resume_command)}"
                    )
        if saved_at != state.step:  # resumed at the end: nothing ran, nothing new to save
            save()

    def _resume_hint(self, command: str | None, lr: float | None = None) -> str:
        if command:
            return command + (f" --lr {lr:g}" if lr is not None else "")
        return f"recover(..., resume=True{f', lr={lr:g}' if lr is not None else ''})"

