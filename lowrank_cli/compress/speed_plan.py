"""Speed-aware plans: factorize a layer only where the factorized form runs faster on the target hardware.

Fewer multiply-adds is not less time: two skinny GEMMs can be slower than one square one (a rank off the
tensor-core tiles, too few tokens to fill the device, launch overhead at batch 1). `speed_plan` times each
candidate layer *shape* of a plan on the target device, dtype and batch shape, dense (one nn.Linear) against
factorized (a LowRankLinear of the planned rank), and keeps dense every layer whose factorized form is not
faster. Ranks are never raised, so each factorized layer keeps the plan's compression (the kappa budget); the
model as a whole is compressed less when layers stay dense, never more.

    plan = make_plan(model, kappa=2, rank_multiple=auto_rank_multiple("cuda", torch.bfloat16))
    plan, timings = speed_plan(model, plan, device="cuda", dtype=torch.bfloat16, batch_size=256)
    factorize(model, plan=plan)
    model.lrc_info.plan = timings                       # stored as `lrc.plan` in the checkpoint

Many layers share a shape (DeiT-B: 48 linears, 4 shapes), so each (d_in, d_out, rank, input shape, bias) is
timed once. The layers are timed eagerly, one at a time, on a random input of the shape the layer sees in the
model at that batch size (found by one batch-1 forward with hooks); under torch.compile the GEMMs are the same
library calls, so the decision carries over, but the rest of the model (fusions, launch overhead) is not part
of it: `lrc bench` measures the whole model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, NamedTuple

import torch
from torch import nn

from lowrank_cli.compress.plan import LayerStatus, Plan
from lowrank_cli.compress.speed_groups import GroupTimer
from lowrank_cli.errors import UsageError


class LayerShape(NamedTuple):
    """What one timing depends on: the layer's shape, its rank and the shape of its input."""

    d_in: int
    d_out: int
    rank: int
    input_shape: tuple[int, ...]  # as the layer sees it at the target batch size, e.g. (256, 197, 768)
    bias: bool

    @property
    def rows(self) -> int:
        n = 1
        for v in self.input_shape[:-1]:
            n *= v
        return n


# timer(shape) -> (dense_ms, lowrank_ms): the function speed_plan calls for each unique shape.
Timer = Callable[[LayerShape], tuple[float, float]]


def auto_rank_multiple(device: str | torch.device | None = "auto", dtype: str | torch.dtype | None = None) -> int:
    """The rank multiple that `rank_multiple="auto"` (`--rank-multiple auto`) means on this device and dtype.

    CUDA, bf16 / fp16: 64. Tensor-core GEMM tiles are multiples of 64 along K and N; on an H100 under
        torch.compile DeiT-B at kappa 2 ran 19.1 ms with ranks rounded to /64 against 20.0 ms with /8 and
        24.5 ms dense (batch 256), while ranks off the multiple-of-8 grid fell off the tensor cores
        (0.54x dense). Rounding to 64 also cuts more MACs (ranks 256/192 instead of 304/288/192 at kappa 2).
    CUDA, fp32 / fp64: 8. TF32 (and FP64) tensor-core MMAs need K and N in multiples of 8 (4-byte types:
        16-byte alignment is 4 elements; 8 keeps every tile whole), and no larger grid was measured to pay.
    CPU, any dtype: one vector register of floats, the unit of MKL's kernels: 8 with AVX2, 16 with AVX-512.
        Measured on a 2-core AVX2 machine (fp32, 3152 tokens, the DeiT-B shapes): ranks on multiples of 8 ran
        the two GEMMs at ~93% of the dense layer's efficiency per MAC, PELA's floor ranks (307) at ~88%, and
        coarser grids (16, 32, 64) no more efficiently per MAC (they only cut more MACs, i.e. compress more
        than kappa asks). On a 2-core AVX-512 machine, ranks that are odd multiples of 8 (264, 280, 296,
        312) took 4-9% more time per MAC than the multiples of 16 beside them on the 3072->768 and
        768->2304 shapes (one run, noisy host).
    """
    from lowrank_cli.devices import resolve_device, resolve_dtype

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, torch.float32)
    if dev.type == "cuda":
        return 64 if dt in (torch.bfloat16, torch.float16) else 8
    return 16 if _cpu_capability().startswith("AVX512") else 8


def _cpu_capability() -> str:
    """The vector ISA torch's CPU kernels use here ("AVX2", "AVX512", ...); "" where torch does not say."""
    try:
        return str(torch.backends.cpu.get_cpu_capability()).upper()
    except (AttributeError, RuntimeError):
        return ""


def run_dtype(plan_dtype: str | torch.dtype | None, stored_dtype: torch.dtype | None, device: torch.device,
              model_dtype: torch.dtype) -> torch.dtype:
    """The precision the factorized model will run in: what `plan_kind="speed"` times and `rank_multiple="auto"`
    suits. `plan_dtype`; else the stored `dtype`; else bf16 on CUDA (a GPU serves transformers in bf16: an fp32
    plan would time TF32-less fp32 GEMMs and pick the fp32 grid) and the model's own dtype on the CPU."""
    from lowrank_cli.devices import resolve_dtype

    if plan_dtype is not None:
        return resolve_dtype(plan_dtype, parameter="plan_dtype")
    if stored_dtype is not None:
        return stored_dtype
    return torch.bfloat16 if device.type == "cuda" else model_dtype


def parse_rank_multiple(value: str | int, device: str | torch.device | None = "auto",
                        dtype: str | torch.dtype | None = None) -> int:
    """A `rank_multiple` value: a whole number >= 1, or "auto" (auto_rank_multiple for device and dtype)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return auto_rank_multiple(device, dtype)
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise UsageError(f"`rank_multiple` '{value}' is not a whole number >= 1 or 'auto'")
    return n


# ------------------------------------------------------------------------------------------------ shapes


def layer_input_shapes(model: nn.Module, names: Sequence[str], *, input_size: Sequence[int] | None = None,
                       batch_size: int = 1) -> dict[str, tuple[int, ...]]:
    """The input shape each named linear sees at `batch_size`: one batch-1 forward with hooks, batch scaled.
    A linear the forward never calls as a module is left out."""
    from lowrank_cli.models.inputs import default_input_size, example_input

    size = tuple(input_size or default_input_size(model))
    seen: dict[str, tuple[int, ...]] = {}

    def hook(name: str):
        def record(module, args, output):
            seen.setdefault(name, tuple(args[0].shape))
        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    param = next(model.parameters())
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            model(example_input(model, size, dtype=param.dtype, device=param.device, zeros=True))
    except Exception as e:
        from lowrank_cli.models.inputs import forward_failed

        raise forward_failed(e, model, size, ", so the layer shapes to time are unknown") from None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    # Linears the model never calls as modules (F.linear on their weight) are missing from the result.
    # Every shape here has the batch first; a layer that sees (B*windows, N, d) scales the same way.
    return {n: (s[0] * batch_size, *s[1:]) for n, s in seen.items()}


# ------------------------------------------------------------------------------------------------ timing


def time_layer(shape: LayerShape, *, device: torch.device, dtype: torch.dtype, repeats: int = 5,
               warmup: int = 2, min_sample_s: float | None = None, cuda_graphs: bool = False,
               fused: bool = False, seed: int = 0) -> tuple[float, float]:
    """Milliseconds of (dense nn.Linear, LowRankLinear) forward on a random input of `shape`: each one's fastest
    repeat. Other work on a shared machine only ever adds time, and a keep-or-factorize decision taken on
    medians of a few repeats flipped on a noisy 2-core host (a 768x768 layer "0.95x" against 1.64x measured a
    minute before); the least disturbed repeats did not.

    The two are interleaved (dense, low-rank, low-rank, dense, ...) so that drift hits both. Weights are
    nn.Linear's usual random init (no denormals on the CPU); the timing does not depend on them. With
    `cuda_graphs` (CUDA only) each layer is replayed from a CUDA graph, as a model deployed with CUDA graphs
    runs: the launch of the second GEMM then costs (almost) nothing, which matters at small batches. With `fused`
    the low-rank layer runs as it will on CUDA: the fused kernel (`layers.fused_lowrank`), one launch.
    """
    from lowrank_cli.layers.fused_lowrank import FusedLowRankLinear
    from lowrank_cli.layers.lowrank_linear import LowRankLinear
    from lowrank_cli.timing import cuda_graphed, synchronize

    gen = torch.Generator().manual_seed(seed)
    dense = nn.Linear(shape.d_in, shape.d_out, bias=shape.bias)
    low = LowRankLinear(shape.d_in, shape.d_out, shape.rank, bias=shape.bias)
    if fused:
        low = FusedLowRankLinear(low)
    dense.to(device=device, dtype=dtype).eval()
    low.to(device=device, dtype=dtype).eval()
    x = torch.randn(shape.input_shape, generator=gen).to(device, dtype)
    cuda = device.type == "cuda"
    min_sample_s = (0.005 if cuda else 0.02) if min_sample_s is None else min_sample_s

    def run(layer: nn.Module, calls: int) -> float:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            for _ in range(calls):
                layer(x)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / calls
        t0 = time.perf_counter()
        for _ in range(calls):
            layer(x)
        return (time.perf_counter() - t0) * 1e3 / calls

    with torch.inference_mode():
        for _ in range(max(warmup, 1)):
            dense(x)
            low(x)
        synchronize(device)
        if cuda_graphs and cuda:
            dense, low = cuda_graphed(dense, x), cuda_graphed(low, x)
        one = max(run(dense, 1), 1e-4)
        calls = max(1, min(1000, int(min_sample_s * 1e3 / one)))
        times: dict[str, list[float]] = {"dense": [], "low": []}
        for i in range(max(repeats, 1)):
            order = (("dense", dense), ("low", low)) if i % 2 == 0 else (("low", low), ("dense", dense))
            for key, layer in order:
                times[key].append(run(layer, calls))
    return min(times["dense"]), min(times["low"])


# ------------------------------------------------------------------------------------------------ the plan


def speed_plan(model: nn.Module, base_plan: Plan, *, device: str | torch.device | None = "auto",
               dtype: str | torch.dtype | None = None, batch_size: int = 1, tokens: int | Sequence[int] | None = None,
               input_size: Sequence[int] | None = None, min_gain: float = 1.0, group: bool | None = None,
               timer: Timer | None = None, group_timer: GroupTimer | None = None,
               progress: Callable[[str, int, int], None] | None = None, **timing: Any) -> tuple[Plan, dict[str, Any]]:
    """`base_plan` with every layer kept dense whose factorized form is not faster; and the timings, JSON-ready.

    model: the dense model the plan is for (only its shapes are read; one batch-1 forward finds the shape each
        layer's input has, unless `tokens` is given). A planned linear that this forward never calls as a module
        (F.linear on its weight) is kept dense untimed, with the same reason `factorize` gives.
    device, dtype: where and how the model will run (dtype default: the model's own).
    batch_size: images per forward pass at inference; tokens: the sequence length each linear sees per image
        (e.g. 197 for DeiT at 224 px), or the exact per-image input shape without the feature dim, e.g. (197,);
        default: measured by the forward pass.
    min_gain: a layer is factorized only if dense_ms / lowrank_ms > min_gain (1.0: strictly faster; a tie stays
        dense, since the point of this plan is speed).
    group: time the layers that read one input (the family's shared-input groups) grouped, as `lowrank_cli.load`
        runs them (compress.speed_groups; None: as models.grouping.GROUPED_BY_DEFAULT says; not when fused).
    timer: `timer(LayerShape) -> (dense_ms, lowrank_ms)`, called once per unique shape; default `time_layer` on
        `device` / `dtype` with the `timing` keywords; group_timer: `group_timer(shapes) -> (dense_ms,
        grouped_ms)` once per unique group, default `speed_groups.time_group`.
    timing: repeats=5, warmup=2; cuda_graphs=False: replay each layer from a CUDA graph (CUDA only: a model
        deployed with CUDA graphs / mode="reduce-overhead"); fused=None: time the fused kernel's form
        (`layers.fused_lowrank`): True (an EnvironmentProblem without CUDA or Triton), None as `lowrank_cli.load`
        runs them (not fused), False the two linears.

    Returns (plan, timings) where timings is
        {"kind": "speed", "device", "dtype", "batch_size", "repeats", "min_gain", "torch",
         "layers": {name: {"d_in", "d_out", "rank", "input_shape", "dense_ms", "lowrank_ms", "gain",
                           "factorized"[, "group_gain"]}}, "groups": [{"members", "dense_ms", "grouped_ms", "gain",
         "factorized"}], "kept_dense": [names], "estimated_gain": sum of dense_ms / sum of the chosen forms' ms,
         "fused"}
    for `CheckpointInfo.plan` (`lrc.plan` in the checkpoint).
    """
    from lowrank_cli.compress.speed_groups import planned_groups
    from lowrank_cli.devices import SHORT_DTYPE, device_name
    from lowrank_cli.models.grouping import resolve_group

    dev, dt, fuse, timing = _resolve(model, device, dtype, batch_size, min_gain, timing)
    shapes, uncalled = _planned_shapes(model, base_plan, batch_size=batch_size, tokens=tokens, input_size=input_size)
    timer, group_timer = _timers(dev, dt, fuse, timing, timer, group_timer)
    measured = _measure(list(dict.fromkeys(shapes.values())), timer, progress)
    groups = planned_groups(model, shapes) if resolve_group(group) and not fuse else []
    group_times = {tuple(g): group_timer(tuple(shapes[n] for n in g)) for g in groups}
    where = f"{dev.type} {SHORT_DTYPE[dt]}{' fused' if fuse else ''}, batch {batch_size}"
    layers_json, slower, totals, groups_json = _decide(base_plan, shapes, measured, min_gain, where, groups,
                                                       group_times)
    plan = _speed_annotated(base_plan.without(uncalled, LayerStatus.DENSE_UNCALLED)
                            .without(slower, LayerStatus.DENSE_SLOWER), layers_json, where)
    info = {
        "kind": "speed", "device": device_name(dev), "device_type": dev.type, "dtype": SHORT_DTYPE[dt],
        "batch_size": batch_size, "repeats": timing["repeats"], "min_gain": min_gain,
        "cuda_graphs": timing["cuda_graphs"], "fused": fuse,
        "torch": torch.__version__.split("+")[0], "unique_shapes": len(measured), "layers": layers_json,
        "groups": groups_json, "kept_dense": [*uncalled, *slower],
        "estimated_gain": round(totals[0] / totals[1], 4) if totals[1] > 0 else None,
    }  # fmt: skip
    return plan, info


def _resolve(model: nn.Module, device: str | torch.device | None, dtype: str | torch.dtype | None, batch_size: int,
             min_gain: float, timing: dict[str, Any]) -> tuple[torch.device, torch.dtype, bool, dict[str, Any]]:
    """The checked options: (device, dtype, fused, the timing keywords with their defaults)."""
    from lowrank_cli.devices import resolve_device, resolve_dtype
    from lowrank_cli.models.fusion import resolve_fused

    unknown = sorted(set(timing) - {"repeats", "warmup", "cuda_graphs", "fused"})
    if unknown:
        raise TypeError(f"speed_plan() got an unexpected keyword argument '{unknown[0]}'")
    if batch_size < 1:
        raise UsageError(f"`batch_size` must be >= 1, got {batch_size}")
    if min_gain <= 0:
        raise UsageError(f"`min_gain` must be > 0, got {min_gain}")
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)  # the CUDA events and graphs of time_layer use the current device
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    dt = resolve_dtype(dtype, torch.float32)
    fuse = resolve_fused(timing.get("fused"), dev, dtype=dt)
    resolved = {"repeats": timing.get("repeats", 5), "warmup": timing.get("warmup", 2),
                "cuda_graphs": bool(timing.get("cuda_graphs", False) and dev.type == "cuda")}
    return dev, dt, fuse, resolved


def _timers(dev: torch.device, dt: torch.dtype, fuse: bool, timing: dict[str, Any], timer: Timer | None,
            group_timer: GroupTimer | None) -> tuple[Timer, GroupTimer]:
    """The given timers, or time_layer / time_group on the device with the timing keywords."""
    from lowrank_cli.compress.speed_groups import time_group
    def layer_timer(shape: LayerShape) -> tuple[float, float]:
        return time_layer(shape, device=dev, dtype=dt, fused=fuse, **timing)

    def groups_timer(shapes: tuple[LayerShape, ...]) -> tuple[float, float]:
        return time_group(shapes, device=dev, dtype=dt, **timing)

    return timer or layer_timer, group_timer or groups_timer


def _planned_shapes(model: nn.Module, plan: Plan, *, batch_size: int, tokens: int | Sequence[int] | None,
                    input_size: Sequence[int] | None) -> tuple[dict[str, LayerShape], dict[str, str]]:
    """What to time for each factorized layer of `plan`, and the layers the forward never calls (kept dense
    untimed, for the reason `factorize` gives)."""
    candidates = [p for p in plan.layers if p.rank is not None]
    names = [p.name for p in candidates]
    if tokens is not None:
        per_image = (int(tokens),) if isinstance(tokens, int) else tuple(int(t) for t in tokens)
        shapes_in = {p.name: (batch_size, *per_image, p.d_in) for p in candidates}
    else:
        shapes_in = layer_input_shapes(model, names, input_size=input_size, batch_size=batch_size) if names else {}

    def bias_of(name: str) -> bool:
        try:
            return getattr(model.get_submodule(name), "bias", None) is not None
        except AttributeError:
            return True

    uncalled = {p.name: "dense: not called as a module (F.linear on its weight)" for p in candidates
                if p.name not in shapes_in}
    shapes = {p.name: LayerShape(p.d_in, p.d_out, p.rank, shapes_in[p.name], bias_of(p.name))
              for p in candidates if p.name in shapes_in}
    return shapes, uncalled


def _measure(unique: list[LayerShape], timer: Timer,
             progress: Callable[[str, int, int], None] | None) -> dict[LayerShape, tuple[float, float]]:
    """(dense_ms, lowrank_ms) of every unique shape, timed once each."""
    measured: dict[LayerShape, tuple[float, float]] = {}
    for i, shape in enumerate(unique, 1):
        dense_ms, low_ms = timer(shape)
        measured[shape] = (float(dense_ms), float(low_ms))
        if progress:
            progress(f"{shape.d_out}x{shape.d_in} rank {shape.rank}", i, len(unique))
    return measured


def _decide(plan: Plan, shapes: dict[str, LayerShape], measured: dict[LayerShape, tuple[float, float]],
            min_gain: float, where: str, groups: list[list[str]],
            group_times: dict[tuple[str, ...], tuple[float, float]]) -> tuple[dict, dict[str, str], list[float], list]:
    """Per timed layer: its timings (JSON-ready) and whether it is factorized; the layers kept dense as slower,
    with why; the summed ms of the linears dense and in the chosen forms; the groups' timings
    (compress.speed_groups.decide_groups: a group faster grouped is factorized as a whole)."""
    from lowrank_cli.compress.speed_groups import decide_groups

    layers_json: dict[str, dict[str, Any]] = {}
    slower: dict[str, str] = {}
    totals = [0.0, 0.0]
    for p in plan.layers:
        if p.name not in shapes:
            continue
        dense_ms, low_ms = measured[shapes[p.name]]
        gain = dense_ms / low_ms if low_ms > 0 else float("inf")
        factorized = gain > min_gain
        if not factorized:
            slower[p.name] = f"dense: factorized {low_ms:.3g} ms vs dense {dense_ms:.3g} ms ({gain:.2f}x) on {where}"
        totals[0] += dense_ms
        totals[1] += low_ms if factorized else dense_ms
        layers_json[p.name] = {
            "d_in": p.d_in, "d_out": p.d_out, "rank": p.rank, "input_shape": list(shapes[p.name].input_shape),
            "dense_ms": round(dense_ms, 5), "lowrank_ms": round(low_ms, 5),
            "gain": round(gain, 4) if gain != float("inf") else None, "factorized": factorized,
        }
    groups_json = decide_groups(groups, group_times, layers_json, slower, totals, min_gain)
    return layers_json, slower, totals, groups_json


def _speed_annotated(plan: Plan, layers_json: dict[str, dict[str, Any]], where: str) -> Plan:
    """The plan with each timed factorized layer's reason extended by its measured gain (a grouped layer's: its
    group's)."""
    def gain(name: str) -> str:
        layer = layers_json[name]
        return f"{layer['group_gain']}x grouped" if layer.get("grouped") else f"{layer['gain']}x"

    return Plan([
        replace(p, why=f"{p.why}; speed {gain(p.name)} on {where}")
        if p.rank is not None and p.name in layers_json else p
        for p in plan.layers
    ])
