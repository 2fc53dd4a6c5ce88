"""Each option defined once: a dataclass field whose metadata holds its help, range, choices and CLI spelling.

    @dataclass
    class RecoverOptions:
        steps: int | None = option(None, low=1, help="Optimizer steps (give this or --epochs).")

The default is the field's; the API checks the value by `check_values` (one message per violation, naming the
parameter in backticks: `steps` must be at least 1, got 0), and `lrc` builds its command-line option from the
same field (cli/option_params.py), checking with the same message rendered as the flag (--steps must be ...).
This module imports no torch, so that `lrc --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from lowrank_cli.errors import UsageError

KEY = "lrc.option"  # where a field's Opt sits in its metadata
LIMIT = 2 ** 31  # the upper bound of every number option without its own (a count, a size, a step, a ratio)


@dataclass(frozen=True)
class Opt:
    """One option: its default and help, the values it takes, and how the command line shows it.

    low / high bound a number (closed ends unless low_open / high_open; `note` is added to the range message);
    `choices` lists the strings it takes; `check(value)` returns the message for a value that does not fit some
    other rule (`rank_multiple`: a whole number or auto). For the command line: `flag` when it is not --the-name
    (`--workers`, `--eval/--no-eval`, `--no-merge` for a switch that turns a True default off), `panel` (the
    --help group), `metavar`, `cli_type` when the command line reads another type than the API takes (Path,
    list[str]), `parse(value)` from what it reads to what the API takes (KEY=VALUE strings -> a dict),
    `show_default` (False to leave the default out of --help), `cli=False` for an option of the API alone.
    A number without its own `high` is still bounded by LIMIT (2^31) unless `limit=False` (a count of MACs).
    `help` may name another option's default as {name} (it is formatted with the class's defaults).
    """

    default: Any = None
    help: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], str | None] | None = None
    flag: str | None = None
    panel: str | None = None
    metavar: str | None = None
    cli_type: Any = None
    parse: Callable[[Any], Any] | None = None
    show_default: bool | None = None
    cli: bool = True
    limit: bool = True

    def field(self, **changes: Any) -> Any:
        """A dataclass field for this option (`changes`: another default, help, panel, ... for one command)."""
        opt = dataclasses.replace(self, **changes)
        return dataclasses.field(default=opt.default, metadata={KEY: opt})

    def violation(self, name: str, value: Any, whole: bool = False) -> str | None:
        """The message for a value this option does not take (None when it is fine); `whole`: an int option."""
        if value is None and self.default is None:
            return None
        if self.choices is not None and not isinstance(value, bool) and value not in self.choices:
            return f"`{name}` '{value}' is not one of {', '.join(self.choices)}"
        if self.check is not None:
            message = self.check(value)
            if message:
                return message
        if self.low is None and self.high is None:
            return _limit_violation(name, value) if self.limit else None
        message = _range_violation(self, name, value, whole)
        return message or (_limit_violation(name, value) if self.limit and self.high is None else None)

    def wanted(self, whole: bool) -> str:
        """The range in words: at least 1, a number > 0, in (0, 0.5]."""
        low, high = self.low, self.high
        if low is not None and high is not None:
            return f"in {'(' if self.low_open else '['}{low:g}, {high:g}{')' if self.high_open else ']'}"
        if whole and not self.low_open and not self.high_open:
            return f"at least {low:g}" if low is not None else f"at most {high:g}"
        if low is not None:
            bound, sign = low, ">" if self.low_open else ">="
        else:
            bound, sign = high, "<" if self.high_open else "<="
        return f"a number {sign} {bound:g}"


def _range_violation(opt: Opt, name: str, value: Any, whole: bool) -> str | None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = number and math.isfinite(value)
    ok = ok and (opt.low is None or (value > opt.low if opt.low_open else value >= opt.low))
    ok = ok and (opt.high is None or (value < opt.high if opt.high_open else value <= opt.high))
    if ok:
        return None
    shown = f"{value:g}" if number and isinstance(value, float) else f"{value}"
    return f"`{name}` must be {opt.wanted(whole)}{opt.note}, got {shown}"


def _limit_violation(name: str, value: Any) -> str | None:
    """Every number option has an upper bound (2^31) though its own range names none: `--steps 1e20` is a typo."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) > LIMIT:
        return f"`{name}` must be at most {LIMIT} (2^31), got {value:g}" if isinstance(value, float) else \
            f"`{name}` must be at most {LIMIT} (2^31), got {value}"
    return None


def option(default: Any = None, **spec: Any) -> Any:
    """A dataclass field that is an option (see Opt for the keywords)."""
    return Opt(default, **spec).field()


def opt_of(field: dataclasses.Field) -> Opt | None:
    return field.metadata.get(KEY)


def is_whole(field: dataclasses.Field) -> bool:
    """An int option (`steps: int | None`): its range reads "at least 1", not "a number >= 1"."""
    kinds = str(field.type).replace(" ", "").split("|")
    return "int" in kinds and "float" not in kinds


def option_fields(cls_or_obj: Any) -> Iterator[tuple[dataclasses.Field, Opt]]:
    """The fields of a dataclass that are options, in their order, with their Opt."""
    for f in dataclasses.fields(cls_or_obj):
        opt = opt_of(f)
        if opt is not None:
            yield f, opt


def check_values(obj: Any) -> None:
    """Refuse the first field value its option does not take (range, choices, own rule): one UsageError."""
    for f, opt in option_fields(obj):
        message = opt.violation(f.name, getattr(obj, f.name), is_whole(f))
        if message:
            raise UsageError(message)


def defaults_of(cls: type) -> dict[str, Any]:
    """{field name: default} of a dataclass (what a help text may name as {name})."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def given_fields(obj: Any) -> set[str]:
    """The fields whose value is not their default (what the API was given, as the command line sees its flags)."""
    return {f.name for f in dataclasses.fields(obj) if f.default is dataclasses.MISSING
            or getattr(obj, f.name) != f.default}


def whole_or_auto(value: Any) -> Any:
    """A whole number as an int, `auto` as itself; anything else unchanged (its check then refuses it)."""
    if isinstance(value, str) and value != "auto":
        try:
            return int(value)
        except ValueError:
            return value
    return value


def rank_multiple_check(name: str) -> Callable[[Any], str | None]:
    """The rule of a `rank_multiple`: a whole number >= 1, or auto (the multiple the device likes)."""

    def check(value: Any) -> str | None:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return None
        return f"`{name}` '{value}' is not a whole number >= 1 or auto"

    return check


DEFAULT_SHARD_SIZE = "5GB"  # as transformers' save_pretrained
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(value: Any, name: str = "max_shard_size") -> int:
    """A size in bytes: an int, or '500MB', '5GB', '1.5GiB' (KB / MB / GB powers of 10, KiB / MiB / GiB of 2)."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise UsageError(f"`{name}` '{value}' is not a size: give bytes or a number with KB, MB, GB (or KiB, MiB, "
                         "GiB), e.g. 500MB")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise UsageError(f"`{name}` must be more than 0 bytes, got '{value}': give e.g. {DEFAULT_SHARD_SIZE} (the "
                         "default)")
    return size


def size_check(name: str) -> Callable[[Any], str | None]:
    """An Opt `check` for a size option (see parse_bytes)."""
    def check(value: Any) -> str | None:
        try:
            parse_bytes(value, name)
        except UsageError as e:
            return e.args[0]  # as raised, `name` in backticks: the CLI shows its flag
        return None

    return check
