"""Option types shared by several commands, defined once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

Model = Annotated[
    str,
    typer.Argument(
        help="timm name (deit_base), hf-hub:ORG/REPO or a Hub id (bert-base-uncased), local-dir:PATH or a folder "
        "(timm or transformers layout), a weights file with --arch, or an lrc checkpoint.",
        show_default=False,
    ),
]
Output = Annotated[Path, typer.Option("--output", "-o", help="Output .safetensors file (written atomically).", show_default=False)]
Force = Annotated[bool, typer.Option("--force", help="Overwrite the output if it exists.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of tables.")]
Arch = Annotated[Optional[str], typer.Option("--arch", help="timm architecture of a bare weights file, or the transformers class to build (BertModel).", show_default=False)]
Library = Annotated[str, typer.Option("--library", help="How to read a folder or Hub repo: auto (from its config.json), timm or transformers.")]
SeqLen = Annotated[Optional[int], typer.Option("--seq-len", help="Tokens per sequence for text models (default 128, at most the model's positions).", show_default=False)]
ModelArg = Annotated[
    Optional[list[str]],
    typer.Option("--model-arg", help="KEY=VALUE constructor argument for --arch (repeatable), e.g. num_classes=10.", show_default=False),
]
Checkpoint = Annotated[
    str,
    typer.Argument(help="An lrc checkpoint: a .safetensors file lrc wrote, an lrc folder (local-dir:PATH, as lrc push "
                   "--dry-run writes it) or hf-hub:ORG/REPO[@REVISION].", show_default=False),
]
Bench = Annotated[Optional[Path], typer.Option("--bench", help="An `lrc bench CHECKPOINT --json` file: its speed goes into the card.", show_default=False)]
Eval = Annotated[Optional[list[Path]], typer.Option("--eval", help="An `lrc eval CHECKPOINT --json` file: its accuracy goes into the card (repeatable).", show_default=False)]
License = Annotated[Optional[str], typer.Option("--license", help="Hub license id for the card (default: the source model's, where known), e.g. apache-2.0.", show_default=False)]
Revision = Annotated[Optional[str], typer.Option("--revision", help="Hub revision (branch, tag or commit) for hf-hub: sources.", show_default=False)]
Device = Annotated[str, typer.Option("--device", help="auto, cpu or cuda (auto: cuda when available).")]
InputSize = Annotated[
    Optional[str], typer.Option("--input-size", help="C,H,W input size (default: the model's pretrained_cfg).", show_default=False)
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
