"""`lrc finetune`: adapt a compressed (or dense) model to a labelled task, adapters merged back at zero cost."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lowrank_cli.cli import console
from lowrank_cli.cli.command import LrcCommand
from lowrank_cli.cli.options import (
    Arch,
    Device,
    Force,
    Json,
    Library,
    Model,
    ModelArg,
    Output,
    option_name,
    Progress,
    choice,
    number,
)
from lowrank_cli.cli.recover_cmd import (
    Augment,
    Bars,
    ClipGrad,
    Compile,
    EvalBatchSize,
    GradAccum,
    Keep,
    LabelSmoothing,
    LogEvery,
    MaxLength,
    NoAugment,
    Resume,
    SaveEvery,
    Seed,
    Steps,
    Temperature,
    ValFraction,
    WarmupSteps,
    Workers,
    augment_level,
    quiet_on_other_ranks,
    refuse_held_out_conflicts,
    resume_command,
)

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

METHOD_PANEL, TRAINING_PANEL, DATA_PANEL = "Method and adapters", "Training", "Data and held-out scores"
MULTITASK_PANEL = "Multi-task"
# The library's vocabularies, written out because those modules import torch and --help must not (test_help).
MODES = ("shared", "experts", "merge", "orthogonal")
SCHEDULES = ("sequential", "interleaved", "proportional")
MERGE_RULES = ("average", "weighted", "concat", "svd")

Data = Annotated[Optional[Path], typer.Option(
    "--data", metavar="PATH", show_default=False,
    help="An ImageFolder (train/<class>/..., optional val/<class>/...), or a .jsonl / .csv file of labelled texts.")]
Method = Annotated[str, typer.Option(
    "--method", rich_help_panel=METHOD_PANEL, **choice("head", "full", "lora", "dora", "rlrr"),
    help="What trains besides the new head: nothing (head), everything (full), LoRA, DoRA or RLRR adapters.")]
AdapterRank = Annotated[Optional[int], typer.Option(
    "--adapter-rank", min=1, show_default=False, rich_help_panel=METHOD_PANEL,
    help="LoRA / DoRA rank (default 8).")]
AdapterAlpha = Annotated[Optional[float], typer.Option(
    "--adapter-alpha", show_default=False, rich_help_panel=METHOD_PANEL, callback=number(low=0, low_open=True),
    help="LoRA / DoRA alpha, > 0 (default: the rank, a scaling of 1).")]
AdapterDropout = Annotated[Optional[float], typer.Option(
    "--adapter-dropout", show_default=False, rich_help_panel=METHOD_PANEL,
    callback=number(low=0, high=1, high_open=True), help="LoRA / DoRA dropout, in [0, 1) (default 0).")]
Targets = Annotated[Optional[list[str]], typer.Option(
    "--targets", metavar="REGEX", show_default=False, rich_help_panel=METHOD_PANEL,
    help="Linears to adapt, full match on module names; a low-rank layer's name stands for both factors "
    "(repeatable; default: every linear of the transformer blocks).")]
NoMerge = Annotated[bool, typer.Option(
    "--no-merge", rich_help_panel=METHOD_PANEL,
    help="Write the adapters alone with the head, not merged into the model (one task).")]
Tasks = Annotated[Optional[list[str]], typer.Option(
    "--task", metavar="NAME=PATH[:label|:score]", show_default=False, rich_help_panel=MULTITASK_PANEL,
    help="A task of a multi-task run (repeatable, two or more, instead of --data): its data, and :score to regress "
    "on a number or :label for classes (default: what the file holds).")]
Mode = Annotated[Optional[str], typer.Option(
    "--multitask", rich_help_panel=MULTITASK_PANEL, show_default=False, **choice(*MODES),
    help="How the tasks share the backbone: shared (one set of adapters, a head per task), experts (one set per "
    "task, merged at load(task=)), merge (per-task adapters merged into one backbone), orthogonal (LoRA on "
    "disjoint orthogonal blocks, their updates summed). Default experts.")]
Schedule = Annotated[Optional[str], typer.Option(
    "--schedule", rich_help_panel=MULTITASK_PANEL, show_default=False, **choice(*SCHEDULES),
    help="--multitask shared: the order of the tasks' batches (default proportional: each task's share of the "
    "data).")]
MergeRule = Annotated[Optional[str], typer.Option(
    "--merge", rich_help_panel=MULTITASK_PANEL, show_default=False, **choice(*MERGE_RULES),
    help="--multitask merge: how the tasks' updates combine (default concat: their exact sum; svd re-truncates it "
    "to --merge-rank).")]
MergeRank = Annotated[Optional[int], typer.Option(
    "--merge-rank", min=1, rich_help_panel=MULTITASK_PANEL, show_default=False,
    help="--merge svd: the rank of the merged update.")]
TaskWeights = Annotated[Optional[list[str]], typer.Option(
    "--task-weight", metavar="NAME=W", rich_help_panel=MULTITASK_PANEL, show_default=False,
    help="--merge weighted / concat / svd: a task's weight, > 0 (repeatable; weighted defaults to the tasks' "
    "training samples).")]
Teacher = Annotated[Optional[str], typer.Option(
    "--teacher", metavar="MODEL", show_default=False, rich_help_panel=METHOD_PANEL,
    help="A model already fine-tuned on this task: adds logit distillation.")]
Gamma = Annotated[Optional[float], typer.Option(
    "--gamma", show_default=False, rich_help_panel=METHOD_PANEL, callback=number(low=0),
    help="Weight of the logit distillation from --teacher, >= 0 (default 1).")]
Epochs = Annotated[Optional[float], typer.Option(
    "--epochs", show_default=False, callback=number(low=0, low_open=True),
    help="Passes over the training data, > 0, fractions allowed (give this or --steps).")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Samples per micro-batch, per process.")]
Lr = Annotated[Optional[float], typer.Option(
    "--lr", show_default=False, rich_help_panel=TRAINING_PANEL, callback=number(low=0, low_open=True),
    help="Peak learning rate of AdamW, > 0 (default: head 1e-3, full 1e-4, lora / dora 5e-4, rlrr 1e-3).")]
WeightDecay = Annotated[float, typer.Option(
    "--weight-decay", rich_help_panel=TRAINING_PANEL, callback=number(low=0),
    help="AdamW weight decay (matrices only), >= 0.")]
ValData = Annotated[Optional[Path], typer.Option(
    "--val-data", metavar="DIR|FILE", show_default=False, rich_help_panel=DATA_PANEL,
    help="Held-out data (default: DATA's val/ split, else --val-fraction of DATA).")]



# Like recover's, but what finetune does by default differs.
EvalEvery = Annotated[Optional[int], typer.Option(
    "--eval-every", min=1, show_default=False, rich_help_panel=DATA_PANEL,
    help="Steps between held-out evaluations (default: once an epoch).")]
Tokenizer = Annotated[Optional[str], typer.Option(
    "--tokenizer", metavar="DIR|REPO", show_default=False, rich_help_panel=DATA_PANEL,
    help="Text data: folder or Hub repo of the tokenizer (default: the model's, or the one its checkpoint records).")]


def finetune(
    model: Model,
    output: Output,
    data: Data = None,
    tasks: Tasks = None,
    method: Method = "lora",
    steps: Steps = None,
    epochs: Epochs = None,
    batch_size: BatchSize = 32,
    device: Device = "auto",
    resume: Resume = False,
    force: Force = False,
    json_out: Json = False,
    progress: Progress = None,
    adapter_rank: AdapterRank = None,
    adapter_alpha: AdapterAlpha = None,
    adapter_dropout: AdapterDropout = None,
    targets: Targets = None,
    no_merge: NoMerge = False,
    mode: Mode = None,
    schedule: Schedule = None,
    merge_rule: MergeRule = None,
    merge_rank: MergeRank = None,
    task_weight: TaskWeights = None,
    teacher: Teacher = None,
    gamma: Gamma = None,
    temperature: Temperature = 1.0,
    label_smoothing: LabelSmoothing = 0.0,
    lr: Lr = None,
    warmup_steps: WarmupSteps = None,
    weight_decay: WeightDecay = 0.01,
    clip_grad: ClipGrad = 1.0,
    grad_accum: GradAccum = 1,
    compile: Compile = False,
    seed: Seed = 0,
    save_every: SaveEvery = 500,
    log_every: LogEvery = 10,
    augment: Augment = "auto",
    no_augment: NoAugment = False,
    val_data: ValData = None,
    val_fraction: ValFraction = None,
    eval_every: EvalEvery = None,
    keep: Keep = None,
    eval_batch_size: EvalBatchSize = None,
    workers: Workers = None,
    tokenizer: Tokenizer = None,
    max_length: MaxLength = None,
    library: Library = "auto",
    arch: Arch = None,
    model_arg: ModelArg = None,
) -> None:
    """Fine-tune a compressed (or dense) MODEL on a labelled task, adapters merged back at zero cost.

    A new head sized to the data's classes, and LoRA, DoRA or RLRR adapters (or only the head, or every weight);
    the output keeps the input's layers, ranks and speed.
    """
    from lowrank_cli.models.pretrained import parse_model_args

    console.show_progress(progress)
    refuse_held_out_conflicts(True, val_data, val_fraction, eval_every, keep)
    multitask = multitask_options(data, tasks, dict(mode=mode, schedule=schedule, merge_rule=merge_rule,
                                                    merge_rank=merge_rank, task_weights=parse_weights(task_weight)))
    options = dict(
        output=output, method=method, steps=steps, epochs=epochs, batch_size=batch_size, device=device,
        resume=resume, force=force, adapter_rank=adapter_rank, adapter_alpha=adapter_alpha,
        adapter_dropout=adapter_dropout or 0.0, targets=targets, merge=not no_merge, teacher=teacher, gamma=gamma,
        temperature=temperature, label_smoothing=label_smoothing, lr=lr, warmup_steps=warmup_steps,
        weight_decay=weight_decay, clip_grad=clip_grad, grad_accum=grad_accum, compile=compile, seed=seed,
        save_every=save_every, log_every=log_every, augment=augment_level(augment, no_augment), val_data=val_data,
        val_fraction=val_fraction, eval_every=eval_every, keep=keep, eval_batch_size=eval_batch_size,
        num_workers=workers, tokenizer=tokenizer, max_length=max_length, library=library, arch=arch,
        model_args=parse_model_args(model_arg),
    )
    result = quiet_on_other_ranks(lambda: _run(model, data, tasks, {**options, **multitask}))
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


def parse_weights(items: list[str] | None) -> dict[str, float] | None:
    """--task-weight NAME=W, repeated."""
    from lowrank_cli.errors import UsageError
    if not items:
        return None
    weights = {}
    for item in items:
        name, sep, value = item.partition("=")
        if name.strip() in weights:
            raise UsageError(f"--task-weight gives task '{name.strip()}' two weights: give each task one")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            weights[name.strip()] = float("nan")
        if not sep or not name.strip() or not weights[name.strip()] > 0 or weights[name.strip()] == float("inf"):
            raise UsageError(f"--task-weight '{item}' is not NAME=W with a weight W > 0")
    return weights


def multitask_options(data: Path | None, tasks: list[str] | None, given: dict) -> dict:
    """--data (one task) or --task (several); the multi-task options (those given) need --task."""
    from lowrank_cli.errors import UsageError

    if data is not None and tasks:
        raise UsageError("--data is one task and --task one of several: give --data, or every task as --task")
    if data is None and not tasks:
        raise UsageError("no training data: give --data PATH (one task), or --task NAME=PATH twice or more")
    given = {k: v for k, v in given.items() if v is not None}
    if given and not tasks:
        raise UsageError(f"{option_name(next(iter(given)))} belongs to a multi-task run: give the tasks as --task "
                         "NAME=PATH, or leave it out")
    return given


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
    table.add_row("method", f"{settings['method']} ({merged}); head {', '.join(settings['head']['modules'])} with "
                  f"{settings['head']['outputs']} output(s)")
    table.add_row("trainable", f"{s['trainable_parameters']:,} of {s['parameters']:,} parameters "
                  f"({100 * s['trainable_share']:.2f} %)")
    resumed = f" (resumed at step {s['resumed_from']})" if s["resumed_from"] else ""
    table.add_row("steps", f"{s['steps']} x {settings['batch_size'] * settings['grad_accum'] * settings['processes']}"
                  f" samples{resumed}, {s['seconds']:.1f} s")
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
