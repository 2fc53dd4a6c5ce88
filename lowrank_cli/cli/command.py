"""The click classes behind `lrc` and its commands: how their help shows switches, arguments and the usage line.

typer gives every parameter a type label (`--force <bool>`, `--help <bool>`) and braces a required argument in
the usage line (`{model}`). Here a switch shows no value, and an argument shows its metavar as click writes it
(`lrc factorize [OPTIONS] MODEL`). An explicit metavar on an option (`REGEX=RANK`) is what typer shows for it.
"""

from __future__ import annotations

from typer.core import TyperCommand, TyperGroup


def _show_switch_without_type(param) -> None:
    """A switch (`--force`, `--eval/--no-eval`) takes no value: nothing after its name in the help."""
    if getattr(param, "is_flag", False) and getattr(param, "metavar", None) is None:
        param.metavar = ""


def _show_range(param) -> None:
    """An int option checked by its field's callback (cli/option_params.py) shows its range as typer's `min` does
    ([x>=1]); the callback, not click, refuses a value outside it, with the API's message."""
    shown = getattr(getattr(param, "callback", None), "shows_range", None)
    if shown is not None:
        param.min, param.max = shown


def _usage_name(param) -> str:
    name = param.metavar or param.name.upper()
    if not param.required:
        name = f"[{name}]"
    return name if param.nargs == 1 else name + "..."


class _TidyHelp:
    """What LrcCommand and LrcGroup share (a mixin before the click class)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            _show_switch_without_type(param)
            _show_range(param)

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)  # created on first use, so not among self.params above
        if option is not None:
            _show_switch_without_type(option)
        return option

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                pieces.append(_usage_name(param))
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces


class LrcCommand(_TidyHelp, TyperCommand):
    """The class of every `lrc` command (`app.command(cls=LrcCommand)`)."""


class LrcGroup(_TidyHelp, TyperGroup):
    """The class of `lrc` itself (`typer.Typer(cls=LrcGroup)`)."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        return [*super().collect_usage_pieces(ctx), self.subcommand_metavar]
