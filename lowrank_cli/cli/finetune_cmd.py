"""`lrc finetune`: adapt a compressed (or dense) model to a labelled task, adapters merged back at zero cost."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Optional

import typer

from lowrank_cli.cli import console
from lowrank_cli.cli.command import LrcCommand
from lowrank_cli.cli.option_params import given, options_of, with_options
from lowrank_cli.cli.options import Json, Model, Output, Progress, option_name
from lowrank_cli.cli.recover_cmd import (
    Bars,
    augment_level,
    quiet_on_other_ranks,
    refuse_held_out_conflicts,
    resume_command,
)
from lowrank_cli.training.multitask_options import (  # noqa: F401  the vocabularies, read by tests/cli/test_help.py
    MERGE_RULES,
    MODES,
    MULTITASK_PANEL,
    SCHEDULES,
    MultitaskOptions,
)
from lowrank_cli.training.options import DATA_PANEL, FinetuneOptions

FINETUNE_EPILOG = """\
Examples:

  lrc finetune deit_lr.safetensors --data flowers/ --method lora --adapter-rank 8 --epochs 10 -o flowers_lr.safetensors

  lrc finetune bert_lr.safetensors --data sst.jsonl --val-data dev.jsonl --method dora --epochs 3 -o sst_lr.safetensors

  lrc finetune deit_base --data flowers/ --method rlrr --epochs 10 -o flowers_rlrr.safetensors

  lrc finetune deit_lr.safetensors --data flowers/ --no-merge --epochs 10 -o flowers_adapters.safetensors

  lrc eval flowers_lr.safetensors --data flowers/

Methods: head (only the new head trains), full (every weight, the factors of low-rank layers included), lora and
dora (Hugging Face peft, the [finetune] extra: on both factors of every low-rank layer and on the dense linears of
the blocks, or --targets), rlrr (W' = W + (s_l s_r^T) * W on the same linears, per factor, with a bias shift and
scale/shift of the LayerNorm outputs). The adapters are merged when training ends: the output has the input's
layers, ranks and speed plus the new head. --no-merge writes the adapters and the head alone, for
lowrank_cli.load(BASE, adapters=FILE).

Data: an ImageFolder (train/<class>/..., optional val/<class>/...) for image models; for text models a .jsonl
({"text": ..., "label": ...} per line, optional "text_pair", or "score" for regression) or a .csv with those
columns. Held-out scores (top-1, accuracy, or Spearman for scores) once per epoch by default, the best state kept.
"""

FINETUNE_DATA_PANEL = "Data and held-out scores"
MULTITASK_FIELDS = [f.name for f in dataclasses.fields(MultitaskOptions) if f.name not in FinetuneOptions.names()]

Data = Annotated[Optional[Path], typer.Option(
    "--data", metavar="PATH", show_default=False,
    help="An ImageFolder (train/<class>/..., optional val/<class>/...), or a .jsonl / .csv file of labelled texts.")]
Tasks = Annotated[Optional[list[str]], typer.Option(
    "--task", metavar="NAME=PATH[:label|:score]", show_default=False, rich_help_panel=MULTITASK_PANEL,
    help="A task of a multi-task run (repeatable, two or more, instead of --data): its data, and :score to regress "
    "on a number or :label for classes (default: what the file holds).")]
NoAugment = Annotated[bool, typer.Option(
    "--no-augment", rich_help_panel=FINETUNE_DATA_PANEL,
    help="Same as --augment none (the evaluation preprocessing).")]


@with_options(options_of(MultitaskOptions, skip=("evaluate_accuracy",), panels={DATA_PANEL: FINETUNE_DATA_PANEL}),
              after="tasks")
def finetune(
    ctx: typer.Context,
    model: Model,
    output: Output,
    data: Data = None,
    tasks: Tasks = None,
    json_out: Json = False,
    progress: Progress = None,
    no_augment: NoAugment = False,
    **options,
) -> None:
    """Fine-tune a compressed (or dense) MODEL on a labelled task, adapters merged back at zero cost.

    A new head sized to the data's classes, and LoRA, DoRA or RLRR adapters (or only the head, or every weight);
    the output keeps the input's layers, ranks and speed.
    """
    console.show_progress(progress)
    refuse_held_out_conflicts(True, options["val_data"], options["val_fraction"], options["eval_every"],
                              options["keep"])
    multitask_options(data, tasks, given(ctx, *MULTITASK_FIELDS))
    options["augment"] = augment_level(options["augment"], no_augment)
    if not tasks:
        options = {k: v for k, v in options.items() if k not in MULTITASK_FIELDS}
    result = quiet_on_other_ranks(lambda: _run(model, data, tasks, {"output": output, **options}))
    if console.is_main_process():
        _show(result.summary(), bool(tasks), json_out)


def _show(summary: dict, multitask: bool, json_out: bool) -> None:
    if json_out:
        console.print_json(summary)
    elif multitask:
        from lowrank_cli.cli.multitask_view import print_multitask_summary

        print_multitask_summary(summary)
    else:
        print_summary(summary)


def multitask_options(data: Path | None, tasks: list[str] | None, given: list[str]) -> None:
    """--data (one task) or --task (several); the multi-task options (those given) need --task."""
    from lowrank_cli.errors import UsageError

    if data is not None and tasks:
        raise UsageError("--data is one task and --task one of several: give --data, or every task as --task")
    if data is None and not tasks:
        raise UsageError("no training data: give --data PATH (one task), or --task NAME=PATH twice or more")
    if given and not tasks:
        raise UsageError(f"{option_name(given[0])} belongs to a multi-task run: give the tasks as --task NAME=PATH, "
                         "or leave it out")


def _run(model: str, data: Path | None, tasks: list[str] | None, options: dict):
    from lowrank_cli.training.finetune import finetune as run_finetune
    from lowrank_cli.training.multitask import finetune_tasks

    bars = Bars()
    hooks = dict(progress=bars, log=console.info, warn=console.warn, resume_command=resume_command())
    try:
        if tasks:
            return finetune_tasks(model, tasks, **options, **hooks)
        return run_finetune(model, data, **options, **hooks)
    finally:
        bars.close()


def _value(name: str, value: float) -> str:
    return f"{100 * value:.2f} %" if name.startswith(("val_top", "val_accuracy")) else f"{value:.4f}"


def print_summary(s: dict) -> None:
    from rich.table import Table

    settings = s["settings"]
    table = Table(title=f"lrc finetune -> {s['output']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    merged = "merged" if settings["merged"] else "not merged: an adapter file"
    stream = settings.get("data_kind") == "token stream"
    head = (f"next-token training, its own head ({settings['head']['outputs']} tokens)" if stream else
            f"head {', '.join(settings['head']['modules'])} with {settings['head']['outputs']} output(s)")
    table.add_row("method", f"{settings['method']} ({merged}); {head}")
    table.add_row("trainable", f"{s['trainable_parameters']:,} of {s['parameters']:,} parameters "
                  f"({100 * s['trainable_share']:.2f} %)")
    resumed = f" (resumed at step {s['resumed_from']})" if s["resumed_from"] else ""
    table.add_row("steps", f"{s['steps']} x {settings['batch_size'] * settings['grad_accum'] * settings['processes']}"
                  f" {'windows' if stream else 'samples'}{resumed}, {s['seconds']:.1f} s")
    if stream:
        table.add_row("tokens seen", f"{s['samples_seen'] * settings['seq_len']:,} (windows of {settings['seq_len']})")
    for term, values in s["losses"].items():
        table.add_row(term, f"{values['first']:.4g} -> {values['last']:.4g}")
    scores = s["scores"]
    if scores.get("after"):
        table.add_row(f"held-out ({scores['samples']})", scores["data"])
        for name, after in scores["after"].items():
            before = scores["before"].get(name)
            table.add_row(f"  {name}", f"{_value(name, before)} -> {_value(name, after)}" if before is not None
                          else _value(name, after))
    else:
        table.add_row("held-out", "none (no val/ split, --val-data or --val-fraction)")
    kept = scores.get("kept") or {}
    if kept:
        value = f", {kept['metric']} {kept['value']:.4g}" if kept.get("value") is not None else ""
        table.add_row("kept", f"{kept['which']} state (step {kept['step']}{value})")
    table.add_row("metrics", str(s["metrics"]))
    console.out.print(table)


def register(app: typer.Typer) -> None:
    app.command("finetune", cls=LrcCommand, epilog=FINETUNE_EPILOG)(finetune)
