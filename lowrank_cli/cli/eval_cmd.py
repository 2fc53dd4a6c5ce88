"""`lrc eval`: top-1 / top-5 accuracy of any MODEL on labelled images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lowrank_cli.cli import console
from lowrank_cli.cli.command import LrcCommand
from lowrank_cli.cli.options import Arch, Device, Fused, Json, Model, ModelArg, Progress

EVAL_EPILOG = """\
Examples:

  lrc eval deit_lr_rec.safetensors --data imagenet/          (imagenet/val/<class>/...)

  lrc eval deit_base --data imagenet/val --json

  lrc eval deit_lr_rec.safetensors --data imagenet/ --device cuda --no-fused     (the two linears per layer)
"""


Data = Annotated[Path, typer.Option(
    "--data", metavar="DIR", show_default=False,
    help="Labelled images: DIR/val/<class>/..., or a class tree DIR/<class>/....")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Images per batch.")]
Workers = Annotated[Optional[int], typer.Option(
    "--workers", min=0, show_default=False, help="Data-loading processes (default: the CPUs, at most 8).")]


def eval_command(
    model: Model,
    data: Data,
    batch_size: BatchSize = 128,
    device: Device = "auto",
    workers: Workers = None,
    fused: Fused = None,
    json_out: Json = False,
    progress: Progress = None,
    arch: Arch = None,
    model_arg: ModelArg = None,
) -> None:
    """Measure the top-1 / top-5 accuracy of any MODEL on labelled images.

    The images are DIR/val/<class>/..., or DIR/<class>/... when DIR is a class tree. On CUDA the low-rank layers
    run the fused Triton kernel (--no-fused: the two linears).
    """
    from lowrank_cli.data.sampling import default_workers
    from lowrank_cli.devices import resolve_device
    from lowrank_cli.evaluation.accuracy import evaluate, val_split
    from lowrank_cli.models.fusion import fuse_lowrank, resolve_fused
    from lowrank_cli.models.sources import load_model, parse_model_args

    console.show_progress(progress)
    image_set = val_split(data)  # a wrong folder fails before the model loads
    dev = resolve_device(device)
    fuse = resolve_fused(fused, dev)  # --fused without CUDA or Triton: exit 6 before the loading
    loaded = load_model(model, arch=arch, model_args=parse_model_args(model_arg),
                        log=lambda msg: console.info(f"Model: {msg}"))
    loaded.model.to(dev).float()
    summary = fuse_lowrank(loaded.model) if fuse else None
    if summary is not None and summary.layers:
        console.info(f"Model: {summary.describe()}")
    with console.progress() as bar:
        task = bar.add_task("accuracy", total=None, status="")
        result = evaluate(loaded.model, image_set, batch_size=batch_size, device=dev,
                          num_workers=default_workers() if workers is None else workers,
                          progress=lambda done, total: bar.update(task, completed=done, total=total))
    result = {"model": model, "data": str(image_set.root), **result, "fused": bool(summary and summary.layers)}
    if json_out:
        console.print_json(result)
        return
    skipped = f", {result['skipped']} unreadable skipped" if result["skipped"] else ""
    console.out.print(
        f"top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%  "
        f"({result['images']} images of {result['data']}{skipped})"
    )


def register(app: typer.Typer) -> None:
    app.command("eval", cls=LrcCommand, epilog=EVAL_EPILOG)(eval_command)
