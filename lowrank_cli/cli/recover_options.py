"""The arguments of `lrc recover` that only the command line has (the options are RecoverOptions' fields, see
training/options.py and cli/option_params.py; the command itself is recover_cmd.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lowrank_cli.training.options import DATA_PANEL

Student = Annotated[str, typer.Argument(
    metavar="STUDENT", show_default=False,
    help="The low-rank model to recover (an lrc checkpoint), or a dense MODEL to factorize first with --kappa.")]
Teacher = Annotated[Optional[str], typer.Option(
    "--teacher", metavar="MODEL", show_default=False,
    help="The dense model the student was made from (any MODEL source); default: a dense STUDENT factorized on the "
    "fly is its own teacher.")]
Data = Annotated[Path, typer.Option(
    "--data", metavar="PATH", show_default=False,
    help="ImageFolder root (train/<class>/..., optional val/<class>/...), a class tree, a folder of unlabelled "
    "images, or for text models a .txt / .jsonl file or folder of them.")]
NoAugment = Annotated[bool, typer.Option(
    "--no-augment", rich_help_panel=DATA_PANEL, help="Same as --augment none (the evaluation preprocessing).")]
