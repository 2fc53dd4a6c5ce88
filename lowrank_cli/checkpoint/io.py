"""The lrc checkpoint: one safetensors file that rebuilds the low-rank model on its own.

`__metadata__` (string -> string; richer values are JSON strings under `lrc.*` keys):

    format            "pt" (what transformers / accelerate expect)
    lrc.schema        version of this layout (SCHEMA); a newer one is refused with "upgrade lrc"
    lrc.version       the lrc version that wrote the file
    lrc.library       "timm" or "transformers"
    lrc.family        the model family that rebuilds it (models.families: timm_vision, hf_encoder, ...); files
                      without it (written before the families) are read by the family of their library
    lrc.architecture  timm architecture name, or transformers model class (BertModel, ViTForImageClassification)
    lrc.model_args    JSON: constructor arguments (num_classes, img_size, ...); transformers: the whole config
    lrc.pretrained_cfg JSON: the source's pretrained_cfg (input size, mean, std, crop, ...); transformers
                      vision models: their image processor's settings in the same form
    lrc.ranks         JSON: {module name: rank} of every LowRankLinear
    lrc.provenance    JSON: source, revision / sha256, kappa, rank multiple, SVD method, dtype, time
    lrc.layers        JSON: per factorized layer: d_in, d_out, rank, kept_energy, rel_error, method
    lrc.dense         JSON: {module name: why} for target layers left dense
    lrc.spectra       JSON: {module name: singular values / the largest}, 4 significant digits
    lrc.recovery      JSON, after `lrc recover`: settings and measured accuracy
    lrc.plan          JSON, after `--plan speed`: measured per-layer timings
    lrc.finetune      JSON, after `lrc finetune`: method, adapters, head, classes or task, settings, scores
    lrc.multitask     JSON, a multi-task checkpoint: its tasks, whose own tensors (heads, expert adapters) are
                      stored as `tasks/<name>/...` beside the model's (checkpoint.tasks); reading the model skips them

Loading never runs an SVD and never unpickles: the architecture is built on the meta device, the ranks are
swapped in, names and shapes are checked against the file's header, then the tensors are assigned.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from lowrank_cli.atomic import check_output, write_safetensors
from lowrank_cli.checkpoint.format import (
    TASKS_PREFIX,
    CheckpointInfo,
    attach_info,
    header_dtypes,
    info_for_saving,
    metadata_of,
    read_info,
)
from lowrank_cli.errors import InputError, UsageError
from lowrank_cli.layers.lowrank_linear import LowRankLinear
from lowrank_cli.models.build import build_empty, check_fits, finish
from lowrank_cli.models.families import family_of, family_of_spec
from lowrank_cli.models.structure import swap_in


def with_ranks(model: nn.Module, ranks: dict[str, int], what: str) -> nn.Module:
    """Replace the named nn.Linear modules by empty LowRankLinear of the given ranks (same device)."""
    for name, rank in ranks.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            linear = None
        if not isinstance(linear, nn.Linear):
            raise InputError(f"{what} factorizes '{name}', which is not an nn.Linear of the architecture: corrupt metadata?")
        if not 0 < rank <= min(linear.in_features, linear.out_features):
            raise InputError(f"{what}: rank {rank} of '{name}' is impossible for a {linear.out_features}x{linear.in_features} layer")
        swap_in(model, name, LowRankLinear(
            linear.in_features, linear.out_features, rank, bias=linear.bias is not None,
            device=linear.weight.device, dtype=linear.weight.dtype,
        ))
    return model


# ------------------------------------------------------------------------------------------------ reading


def read_checkpoint(path: str | Path, device: str | torch.device = "cpu", *, fused: bool | None = False):
    """Rebuild the model from the file alone; returns a LoadedModel (model, spec, source, checkpoint info).
    `fused`: see `load` (default False here: the model is not fused)."""
    from lowrank_cli.checkpoint.shards import TensorSet
    from lowrank_cli.models.fusion import fuse_lowrank, resolve_fused
    from lowrank_cli.models.loaded import LoadedModel

    fuse = resolve_fused(fused, device)  # `fused=True` where the kernel cannot run fails before the reading
    path = Path(path)
    info, shapes = read_info(path)
    shapes = {k: v for k, v in shapes.items() if not k.startswith(TASKS_PREFIX)}  # a multi-task file's own tensors
    what = f"'{path}'"
    stored = sum(math.prod(shape) for shape in shapes.values())
    model = with_ranks(build_empty(info.spec, what=what, fix="its lrc.model_args are corrupt; write the file again",
                                   max_params=100 * stored + 10**6), info.ranks, what)
    # A tied copy (lm_head.weight of a tied causal LM) may be stored once, as transformers does: `finish` ties it.
    tied = {k: v for k, v in family_of_spec(info.spec).tied_copies(model).items() if k not in shapes and v in shapes}
    check_fits(model, {**shapes, **{k: shapes[v] for k, v in tied.items()}}, what)
    check_dtypes(model, header_dtypes(path), what)
    state_dict = TensorSet.open(path).mapped(list(shapes))  # the files' pages, read when touched: no second copy
    model.load_state_dict(state_dict, strict=not tied, assign=True)
    finish(model, info.spec)  # transformers: tie the tensors the file holds once, or re-tie those it holds twice
    _check_tied(model, tied, what)
    model.to(device)
    model.eval()
    attach_info(model, info)
    if fuse:
        fuse_lowrank(model)
    return LoadedModel(model, info.spec, {"kind": "lrc", "id": str(path.resolve())}, info)


def _check_tied(model: nn.Module, tied: dict[str, str], what: str) -> None:
    """The tensors the file left to `finish` are tied now (a config that no longer ties them would leave garbage)."""
    for copy, original in tied.items():
        if model.get_parameter(copy) is not model.get_parameter(original):
            raise InputError(f"{what} stores '{copy}' as a copy of '{original}', but its config does not tie them: "
                             "corrupt metadata? write the file again")


def check_dtypes(model: nn.Module, dtypes: dict[str, str], what: str) -> None:
    """Before any tensor is read: the model's floating tensors are stored in one floating dtype (lrc writes a model
    in one precision) and its integer buffers as integers, so that a tensor stored as int8 (or float16) in a float32
    file is named here, not met inside load_state_dict (or as a dtype clash in the first forward pass)."""
    expected = model.state_dict()
    floating = {k: d for k, d in dtypes.items() if k in expected and expected[k].is_floating_point()}
    for name, dtype in dtypes.items():
        if name in expected and not expected[name].is_floating_point() and _is_floating(dtype):
            raise InputError(f"{what}: tensor '{name}' is stored as {dtype}, but the model keeps it as "
                             f"{str(expected[name].dtype).removeprefix('torch.')}: the file is corrupt or was edited; "
                             "write it again")
    if not floating:
        return
    common = Counter(floating.values()).most_common(1)[0][0]
    if not _is_floating(common):
        common = next((d for d in floating.values() if _is_floating(d)), "float32")
    odd = sorted(k for k, d in floating.items() if d != common)
    if odd:
        more = f" (and {len(odd) - 1} more)" if len(odd) > 1 else ""
        raise InputError(f"{what}: tensor '{odd[0]}'{more} is stored as {floating[odd[0]]}, but the model's other weights "
                         f"are {common}: the file is corrupt or was edited; write it again in one precision "
                         "(`lowrank_cli.save(model, path, dtype=...)`)")


def _is_floating(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat", "F8", "F4", "F6"))


def load(path: str | Path, device: str | torch.device = "cpu", *, revision: str | None = None,
         fused: bool | None = None) -> nn.Module:
    """`lowrank_cli.load(path)`: the low-rank model of an lrc checkpoint, in eval mode, ready to run.

    `path` is the checkpoint file, or an lrc folder or Hub repo as `lrc push` writes them (`hf-hub:ORG/REPO`,
    `local-dir:PATH`, a folder); `revision` picks the Hub branch, tag or commit.
    `fused`: run the low-rank layers through the fused CUDA kernel for inference (`models.fusion.fuse_lowrank`:
    the same state dict, GELUs and layers that read one input folded in). None (default) and False: not
    fused (on an H200 the kernel was slower than the two cuBLAS GEMMs, see models.fusion.FUSED_BY_DEFAULT); True: always, an EnvironmentProblem (exit 6) without CUDA or Triton.
    """
    from lowrank_cli.models.lrc_folder import checkpoint_path

    return read_checkpoint(checkpoint_path(path, revision), device, fused=fused).model


# ------------------------------------------------------------------------------------------------ writing


def save(model: nn.Module, path: str | Path, *, force: bool = True, dtype: torch.dtype | None = None,
         extra_tensors: dict[str, torch.Tensor] | None = None, max_shard_size: int | None = None) -> Path:
    """`lowrank_cli.save(model, path)`: write the model as an lrc checkpoint, atomically.

    `dtype` casts floating tensors on the way out. With force=False an existing file is refused. `extra_tensors`
    are written beside the state dict under their own names (a multi-task checkpoint's `tasks/...`, see
    checkpoint.tasks); reading the model ignores only those under `tasks/`. A model read from a multi-task
    checkpoint is written as the one model it is: its record's tasks go only with their tensors (write_multitask).
    """
    info = info_for_saving(model)
    if info.multitask is not None and not any(k.startswith(TASKS_PREFIX) for k in extra_tensors or {}):
        info = dataclasses.replace(info, multitask=None)
    return write_checkpoint(model, path, info, force=force, dtype=dtype, extra_tensors=extra_tensors,
                            max_shard_size=max_shard_size)


def write_checkpoint(model: nn.Module, path: str | Path, info: CheckpointInfo, *, force: bool = True,
                     dtype: torch.dtype | None = None, extra_tensors: dict[str, torch.Tensor] | None = None,
                     max_shard_size: int | None = None) -> Path:
    """`save` with the record to write given (`info`, e.g. the model's with a multi-task record added)."""
    path = check_output(path, force=force)
    info.provenance.setdefault("saved", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    tensors = {}
    seen: dict[int, str] = {}
    state = model.state_dict()
    clash = sorted(set(state) & set(extra_tensors or {}))
    if clash:
        raise UsageError(f"`extra_tensors` names '{clash[0]}', a tensor of the model itself: give extra tensors "
                         "names of their own (tasks/<name>/...)")
    for name in _stored_once(model, state):
        del state[name]
    for name, t in [*state.items(), *(extra_tensors or {}).items()]:
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        # safetensors refuses tensors that share memory; tied weights are written as separate copies.
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key in seen and t.numel():
            t = t.clone()
        seen[key] = name
        tensors[name] = t.to("cpu").contiguous()
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    check_output(path, force=True, needed_bytes=total)
    if max_shard_size is None or total <= max_shard_size:
        write_safetensors(path, tensors, metadata_of(model, info))
        return path
    from lowrank_cli.checkpoint.shard_writer import SetWriter

    with SetWriter(path, {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}, max_shard_size) as writer:
        for name, t in tensors.items():
            writer.write(name, t)
        return writer.finish(metadata_of(model, info))[-1]


def _stored_once(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """The state-dict names that the model's family ties again on loading and that really are the same tensor as
    their original now (an untied model writes both)."""
    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        return a.device.type != "meta" and a.data_ptr() == b.data_ptr() and a.shape == b.shape

    return [copy for copy, original in family_of(model).tied_copies(model).items()
            if copy in state and original in state and same(state[copy], state[original])]
