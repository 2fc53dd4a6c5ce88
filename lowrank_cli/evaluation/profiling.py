"""Where the time of one forward pass goes: GEMMs (the linear layers), attention kernels and everything else
(`lrc bench --profile`), which says where the time goes once the GEMMs are smaller.

    p = profile(model, x, name="lrc")          # x already on the model's device
    p.gemm_ms, p.attention_ms, p.other_ms      # milliseconds per forward
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lowrank_cli.timing import synchronize

_ATTENTION = re.compile(r"scaled_dot_product|flash|fmha|attention|sdpa|\bbmm\b|baddbmm", re.IGNORECASE)
_GEMM = re.compile(
    r"addmm|\bmm\b|aten::mm|matmul|linear|gemm|nvjet|xmma|cublas|cutlass|tensorop|s16816|h16816|mkl|"
    r"triton_tem_fused_.*mm|lowrank",
    re.IGNORECASE,
)
# Wrappers whose self time is bookkeeping, not work (and would be counted twice under their children).
_SKIP = re.compile(r"^(ProfilerStep|\[memory\]|## |Torch-Compiled Region|CompiledFunction)")

CUDA_WHERE = "cuda kernels"
CPU_WHERE = "cpu ops (linear / attention ops with everything under them, other ops self time)"


@dataclass
class Profile:
    """Where the time of one forward pass goes (milliseconds per forward)."""

    model: str
    batch_size: int
    gemm_ms: float  # matrix multiplies of the linear layers (addmm / mm / linear / gemm kernels)
    attention_ms: float  # fused attention kernels (scaled_dot_product_*, flash, fmha) and bmm
    other_ms: float  # everything else: norms, activations, residual adds, copies, launch gaps on the CPU side
    total_ms: float
    where: str  # "cpu ops (self time)" or "cuda kernels"
    top: list[tuple[str, str, float]] = field(default_factory=list)  # (kind, name, ms), largest first

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["top"] = [{"kind": k, "name": n, "ms": round(ms, 4)} for k, n, ms in self.top]
        for k in ("gemm_ms", "attention_ms", "other_ms", "total_ms"):
            d[k] = round(d[k], 4)
        return d


def classify(name: str) -> str:
    """'gemm', 'attention' or 'other' for a profiler op or kernel name."""
    if _ATTENTION.search(name):
        return "attention"
    if _GEMM.search(name):
        return "gemm"
    return "other"


def profile(
    model: nn.Module,
    x: torch.Tensor,
    *,
    name: str = "model",
    calls: int = 1,
    fn: Callable[[torch.Tensor], Any] | None = None,
    top: int = 8,
) -> Profile:
    """Split the time of `calls` forward passes of `model` on `x` (already on its device) into GEMMs, attention
    and the rest. On CUDA the kernels' device time is split by kernel name; on the CPU the ops' self time.
    `fn` (e.g. a compiled model) is called instead of `model` when given; warm it up first."""
    fn = model if fn is None else fn  # not `fn or model`: a compiled module has no truth value (len() raises)
    events = _trace(fn, x, calls)
    if x.device.type == "cuda":
        totals, where = _kernel_times(events), CUDA_WHERE
    else:
        totals, where = _op_times(events), CPU_WHERE
    by_kind = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    for (kind, _), ms in totals.items():
        by_kind[kind] += ms / calls
    ranked = sorted(((k, n, ms / calls) for (k, n), ms in totals.items()), key=lambda t: -t[2])
    return Profile(
        model=name,
        batch_size=int(x.shape[0]),
        gemm_ms=by_kind["gemm"],
        attention_ms=by_kind["attention"],
        other_ms=by_kind["other"],
        total_ms=sum(by_kind.values()),
        where=where,
        top=[(k, n[:80], ms) for k, n, ms in ranked[:top]],
    )


def _trace(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, calls: int) -> list:
    """The profiler events of `calls` calls of fn(x), after one untraced call."""
    import os

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # no "gpuGetDeviceCount failed" line on machines without CUDA
    cuda = x.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.inference_mode():
        fn(x)  # one call outside the trace: lazy initialisation is not the model's time
        synchronize(x.device)
        with torch_profile(activities=activities) as prof:
            for _ in range(calls):
                fn(x)
            synchronize(x.device)
    return prof.events()


def _kernel_times(events: list) -> dict[tuple[str, str], float]:
    """(kind, kernel name) -> milliseconds of device time, over the CUDA kernels."""
    totals: dict[tuple[str, str], float] = {}
    for evt in events:
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            key = (classify(evt.name), evt.name)
            totals[key] = totals.get(key, 0.0) + evt.time_range.elapsed_us() / 1e3
    return totals


def _op_times(events: list) -> dict[tuple[str, str], float]:
    """(kind, op name) -> milliseconds on the CPU, over the op tree: a GEMM or attention op counts with everything
    under it (aten::linear -> t, addmm -> the bias copy), any other op with its self time, its children judged on
    their own."""
    totals: dict[tuple[str, str], float] = {}

    def add(kind: str, name: str, us: float) -> None:
        totals[(kind, name)] = totals.get((kind, name), 0.0) + us / 1e3

    def walk(evt) -> None:
        if _SKIP.match(evt.name):
            for child in evt.cpu_children:
                walk(child)
            return
        kind = classify(evt.name)
        if kind != "other":
            add(kind, evt.name, evt.cpu_time_total)
            return
        add(kind, evt.name, evt.self_cpu_time_total)
        for child in evt.cpu_children:
            walk(child)

    for evt in events:
        if evt.cpu_parent is None and evt.device_type == torch.autograd.DeviceType.CPU and not evt.is_async:
            walk(evt)
    return {k: v for k, v in totals.items() if v > 0}
