"""Fused execution swapped into a model at load time, for inference on CUDA; the state dict does not change.

    fuse_lowrank(model)      # every LowRankLinear -> FusedLowRankLinear (same children, same state-dict keys);
                             # a GELU right after one goes into its kernel; layers that read the same tensor
                             # (BERT's query, key, value) run as one group, one kernel launch
    unfuse_lowrank(model)    # back to plain LowRankLinear and the model's own GELU modules

What reads what is found by one forward pass of a twin of the model on the meta device (no arithmetic, no
memory), with hooks: a GELU is folded into a layer only when its input is that layer's output and both belong to
the same parent module (timm's Mlp: fc1 -> act; BERT's intermediate: dense -> intermediate_act_fn), and layers are
grouped only when they get the very same input tensor and have equal shapes. A model the meta twin cannot run
keeps per-layer fusion only.
"""

from __future__ import annotations

import copy
import itertools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_cli.errors import EnvironmentProblem
from lowrank_cli.layers.fused_lowrank import (
    KERNEL_DTYPES,
    MAX_GROUPS,
    FusedLowRankLinear,
    LowRankGroup,
    fused_unavailable,
)
from lowrank_cli.layers.lowrank_linear import LowRankLinear
from lowrank_cli.models.structure import swap_in

log = logging.getLogger("lowrank_cli.fused")


@dataclass
class FusionSummary:
    layers: int = 0  # low-rank layers that run fused
    groups: int = 0  # groups of layers that read the same input, one launch each
    grouped_layers: int = 0
    activations: int = 0  # GELUs folded into a kernel's epilogue
    traced: bool = False  # the meta forward ran (groups and GELUs were looked for)

    def describe(self) -> str:
        if not self.layers:
            return "no low-rank layer to fuse"
        text = f"{self.layers} low-rank layers run fused"
        if self.groups:
            text += f", {self.grouped_layers} of them in {self.groups} groups reading one input"
        if self.activations:
            text += f", {self.activations} with the GELU after them in the kernel"
        return text


# Measured on an H200 (bf16, torch 2.11, Triton 3.6; benchmarks/gpu_speed.py): the fused kernel ran DeiT-B kappa 2
# at 0.86x dense where the two cuBLAS GEMMs per layer ran 1.25-1.33x, and BERT-base batch 64 at 0.93x against 1.07x
# (CUDA graphs). Until it beats cuBLAS it runs only when asked for.
FUSED_BY_DEFAULT = False


def resolve_fused(fused: bool | None, device: torch.device | str, *, dtype: torch.dtype | None = None,
                  parameter: str = "fused") -> bool:
    """Whether to fuse for `device`: `fused=None` (default) as FUSED_BY_DEFAULT says where the kernel can run there
    (and takes `dtype`, when the model runs in a known one), `fused=False` never, `fused=True` always (an
    EnvironmentProblem where it cannot: no CUDA, no Triton). `parameter` names the option in messages."""
    if fused is False or (fused is None and not FUSED_BY_DEFAULT):
        return False
    if fused is None and dtype is not None and dtype not in KERNEL_DTYPES:
        return False
    why = fused_unavailable(device)
    if why is None:
        return True
    if fused:
        raise EnvironmentProblem(f"`{parameter}=True` asks for the fused low-rank kernel, but {why}: run on a CUDA "
                                 f"device with Triton installed, or leave the kernel out with `{parameter}=False`")
    return False


def is_exact_gelu(module: nn.Module) -> bool:
    """nn.GELU() (erf form) or transformers' GELUActivation over F.gelu: what the kernel's epilogue computes."""
    if isinstance(module, nn.GELU):
        return module.approximate == "none"
    return type(module).__name__ == "GELUActivation" and getattr(module, "act", None) is F.gelu


def fuse_lowrank(model: nn.Module, *, activations: bool = True, groups: bool = True,
                 input_size: tuple[int, ...] | None = None) -> FusionSummary:
    """Swap fused execution into `model` in place (see the module docstring); returns what was fused."""
    unfuse_lowrank(model)
    names = [n for n, m in model.named_modules() if n and isinstance(m, LowRankLinear)]  # not a bare layer: wrap it
    summary = FusionSummary()
    if not names:
        return summary
    gelus, sets = {}, []
    if activations or groups:
        reads = _trace_reads(model, names, input_size)
        if reads is not None:
            summary.traced = True
            gelus = _absorbable_gelus(model, reads) if activations else {}
            sets = _read_sets(model, reads, exclude=set(gelus)) if groups else []
    for name in names:
        fused = FusedLowRankLinear(model.get_submodule(name), activation="gelu" if name in gelus else "none")
        if name in gelus:
            parent_name, attr = gelus[name]
            parent = model.get_submodule(parent_name)
            fused.absorbed = (attr, getattr(parent, attr))
            setattr(parent, attr, nn.Identity())
            summary.activations += 1
        swap_in(model, name, fused)
    for members in sets:
        LowRankGroup([model.get_submodule(n) for n in members])
        summary.groups += 1
        summary.grouped_layers += len(members)
    summary.layers = len(names)
    log.debug("fusion: %s", summary.describe())
    return summary


def unfuse_lowrank(model: nn.Module) -> int:
    """Undo `fuse_lowrank`: plain LowRankLinear layers and the model's GELU modules again; returns how many."""
    undone = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, FusedLowRankLinear):
            continue
        if module.group is not None:
            module.group.dissolve()
        if module.absorbed is not None:
            attr, original = module.absorbed
            parent_name = name.rpartition(".")[0]
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, original)
        plain = LowRankLinear.__new__(LowRankLinear)
        nn.Module.__init__(plain)
        plain.in_features, plain.out_features, plain.rank = module.in_features, module.out_features, module.rank
        plain.first, plain.second = module.first, module.second
        swap_in(model, name, plain)
        undone += 1
    return undone


# ------------------------------------------------------------------------------------------------ what reads what


@dataclass
class _Reads:
    inputs: dict[str, list[torch.Tensor]]  # module name -> the input tensor of each call
    outputs: dict[str, list[torch.Tensor]]  # low-rank layer name -> the output tensor of each call
    gelus: list[str]  # names of the exact GELU modules, each a single attribute of its parent


def _trace_reads(model: nn.Module, names: list[str], input_size: tuple[int, ...] | None) -> _Reads | None:
    """One forward of a meta-device twin of `model`, recording every low-rank layer's and GELU's input and output
    tensors (kept alive, so that identity means identity). None when the twin cannot run."""
    from lowrank_cli.models.inputs import default_input_size, input_spec

    counts: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    gelus = [n for n, m in model.named_modules() if n and is_exact_gelu(m) and counts[id(m)] == 1]
    try:
        twin = copy.deepcopy(model, {id(t): torch.empty_like(t, device="meta")
                                     for t in itertools.chain(model.parameters(), model.buffers())})
        size = tuple(input_size or default_input_size(model))
        reads = _Reads({}, {}, gelus)
        hooks = []
        for name in [*names, *gelus]:
            def record(module, args, output, name=name):
                reads.inputs.setdefault(name, []).append(args[0] if args else None)
                reads.outputs.setdefault(name, []).append(output)
            hooks.append(twin.get_submodule(name).register_forward_hook(record))
        twin.eval()
        with torch.no_grad():
            twin(input_spec(model).example(size, device="meta", dtype=next(model.parameters()).dtype, zeros=True))
    except Exception as e:  # fusion is an optimisation: a model the twin cannot run keeps per-layer fusion
        log.debug("fusion: no meta forward (%s: %s): layers fused one by one", type(e).__name__, str(e)[:200])
        return None
    return reads


def _absorbable_gelus(model: nn.Module, reads: _Reads) -> dict[str, tuple[str, str]]:
    """low-rank layer name -> (parent name, attribute) of the GELU that only ever reads its output."""
    found = {}
    for gelu in reads.gelus:
        calls = reads.inputs.get(gelu, [])
        parent, _, attr = gelu.rpartition(".")
        for name, outs in reads.outputs.items():
            if name in reads.gelus or name.rpartition(".")[0] != parent or len(outs) != 1 or len(calls) != 1:
                continue
            if calls[0] is outs[0] and name not in found:
                found[name] = (parent, attr)
    return found


def _read_sets(model: nn.Module, reads: _Reads, exclude: set[str]) -> list[list[str]]:
    """Groups (2 to MAX_GROUPS, in call order) of low-rank layers of one parent and equal shapes that read the very
    same input tensor once each."""
    buckets: dict[tuple, list[str]] = {}
    for name, ins in reads.inputs.items():
        if name in reads.gelus or name in exclude or len(ins) != 1 or ins[0] is None:
            continue
        layer = model.get_submodule(name)
        key = (id(ins[0]), name.rpartition(".")[0], layer.in_features, layer.out_features, layer.rank,
               layer.second.bias is not None)
        buckets.setdefault(key, []).append(name)
    sets = []
    for members in buckets.values():
        for i in range(0, len(members), MAX_GROUPS):
            chunk = members[i:i + MAX_GROUPS]
            if len(chunk) >= 2:
                sets.append(chunk)
    return sets
