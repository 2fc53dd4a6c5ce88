"""Every way to run the models, and each model's fastest: `lrc bench`'s default.

    rows = bench_ways({"lrc": low, "dense": dense}, ways_for("cuda", ["eager", "compile", "graphs"], None, [low]),
                      device="cuda", dtype="bf16", batch_sizes=[1, 64])
    best = [r for r in rows if r.fastest]     # one row per (model, batch size), ratios best against best

A way is a runtime (models.runtime: eager, compile, graphs) and, for models with shared-input groups
(models.grouping), grouped or not. Every model runs every way, so the dense reference gets the same treatment and
the ratio of the two fastest is honest; within one way the models are timed interleaved (evaluation.bench).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from lowrank_cli.evaluation import bench as timing
from lowrank_cli.evaluation.bench import BenchRow
from lowrank_cli.models.grouping import NO_GROUPS_NOTE, apply_group, group_lowrank, ungroup_lowrank
from lowrank_cli.models.runtime import RUNTIMES, check_runtime, compile_mode


@dataclass(frozen=True)
class Way:
    runtime: str  # eager | compile | graphs
    grouped: bool | None  # None: no model has shared-input groups (nothing to choose)

    @property
    def label(self) -> str:
        return self.runtime + {None: "", True: ", grouped", False: ", ungrouped"}[self.grouped]


def device_runtimes(device_type: str, everything: bool = False) -> list[str]:
    """The runtimes `lrc bench` tries by default: CUDA all three; the CPU eager (compile too with `everything`:
    inductor's C++ compile of a large model takes minutes there)."""
    if device_type == "cuda":
        return list(RUNTIMES)
    return ["eager", "compile"] if everything else ["eager"]


def has_groups(model: nn.Module) -> bool:
    """The model has low-rank layers that its family groups (tried on a model left as it was)."""
    found = group_lowrank(model).groups > 0
    ungroup_lowrank(model)
    return found


def ways_for(device, runtimes: Sequence[str], group: bool | None, models: Sequence[nn.Module],
             note: Callable[[str], None] | None = None) -> list[Way]:
    """The ways to run: each runtime (checked for `device`), grouped and ungrouped where a model has groups and
    `group` is None (default), only as `group` says otherwise (`group=True` and no groups: a note to `note`)."""
    for runtime in runtimes:
        check_runtime(runtime, device)
    groupable = any(has_groups(m) for m in models)
    if group and not groupable and note is not None:
        note(NO_GROUPS_NOTE.format(what="no model has low-rank layers that read one input"))
    choices: list[bool | None] = [None] if not groupable else ([False, True] if group is None else [bool(group)])
    return [Way(runtime, grouped) for runtime in runtimes for grouped in choices]


def bench_ways(models: Mapping[str, nn.Module], ways: Sequence[Way], *, progress: Callable[[str], None] | None = None,
               warn: Callable[[str], None] | None = None, **options: Any) -> list[BenchRow]:
    """`bench` once per way (the `bench` options as keywords), rows tagged with their way; then each model's
    fastest row per batch size marked `fastest`, with its speedup against the reference's fastest."""
    rows: list[BenchRow] = []
    for way in ways:
        for model in models.values():
            group_lowrank(model) if way.grouped else ungroup_lowrank(model)
        say = (lambda msg, way=way: progress(f"{way.label}: {msg}")) if progress else None
        for row in timing.bench(models, compile=compile_mode(way.runtime) or False, progress=say, warn=warn, **options):
            rows.append(replace(row, runtime=way.runtime))
    return mark_fastest(rows) if len(ways) > 1 else rows


def group_models(models: Mapping[str, nn.Module], group: bool | None, note: Callable[[str], None]) -> int:
    """`load`'s `group` for every model (models.grouping.apply_group); `note` hears once that `group=True` found
    no group in any of them. Returns how many groups were made."""
    quiet: list[str] = []
    made = sum(apply_group(model, group, quiet.append).groups for model in models.values())
    if group and not made and quiet:
        note(quiet[0])
    return made


def mark_fastest(rows: list[BenchRow]) -> list[BenchRow]:
    """The rows, each model's fastest per batch size (least median) as a copy at the end with `fastest` set and
    speedup = the reference's fastest median / its median."""
    best: dict[tuple[str, int], BenchRow] = {}
    for r in rows:
        key = (r.model, r.batch_size)
        if key not in best or r.median_ms < best[key].median_ms:
            best[key] = r
    fastest = []
    for r in best.values():
        ref = best.get((r.reference, r.batch_size)) if r.reference else None
        speedup = ref.median_ms / r.median_ms if ref is not None else None
        fastest.append(replace(r, fastest=True, speedup=speedup))
    return rows + fastest

