"""Option types shared by several commands, defined once, and the checks that run on options at the CLI edge.

A value that cannot work (a batch size of 0, a choice that is not one, a negative time) is a usage error, exit 2,
raised while the command line is parsed, before anything is loaded. Whole numbers use typer's `min` / `max` (the
help shows the range); other numbers and fixed choices go through the callbacks below, whose messages name the
option and the values it takes. The vocabularies are written out here because the library modules that own them
import torch, and `--help` must not (tests/cli/test_help.py pins them to the library's).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from lowrank_cli.models.families import libraries  # the registry imports no torch

# Recent typer vendors its own click, older typer uses click itself: take the class typer actually raises.
CLICK_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")

DTYPE_CHOICES = ("fp32", "bf16", "fp16", "fp64")  # devices.DTYPE_CHOICES; the long spellings are accepted too
LIBRARY_CHOICES = ("auto", *libraries())  # models.pretrained.LIBRARIES: the model families' libraries
DEVICE_FORMS = "auto|cpu|cuda[:N]"
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")

SOURCE_PANEL = "Model source"  # the --help panel of the options that say how to read a MODEL


def flag_of(param: Any) -> str:
    """The option as a user writes it (--output, not -o)."""
    return max(param.opts, key=len) if getattr(param, "opts", None) else str(param.name)


def refuse(ctx: Any, message: str) -> None:
    """A usage error while the command line is parsed: one `Error:` line, exit 2 (see app.main)."""
    raise CLICK_USAGE_ERROR(message, ctx=ctx)


def choice(*values: str, metavar: str | None = None) -> dict[str, Any]:
    """typer.Option arguments for a fixed set of values: listed in --help (as the metavar, unless the help text
    lists them and `metavar` names them), anything else refused."""

    def check(ctx, param, value):
        if value is not None and value not in values:
            refuse(ctx, f"{flag_of(param)} '{value}' is not one of {', '.join(values)}")
        return value

    return {"metavar": metavar or "|".join(values), "callback": check}


def dtype_choice() -> dict[str, Any]:
    """typer.Option arguments for a dtype: fp32|bf16|fp16|fp64 in --help; float32, bfloat16, ... also accepted
    (as lowrank_cli.devices.resolve_dtype accepts them) and passed on in the short form."""

    def check(ctx, param, value):
        if value is None:
            return None
        from lowrank_cli.devices import DTYPES, SHORT_DTYPE

        key = value.lower().removeprefix("torch.")
        if key not in DTYPES:
            refuse(ctx, f"{flag_of(param)} '{value}' is not one of {', '.join(DTYPE_CHOICES)} (or float32, bfloat16, "
                        "float16, float64)")
        return SHORT_DTYPE[DTYPES[key]]

    return {"metavar": "|".join(DTYPE_CHOICES), "callback": check}


def number(*, low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False,
           note: str = "") -> Callable:
    """A callback for a float option: finite, within [low, high] (open ends with low_open / high_open)."""
    if low is not None and high is not None:
        wanted = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    else:
        bound, sign = (low, ">" if low_open else ">=") if low is not None else (high, "<" if high_open else "<=")
        wanted = f"a number {sign} {bound:g}"

    def check(ctx, param, value):
        if value is None:
            return None
        ok = math.isfinite(value)
        ok = ok and (low is None or (value > low if low_open else value >= low))
        ok = ok and (high is None or (value < high if high_open else value <= high))
        if not ok:
            refuse(ctx, f"{flag_of(param)} must be {wanted}{note}, got {value:g}")
        return value

    return check


def rank_multiple_option(ctx, param, value):
    """--rank-multiple: a whole number >= 1, or auto (the multiple the device likes): an int or "auto"."""
    if value is None or value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        refuse(ctx, f"{flag_of(param)} '{value}' is not a whole number >= 1 or auto")
    return n


def device_option(ctx, param, value):
    if value is not None and not _DEVICE.fullmatch(value):
        refuse(ctx, f"{flag_of(param)} '{value}' is not one of auto, cpu, cuda or cuda:N")
    return value


Model = Annotated[
    str,
    typer.Argument(
        metavar="MODEL",
        help="timm name (deit_base), hf-hub:ORG/REPO or a Hub id (bert-base-uncased), local-dir:PATH or a folder "
        "(timm or transformers layout), a weights file with --arch, or an lrc checkpoint.",
        show_default=False,
    ),
]
Output = Annotated[
    Path,
    typer.Option("--output", "-o", metavar="FILE", help="Output .safetensors file (written atomically).",
                 show_default=False),
]
Force = Annotated[bool, typer.Option("--force", help="Overwrite the output if it exists.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of tables.")]
Progress = Annotated[
    Optional[bool],
    typer.Option("--progress/--no-progress", help="Draw progress bars on stderr (default: only when it is a terminal).",
                 show_default=False),
]
Arch = Annotated[
    Optional[str],
    typer.Option("--arch", metavar="NAME", help="timm architecture of a bare weights file, or the transformers class "
                 "to build (BertModel).", show_default=False, rich_help_panel=SOURCE_PANEL),
]
Library = Annotated[
    str,
    typer.Option("--library", help="How to read a folder or Hub repo: auto (from its config.json), timm or "
                 "transformers.", rich_help_panel=SOURCE_PANEL, **choice(*LIBRARY_CHOICES)),
]
SeqLen = Annotated[
    Optional[int],
    typer.Option("--seq-len", min=1, help="Tokens per sequence for text models (default 128, at most the model's "
                 "positions).", show_default=False, rich_help_panel=SOURCE_PANEL),
]
ModelArg = Annotated[
    Optional[list[str]],
    typer.Option("--model-arg", metavar="KEY=VALUE", help="Constructor argument for --arch (repeatable), e.g. "
                 "num_classes=10.", show_default=False, rich_help_panel=SOURCE_PANEL),
]
Revision = Annotated[
    Optional[str],
    typer.Option("--revision", metavar="REV", help="Hub revision (branch, tag or commit) for hf-hub: sources.",
                 show_default=False, rich_help_panel=SOURCE_PANEL),
]
Device = Annotated[
    str,
    typer.Option("--device", metavar=DEVICE_FORMS, help="Where to run (auto: cuda when available).",
                 callback=device_option),
]
Checkpoint = Annotated[
    str,
    typer.Argument(help="An lrc checkpoint: a .safetensors file lrc wrote, an lrc folder (local-dir:PATH, as lrc push "
                   "--dry-run writes it) or hf-hub:ORG/REPO[@REVISION].", show_default=False),
]
Bench = Annotated[Optional[Path], typer.Option("--bench", help="An `lrc bench CHECKPOINT --json` file: its speed goes into the card.", show_default=False)]
Eval = Annotated[Optional[list[Path]], typer.Option("--eval", help="An `lrc eval CHECKPOINT --json` file: its accuracy goes into the card (repeatable).", show_default=False)]
License = Annotated[Optional[str], typer.Option("--license", help="Hub license id for the card (default: the source model's, where known), e.g. apache-2.0.", show_default=False)]
Fused = Annotated[
    Optional[bool],
    typer.Option("--fused/--no-fused", show_default=False, help="Run the low-rank layers through the fused Triton "
                 "kernel, one launch per layer (CUDA with Triton only; default off: on an H200 it was slower than the two "
                 "cuBLAS GEMMs)."),
]
InputSize = Annotated[
    Optional[str],
    typer.Option("--input-size", metavar="C,H,W", help="Input size of an image model (default: the model's "
                 "pretrained_cfg).", show_default=False, rich_help_panel=SOURCE_PANEL),
]


# API parameters whose CLI option is not simply --the-name (see errors.PARAMETER: messages name parameters).
_OPTION_OF = {
    "num_workers": "--workers",
    "evaluate_accuracy=False": "--no-eval",
    "augment=False": "--no-augment",
    "model_args": "--model-arg",
    "rank_patterns": "--rank-pattern",
    "compile=True": "--compile",
    "compile": "--compile-mode",  # lrc bench: compile=True is --compile, a mode name is --compile-mode MODE
    "batch_sizes": "--batch-size",
    "budget_samples": "--calib-samples",
    "calib_samples": "--calib-samples",
    "plan_batch_size": "--plan-batch-size",
    "plan_kind": "--plan",
    "output": "-o/--output",
    "evals": "--eval",
    "tokenizer=False": "--no-tokenizer",
    "fused=False": "--no-fused",
    "plan_fused=False": "--no-plan-fused",
    "merge=False": "--no-merge",
    "tasks": "--task",  # repeatable: --task NAME=PATH once per task
    "mode": "--multitask",
    "merge_rule": "--merge",
    "task_weights": "--task-weight",
}


def option_name(parameter: str) -> str:
    """The CLI option for an API parameter named in an error message: batch_size -> --batch-size,
    force=True -> --force, device=cpu -> --device cpu."""
    if parameter in _OPTION_OF:
        return _OPTION_OF[parameter]
    name, _, value = parameter.partition("=")
    flag = _OPTION_OF.get(name, "--" + name.replace("_", "-"))
    if value in ("", "True"):
        return flag
    return f"{flag} {value}"


def parse_input_size(text: str | None) -> tuple[int, ...] | None:
    from lowrank_cli.errors import UsageError

    if text is None:
        return None
    try:
        size = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        size = ()
    if len(size) != 3 or min(size) < 1:
        raise UsageError(f"--input-size '{text}' is not C,H,W (e.g. 3,224,224)")
    return size
