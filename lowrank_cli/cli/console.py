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


def progress(description: str = "working"):
    """A rich progress bar on stderr with rate and ETA (disabled on ranks other than 0)."""
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
        disable=not is_main_process(),
    )
