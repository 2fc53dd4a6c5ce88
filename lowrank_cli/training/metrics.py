"""The metrics log of a training run (<output stem>.metrics.jsonl): one JSON object per logged step."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any


def metrics_lines(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            lines.append(json.loads(line))
    return lines


def truncate_metrics(path: Path, step: int) -> None:
    """On resume: keep the lines up to the resumed step (the steps after it are done again)."""
    from lowrank_cli.atomic import write_text

    kept = [line for line in metrics_lines(path) if line.get("step", 0) <= step]
    write_text(path, "".join(json.dumps(line) + "\n" for line in kept))


def metrics_path(output: str | Path) -> Path:
    """`out.safetensors` -> `out.metrics.jsonl`, next to the output."""
    output = Path(output)
    return output.with_name(output.stem + ".metrics.jsonl")
