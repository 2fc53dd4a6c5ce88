"""stdout's console (cli/console.py): off a terminal a table is printed whole, whatever rich's fallback width or
COLUMNS says; on a terminal it is rich's own rendering, unchanged."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from rich.table import Table

from lowrank_cli.cli.console import OFF_TERMINAL_WIDTH, StdoutConsole, out

HEADERS = [f"column number {i}" for i in range(8)]  # 8 x 16 characters: wider than 80 columns


def _table() -> Table:
    table = Table(title="wide")
    for h in HEADERS:
        table.add_column(h, no_wrap=True)
    table.add_row(*(f"value {i:>10}" for i in range(8)))
    return table


def _printed(console: Console) -> str:
    console.print(_table())
    return console.file.getvalue()


@pytest.mark.parametrize("columns", [None, "40", "80"])
def test_a_table_off_a_terminal_is_whole(monkeypatch, columns):
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    text = _printed(StdoutConsole(file=io.StringIO(), soft_wrap=True))
    assert "…" not in text
    assert all(h in text for h in HEADERS) and all(f"value {i:>10}" in text for i in range(8))
    assert max(len(line) for line in text.splitlines()) == 8 * 19 + 1  # every column at its natural width
    assert isinstance(out, StdoutConsole)


def test_a_wider_columns_is_kept_and_a_terminal_is_rich_s_own(monkeypatch):
    monkeypatch.setenv("COLUMNS", str(OFF_TERMINAL_WIDTH + 500))
    assert StdoutConsole(file=io.StringIO()).width == OFF_TERMINAL_WIDTH + 500
    monkeypatch.setenv("COLUMNS", "80")
    ours = StdoutConsole(file=io.StringIO(), force_terminal=True, color_system=None)
    rich_s = Console(file=io.StringIO(), force_terminal=True, color_system=None)
    assert ours.width == rich_s.width == 80
    on_terminal = _printed(rich_s)
    assert _printed(ours) == on_terminal and "…" in on_terminal  # an 80-column terminal still cuts, as rich does


def test_a_width_set_on_the_console_is_kept_off_a_terminal(monkeypatch):
    # rich's `console.width = N` (as tests/evaluation/test_bench.py narrows console.out) is kept, like `size`
    monkeypatch.delenv("COLUMNS", raising=False)
    console = StdoutConsole(file=io.StringIO(), soft_wrap=True)
    console.width = 60
    assert console.width == 60 and console.size.width == 60
    assert "…" in _printed(console)  # narrowed on purpose: cut to it, as rich does
