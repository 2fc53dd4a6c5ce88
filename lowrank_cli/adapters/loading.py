"""Loading, from any source: `lowrank_cli.load_model` (any MODEL source, lrc checkpoints included: a multi-task
one as its first task's model) and `lowrank_cli.load` (an lrc checkpoint, or a base with the adapters of a
`finetune(..., merge=False)` run).

This is the one entry point for reading a model, above checkpoint/ because a multi-task checkpoint's task is
merged with its adapters: an lrc checkpoint (file, folder, Hub repo) is read by checkpoint.io, any other source by
its model family (models.pretrained.open_pretrained).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_cli.adapters.task_models import model_for_task
from lowrank_cli.checkpoint.format import is_lrc_checkpoint, read_info
from lowrank_cli.checkpoint.io import read_checkpoint
from lowrank_cli.checkpoint.shards import index_of
from lowrank_cli.errors import UsageError
from lowrank_cli.models.fusion import fuse_lowrank, resolve_fused
from lowrank_cli.models.loaded import LoadedModel
from lowrank_cli.models.lrc_folder import (
    HUB_PREFIX,
    LrcFiles,
    checkpoint_path,
    folder_files,
    hub_files,
    is_lrc_folder,
    split_hub_source,
)
from lowrank_cli.models.pretrained import as_hub_repo, check_library, is_hub_name, local_folder, open_pretrained


def load_model(source: str, *, arch: str | None = None, model_args: dict[str, Any] | None = None,
               revision: str | None = None, library: str | None = None, log=None, first_task: bool = True
               ) -> LoadedModel:
    """Load any MODEL source (see models.pretrained; an lrc checkpoint file, folder or Hub repo too). `log(msg)`
    receives what was chosen. `library` ("timm" / "transformers" / None for auto) forces how a folder or Hub repo
    is read. A multi-task checkpoint is its first task's model (`as_first_task`), unless `first_task` is False
    (then the file as stored, for `adapters.task_models.model_for_task` to pick a task)."""
    check_library(library)
    files = lrc_source(source, revision)
    if files is None:
        from lowrank_cli.adapters.adapter_source import is_adapter_file, load_adapted

        if is_adapter_file(source):  # finetune --no-merge's file: its base, with the adapters merged
            return load_adapted(source, lambda base: load_model(base, library=library, log=log), log)
        return open_pretrained(source, arch=arch, model_args=model_args, revision=revision, library=library, log=log)
    loaded = read_lrc(files)
    return as_first_task(loaded) if first_task else loaded


def lrc_source(source: str, revision: str | None = None) -> LrcFiles | None:
    """Where the lrc checkpoint that `source` names is: an lrc folder or Hub repo (its marker), or a safetensors
    file with lrc metadata; None for any other source (a Hub repo offline whose marker is not cached included: the
    next file the family asks for decides, as an lrc repo has no config.json)."""
    if source.startswith(HUB_PREFIX):
        return hub_files(*split_hub_source(source, revision))
    folder = local_folder(source)
    if folder is not None:
        return folder_files(folder) if is_lrc_folder(folder) else None
    path = Path(source).expanduser()
    index = index_of(path)  # a sharded lrc checkpoint: its index (or X.safetensors beside X.safetensors.index.json)
    if index is not None and index.is_file():
        return LrcFiles(index, index.parent) if is_lrc_checkpoint(index) else None
    if path.is_file():
        is_lrc = path.suffix == ".safetensors" and is_lrc_checkpoint(path)  # a corrupt header fails here
        return LrcFiles(path, path.parent) if is_lrc else None
    if is_hub_name(source):
        with as_hub_repo(source):
            return hub_files(source, revision)
    return None


def read_lrc(files: LrcFiles) -> LoadedModel:
    """An lrc checkpoint: an lrc folder's or repo's with its source named as given and the tokenizer next to it."""
    loaded = read_checkpoint(files.checkpoint)
    if files.source:
        loaded.source = dict(files.source)
    if files.tokenizer:
        loaded.files, loaded.revision = str(files.folder), files.source.get("revision")
    return loaded


def as_first_task(loaded: LoadedModel) -> LoadedModel:
    """A multi-task checkpoint read as a MODEL is its first task's model (`load(path)`): in experts mode the
    stored backbone lacks that task's adapters, which every command that reads a MODEL should see merged."""
    if getattr(loaded.checkpoint, "multitask", None) is not None:
        model_for_task(loaded)
    return loaded


def load(path: str | os.PathLike, device: str | torch.device = "cpu", *, revision: str | None = None,
         adapters: str | os.PathLike | None = None, merge: bool = True, fused: bool | None = None,
         task: str | None = None, group: bool | None = None, runtime: str = "eager", note=None) -> nn.Module:
    """`lowrank_cli.load(path)`: the model of an lrc checkpoint, in eval mode, ready to run.

    `path` is the checkpoint file, or an lrc folder or Hub repo as `lrc push` writes them (`hf-hub:ORG/REPO`,
    `local-dir:PATH`, a folder); `revision` picks the Hub branch, tag or commit. With `adapters` (an adapter file
    of `finetune(..., merge=False)`), `path` is the base they were trained on (any MODEL source; its weights must
    hash to the one the file names): the file's head and adapters are applied, and merged unless `merge` is False.
    `task`: for a multi-task checkpoint, which task's model (its head, and its adapters merged in `experts` mode;
    default the first task; see checkpoint.tasks).
    `fused`: the low-rank layers run through the fused CUDA kernel (see `checkpoint.io.load`; merged models only).
    `group`: low-rank layers that read one input (q/k/v, gate/up, as the model's family declares) run as one GEMM
    for their first factors (models.grouping; None: as GROUPED_BY_DEFAULT says, on; True on a model without such
    layers: a note to `note(msg)` (default: the lowrank_cli.grouping logger), not an error). The file format does
    not change: a grouped model saved back is the ungrouped file. Fused layers keep the kernel's own groups.
    `runtime`: eager, compile or graphs (CUDA only; see models.runtime); compile and graphs return the compiled
    model (a causal LM: the model, its forward compiled and a static KV cache for generate).
    """
    from lowrank_cli.models.runtime import check_runtime

    check_runtime(runtime, device)  # graphs on the CPU is refused before the reading
    if adapters is None:
        model = _load_checkpoint(path, device, revision, fused, task)
        return _ready(model, device, group, runtime, note)
    if task is not None:
        raise UsageError("`task` picks a task of a multi-task checkpoint and `adapters` applies an adapter file to a "
                         "base: give one of them")
    from lowrank_cli.adapters.files import apply_adapter_file

    if fused and not merge:
        raise UsageError("`fused` runs merged low-rank layers; with `merge=False` the adapters stay apart: merge them, "
                         "or leave out `fused`")
    fuse = merge and resolve_fused(fused, torch.device(device))
    loaded = load_model(str(path), revision=revision)
    model = apply_adapter_file(loaded, adapters, merge=merge).to(device)
    if fuse:
        fuse_lowrank(model)
    return _ready(model, device, group, runtime, note)


def _ready(model: nn.Module, device: str | torch.device, group: bool | None, runtime: str, note) -> nn.Module:
    """The loaded model grouped (unless fused) and set up to run as `runtime` says."""
    from lowrank_cli.layers.fused_lowrank import FusedLowRankLinear
    from lowrank_cli.models.grouping import apply_group
    from lowrank_cli.models.runtime import apply_runtime

    if not any(isinstance(m, FusedLowRankLinear) for m in model.modules()):
        apply_group(model, group, note)
    return apply_runtime(model, runtime, device)


def _load_checkpoint(path: str | os.PathLike, device: str | torch.device, revision: str | None,
                     fused: bool | None, task: str | None) -> nn.Module:
    """An lrc checkpoint; a multi-task one as the model of `task` (the first by default)."""
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
