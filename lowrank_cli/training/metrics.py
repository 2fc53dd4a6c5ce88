"""The metrics log of a training run (<output stem>.metrics.jsonl): one JSON object per logged step."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from lowrank_cli.errors import OutputError


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


def check_metrics_path(output: str | Path) -> Path:
    """The metrics log of a run writing `output`, refused before the run when something that is not a file (a
    folder) sits there: the run would fail at its first log line, after the loading."""
    path = metrics_path(output)
    if path.exists() and not path.is_file():
        raise OutputError(f"'{path}' is a folder, where the run writes its metrics log: move it away, or choose "
                          "another `output`")
    return path
