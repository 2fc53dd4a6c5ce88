"""`lowrank_cli.load`: an lrc checkpoint, or a base with the adapters of a `finetune(..., merge=False)` run."""

from __future__ import annotations

import os

import torch
from torch import nn

from lowrank_cli.errors import UsageError


def load(path: str | os.PathLike, device: str | torch.device = "cpu", *, revision: str | None = None,
         adapters: str | os.PathLike | None = None, merge: bool = True, fused: bool | None = None) -> nn.Module:
    """`lowrank_cli.load(path)`: the model of an lrc checkpoint, in eval mode, ready to run.

    `path` is the checkpoint file, or an lrc folder or Hub repo as `lrc push` writes them (`hf-hub:ORG/REPO`,
    `local-dir:PATH`, a folder); `revision` picks the Hub branch, tag or commit. With `adapters` (an adapter file
    of `finetune(..., merge=False)`), `path` is the base they were trained on (any MODEL source; its weights must
    hash to the one the file names): the file's head and adapters are applied, and merged unless `merge` is False.
    `fused`: the low-rank layers run through the fused CUDA kernel (see `checkpoint.io.load`; merged models only).
    """
    if adapters is None:
        from lowrank_cli.checkpoint.io import load as load_checkpoint

        return load_checkpoint(path, device, revision=revision, fused=fused)
    from lowrank_cli.adapters.files import apply_adapter_file
    from lowrank_cli.models.fusion import fuse_lowrank, resolve_fused
    from lowrank_cli.models.sources import load_model

    if fused and not merge:
        raise UsageError("`fused` runs merged low-rank layers; with `merge=False` the adapters stay apart: merge them, "
                         "or leave out `fused`")
    fuse = merge and resolve_fused(fused, torch.device(device))
    loaded = load_model(str(path), revision=revision)
    model = apply_adapter_file(loaded, adapters, merge=merge).to(device)
    if fuse:
        fuse_lowrank(model)
    return model
