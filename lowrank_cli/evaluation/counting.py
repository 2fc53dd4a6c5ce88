"""Parameter and multiply-accumulate (MAC) counts, and the human sizes that CI gates are written in.

MACs come from fvcore's `FlopCountAnalysis`, whose "flop" is in fact one multiply-accumulate. fvcore knows
nothing of `aten::scaled_dot_product_attention`, the fused attention timm uses by default, so on its own it
drops the attention matmuls (DeiT-B: 16.87 GMACs instead of 17.58); a handle for it is registered here, so
fused and unfused attention count the same.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Union

import torch
from torch import nn

with warnings.catch_warnings():
    # fvcore.nn imports a module that calls torch.jit.script, deprecated (FutureWarning) in recent torch.
    warnings.simplefilter("ignore")
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import (
        elementwise_flop_counter,
        get_shape,
        norm_flop_counter,
    )

from lowrank_cli.errors import InputError, UsageError
from lowrank_cli.layers.lowrank_linear import LowRankLinear
from lowrank_cli.models.families import family_of

__all__ = [
    "MacCount",
    "ParamCount",
    "count_macs",
    "count_params",
    "format_size",
    "linear_macs_removed",
    "parse_size",
]

Inputs = Union[torch.Tensor, Sequence[torch.Tensor], Sequence[int]]


# ----------------------------------------------------------------------------------------------- params


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts; `lowrank + dense_linear + other == total`."""

    total: int
    lowrank: int  # inside LowRankLinear modules (their .first and .second)
    dense_linear: int  # plain nn.Linear modules not inside a LowRankLinear: what is left to factorize
    other: int  # embeddings, norms, convs, class token, position embedding, ...


def count_params(model: nn.Module) -> ParamCount:
    """Count `model`'s parameters by kind; a shared (tied) parameter is counted once, where first seen."""
    counts = {"lowrank": 0, "dense_linear": 0, "other": 0}
    seen: set[int] = set()

    def walk(module: nn.Module, inside_lowrank: bool) -> None:
        inside_lowrank = inside_lowrank or isinstance(module, LowRankLinear)
        if inside_lowrank:
            kind = "lowrank"
        elif isinstance(module, nn.Linear):
            kind = "dense_linear"
        else:
            kind = "other"
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                counts[kind] += p.numel()
        for child in module.children():
            walk(child, inside_lowrank)

    walk(model, False)
    return ParamCount(total=sum(counts.values()), **counts)


# ----------------------------------------------------------------------------------------------- MACs


@dataclass(frozen=True)
class MacCount:
    """Multiply-accumulates of one forward pass (fvcore's conventions; see the module docstring)."""

    total: int
    flops: int  # 2 * total: one MAC is a multiply and an add
    by_module: dict[str, int]  # module name -> MACs, "" is the whole model
    by_operator: dict[str, int]  # "linear", "conv", "scaled_dot_product_attention", ... -> MACs
    uncounted: dict[str, int]  # op -> occurrences: ops that may cost MACs but were counted as 0
    input_shape: tuple[int, ...]  # of the first input tensor, batch included


def _sdpa_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """aten::scaled_dot_product_attention: Q @ K^T plus attn @ V, the same two matmuls fvcore counts in
    timm's unfused path. Softmax and scaling are left out there too (elementwise)."""
    q, k, v = (get_shape(x) for x in inputs[:3])
    if q is None or k is None or v is None:
        raise InputError(
            "could not read the attention shapes from the traced graph. Fix: pass a concrete input tensor "
            "or `input_size` so the model can be traced with known shapes."
        )
    *batch_dims, lq, e = q  # batch and heads; K/V may have fewer heads (GQA), the work follows Q's
    lk, ev = k[-2], v[-1]
    return math.prod(batch_dims) * lq * lk * (e + ev)


# Handles added to fvcore's defaults (which are kept for everything else).
_EXTRA_HANDLES = {
    "aten::scaled_dot_product_attention": _sdpa_macs,
    # fvcore counts adaptive_avg_pool2d as 1 per input element; timm's global pooling of tokens is a
    # mean (Swin, ViT with global_pool="avg"), so count it the same way.
    "aten::mean": elementwise_flop_counter(1, 0),
    # fvcore counts layer_norm/group_norm as 5 per element (with affine); RMSNorm is the same kind.
    "aten::rms_norm": norm_flop_counter(2),
}

# Ops fvcore reports as unsupported that cost no multiply-accumulates by fvcore's own convention: it counts
# matmuls, convs, norms and pooling, and never elementwise arithmetic or activations (it even lists relu and
# clamp among the ops it ignores), nor data movement. Anything fvcore cannot count and that is not here is
# reported in `MacCount.uncounted`, so a missing handle shows up instead of silently lowering the figure.
_ZERO_MAC_OPS = frozenset(
    {
        # elementwise arithmetic: residual adds, layer scale, q * scale, masks (Swin's rsub)
        "aten::add", "aten::add_", "aten::sub", "aten::sub_", "aten::rsub", "aten::mul", "aten::mul_",
        "aten::div", "aten::div_", "aten::neg",
        # activations, softmax included (fvcore leaves softmax out in attention as well)
        "aten::gelu", "aten::gelu_", "aten::silu", "aten::silu_", "aten::sigmoid", "aten::sigmoid_",
        "aten::tanh", "aten::tanh_", "aten::hardswish", "aten::hardswish_", "aten::hardsigmoid",
        "aten::hardtanh", "aten::hardtanh_", "aten::softmax", "aten::log_softmax",
        # data movement and comparisons (Swin pads to whole windows)
        "aten::pad", "aten::clone", "aten::repeat", "aten::expand_as", "aten::masked_fill_", "aten::ne",
        "aten::lt", "aten::le", "aten::where",
        # table lookups (transformers' token, position and type embeddings)
        "aten::embedding",
        # decoder LMs: elementwise powers and roots (RMSNorm written out, GPT-2's tanh GELU), rotary cos / sin, and
        # the position and mask bookkeeping of transformers' causal masks
        "aten::pow", "aten::rsqrt", "aten::cos", "aten::sin", "aten::cumsum", "aten::diff", "aten::new_ones",
    }
)  # fmt: skip


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def _as_inputs(model: nn.Module, inputs: Inputs) -> tuple[torch.Tensor, ...]:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    items = tuple(inputs) if isinstance(inputs, (tuple, list)) else ()
    if items and all(isinstance(t, torch.Tensor) for t in items):
        return items
    if items and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in items):
        from lowrank_cli.models.inputs import example_input

        device, dtype = _model_device_dtype(model)
        # A private generator: values do not change the count, and the caller's RNG stream stays untouched.
        return (example_input(model, items, device=device, dtype=dtype, generator=torch.Generator().manual_seed(0)),)
    raise UsageError(
        f"cannot count MACs for inputs {inputs!r}. Fix: pass an input tensor, a tuple of tensors, or an "
        "input size without the batch dimension such as (3, 224, 224)."
    )


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the count, then each module's own training flag back: the caller's model is untouched."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


@contextlib.contextmanager
def _quiet_fvcore() -> Iterator[None]:
    logger = logging.getLogger("fvcore")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def count_macs(model: nn.Module, inputs: Inputs) -> MacCount:
    """MACs of one forward pass of `model` in eval mode.

    `inputs`: a tensor, a tuple of tensors, or an input size without batch such as (3, 224, 224) or, for a
    text model, (seq_len,) (then a batch-1 random input on the model's device and dtype is used).
    """
    args = _as_inputs(model, inputs)
    analysis = (
        FlopCountAnalysis(model, args)
        .unsupported_ops_warnings(False)
        .uncalled_modules_warnings(False)
        .tracer_warnings("none")  # jit tracing warns about data-dependent shapes in timm; irrelevant here
    )
    for op, handle in _EXTRA_HANDLES.items():
        analysis.set_op_handle(op, handle)
    with _eval_mode(model), torch.no_grad(), _quiet_fvcore(), family_of(model).plain_outputs(model):
        try:
            total = int(analysis.total())
        except (RuntimeError, AssertionError, ValueError, TypeError, IndexError) as err:
            shapes = ", ".join(str(tuple(a.shape)) for a in args)
            raise InputError(
                f"could not run the model on input of shape {shapes}: {err}. Fix: use an input size the "
                "model accepts (timm models: pretrained_cfg['input_size'])."
            ) from err
        by_module = {name: int(n) for name, n in analysis.by_module().items()}
        by_operator = {op: int(n) for op, n in analysis.by_operator().items()}
        uncounted = {op: n for op, n in analysis.unsupported_ops().items() if op not in _ZERO_MAC_OPS}
    return MacCount(
        total=total,
        flops=2 * total,
        by_module=by_module,
        by_operator=by_operator,
        uncounted=uncounted,
        input_shape=tuple(args[0].shape),
    )


def linear_macs_removed(d_in: int, d_out: int, rank: int, tokens: int) -> int:
    """MACs saved by replacing a d_in -> d_out linear that sees `tokens` tokens with a rank-`rank` pair
    (negative when the rank is too large to pay off)."""
    return tokens * (d_in * d_out - rank * (d_in + d_out))


# ----------------------------------------------------------------------------------------------- sizes

_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?(?:e[+-]?\d+)?|\.\d+(?:e[+-]?\d+)?)\s*([kmgt]?)\s*$", re.IGNORECASE)
_SIZE_FORMS = (
    "a whole number such as 12345 or 2.5e9, optionally with a decimal suffix k, M, G or T (50M, 1.5k, 9G)"
)


def parse_size(text: str) -> int:
    """Parse a human size: "50M" -> 50_000_000, "1.5k" -> 1500, "2.5e9"; suffixes are powers of 1000."""
    match = _SIZE_RE.match(text) if isinstance(text, str) else None
    if match is None:
        raise UsageError(f"invalid size {text!r}. Fix: write {_SIZE_FORMS}.")
    # Decimal, not float: "1.1T" must be exactly 1_100_000_000_000.
    value = Decimal(match.group(1)) * _SUFFIXES[match.group(2).lower()]
    if value != value.to_integral_value():
        raise UsageError(f"size {text!r} is not a whole number ({value}). Fix: write {_SIZE_FORMS}.")
    return int(value)


def format_size(n: int | float) -> str:
    """Short decimal form with two decimals: 86_567_656 -> "86.57M", 17_580_000_000 -> "17.58G"."""
    if n < 0:
        return "-" + format_size(-n)
    if n < 1000:
        return f"{n:g}" if isinstance(n, float) else str(n)
    for suffix, unit in (("k", 10**3), ("M", 10**6), ("G", 10**9)):
        if round(n / unit, 2) < 1000:  # so 999_999 becomes "1.00M", not "1000.00k"
            return f"{n / unit:.2f}{suffix}"
    return f"{n / 10**12:.2f}T"
