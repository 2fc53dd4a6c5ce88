"""`lrc recover`: distil a low-rank model back towards its dense teacher."""

from __future__ import annotations

import os
import shlex
import signal
import sys
from pathlib import Path

import typer

from lowrank_cli.cli import console
from lowrank_cli.cli.command import LrcCommand
from lowrank_cli.cli.option_params import given, options_of, with_options
from lowrank_cli.cli.options import Json, Output, Progress
from lowrank_cli.cli.recover_options import Data, NoAugment, Student, Teacher
from lowrank_cli.training.options import RecoverOptions

RECOVER_EPILOG = """\
Examples:

  lrc recover deit_lr.safetensors --teacher deit_base --data imagenet/ --steps 2000 -o deit_lr_rec.safetensors

  lrc recover deit_lr.safetensors --teacher deit_base --data unlabeled_images/ --epochs 1 -o out.safetensors

  lrc recover deit_base --kappa 2 --teacher deit_base --data imagenet/ --steps 2000 -o out.safetensors

  torchrun --standalone --nproc_per_node 8 -m lowrank_cli recover deit_lr.safetensors --teacher deit_base \\
      --data imagenet/ --steps 2000 -o deit_lr_rec.safetensors

  lrc recover bert_lr.safetensors --teacher ./my-bert-folder --data corpus.txt --steps 500 -o rec.safetensors

  lrc recover deit_base --method progressive --rank 32 --data imagenet/ --steps 5000 -o deit_r32.safetensors
      (PC-LoRA: the dense weights fade out while the factors learn; the dense STUDENT is its own teacher)

  lrc recover ... --resume        (after a crash, a kill or Ctrl-C: continues where it stopped)

Data: DIR/train/<class>/... (labels: cross-entropy + distillation), optional DIR/val/<class>/... (accuracy
before and after), or a folder of images without classes (distillation only). For text models: a .txt file
(one text per line), a .jsonl file ({"text": ...} per line) or a folder of them, tokenised with the teacher's
tokenizer; distillation of every layer's hidden states on the real tokens. --batch-size is per process.
Every --save-every steps the training state is written to <output stem>.train.safetensors; metrics go to
<output stem>.metrics.jsonl.

--method progressive (PC-LoRA, arXiv 2406.09117) factorizes the dense STUDENT on the fly (--kappa or --rank) and
trains y = lambda(t) W_res x + second(first(x)) + b, lambda falling from 1 to 0 (--decay) at --decay-end of the
steps; the output is an ordinary low-rank checkpoint. Memory: while it trains, the dense weights are held too
(once, frozen, in the training precision, with no optimizer state).
"""

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


@with_options(options_of(RecoverOptions), after="teacher")
def recover(
    ctx: typer.Context,
    student: Student,
    output: Output,
    data: Data,
    teacher: Teacher = None,
    json_out: Json = False,
    progress: Progress = None,
    no_augment: NoAugment = False,
    **options,
) -> None:
    """Recover a low-rank model's accuracy by distillation, or compress a dense one progressively.

    The loss is PELA's Eq. 7: feature distillation, optional logit distillation and weight-perturbation
    regulariser, and cross-entropy when the data has labels. --method progressive is PC-LoRA.
    """
    console.show_progress(progress)
    _refuse_conflicts(given(ctx, "rank_multiple"), options)
    refuse_held_out_conflicts(options["evaluate_accuracy"], options["val_data"], options["val_fraction"],
                              options["eval_every"], options["keep"])
    options["augment"] = augment_level(options["augment"], no_augment)
    result = quiet_on_other_ranks(lambda: _run(student, teacher, data, {"output": output, **options}))
    if not console.is_main_process():
        return
    summary = result.summary()
    if json_out:
        console.print_json(summary)
        return
    print_summary(summary)


def _refuse_conflicts(given_multiple: list[str], options: dict) -> None:
    """An option that the others make useless is a usage error (exit 2), not silently dropped (the API cannot tell
    a default `rank_multiple` from a given one; the command line can)."""
    from lowrank_cli.errors import UsageError

    if given_multiple and options["kappa"] is None:
        raise UsageError("`rank_multiple` rounds the ranks that `kappa` gives a dense student: add `kappa`, or drop it")
    if options["eval_batch_size"] is not None and not options["evaluate_accuracy"]:
        raise UsageError("`eval_batch_size` sizes the accuracy runs that `evaluate_accuracy=False` turns off: drop one "
                         "of them")


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
    unit = {"text": "texts", "token stream": "windows"}.get(settings.get("data_kind"), "images")
    table.add_row("steps", f"{s['steps']} x {settings['images_per_step']} {unit}{resumed}")
    if settings.get("method") == "progressive":
        table.add_row("method", f"progressive (init {settings['init']}, {settings['decay']} decay; lambda 0 from step "
                      f"{settings['decay_steps']})")
    table.add_row(f"{unit} seen", f"{s['images_seen']:,} ({s['images_per_second']:.0f} {unit}/s, {s['seconds']:.1f} s)")
    if unit == "windows":
        table.add_row("tokens seen", f"{s['images_seen'] * settings['seq_len']:,} (windows of {settings['seq_len']})")
    if s["skipped_images"]:
        table.add_row("unreadable images", f"{s['skipped_images']} skipped")
    for term, values in s["losses"].items():
        table.add_row(f"{term}", f"{values['first']:.4g} -> {values['last']:.4g}")
    acc = s["accuracy"]
    if acc.get("after") or acc.get("teacher"):
        table.add_row("top-1 / top-5 (%)", "")
        selection = str(settings.get("after_is", "")).startswith("selection")
        for name in ("teacher", "before", "after"):
            a = acc.get(name)
            if a:
                label = "after (selection score)" if name == "after" and selection else name
                table.add_row(f"  {label}", f"{_percent(a, 'top1')} / {_percent(a, 'top5')}  ({a['images']} images)")
    else:
        why = "text data: distillation only" if unit != "images" else console.cli_text(
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
            shown = f"{name} (selection score)" if str(settings.get("after_is", "")).startswith("selection") else name
            table.add_row(f"  {shown}", f"{before:.4g} -> {held['after'][name]:.4g}" if before is not None else
                          f"{held['after'][name]:.4g}")
        if held.get("teacher_perplexity") is not None:
            table.add_row("  teacher perplexity", f"{held['teacher_perplexity']:.4g}")
    if kept:
        value = f", {kept['metric']} {kept['value']:.4g}" if kept.get("value") is not None else ""
        table.add_row("kept", f"{kept['which']} state (step {kept['step']}{value})")


def register(app: typer.Typer) -> None:
    app.command(cls=LrcCommand, epilog=RECOVER_EPILOG)(recover)
