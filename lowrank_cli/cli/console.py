"""Where output goes: results on stdout (tables, or JSON for pipes), everything else on stderr.

Under torchrun only rank 0 talks, so N processes do not print N copies.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.console import Console

out = Console(soft_wrap=True)
err = Console(stderr=True)


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def cli_text(message: str) -> str:
    """A library message with its `parameter` names written as this CLI's options (see errors.PARAMETER)."""
    from lowrank_cli.cli.options import option_name
    from lowrank_cli.errors import PARAMETER

    return PARAMETER.sub(lambda m: option_name(m.group(1)), message)


def info(message: str) -> None:
    if is_main_process():
        err.print(cli_text(message), highlight=False)


def warn(message: str) -> None:
    if is_main_process():
        err.print(f"[yellow]Warning:[/yellow] {cli_text(message)}", highlight=False)


def print_json(document: Any) -> None:
    if is_main_process():
        sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")
        sys.stdout.flush()


_PROGRESS: bool | None = None  # --progress / --no-progress; None: only when stderr is a terminal


def show_progress(value: bool | None) -> None:
    """Force progress bars on (a log collector that wants them) or off; None goes back to "on a terminal"."""
    global _PROGRESS
    _PROGRESS = value


def progress_wanted() -> bool:
    if _PROGRESS is not None:
        return _PROGRESS
    return err.is_terminal  # a CI log or a pipe gets no bar redrawn a hundred times


def progress(description: str = "working"):
    """A rich progress bar on stderr with rate and ETA, on a terminal (or with --progress), on rank 0 only."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
        disable=not (is_main_process() and progress_wanted()),
    )
