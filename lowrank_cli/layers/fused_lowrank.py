"""Fused execution of low-rank layers on CUDA: one Triton kernel per layer (or per group of layers that read the
same input) instead of two GEMM launches and a round trip of the rank-r intermediate through memory.

    y = torch.ops.lrc.fused_lowrank(x, [first.weight], [second.weight], [second.bias], "none")

`fused_lowrank` is a torch custom op (`torch.library.custom_op`) with a fake implementation, so torch.compile
traces through it and CUDA graphs capture it. It runs the Triton kernel (`layers.kernels.lowrank_triton`) where
the kernel applies: CUDA tensors, bf16 / fp16, rank a multiple of 16 up to 512, at most 3 layers of equal shapes,
no activation or GELU. Anything else (the CPU, fp32, an odd rank, no Triton) runs the two-`F.linear` reference,
with one debug log line (logger `lowrank_cli.fused`) per reason, never an exception.

`FusedLowRankLinear` is a `LowRankLinear` whose forward calls the op: the same two `nn.Linear` children, so the
state dict, the checkpoint, fvcore's count and every `isinstance` check are unchanged. It calls the op for
inference only (no gradient wanted, not traced by torch.jit): training runs the two linears, as autograd knows them.
`LowRankGroup` runs several of them that read the same tensor in one kernel launch. `models.fusion.fuse_lowrank`
swaps them into a model.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_cli.layers.lowrank_linear import LowRankLinear, take_pending

log = logging.getLogger("lowrank_cli.fused")

ACTIVATIONS = ("none", "gelu")
KERNEL_DTYPES = (torch.bfloat16, torch.float16)
KERNEL_DEVICES = {"cuda"}  # tests add "cpu" to run the kernel under TRITON_INTERPRET=1
MAX_GROUPS = 3
RANK_STEP, MAX_RANK = 16, 512
# (layers, rank, d_in, d_out, dtype, activation) -> why: shapes whose kernel failed to build or launch here; they run
# the reference from then on (the GPU tests check that this stays empty).
KERNEL_FAILURES: dict[tuple, str] = {}


@functools.cache
def triton_missing() -> str | None:
    """Why the Triton kernel cannot run in this installation (None: it can)."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (it ships with torch's CUDA wheels on Linux: pip install triton)"
    try:
        import triton  # noqa: F401
    except Exception as e:  # a broken install is an environment problem, not a crash
        return f"Triton does not import ({type(e).__name__}: {str(e)[:120]})"
    return None


def fused_unavailable(device: torch.device | str) -> str | None:
    """Why the fused kernel cannot run on `device` here (None: it can)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"it runs on CUDA devices and the model is on {device.type}"
    if not torch.cuda.is_available():
        return "no CUDA device is available here"
    if torch.cuda.get_device_capability(device) < (7, 0):
        return f"{torch.cuda.get_device_name(device)} is older than Volta (compute capability 7.0)"
    return triton_missing()


def unsupported(x: torch.Tensor, first: Sequence[torch.Tensor], second: Sequence[torch.Tensor],
                bias: Sequence[torch.Tensor | None], activation: str) -> str | None:
    """Why the kernel does not take these inputs (None: it does); the reference path runs them instead. Plain
    checks, the message formatted only for the one that fails: this runs on every eager call."""
    groups, rank, k = len(first), first[0].shape[0], first[0].shape[-1]
    if x.device.type not in KERNEL_DEVICES:
        return f"{x.device.type} tensors"
    if not (x.dtype in KERNEL_DTYPES or (x.device.type == "cpu" and x.dtype == torch.float32)):
        return f"dtype {x.dtype}"
    if any(t is not None and (t.device != x.device or t.dtype != x.dtype) for t in (*first, *second, *bias)):
        return "mixed devices or dtypes"
    if not (1 <= groups <= MAX_GROUPS and len(second) == len(bias) == groups):
        return f"{groups} layers in one group"
    if rank % RANK_STEP or not RANK_STEP <= rank <= MAX_RANK:
        return f"rank {rank} (a multiple of 16 up to 512 runs)"
    if activation not in ACTIVATIONS:
        return f"activation '{activation}'"
    if x.dim() < 1 or x.shape[-1] != k:
        return "an input that does not fit the layer"
    shape2 = second[0].shape
    if any(w.shape != (rank, k) for w in first) or any(w.shape != shape2 for w in second) or shape2[1] != rank:
        return "layers of different shapes"
    if any((b is None) != (bias[0] is None) for b in bias):
        return "a group mixing layers with and without bias"
    if x.device.type == "cuda":
        if x.dtype == torch.bfloat16 and _capability(x.device.index) < (8, 0):
            return "bf16 before Ampere"
        return triton_missing()
    return None


@functools.cache
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.cache
def log_fallback(why: str) -> None:
    log.debug("fused low-rank kernel not used (%s): running the two linears", why)


def reference(x: torch.Tensor, first: Sequence[torch.Tensor], second: Sequence[torch.Tensor],
              bias: Sequence[torch.Tensor | None], activation: str = "none") -> torch.Tensor:
    """What the kernel computes, as the two linears of each layer compute it (outputs side by side)."""
    outs = []
    for w1, w2, b in zip(first, second, bias):
        y = F.linear(F.linear(x, w1), w2, b)
        outs.append(F.gelu(y) if activation == "gelu" else y)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def fused_lowrank_eager(x: torch.Tensor, first: list[torch.Tensor], second: list[torch.Tensor],
                        bias: list[Optional[torch.Tensor]], activation: str) -> torch.Tensor:
    """act(second[g](first[g](x))) for each layer g, side by side on the last dimension: one kernel launch where
    the kernel applies, the reference elsewhere. The body of the op, called directly in eager mode (the
    dispatcher's Python overhead would cost more than a launch at batch 1)."""
    why = unsupported(x, first, second, bias, activation)
    if why is None:
        key = (len(first), *first[0].shape, second[0].shape[0], str(x.dtype), activation)
        why = KERNEL_FAILURES.get(key)
        if why is None:
            try:
                from lowrank_cli.layers.kernels.lowrank_triton import fused_lowrank as launch

                return launch(x, first, second, bias, activation)
            except Exception as e:  # a kernel that does not build or launch here: the reference, and say so once
                if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                    raise
                why = KERNEL_FAILURES[key] = f"the kernel failed ({type(e).__name__}: {str(e)[:200]})"
                log.warning("fused low-rank kernel failed for %s layer(s) %s -> %s, rank %s, %s: running the two "
                            "linears instead (%s)", key[0], key[2], key[3], key[1], key[4], why)
    log_fallback(why)
    return reference(x, first, second, bias, activation).contiguous()


fused_lowrank = torch.library.custom_op(
    "lrc::fused_lowrank", mutates_args=(),
    schema="(Tensor x, Tensor[] first, Tensor[] second, Tensor?[] bias, str activation) -> Tensor",
)(fused_lowrank_eager)


@fused_lowrank.register_fake
def _fused_lowrank_fake(x, first, second, bias, activation):
    return x.new_empty((*x.shape[:-1], len(second) * second[0].shape[0]))


def _inference_only(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> bool:
    """The op runs only where autograd needs nothing from it, and not under torch.jit tracing (fvcore counts the
    two linears it sees there)."""
    if torch.jit.is_tracing():
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)))


def _autocast(tensors: list[torch.Tensor | None], device_type: str) -> list[torch.Tensor | None]:
    """Under autocast, the op's inputs in the autocast dtype, as F.linear would cast them."""
    if device_type != "cuda" or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return [None if t is None else t.to(dtype) for t in tensors]


def run_fused(x: torch.Tensor, layers: Sequence[LowRankLinear], activation: str = "none") -> torch.Tensor:
    """The layers on x through the op (their outputs side by side), in autocast's dtype where it is on."""
    first = [m.first.weight for m in layers]
    second = [m.second.weight for m in layers]
    bias = [m.second.bias for m in layers]
    cast = _autocast([x, *first, *second, *bias], x.device.type)
    n = len(layers)
    op = torch.ops.lrc.fused_lowrank if torch.compiler.is_compiling() else fused_lowrank_eager
    return op(cast[0], cast[1:1 + n], cast[1 + n:1 + 2 * n], cast[1 + 2 * n:], activation)


class FusedLowRankLinear(LowRankLinear):
    """A LowRankLinear that runs as one fused kernel for inference on CUDA (same children, same state dict).

    `activation="gelu"` folds the GELU that follows the layer into the kernel's epilogue (the model's own GELU
    module is then an nn.Identity: `models.fusion` swaps it and remembers it in `absorbed`). `group`, when set,
    is the LowRankGroup that computes this layer together with its siblings.
    """

    def __init__(self, layer: LowRankLinear, activation: str = "none") -> None:
        nn.Module.__init__(self)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got '{activation}'")
        self.in_features, self.out_features, self.rank = layer.in_features, layer.out_features, layer.rank
        self.first = layer.first
        self.second = layer.second
        self.activation = activation
        self.group: LowRankGroup | None = None
        self.group_index = 0
        self.absorbed: tuple[str, nn.Module] | None = None  # (attribute of the parent, the GELU module it held)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.plain() and _inference_only(x, (self.first.weight,))):
            y = self.second(self.first(x))
            return F.gelu(y) if self.activation == "gelu" else y
        if self.group is not None:
            return self.group.output(self, x)
        return run_fused(x, (self,), self.activation)

    def plain(self) -> bool:
        """Both children are hook-free nn.Linear, so the kernel computes what they would (an adapter that wraps
        one, peft's LoRA, or a hook on one: the children run)."""
        return all(type(m) is nn.Linear and not (m._forward_hooks or m._forward_pre_hooks)
                   for m in (self.first, self.second))

    def extra_repr(self) -> str:
        grouped = f", group of {len(self.group.members)}" if self.group is not None else ""
        return f"{super().extra_repr()}, fused{'+gelu' if self.activation == 'gelu' else ''}{grouped}"


class LowRankGroup:
    """Fused low-rank layers of equal shapes that read the same input (BERT's query, key and value): the first of
    them to be called runs all of them in one launch, and the others take their outputs when they are called
    with that same tensor. A layer called with another tensor (cross-attention) runs on its own."""

    def __init__(self, members: Sequence[FusedLowRankLinear]) -> None:
        if not 2 <= len(members) <= MAX_GROUPS:
            raise ValueError(f"a group holds 2 to {MAX_GROUPS} layers, got {len(members)}")
        self.members = list(members)
        self.pending: tuple[torch.Tensor, list[torch.Tensor | None]] | None = None
        for i, m in enumerate(self.members):
            m.group, m.group_index = self, i

    def output(self, member: FusedLowRankLinear, x: torch.Tensor) -> torch.Tensor:
        index = member.group_index
        out = take_pending(self, index, x)
        if out is not None:
            return out
        if not all(m.plain() for m in self.members):
            return run_fused(x, (member,), member.activation)
        outs = list(run_fused(x, self.members).chunk(len(self.members), dim=-1))
        mine = outs[index]
        outs[index] = None
        self.pending = (x, outs)
        return mine

    def dissolve(self) -> None:
        for m in self.members:
            m.group = None
        self.pending = None
