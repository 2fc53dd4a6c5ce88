"""The speed plan's shared-input groups: layers that read one input (q/k/v, gate/up, as the model's family says)
run grouped once factorized (`lowrank_cli.load` groups them by default, models.grouping), so the plan times them
the way they will run: the members' dense linears one after the other against one SharedInputGroup (one GEMM for
the concatenated first factors, then the second factors), on the same input.

A group is factorized as a whole when its grouped form beats both the dense members and the members' own
per-layer choices; otherwise each member keeps its per-layer decision.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

# group_timer(shapes) -> (dense_ms, grouped_ms): the members' dense linears in turn, and the group, on one input.
GroupTimer = Callable[[tuple[Any, ...]], tuple[float, float]]


def planned_groups(model: nn.Module, shapes: dict[str, Any]) -> list[list[str]]:
    """The family's shared-input groups, members limited to the timed (planned factorized) layers, with one input
    shape; those of 2 or more members."""
    from lowrank_cli.models.families import family_of

    groups = []
    for names in family_of(model).shared_input_groups(model):
        members = [n for n in names if n in shapes]
        if len(members) >= 2 and len({shapes[n].input_shape for n in members}) == 1:
            groups.append(members)
    return groups


def time_group(shapes: Sequence[Any], *, device: torch.device, dtype: torch.dtype, repeats: int = 5, warmup: int = 2,
               min_sample_s: float | None = None, cuda_graphs: bool = False, seed: int = 0) -> tuple[float, float]:
    """Milliseconds of (the members' dense nn.Linears in turn, their SharedInputGroup) on one random input: each
    one's fastest repeat, interleaved, as `speed_plan.time_layer` times one layer."""
    from lowrank_cli.layers.grouped_lowrank import GroupedLowRankLinear, SharedInputGroup
    from lowrank_cli.layers.lowrank_linear import LowRankLinear
    from lowrank_cli.timing import cuda_graphed, synchronize

    dense = [nn.Linear(s.d_in, s.d_out, bias=s.bias).to(device=device, dtype=dtype).eval() for s in shapes]
    members = [GroupedLowRankLinear(LowRankLinear(s.d_in, s.d_out, s.rank, bias=s.bias).to(device=device, dtype=dtype))
               for s in shapes]
    SharedInputGroup(members)
    x = torch.randn(shapes[0].input_shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
    cuda = device.type == "cuda"
    min_sample_s = (0.005 if cuda else 0.02) if min_sample_s is None else min_sample_s

    def each(layers: list[nn.Module]) -> Callable[[torch.Tensor], list[torch.Tensor]]:
        return lambda t: [layer(t) for layer in layers]

    with torch.inference_mode():
        fns = {"dense": each(dense), "grouped": each(members)}
        for _ in range(max(warmup, 1)):
            for fn in fns.values():
                fn(x)
        synchronize(device)
        if cuda_graphs and cuda:
            fns = {k: cuda_graphed(fn, x) for k, fn in fns.items()}
        one = max(_run(fns["dense"], x, 1, device), 1e-4)
        calls = max(1, min(1000, int(min_sample_s * 1e3 / one)))
        times: dict[str, list[float]] = {"dense": [], "grouped": []}
        for i in range(max(repeats, 1)):
            for key in (("dense", "grouped") if i % 2 == 0 else ("grouped", "dense")):
                times[key].append(_run(fns[key], x, calls, device))
    return min(times["dense"]), min(times["grouped"])


def _run(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, calls: int, device: torch.device) -> float:
    """Milliseconds per call of `fn(x)`, over `calls` back-to-back calls."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(calls):
            fn(x)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / calls
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(x)
    return (time.perf_counter() - t0) * 1e3 / calls


def decide_groups(groups: list[list[str]], group_times: dict[tuple[str, ...], tuple[float, float]],
                  layers_json: dict[str, dict[str, Any]], slower: dict[str, str], totals: list[float],
                  min_gain: float) -> list[dict[str, Any]]:
    """Each group factorized as a whole where its grouped form is faster than dense (by more than `min_gain`) and
    than its members' per-layer choices: `layers_json`, `slower` and `totals` ([dense, chosen] ms) updated in
    place. Returns the groups' timings, JSON-ready."""
    report = []
    for members in groups:
        dense_ms, grouped_ms = group_times[tuple(members)]
        chosen = sum(layers_json[n]["lowrank_ms"] if layers_json[n]["factorized"] else layers_json[n]["dense_ms"]
                     for n in members)
        gain = dense_ms / grouped_ms if grouped_ms > 0 else float("inf")
        whole = gain > min_gain and grouped_ms < chosen
        if whole:
            totals[1] += grouped_ms - chosen
            for n in members:
                slower.pop(n, None)
                layers_json[n]["factorized"] = True
        for n in members:
            layers_json[n]["group_gain"] = round(gain, 4) if gain != float("inf") else None
            layers_json[n]["grouped"] = whole
        report.append({"members": list(members), "dense_ms": round(dense_ms, 5), "grouped_ms": round(grouped_ms, 5),
                       "gain": round(gain, 4) if gain != float("inf") else None, "factorized": whole})
    return report
