"""`lrc recover`: distil a low-rank model back towards its dense teacher."""

from __future__ import annotations

import os
import shlex
import signal
import sys
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
    ModelArg,
    Output,
    Progress,
    choice,
    number,
    rank_multiple_option,
)

RECOVER_EPILOG = """\
Examples:

  lrc recover deit_lr.safetensors --teacher deit_base --data imagenet/ --steps 2000 -o deit_lr_rec.safetensors

  lrc recover deit_lr.safetensors --teacher deit_base --data unlabeled_images/ --epochs 1 -o out.safetensors

  lrc recover deit_base --kappa 2 --teacher deit_base --data imagenet/ --steps 2000 -o out.safetensors

  torchrun --standalone --nproc_per_node 8 -m lowrank_cli recover deit_lr.safetensors --teacher deit_base \\
      --data imagenet/ --steps 2000 -o deit_lr_rec.safetensors

  lrc recover bert_lr.safetensors --teacher ./my-bert-folder --data corpus.txt --steps 500 -o rec.safetensors

  lrc recover ... --resume        (after a crash, a kill or Ctrl-C: continues where it stopped)

Data: DIR/train/<class>/... (labels: cross-entropy + distillation), optional DIR/val/<class>/... (accuracy
before and after), or a folder of images without classes (distillation only). For text models: a .txt file
(one text per line), a .jsonl file ({"text": ...} per line) or a folder of them, tokenised with the teacher's
tokenizer; distillation of every layer's hidden states on the real tokens. --batch-size is per process.
Every --save-every steps the training state is written to <output stem>.train.safetensors; metrics go to
<output stem>.metrics.jsonl.
"""

LOSS_PANEL, TRAINING_PANEL, DATA_PANEL = "Loss (PELA Eq. 7)", "Training", "Data and accuracy"
STUDENT_PANEL = "A dense STUDENT, factorized on the fly"
DEFAULT_RANK_MULTIPLE = 8

Student = Annotated[str, typer.Argument(
    metavar="STUDENT", show_default=False,
    help="The low-rank model to recover (an lrc checkpoint), or a dense MODEL to factorize first with --kappa.")]
Teacher = Annotated[str, typer.Option(
    "--teacher", metavar="MODEL", show_default=False,
    help="The dense model the student was made from (any MODEL source).")]
Data = Annotated[Path, typer.Option(
    "--data", metavar="PATH", show_default=False,
    help="ImageFolder root (train/<class>/..., optional val/<class>/...), a class tree, a folder of unlabelled "
    "images, or for text models a .txt / .jsonl file or folder of them.")]
Steps = Annotated[Optional[int], typer.Option(
    "--steps", min=1, show_default=False, help="Optimizer steps (give this or --epochs).")]
Epochs = Annotated[Optional[float], typer.Option(
    "--epochs", show_default=False, callback=number(low=0, low_open=True),
    help="Passes over the training data, > 0, fractions allowed (give this or --steps).")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Images (or texts) per micro-batch, per process.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the interrupted run from its training state.")]

Alpha = Annotated[float, typer.Option(
    "--alpha", rich_help_panel=LOSS_PANEL, callback=number(low=0),
    help="Weight of the feature distillation (block outputs, MSE), >= 0.")]
Beta = Annotated[float, typer.Option(
    "--beta", rich_help_panel=LOSS_PANEL, callback=number(low=0),
    help="Weight of the weight-perturbation regulariser (max|second@first - W| - eps)^2, >= 0.")]
Gamma = Annotated[float, typer.Option(
    "--gamma", rich_help_panel=LOSS_PANEL, callback=number(low=0),
    help="Weight of the logit distillation (KL at --temperature), >= 0.")]
Delta = Annotated[float, typer.Option(
    "--delta", rich_help_panel=LOSS_PANEL, callback=number(low=0),
    help="Text models: weight of the MSE on the final pooled output, >= 0.")]
Eps = Annotated[float, typer.Option(
    "--eps", rich_help_panel=LOSS_PANEL, callback=number(low=0),
    help="The weight perturbation the regulariser aims at, >= 0.")]
Temperature = Annotated[float, typer.Option(
    "--temperature", rich_help_panel=LOSS_PANEL, callback=number(low=0, low_open=True),
    help="Temperature of the logit distillation, > 0.")]
LabelSmoothing = Annotated[float, typer.Option(
    "--label-smoothing", rich_help_panel=LOSS_PANEL, callback=number(low=0, high=1, high_open=True),
    help="Label smoothing of the cross-entropy (labelled data), in [0, 1).")]

Lr = Annotated[float, typer.Option(
    "--lr", rich_help_panel=TRAINING_PANEL, callback=number(low=0, low_open=True),
    help="Peak learning rate of AdamW (linear warm-up, then cosine to 0), > 0.")]
WarmupSteps = Annotated[Optional[int], typer.Option(
    "--warmup-steps", min=0, show_default=False, rich_help_panel=TRAINING_PANEL,
    help="Linear warm-up steps (default: 5% of the steps).")]
WeightDecay = Annotated[float, typer.Option(
    "--weight-decay", rich_help_panel=TRAINING_PANEL, callback=number(low=0),
    help="AdamW weight decay (matrices only), >= 0.")]
ClipGrad = Annotated[float, typer.Option(
    "--clip-grad", rich_help_panel=TRAINING_PANEL, callback=number(low=0),
    help="Clip the gradient norm to this (0: off).")]
GradAccum = Annotated[int, typer.Option(
    "--grad-accum", min=1, rich_help_panel=TRAINING_PANEL, help="Micro-batches per optimizer step.")]
FreezeDense = Annotated[bool, typer.Option(
    "--freeze-dense", rich_help_panel=TRAINING_PANEL,
    help="Train only the factorized layers (norms, embeddings, head stay).")]
Compile = Annotated[bool, typer.Option(
    "--compile", rich_help_panel=TRAINING_PANEL, help="torch.compile the student and the teacher.")]
Seed = Annotated[int, typer.Option(
    "--seed", rich_help_panel=TRAINING_PANEL, help="Seed of the data order, augmentations and dropout.")]
SaveEvery = Annotated[int, typer.Option(
    "--save-every", min=1, rich_help_panel=TRAINING_PANEL, help="Write the training state every N steps.")]
LogEvery = Annotated[int, typer.Option(
    "--log-every", min=1, rich_help_panel=TRAINING_PANEL, help="Log metrics every N steps.")]

Augment = Annotated[str, typer.Option(
    "--augment", rich_help_panel=DATA_PANEL, **choice("auto", "none", "light", "strong"),
    help="Training augmentation. auto: none for images about the model's input size or smaller, light (flips, "
    "mild scale jitter) for short runs, strong (timm's random resized crops) for long runs on large images.")]
NoAugment = Annotated[bool, typer.Option(
    "--no-augment", rich_help_panel=DATA_PANEL, help="Same as --augment none (the evaluation preprocessing).")]
ValData = Annotated[Optional[Path], typer.Option(
    "--val-data", metavar="DIR|FILE", show_default=False, rich_help_panel=DATA_PANEL,
    help="Held-out data to score the student on (default: DATA's val/ split, else --val-fraction of DATA).")]
ValFraction = Annotated[Optional[float], typer.Option(
    "--val-fraction", show_default=False, rich_help_panel=DATA_PANEL, callback=number(low=0, high=0.5, low_open=True),
    help="Share of the training data held out, in (0, 0.5] (default: 0.1 when there are 200 samples or more and no "
    "val/ split).")]
EvalEvery = Annotated[Optional[int], typer.Option(
    "--eval-every", min=1, show_default=False, rich_help_panel=DATA_PANEL,
    help="Steps between held-out evaluations (default: a tenth of the run).")]
Keep = Annotated[Optional[str], typer.Option(
    "--keep", show_default=False, rich_help_panel=DATA_PANEL, **choice("best", "last"),
    help="Which state to write: best held-out score (the default with held-out data) or the last step.")]
Workers = Annotated[Optional[int], typer.Option(
    "--workers", min=0, show_default=False, rich_help_panel=DATA_PANEL,
    help="Data-loading processes per training process (default: its share of the CPUs, at most 8).")]
Tokenizer = Annotated[Optional[str], typer.Option(
    "--tokenizer", metavar="DIR|REPO", show_default=False, rich_help_panel=DATA_PANEL,
    help="Text data: folder or Hub repo of the tokenizer (default: the teacher's).")]
MaxLength = Annotated[Optional[int], typer.Option(
    "--max-length", min=1, show_default=False, rich_help_panel=DATA_PANEL,
    help="Text data: tokens per text at most (default: the model's positions, at most 512).")]
Eval = Annotated[bool, typer.Option(
    "--eval/--no-eval", rich_help_panel=DATA_PANEL, help="Measure accuracy on the val split before and after.")]
EvalBatchSize = Annotated[Optional[int], typer.Option(
    "--eval-batch-size", min=1, show_default=False, rich_help_panel=DATA_PANEL,
    help="Batch size of the accuracy runs (default: --batch-size).")]

Kappa = Annotated[Optional[float], typer.Option(
    "--kappa", show_default=False, rich_help_panel=STUDENT_PANEL,
    callback=number(low=1, low_open=True, note=" (the compression ratio of each layer)"),
    help="Factorize a dense STUDENT on the fly at this ratio (> 1).")]
RankMultiple = Annotated[Optional[str], typer.Option(
    "--rank-multiple", metavar="N|auto", show_default=False, rich_help_panel=STUDENT_PANEL,
    callback=rank_multiple_option,
    help=f"With --kappa: round ranks down to a multiple of this (default {DEFAULT_RANK_MULTIPLE}; auto: what the "
    "device likes).")]


def resume_command() -> str:
    """The command that continues this run (shown when it is interrupted)."""
    args = [a for a in sys.argv[1:] if a != "--resume"]
    prog = Path(sys.argv[0]).name if sys.argv else "lrc"
    world = os.environ.get("WORLD_SIZE")
    if world:  # under torchrun: one node is --standalone; on several, the user's own rendezvous options apply
        local = os.environ.get("LOCAL_WORLD_SIZE", world)
        nodes = "--standalone" if local == world else f"--nnodes {int(world) // max(int(local), 1)} (your rendezvous options)"
        return f"torchrun {nodes} --nproc_per_node {local} -m lowrank_cli {shlex.join(args)} --resume"
    if prog == "__main__.py":
        return f"python -m lowrank_cli {shlex.join(args)} --resume"
    if prog not in ("lrc", "lrc.exe"):  # called from Python (tests): the arguments are not in sys.argv
        return "the same lrc command with --resume"
    return f"lrc {shlex.join(args)} --resume"


class Bars:
    """The progress bars of a recovery, one per phase (accuracy, training), on stderr and on rank 0 only. The
    display starts with the first bar, so that an early error is not preceded by an empty one."""

    def __init__(self) -> None:
        self.bar, self.tasks = None, {}

    def __call__(self, phase: str, done: int, total: int, status: str | None) -> None:
        if self.bar is None:
            self.bar = console.progress()
            self.bar.start()
        if phase not in self.tasks:
            self.tasks[phase] = self.bar.add_task(phase, total=total, completed=done, status=status or "")
        fields = {"status": status} if status is not None else {}
        self.bar.update(self.tasks[phase], completed=done, total=total, **fields)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def quiet_on_other_ranks(fn):
    """Under torchrun only rank 0 reports an error; the other ranks exit with the same code silently.

    After an interruption the process only reports and exits: a late copy of the Ctrl-C (a terminal signals the
    whole process group, torchrun forwards it once more) must not turn the resume message into a traceback."""
    from lowrank_cli.errors import Interrupted, LrcError

    try:
        return fn()
    except (LrcError, KeyboardInterrupt) as e:
        if isinstance(e, (Interrupted, KeyboardInterrupt)):
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        if console.is_main_process():
            raise
        raise SystemExit(getattr(e, "exit_code", 130)) from None  # past the error boundary: nothing printed


def recover(
    student: Student,
    output: Output,
    teacher: Teacher,
    data: Data,
    steps: Steps = None,
    epochs: Epochs = None,
    batch_size: BatchSize = 64,
    device: Device = "auto",
    resume: Resume = False,
    force: Force = False,
    json_out: Json = False,
    progress: Progress = None,
    alpha: Alpha = 1.0,
    beta: Beta = 0.0,
    gamma: Gamma = 0.0,
    delta: Delta = 0.0,
    eps: Eps = 1e-3,
    temperature: Temperature = 1.0,
    label_smoothing: LabelSmoothing = 0.0,
    lr: Lr = 1e-4,
    warmup_steps: WarmupSteps = None,
    weight_decay: WeightDecay = 0.05,
    clip_grad: ClipGrad = 1.0,
    grad_accum: GradAccum = 1,
    freeze_dense: FreezeDense = False,
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
    workers: Workers = None,
    tokenizer: Tokenizer = None,
    max_length: MaxLength = None,
    eval_: Eval = True,
    eval_batch_size: EvalBatchSize = None,
    kappa: Kappa = None,
    rank_multiple: RankMultiple = None,
    library: Library = "auto",
    arch: Arch = None,
    model_arg: ModelArg = None,
) -> None:
    """Recover the accuracy of a low-rank model by distillation from its dense teacher.

    The loss is PELA's Eq. 7: feature distillation, optional logit distillation and weight-perturbation
    regulariser, and cross-entropy when the data has labels.
    """
    from lowrank_cli.models.sources import parse_model_args

    console.show_progress(progress)
    _refuse_conflicts(kappa, rank_multiple, eval_, eval_batch_size)
    augment = augment_level(augment, no_augment)
    refuse_held_out_conflicts(eval_, val_data, val_fraction, eval_every, keep)
    options = dict(
        output=output, steps=steps, epochs=epochs, lr=lr, batch_size=batch_size, grad_accum=grad_accum, alpha=alpha,
        beta=beta, gamma=gamma, eps=eps, temperature=temperature, label_smoothing=label_smoothing, delta=delta,
        tokenizer=tokenizer, max_length=max_length, library=library, warmup_steps=warmup_steps,
        weight_decay=weight_decay, clip_grad=clip_grad, freeze_dense=freeze_dense, augment=augment, kappa=kappa,
        rank_multiple=DEFAULT_RANK_MULTIPLE if rank_multiple is None else rank_multiple, arch=arch,
        model_args=parse_model_args(model_arg), save_every=save_every, log_every=log_every, resume=resume,
        force=force, compile=compile, evaluate_accuracy=eval_, eval_batch_size=eval_batch_size, device=device,
        num_workers=workers, seed=seed, val_data=val_data, val_fraction=val_fraction, eval_every=eval_every, keep=keep,
    )
    result = quiet_on_other_ranks(lambda: _run(student, teacher, data, options))
    if not console.is_main_process():
        return
    summary = result.summary()
    if json_out:
        console.print_json(summary)
        return
    print_summary(summary)


def _refuse_conflicts(kappa: float | None, rank_multiple: int | str | None, evaluate: bool,
                      eval_batch_size: int | None) -> None:
    """An option that the others make useless is a usage error (exit 2), not silently dropped."""
    from lowrank_cli.errors import UsageError

    if rank_multiple is not None and kappa is None:
        raise UsageError("--rank-multiple rounds the ranks that --kappa gives a dense student: add --kappa, or drop it")
    if eval_batch_size is not None and not evaluate:
        raise UsageError("--eval-batch-size sizes the accuracy runs that --no-eval turns off: drop one of them")


def augment_level(augment: str, no_augment: bool) -> str:
    from lowrank_cli.errors import UsageError

    if no_augment and augment not in ("auto", "none"):
        raise UsageError(f"--no-augment contradicts --augment {augment}: drop one of them")
    return "none" if no_augment else augment


def refuse_held_out_conflicts(evaluate: bool, val_data, val_fraction, eval_every, keep) -> None:
    from lowrank_cli.errors import UsageError

    given = [name for name, value in (("--val-data", val_data), ("--val-fraction", val_fraction),
                                      ("--eval-every", eval_every), ("--keep best", keep == "best")) if value]
    if given and not evaluate:
        raise UsageError(f"{given[0]} is for held-out evaluation, which --no-eval turns off: drop one of them")
    if val_data is not None and val_fraction is not None:
        raise UsageError("--val-data and --val-fraction both say where the held-out data comes from: give one")


def _run(student: str, teacher: str, data: Path, options: dict):
    """training.recovery.recover with the progress bars, on every rank."""
    from lowrank_cli.training.recovery import recover as run_recover

    bars = Bars()
    try:
        return run_recover(student, teacher, data, **options, progress=bars, log=console.info, warn=console.warn,
                           resume_command=resume_command())
    finally:
        bars.close()


def _percent(acc: dict | None, key: str) -> str:
    return f"{100 * acc[key]:.2f}" if acc else "-"


def print_summary(s: dict) -> None:
    from rich.table import Table

    table = Table(title=f"lrc recover -> {s['output']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    settings = s["settings"]
    resumed = f" (resumed at step {s['resumed_from']})" if s["resumed_from"] else ""
    unit = "texts" if settings.get("data_kind") == "text" else "images"
    table.add_row("steps", f"{s['steps']} x {settings['images_per_step']} {unit}{resumed}")
    table.add_row(f"{unit} seen", f"{s['images_seen']:,} ({s['images_per_second']:.0f} {unit}/s, {s['seconds']:.1f} s)")
    if s["skipped_images"]:
        table.add_row("unreadable images", f"{s['skipped_images']} skipped")
    for term, values in s["losses"].items():
        table.add_row(f"{term}", f"{values['first']:.4g} -> {values['last']:.4g}")
    acc = s["accuracy"]
    if acc.get("after") or acc.get("teacher"):
        table.add_row("top-1 / top-5 (%)", "")
        for name in ("teacher", "before", "after"):
            a = acc.get(name)
            if a:
                table.add_row(f"  {name}", f"{_percent(a, 'top1')} / {_percent(a, 'top5')}  ({a['images']} images)")
    else:
        why = "text data: distillation only" if unit == "texts" else console.cli_text(
            settings.get("accuracy_not_measured", "no labelled val/ split"))
        table.add_row("accuracy", f"not measured ({why})")
    _held_out_rows(table, settings)
    table.add_row("metrics", str(s["metrics"]))
    console.out.print(table)


def _held_out_rows(table, settings: dict) -> None:
    """Held-out scores before and after (texts, unlabelled images), where they came from, and the state kept."""
    held, kept = settings.get("held_out"), settings.get("kept")
    if held and held.get("before") and held.get("after"):
        table.add_row(f"held-out ({held['samples']})", held["data"])
        for name in sorted(held["after"]):
            before = held["before"].get(name)
            table.add_row(f"  {name}", f"{before:.4g} -> {held['after'][name]:.4g}" if before is not None else
                          f"{held['after'][name]:.4g}")
    if kept:
        value = f", {kept['metric']} {kept['value']:.4g}" if kept.get("value") is not None else ""
        table.add_row("kept", f"{kept['which']} state (step {kept['step']}{value})")


def register(app: typer.Typer) -> None:
    app.command(cls=LrcCommand, epilog=RECOVER_EPILOG)(recover)
