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

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_cli import distributed
from lowrank_cli.data.sampling import default_workers
from lowrank_cli.errors import EnvironmentProblem, InputError, Interrupted, OutputError, TrainingError
from lowrank_cli.training.metrics import check_metrics_path, metrics_path
from lowrank_cli.training.options import RecoverOptions, options_of
from lowrank_cli.training.recovery_run import RecoveryRun
from lowrank_cli.training.result import RecoverResult
from lowrank_cli.training.state import train_state_path
from lowrank_cli.training.trainer import NoUsableData, ProgressFn

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
    opts = options_of(RecoverOptions, options, option_values, "recover")
    log = log or (lambda msg: None)
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=2))
    return guarded_run(opts, output, lambda ctx, workers, state_path: RecoveryRun(
        ctx, opts, workers, log, warn, progress, resume_command, on_step).run(
        student, teacher, Path(data).expanduser(), Path(output), state_path))


def guarded_run(opts: Any, output: str | os.PathLike, body: Callable[..., Any]) -> Any:
    """Run one training (`body(ctx, workers, state_path)`) with what every training needs around it: the outputs
    checked before anything loads, torch.distributed set up and torn down, out-of-memory as an environment
    problem, and a fresh run that fails leaving nothing behind (an interrupted one keeps its state to resume)."""
    output = Path(output)
    state_path = train_state_path(output)
    _check_outputs(output, state_path, opts)
    ctx = distributed.setup(opts.device)
    workers = default_workers(ctx.local_world_size) if opts.num_workers is None else opts.num_workers
    try:
        return body(ctx, workers, state_path)
    except torch.cuda.OutOfMemoryError:
        _forget_failed_run(output, state_path, opts, ctx)
        raise EnvironmentProblem(
            f"out of GPU memory at `batch_size` {opts.batch_size}: use a smaller `batch_size` with a larger "
            "`grad_accum` (same images per step)"
        ) from None
    except (Interrupted, TrainingError):
        raise  # the saved training state and its metrics are what a resume continues from
    except BaseException as e:
        _forget_failed_run(output, state_path, opts, ctx, drop_state=isinstance(e, NoUsableData))
        raise
    finally:
        distributed.teardown(ctx)


def _forget_failed_run(output: Path, state_path: Path, opts: RecoverOptions, ctx, drop_state: bool = False) -> None:
    """A fresh run that failed leaves nothing behind: its metrics log (and, when it trained on nothing, its state).
    A resumed run keeps both: they belong to the run it continues."""
    if opts.resume or not ctx.is_main:
        return
    if drop_state:
        state_path.unlink(missing_ok=True)
    if not state_path.exists():
        metrics_path(output).unlink(missing_ok=True)


def _check_outputs(output: Path, state_path: Path, opts: RecoverOptions) -> None:
    """The output and the training state of an earlier run, checked before anything is loaded."""
    from lowrank_cli.atomic import check_output

    check_output(output, force=opts.force)
    check_metrics_path(output)
    if opts.resume and not state_path.is_file():
        raise InputError(f"`resume=True`: there is no training state '{state_path}' to continue (it is written every "
                         "`save_every` steps, and removed when a run finishes): start without `resume=True`")
    if not opts.resume and state_path.exists():
        if not opts.force:
            raise OutputError(f"the training state of an earlier, unfinished run is at '{state_path}': continue it "
                              "with `resume=True`, or pass `force=True` to start again")
        state_path.unlink(missing_ok=True)  # starting again: a later resume must not find the old run


