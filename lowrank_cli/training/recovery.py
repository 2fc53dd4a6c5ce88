"""Recovery: distil the low-rank student back towards its dense teacher (PELA Eq. 7).

    from lowrank_cli import recover
    result = recover("deit_lr.safetensors", "deit_base", "imagenet/", output="deit_lr_rec.safetensors", steps=2000)
    result.accuracy        # {"teacher": {...}, "before": {...}, "after": {...}} on imagenet/val
    result.summary()       # what `lrc recover --json` prints

Single process, or data parallel under torchrun (the same call: see lowrank_cli.distributed):

    torchrun --standalone --nproc_per_node 8 -m lowrank_cli recover deit_lr.safetensors --teacher deit_base \\
        --data imagenet/ --steps 2000 -o deit_lr_rec.safetensors

The pieces: the options (training/options.py), the student and teacher (training/teacher.py), the data of each
kind (data/modality.py), the loss (training/losses.py), what a recovery answers the one setup and loop
(training/recover_strategy.py, the setup in training/setup.py), one step (training/step.py), the loop with its
saves and signals (training/trainer.py). AdamW with a cosine schedule after a linear warm-up, gradient clipping, bf16
autocast on CUDA (float32 on the CPU). `resume=True` continues exactly: the data order comes from (seed, epoch),
each image's augmentation from (seed, epoch, index) and the model's own randomness from (seed, step, rank).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from lowrank_cli.training.options import RecoverOptions, options_of
from lowrank_cli.training.recover_strategy import RecoverStrategy
from lowrank_cli.training.result import RecoverResult
from lowrank_cli.training.run import train
from lowrank_cli.training.setup import Hooks
from lowrank_cli.training.trainer import ProgressFn


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
    hooks = Hooks(log or (lambda msg: None), warn or (lambda msg: warnings.warn(msg, stacklevel=2)), progress,
                  resume_command, on_step)
    return train(RecoverStrategy(opts, student, teacher, Path(data).expanduser()), output, hooks)
