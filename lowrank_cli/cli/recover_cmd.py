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
from lowrank_cli.cli.options import Arch, Device, Force, Json, Library, Model, ModelArg, Output

RECOVER_EPILOG = """\
Examples:

  lrc recover deit_lr.safetensors --teacher deit_base --data imagenet/ --steps 2000 -o deit_lr_rec.safetensors

  lrc recover deit_lr.safetensors --teacher deit_base --data unlabeled_images/ --epochs 1 -o out.safetensors

  lrc recover deit_base --kappa 2 --teacher deit_base --data imagenet/ --steps 2000 -o out.safetensors

  torchrun --standalone --nproc_per_node 8 -m lowrank_cli recover deit_lr.safetensors --teacher deit_base \\
      --data imagenet/ --steps 2000 -o deit_lr_rec.safetensors

  lrc recover bert_lr.safetensors --teacher ./my-bert-folder --data corpus.txt --steps 500 -o rec.safetensors

  lrc recover deit_base --method progressive --rank 32 --teacher deit_base --data imagenet/ --steps 5000 \\
      -o deit_r32.safetensors        (PC-LoRA: the dense weights fade out while the factors learn)

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

Data = Annotated[
    Path,
    typer.Option("--data", help="ImageFolder root (train/<class>/..., optional val/<class>/...), a class tree, a "
                 "folder of unlabelled images, or for text models a .txt / .jsonl file or folder of them.",
                 show_default=False),
]
Method = Annotated[
    str,
    typer.Option("--method", help="pela: factorize, then distil; progressive: PC-LoRA, the dense weights fade out "
                 "while the low-rank factors learn (needs a dense STUDENT with --kappa or --rank; holds the dense "
                 "weights during training as well)."),
]
Init = Annotated[
    Optional[str],
    typer.Option("--init", help="--method progressive: svd (the truncated SVD + the dense remainder, exactly the "
                 "dense model at the start; default) or lora (W_res = W, random first, zero second: the paper's).",
                 show_default=False),
]
Decay = Annotated[
    Optional[str],
    typer.Option("--decay", help="--method progressive: how lambda falls from 1 to 0: linear (default), sine or "
                 "cosine.", show_default=False),
]
DecayEnd = Annotated[
    Optional[float],
    typer.Option("--decay-end", help="--method progressive: lambda is 0 from this fraction of the steps on, in "
                 "(0, 1] (default 0.8: the last 20% train the pure low-rank model).", show_default=False),
]
Workers = Annotated[
    Optional[int],
    typer.Option("--workers", help="Data-loading processes per training process (default: its share of the CPUs, at "
                 "most 8).", show_default=False),
]


def _resume_command() -> str:
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
        return "the same lrc recover command with --resume"
    return f"lrc {shlex.join(args)} --resume"


class _Bars:
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


def _quiet_on_other_ranks(fn):
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
    student: Model,
    output: Output,
    data: Data,
    teacher: Annotated[Optional[str], typer.Option("--teacher", help="The dense model the student was made from (any MODEL source); default: a dense STUDENT factorized on the fly (--kappa / --rank) is its own teacher.", show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Optimizer steps (or give --epochs).", show_default=False)] = None,
    epochs: Annotated[Optional[float], typer.Option("--epochs", help="Passes over the training images (fractions allowed).", show_default=False)] = None,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate of AdamW (linear warm-up, then cosine to 0).")] = 1e-4,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per micro-batch, per process.")] = 64,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Micro-batches per optimizer step.")] = 1,
    warmup_steps: Annotated[Optional[int], typer.Option("--warmup-steps", help="Linear warm-up steps (default: 5% of the steps).", show_default=False)] = None,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay (matrices only).")] = 0.05,
    clip_grad: Annotated[float, typer.Option("--clip-grad", help="Clip the gradient norm to this (0: off).")] = 1.0,
    alpha: Annotated[float, typer.Option("--alpha", help="Weight of the feature distillation (block outputs, MSE).")] = 1.0,
    beta: Annotated[float, typer.Option("--beta", help="Weight of the weight-perturbation regulariser (max|second@first - W| - eps)^2.")] = 0.0,
    gamma: Annotated[float, typer.Option("--gamma", help="Weight of the logit distillation (KL at --temperature).")] = 0.0,
    eps: Annotated[float, typer.Option("--eps", help="The weight perturbation the regulariser aims at.")] = 1e-3,
    temperature: Annotated[float, typer.Option("--temperature", help="Temperature of the logit distillation.")] = 1.0,
    label_smoothing: Annotated[float, typer.Option("--label-smoothing", help="Label smoothing of the cross-entropy (labelled data).")] = 0.0,
    delta: Annotated[float, typer.Option("--delta", help="Text models: weight of the MSE on the final pooled output.")] = 0.0,
    tokenizer: Annotated[Optional[str], typer.Option("--tokenizer", help="Text data: folder or Hub repo of the tokenizer (default: the teacher's).", show_default=False)] = None,
    max_length: Annotated[Optional[int], typer.Option("--max-length", help="Text data: tokens per text at most (default: the model's positions, at most 512).", show_default=False)] = None,
    library: Library = "auto",
    freeze_dense: Annotated[bool, typer.Option("--freeze-dense", help="Train only the factorized layers (norms, embeddings, head stay).")] = False,
    augment: Annotated[bool, typer.Option("--augment/--no-augment", help="Random resized crops and flips (timm's training transform); --no-augment trains on the evaluation preprocessing (for digits, text, centred objects).")] = True,
    kappa: Annotated[Optional[float], typer.Option("--kappa", help="Factorize a dense STUDENT on the fly at this ratio.", show_default=False)] = None,
    rank_multiple: Annotated[int, typer.Option("--rank-multiple", help="With --kappa: round ranks down to a multiple of this.")] = 8,
    rank: Annotated[Optional[int], typer.Option("--rank", help="Factorize a dense STUDENT on the fly at this rank for every target layer (instead of --kappa).", show_default=False)] = None,
    calib: Annotated[Optional[str], typer.Option("--calib", help="With --kappa / --rank: data-aware truncation on these images or texts.", show_default=False)] = None,
    calib_samples: Annotated[int, typer.Option("--calib-samples", help="Images or texts of --calib to use.")] = 256,
    method: Method = "pela",
    init: Init = None,
    decay: Decay = None,
    decay_end: DecayEnd = None,
    lora_alpha: Annotated[Optional[float], typer.Option("--lora-alpha", help="--init lora: second is scaled by this / rank, folded in at the end (default: scale 1).", show_default=False)] = None,
    save_every: Annotated[int, typer.Option("--save-every", help="Write the training state every N steps.")] = 500,
    log_every: Annotated[int, typer.Option("--log-every", help="Log metrics every N steps.")] = 10,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run from its training state.")] = False,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the student and the teacher.")] = False,
    eval_: Annotated[bool, typer.Option("--eval/--no-eval", help="Measure accuracy on the val split before and after.")] = True,
    eval_batch_size: Annotated[Optional[int], typer.Option("--eval-batch-size", help="Batch size of the accuracy runs (default: --batch-size).", show_default=False)] = None,
    device: Device = "auto",
    workers: Workers = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the data order, augmentations and dropout.")] = 0,
    arch: Arch = None,
    model_arg: ModelArg = None,
    force: Force = False,
    json_out: Json = False,
) -> None:
    """Recover the accuracy of a low-rank model by distillation from its dense teacher (PELA Eq. 7), or compress
    a dense one progressively (--method progressive, PC-LoRA)."""
    from lowrank_cli.models.sources import parse_model_args
    from lowrank_cli.training.recovery import recover as run_recover

    def go():
        bars = _Bars()
        try:
            return run_recover(
                student, teacher, data, output=output, steps=steps, epochs=epochs, lr=lr, batch_size=batch_size,
                grad_accum=grad_accum, alpha=alpha, beta=beta, gamma=gamma, eps=eps, temperature=temperature,
                label_smoothing=label_smoothing, delta=delta, tokenizer=tokenizer, max_length=max_length,
                library=library, warmup_steps=warmup_steps, weight_decay=weight_decay,
                clip_grad=clip_grad, freeze_dense=freeze_dense, augment=augment, kappa=kappa, rank_multiple=rank_multiple, arch=arch,
                rank=rank, calib=calib, calib_samples=calib_samples, method=method, init=init, decay=decay,
                decay_end=decay_end, lora_alpha=lora_alpha,
                model_args=parse_model_args(model_arg), save_every=save_every, log_every=log_every, resume=resume,
                force=force, compile=compile, evaluate_accuracy=eval_, eval_batch_size=eval_batch_size,
                device=device, num_workers=workers, seed=seed, progress=bars, log=console.info,
                warn=console.warn, resume_command=_resume_command(),
            )
        finally:
            bars.close()

    result = _quiet_on_other_ranks(go)
    if not console.is_main_process():
        return
    show = console.print_json if json_out else print_summary  # only rank 0 prints
    show(result.summary())


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
    if settings.get("method") == "progressive":
        table.add_row("method", f"progressive (init {settings['init']}, {settings['decay']} decay; lambda 0 from step "
                      f"{settings['decay_steps']})")
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
        why = "text data: distillation only" if unit == "texts" else "no labelled val/ split"
        table.add_row("accuracy", f"not measured ({why})")
    table.add_row("metrics", str(s["metrics"]))
    console.out.print(table)


def register(app: typer.Typer) -> None:
    app.command(epilog=RECOVER_EPILOG)(recover)
