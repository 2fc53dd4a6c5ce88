"""Command-line options made from option fields (lowrank_cli.option_fields): one typer option per field.

    @with_options(options_of(RecoverOptions), after="teacher")
    def recover(student: Student, output: Output, data: Data, teacher: Teacher = None, ..., **options): ...

typer reads a command's parameters from `inspect.signature`, so `with_options` gives the command a signature: its
own parameters (what only the CLI has: arguments, --json, --progress), with the fields' options inserted after
`after`, each `Annotated[type, typer.Option(flag, help=..., rich_help_panel=..., callback=...)]` with the field's
default. The callback turns what was typed into the API's value (`parse`, a `--no-merge` switch into
merge=False) and refuses a value the field does not take with the API's message, its parameter written as the
flag. The command receives the values as keywords named like the fields: `**options` is what the API takes.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from lowrank_cli.cli.options import LIBRARY_CHOICES, choice, device_option, dtype_choice, flag_of, option_name, refuse
from lowrank_cli.option_fields import Opt, defaults_of, is_whole, option_fields

_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "Path": Path, "list[str]": list[str]}

# What the command line checks of an option whose vocabulary lives in a module that imports torch (the library
# checks the same values again when it resolves them).
CLI_CHECKS: dict[str, Callable[[], dict[str, Any]]] = {
    "library": lambda: choice(*LIBRARY_CHOICES),
    "device": lambda: {"callback": device_option},
    "dtype": dtype_choice,
    "plan_dtype": dtype_choice,
}


def default_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _cli_type(field: dataclasses.Field, opt: Opt) -> Any:
    """What the command line reads: `cli_type`, else the field's first type (`int | None` -> Optional[int])."""
    kind = opt.cli_type
    if kind is None:
        names = [t for t in str(field.type).replace(" ", "").split("|") if t != "None"]
        kind = _TYPES[names[0]]
    return Optional[kind] if opt.default is None else kind


def _callback(name: str, opt: Opt, whole: bool, inverted: bool, extra: Callable | None) -> Callable:
    """The check of one option while the command line is parsed: the API's value, or the API's refusal (exit 2).
    A repeatable option keeps what was typed (typer makes a list of what its callback returns): the command's
    wrapper parses it (see with_options)."""
    from lowrank_cli.errors import LrcError, UsageError

    def check(ctx, param, value):
        if extra is not None:
            value = extra(ctx, param, value)
        typed = value = (not value) if inverted else value
        try:
            value = opt.parse(value) if opt.parse is not None else value
        except LrcError as e:
            refuse(ctx, e.render(option_name))
        message = opt.violation(name, value, whole)
        if message:
            refuse(ctx, UsageError(message).render(lambda p: flag_of(param) if p == name else option_name(p)))
        return typed if getattr(param, "multiple", False) else value

    if whole and opt.cli_type in (None, int) and opt.low is not None and not opt.low_open and not opt.high_open:
        check.shows_range = (int(opt.low), None if opt.high is None else int(opt.high))  # see command.LrcCommand
    return check


def _parameter(field: dataclasses.Field, opt: Opt, defaults: dict[str, Any], panels: dict[str, str]) -> Any:
    flag = opt.flag or default_flag(field.name)
    inverted = flag.startswith("--no-") and "/" not in flag and opt.default is True  # --no-merge: merge=False
    extra = CLI_CHECKS[field.name]() if field.name in CLI_CHECKS else {}
    metavar = opt.metavar or extra.get("metavar") or ("|".join(opt.choices) if opt.choices else None)
    settings: dict[str, Any] = dict(
        help=opt.help.format(**defaults) if "{" in opt.help else opt.help,
        rich_help_panel=panels.get(opt.panel, opt.panel),
        callback=_callback(field.name, opt, is_whole(field), inverted, extra.get("callback")),
    )
    if metavar:
        settings["metavar"] = metavar
    if opt.show_default is False or opt.default is None:
        settings["show_default"] = False
    kind = bool if inverted else _cli_type(field, opt)
    return inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=False if inverted else opt.default,
                             annotation=Annotated[kind, typer.Option(flag, **settings)])


class Generated(list):
    """The typer parameters of some option fields, and the parsers the command applies to repeatable ones."""

    def __init__(self, parameters: list[inspect.Parameter], parsers: dict[str, Callable[[Any], Any]]) -> None:
        super().__init__(parameters)
        self.parsers = parsers


def options_of(cls: type, *, skip: Iterable[str] = (), only: Iterable[str] | None = None,
               panels: dict[str, str] | None = None) -> Generated:
    """The typer parameters of the option fields of `cls` (those in `only`, less `skip`), in field order;
    `panels` retitles --help panels for this command ({field panel: title})."""
    skip, only = set(skip), None if only is None else list(only)
    defaults = defaults_of(cls)
    chosen = [(f, opt) for f, opt in option_fields(cls) if opt.cli and f.name not in skip
              and (only is None or f.name in only)]
    if only is not None:
        chosen.sort(key=lambda pair: only.index(pair[0].name))
    parsers = {f.name: opt.parse for f, opt in chosen if opt.parse is not None and _is_list(_cli_type(f, opt))}
    return Generated([_parameter(f, opt, defaults, panels or {}) for f, opt in chosen], parsers)


def _is_list(kind: Any) -> bool:
    return kind is list[str] or kind == Optional[list[str]]


def with_options(*generated: Generated, after: str | None = None) -> Callable:
    """Give a command the signature typer reads: its own parameters, with `generated` inserted after `after`
    (default: at the end). The command takes the generated values as `**options`, the API's values."""

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn, eval_str=True)
        own = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        at = len(own) if after is None else [p.name for p in own].index(after) + 1
        rest = [p.replace(kind=p.KEYWORD_ONLY) for p in own[at:]]
        new = [p for part in generated for p in part]
        parsers = {name: parse for part in generated for name, parse in part.parsers.items()}

        @functools.wraps(fn)
        def command(**values: Any) -> Any:
            for name, parse in parsers.items():
                values[name] = parse(values[name])  # checked by its callback already
            return fn(**values)

        command.__signature__ = signature.replace(parameters=[*own[:at], *new, *rest])
        return command

    return decorate


def given(ctx: Any, *names: str) -> list[str]:
    """Those of `names` the command line gave (not their defaults)."""
    return [n for n in names if getattr(ctx.get_parameter_source(n), "name", "DEFAULT") not in ("DEFAULT",
                                                                                                 "DEFAULT_MAP")]
