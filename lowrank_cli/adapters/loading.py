"""`lowrank_cli.load`: an lrc checkpoint (a multi-task one as one task's model), or a base with the adapters of a
`finetune(..., merge=False)` run."""

from __future__ import annotations

import os

import torch
from torch import nn

from lowrank_cli.errors import UsageError


def load(path: str | os.PathLike, device: str | torch.device = "cpu", *, revision: str | None = None,
         adapters: str | os.PathLike | None = None, merge: bool = True, fused: bool | None = None,
         task: str | None = None) -> nn.Module:
    """`lowrank_cli.load(path)`: the model of an lrc checkpoint, in eval mode, ready to run.

    `path` is the checkpoint file, or an lrc folder or Hub repo as `lrc push` writes them (`hf-hub:ORG/REPO`,
    `local-dir:PATH`, a folder); `revision` picks the Hub branch, tag or commit. With `adapters` (an adapter file
    of `finetune(..., merge=False)`), `path` is the base they were trained on (any MODEL source; its weights must
    hash to the one the file names): the file's head and adapters are applied, and merged unless `merge` is False.
    `task`: for a multi-task checkpoint, which task's model (its head, and its adapters merged in `experts` mode;
    default the first task; see checkpoint.tasks).
    `fused`: the low-rank layers run through the fused CUDA kernel (see `checkpoint.io.load`; merged models only).
    """
    if adapters is None:
        return _load_checkpoint(path, device, revision, fused, task)
    if task is not None:
        raise UsageError("`task` picks a task of a multi-task checkpoint and `adapters` applies an adapter file to a "
                         "base: give one of them")
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


def _load_checkpoint(path: str | os.PathLike, device: str | torch.device, revision: str | None,
                     fused: bool | None, task: str | None) -> nn.Module:
    """An lrc checkpoint; a multi-task one as the model of `task` (the first by default)."""
    from lowrank_cli.checkpoint.format import read_info
    from lowrank_cli.checkpoint.io import read_checkpoint
    from lowrank_cli.checkpoint.tasks import model_for_task
    from lowrank_cli.models.fusion import fuse_lowrank, resolve_fused
    from lowrank_cli.models.lrc_folder import checkpoint_path

    file = checkpoint_path(path, revision)
    info, _ = read_info(file)
    if info.multitask is None:
        if task is not None:
            raise UsageError(f"'{path}' holds one task (it is not a multi-task checkpoint): leave `task` out")
        return read_checkpoint(file, device, fused=fused).model
    fuse = resolve_fused(fused, device)  # `fused=True` where the kernel cannot run fails before the reading
    model = model_for_task(read_checkpoint(file, device), task)
    if fuse:
        fuse_lowrank(model)
    return model
