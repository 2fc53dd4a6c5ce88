"""`lrc eval`: top-1 / top-5 accuracy of any MODEL on labelled images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lowrank_cli.cli import console
from lowrank_cli.cli.options import Arch, Device, Json, Model, ModelArg

EVAL_EPILOG = """\
Examples:

  lrc eval deit_lr_rec.safetensors --data imagenet/          (imagenet/val/<class>/...)

  lrc eval deit_base --data imagenet/val --json
"""


def eval_command(
    model: Model,
    data: Annotated[Path, typer.Option("--data", help="Labelled images: DIR/val/<class>/..., or a class tree DIR/<class>/....", show_default=False)],
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per batch.")] = 128,
    device: Device = "auto",
    workers: Annotated[Optional[int], typer.Option("--workers", help="Data-loading processes (default: the CPUs, at most 8).", show_default=False)] = None,
    arch: Arch = None,
    model_arg: ModelArg = None,
    json_out: Json = False,
) -> None:
    """Top-1 / top-5 accuracy of any MODEL on DIR/val (or on DIR when it is a class tree)."""
    from lowrank_cli.data.sampling import default_workers
    from lowrank_cli.devices import resolve_device
    from lowrank_cli.evaluation.accuracy import evaluate, val_split
    from lowrank_cli.models.sources import load_model, parse_model_args

    image_set = val_split(data)  # a wrong folder fails before the model loads
    dev = resolve_device(device)
    loaded = load_model(model, arch=arch, model_args=parse_model_args(model_arg),
                        log=lambda msg: console.info(f"Model: {msg}"))
    loaded.model.to(dev).float()
    with console.progress() as bar:
        task = bar.add_task("accuracy", total=None, status="")
        result = evaluate(loaded.model, image_set, batch_size=batch_size, device=dev,
                          num_workers=default_workers() if workers is None else workers,
                          progress=lambda done, total: bar.update(task, completed=done, total=total))
    result = {"model": model, "data": str(image_set.root), **result}
    if json_out:
        console.print_json(result)
        return
    skipped = f", {result['skipped']} unreadable skipped" if result["skipped"] else ""
    console.out.print(
        f"top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%  "
        f"({result['images']} images of {result['data']}{skipped})"
    )


def register(app: typer.Typer) -> None:
    app.command("eval", epilog=EVAL_EPILOG)(eval_command)
