"""CI gates on a report (`lrc report --max-params / --max-macs / --min-compression`).

    report = build_report("deit_lr.safetensors")
    failed = apply_gates(report, max_params=50_000_000, min_compression=1.8)   # the failed ones
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from lowrank_cli.errors import UsageError

if TYPE_CHECKING:
    from lowrank_cli.evaluation.report import Report


def apply_gates(
    report: Report,
    *,
    max_params: int | None = None,
    max_macs: int | None = None,
    min_compression: float | None = None,
) -> list[dict[str, Any]]:
    """Evaluate the CI gates, record them in `report.document["gates"]`, return the failed ones.

    A gate that cannot be evaluated (no MACs without the architecture, no compression without a dense
    reference) is a UsageError: a CI gate must never pass for want of a number.
    """
    doc = report.document
    gates = []
    if max_params is not None:
        value = doc["params"]["total"]
        gates.append({"name": "max_params", "option": "--max-params", "limit": max_params, "value": value,
                      "passed": value <= max_params})
    if max_macs is not None:
        value = doc["macs"]["total"]
        if value is None:
            raise UsageError(
                "`max_macs` needs the MACs, which a plain weights file does not give: pass `arch=NAME` "
                "(and `model_args` KEY=VALUE as needed) so lrc can build the model"
            )
        gates.append({"name": "max_macs", "option": "--max-macs", "limit": max_macs, "value": value,
                      "passed": value <= max_macs})
    if min_compression is not None:
        if doc["compression"] is None:
            raise UsageError(
                "`min_compression` needs a dense reference, and this file has no lrc metadata to rebuild one: "
                "pass `compare=MODEL` (the dense source, e.g. `compare=deit_base`)"
            )
        value = doc["compression"]["params"]
        gates.append({"name": "min_compression", "option": "--min-compression", "limit": min_compression,
                      "value": value, "passed": value >= min_compression})
    doc["gates"] = gates
    return report.failed_gates


def describe_gate(gate: dict[str, Any]) -> str:
    """'params 86.57M > 50.00M allowed', 'compression 1.96x >= 1.80x required', ..."""
    from lowrank_cli.evaluation.counting import format_size

    value, limit, ok = gate["value"], gate["limit"], gate["passed"]
    if gate["name"] == "min_compression":
        return f"compression {value:.2f}x {'>=' if ok else '<'} {limit:.2f}x required"
    what = "params" if gate["name"] == "max_params" else "MACs"
    return f"{what} {format_size(value)} {'<=' if ok else '>'} {format_size(limit)} allowed"


def parse_ratio(text: str | float | None) -> float | None:
    """A `min_compression`: 1.8 or 1.8x; must be a finite number > 0."""
    if text is None or isinstance(text, float):
        return text
    raw = str(text).strip().lower().removesuffix("x")
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"`min_compression` '{text}' is not a ratio: write e.g. `min_compression=1.8`")
    return value
