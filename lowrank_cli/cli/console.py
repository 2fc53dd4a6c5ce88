"""Where output goes: results on stdout (tables, or JSON for pipes), everything else on stderr.

Under torchrun only rank 0 talks, so N processes do not print N copies.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.console import Console, ConsoleDimensions

OFF_TERMINAL_WIDTH = 1000  # a table off a terminal: its whole width, never cut to "ba…" at 80 columns


class StdoutConsole(Console):
    """stdout's console. On a terminal, rich's own width (the terminal's, or COLUMNS). Off one (a CI log, `| tee`,
    a subprocess capture) OFF_TERMINAL_WIDTH, or COLUMNS where that is wider: every table (bench, report, recover,
    factorize, ...) is printed at its natural width, where rich's fallback of 80 columns (or a CI's COLUMNS=80)
    cut each cell to "ba…" and dropped whole columns. Nothing off a terminal is folded for a screen anyway: the
    text lines are soft-wrapped (one line each), and a log viewer scrolls."""

    _set_size: tuple[int, int] | None = None  # `console.size = (w, h)` wins over both

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        if self.is_terminal or self._set_size is not None:
            return size
        columns = os.environ.get("COLUMNS", "").strip()
        return ConsoleDimensions(max(OFF_TERMINAL_WIDTH, int(columns) if columns.isdigit() else 0), size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._set_size = new_size
        Console.size.fset(self, new_size)

    @property
    def width(self) -> int:
        return self.size.width

    @width.setter
    def width(self, width: int) -> None:  # rich's own setter, kept like `size` (it set a width this ignored)
        self.size = (width, self.size.height)


out = StdoutConsole(soft_wrap=True)
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
    """A rich progress bar on stderr with rate and ETA, on a terminal (or with --progress), on rank 0 only; off a
    terminal (no --progress / --no-progress) the same calls print plain lines (PlainBars)."""
    if plain_progress_wanted():
        return PlainBars()
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


def plain_progress_wanted() -> bool:
    """Off a terminal (a CI log, a pipe) with no --progress / --no-progress given: plain progress lines instead of
    bars, so that a long run is not silent until its table."""
    return _PROGRESS is None and not err.is_terminal and is_main_process()


class PhaseProgress:
    """A progress callback `(phase, done, total, status)` for a run of several phases: on a terminal (or with
    --progress) one bar per phase; off one, a plain line on stderr when a phase starts, when it ends, and at most
    every `every` seconds between; with --no-progress nothing. The bars start with the first phase, so that an early
    error is not preceded by an empty display."""

    def __init__(self, prefix: str, every: float = 10.0) -> None:
        self.prefix, self.every = prefix, every
        self.bar, self.tasks = None, {}
        self.lines = plain_progress_wanted()
        self.last: dict[str, tuple[float, int]] = {}  # phase -> (time of its last line, done then)

    def __call__(self, phase: str, done: int, total: int, status: str | None) -> None:
        if self.lines:
            self._line(phase, done, total, status)
            return
        if self.bar is None:
            self.bar = progress()
            self.bar.start()
        if phase not in self.tasks:
            self.tasks[phase] = self.bar.add_task(phase, total=total, completed=done, status=status or "")
        fields = {"status": status} if status is not None else {}
        self.bar.update(self.tasks[phase], completed=done, total=total, **fields)

    def _line(self, phase: str, done: int, total: int, status: str | None) -> None:
        import time

        now = time.monotonic()
        seen = self.last.get(phase)
        finished = total and done >= total
        if seen is not None and (seen[1] == done or not (finished or now - seen[0] >= self.every)):
            return
        self.last[phase] = (now, done)
        count = f"{done}/{total}" if total else str(done)
        # soft_wrap: one line per update, never folded at 80 columns (a log is read by grep)
        err.print(f"{self.prefix}{phase} {count}{f' ({status})' if status else ''}", highlight=False, markup=False,
                  soft_wrap=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class PlainBars:
    """What `progress()` gives off a terminal: rich's add_task / update / start / stop, written as PhaseProgress's
    plain lines (a task's first and last state and at most one line every 10 s between), so that a long factorize
    or eval in a CI log says how far it is."""

    def __init__(self) -> None:
        self.lines = PhaseProgress("")
        self.tasks: list[list[Any]] = []  # [description, total, completed, status]

    def __enter__(self) -> PlainBars:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def start(self) -> None:
        return None

    def stop(self) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, completed: int = 0, status: str = "",
                 **_: Any) -> int:
        self.tasks.append([description, total, completed, status])
        self._show(len(self.tasks) - 1)
        return len(self.tasks) - 1

    def update(self, task: int, completed: int | None = None, total: float | None = None, status: str | None = None,
               **_: Any) -> None:
        entry = self.tasks[task]
        for i, value in ((1, total), (2, completed), (3, status)):
            if value is not None:
                entry[i] = value
        self._show(task)

    def _show(self, task: int) -> None:
        description, total, completed, status = self.tasks[task]
        self.lines._line(description, int(completed or 0), int(total or 0), status or None)
