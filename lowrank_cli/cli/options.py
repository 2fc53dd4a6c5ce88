"""Option types of the command line only (arguments, --output, --json, --progress, ...), the checks that run on
options at the CLI edge, and how an API parameter named in a message is written as its option (`option_name`).

The options that the API has too are its option fields (lowrank_cli.option_fields: training/options.py,
compress/factorize_options.py, models/source_options.py), made into typer options by cli/option_params.py. A value
that cannot work (a batch size of 0, a choice that is not one, a negative time) is a usage error, exit 2, raised
while the command line is parsed, before anything is loaded: option fields by their own check, the options here
by typer's `min` / `max` and the callbacks below, whose messages name the option and the values it takes. The
vocabularies are written out here because the library modules that own them import torch, and `--help` must not
(tests/cli/test_help.py pins them to the library's).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from lowrank_cli.models.families import libraries  # the registry imports no torch
from lowrank_cli.models.source_options import REVISION

# Recent typer vendors its own click, older typer uses click itself: take the class typer actually raises.
CLICK_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")

DTYPE_CHOICES = ("fp32", "bf16", "fp16", "fp64")  # devices.DTYPE_CHOICES; the long spellings are accepted too
LIBRARY_CHOICES = ("auto", *libraries())  # models.pretrained.LIBRARIES: the model families' libraries
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


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
def model_output(ctx, param, value):
    """-o of a command that writes a model: a .safetensors name (lrc reads any other name back as a foreign file)."""
    if value is not None and Path(value).suffix != ".safetensors":
        shown = Path(value)
        refuse(ctx, f"{flag_of(param)} '{shown}' does not end in .safetensors, the format lrc writes: use "
               f"-o {shown.with_suffix('.safetensors') if shown.suffix else shown.with_name(shown.name + '.safetensors')}")
    return value


Output = Annotated[
    Path,
    typer.Option("--output", "-o", metavar="FILE", help="Output .safetensors file (written atomically).",
                 show_default=False, callback=model_output),
]
Force = Annotated[bool, typer.Option("--force", help="Overwrite the output if it exists.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of tables.")]
Progress = Annotated[
    Optional[bool],
    typer.Option("--progress/--no-progress", help="Draw progress bars on stderr (default: only when it is a terminal).",
                 show_default=False),
]
Revision = Annotated[  # lrc card: the revision of the source's card (the model-source commands: SourceOptions)
    Optional[str],
    typer.Option("--revision", metavar=REVISION.metavar, help=REVISION.help, show_default=False,
                 rich_help_panel=REVISION.panel),
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


# API parameters whose CLI option is not simply --the-name (see errors.PARAMETER: messages name parameters), besides
# those of the option fields (their `flag`, see _field_flags).
_OPTION_OF = {
    "augment=False": "--no-augment",
    "rank_patterns": "--rank-pattern",
    "compile=True": "--compile",
    "compile": "--compile-mode",  # lrc bench: compile=True is --compile, a mode name is --compile-mode MODE
    "batch_sizes": "--batch-size",
    "budget_samples": "--calib-samples",
    "output": "-o/--output",
    "evals": "--eval",
    "tokenizer=False": "--no-tokenizer",
    "fused=False": "--no-fused",
    "tasks": "--task",  # repeatable: --task NAME=PATH once per task
}


@functools.cache
def _field_flags() -> dict[str, str]:
    """The flags of the option fields that are not --the-name: num_workers -> --workers, evaluate_accuracy=False
    -> --no-eval, merge=False -> --no-merge."""
    from lowrank_cli.compress.factorize_options import CONFIGS
    from lowrank_cli.models.source_options import SourceOptions
    from lowrank_cli.option_fields import option_fields
    from lowrank_cli.training.multitask_options import MultitaskOptions
    from lowrank_cli.training.options import RecoverOptions

    flags: dict[str, str] = {}
    for cls in (SourceOptions, RecoverOptions, MultitaskOptions, *CONFIGS):
        for f, opt in option_fields(cls):
            flag = opt.flag or "--" + f.name.replace("_", "-")
            if "/" in flag:
                flags[f.name], flags[f"{f.name}=False"] = flag.split("/")
            elif flag.startswith("--no-") and opt.default is True:
                flags[f"{f.name}=False"] = flag
            elif flag != "--" + f.name.replace("_", "-"):
                flags[f.name] = flag
    return flags


def option_name(parameter: str) -> str:
    """The CLI option for an API parameter named in an error message: batch_size -> --batch-size,
    force=True -> --force, device=cpu -> --device cpu."""
    known = {**_field_flags(), **_OPTION_OF}
    if parameter in known:
        return known[parameter]
    name, _, value = parameter.partition("=")
    flag = known.get(name, "--" + name.replace("_", "-"))
    if value in ("", "True"):
        return flag
    return f"{flag} {value}"
