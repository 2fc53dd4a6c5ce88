"""Fine-tuning: adapt a compressed (or dense) model to a downstream task with a new head and one of the methods of
lowrank_cli.adapters, merged back at zero cost.

    from lowrank_cli.training.finetune import finetune
    result = finetune("deit_lr.safetensors", "flowers/", output="flowers_lr.safetensors", method="lora", epochs=10)
    result.scores                # held-out top-1 (or accuracy, or Spearman) before and after, the state kept
    result.trainable_share       # the share of the parameters that trained

The output has the input's layers, shapes and ranks plus the new head, and records `lrc.finetune` (method,
adapters, head, classes, settings, scores); `lowrank_cli.load` rebuilds it. With `merge=False` the output is an
adapter file instead (adapters.files), applied by `lowrank_cli.load(base, adapters=...)`.

The training is recovery's (the one setup and loop, training/setup.py and training/trainer.py, with
training/finetune_strategy.py): AdamW, warm-up then cosine, bf16 autocast on
CUDA, DDP under torchrun, `compile`, exact `resume`, Ctrl-C / SIGTERM saves, metrics JSONL, held-out scores every
`eval_every` steps (default once per epoch) with the best state kept (`keep`).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from lowrank_cli.training.finetune_strategy import DataFile, FinetuneStrategy
from lowrank_cli.training.options import FinetuneOptions, options_of
from lowrank_cli.training.result import FinetuneResult
from lowrank_cli.training.run import train
from lowrank_cli.training.setup import Hooks
from lowrank_cli.training.trainer import ProgressFn


def finetune(
    model: Any,
    data: str | os.PathLike,
    *,
    output: str | os.PathLike,
    options: FinetuneOptions | None = None,
    progress: ProgressFn | None = None,
    log: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
    resume_command: str | None = None,
    on_step: Callable[[int, nn.Module], bool | None] | None = None,
    **option_values: Any,
) -> FinetuneResult:
    """Fine-tune `model` (any MODEL source, an lrc checkpoint or a dense model, or a LoadedModel) on `data`.

    data: an ImageFolder (train/<class>/..., optional val/<class>/...) or class tree for image models; a .jsonl /
    .csv file of `text` (optional `text_pair`) with `label` (classes) or `score` (regression) for text models. The
    options are those of `FinetuneOptions` (training/options.py), as keywords (`method="dora", epochs=3`) or one
    `options` object; exactly one of `steps` and `epochs`. `on_step(step, model)` returning True stops the run as
    SIGINT does; `resume_command` is the command printed on interruption.
    """
    opts = options_of(FinetuneOptions, options, option_values, "finetune")
    opts = dataclasses.replace(opts, lr=opts.peak_lr)
    hooks = Hooks(log or (lambda msg: None), warn or (lambda msg: warnings.warn(msg, stacklevel=2)), progress,
                  resume_command, on_step)
    path = Path(data).expanduser()
    return train(strategy_for(opts, model, path, hooks), output, hooks)


def strategy_for(opts: FinetuneOptions, model: Any, path: Path, hooks: Hooks) -> Any:
    """Labelled data for a classifier or a regression (FinetuneStrategy); text for a causal LM, whose family reads
    it as a token stream: next-token training (NextTokenStrategy). Only text data loads the model this early."""
    from lowrank_cli.data.texts import looks_like_text_data

    if looks_like_text_data(path):
        from lowrank_cli.models.families import family_of
        from lowrank_cli.training.lm_strategy import NextTokenStrategy
        from lowrank_cli.training.teacher import load_participant

        log = hooks.log if os.environ.get("RANK", "0") == "0" else (lambda msg: None)  # torchrun: rank 0 says it
        loaded = load_participant(model, "model", opts.arch, opts.model_args, log, opts.library)
        if family_of(loaded.model).text_data == "stream":
            return NextTokenStrategy(opts, loaded, path)
        model = loaded
    return FinetuneStrategy(opts, model, DataFile(path))
