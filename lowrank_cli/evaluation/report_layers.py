"""The per-linear rows of a report (`document["layers"]`): shape, rank, parameters and MACs of every linear, with
what the checkpoint recorded about it (truncation error, `--plan speed` timings)."""

from __future__ import annotations

from typing import Any

from torch import nn

from lowrank_cli.checkpoint.format import CheckpointInfo


def layer_rows(model: nn.Module, by_module: dict[str, int], checkpoint: CheckpointInfo | None) -> list[dict[str, Any]]:
    """One row per linear of the model: low-rank layers and plain nn.Linear (not those inside a low-rank pair).
    `by_module` is fvcore's MAC count per module name."""
    from lowrank_cli.layers.lowrank_linear import LowRankLinear

    records = checkpoint.layers if checkpoint is not None else {}
    timings = speed_plan_layers(checkpoint)
    rows = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in inside):
            continue
        if isinstance(module, LowRankLinear):
            inside.append(name + ".")
            row = _lowrank_row(name, module, by_module, records.get(name) or {})
        elif isinstance(module, nn.Linear):
            row = _dense_row(name, module, by_module)
        else:
            continue
        entry = timings.get(name)
        rows.append({**row, "plan": entry, "speedup": plan_speedup(entry)})
    return rows


def _lowrank_row(name: str, module: nn.Module, by_module: dict[str, int], record: dict[str, Any]) -> dict[str, Any]:
    d_in, d_out, rank = module.in_features, module.out_features, module.rank
    params = sum(p.numel() for p in module.parameters())
    first, second = by_module.get(f"{name}.first", 0), by_module.get(f"{name}.second", 0)
    tokens = first // (d_in * rank)
    bias = d_out if module.second.bias is not None else 0
    return {
        "name": name, "kind": "lowrank", "d_in": d_in, "d_out": d_out, "rank": rank,
        "params": params, "macs": first + second, "tokens": tokens,
        "dense_params": d_in * d_out + bias, "dense_macs": tokens * d_in * d_out,
        "kept_energy": _float_or_none(record.get("kept_energy")),
        "rel_error": _float_or_none(record.get("rel_error")),
    }


def _dense_row(name: str, module: nn.Linear, by_module: dict[str, int]) -> dict[str, Any]:
    d_in, d_out = module.in_features, module.out_features
    params = sum(p.numel() for p in module.parameters(recurse=False))
    macs = by_module.get(name, 0)
    return {
        "name": name, "kind": "dense", "d_in": d_in, "d_out": d_out, "rank": None,
        "params": params, "macs": macs, "tokens": macs // (d_in * d_out),
        "dense_params": params, "dense_macs": macs,
        "kept_energy": None, "rel_error": None,
    }


def _float_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def speed_plan_layers(checkpoint: CheckpointInfo | None) -> dict[str, dict[str, Any]]:
    """The per-layer entries of the checkpoint's `--plan speed` timings (`lrc.plan`, written by
    `compress.speed_plan.speed_plan` as `timings["layers"]`); empty without a speed plan."""
    if checkpoint is None or checkpoint.plan is None:
        return {}
    return checkpoint.plan["layers"]


def plan_speedup(entry: dict[str, Any] | None) -> float | None:
    """The speed gain of one layer from its speed-plan entry: the `gain` speed_plan recorded (dense_ms / lowrank_ms
    of the unrounded times, to 4 decimals; None when the low-rank time was 0), or, for an entry that has only the
    two times (one written by other means than speed_plan), their ratio; a layer factorized with its shared-input
    group (compress.speed_groups), its group's gain. None without an entry."""
    if entry is None:
        return None
    if entry.get("grouped") and "group_gain" in entry:
        return None if entry["group_gain"] is None else float(entry["group_gain"])
    if "gain" in entry:
        return None if entry["gain"] is None else float(entry["gain"])
    dense_ms, lowrank_ms = entry["dense_ms"], entry["lowrank_ms"]
    return float(dense_ms) / float(lowrank_ms) if dense_ms and lowrank_ms else None
