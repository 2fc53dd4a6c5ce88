"""`lrc factorize`: any timm or transformers model -> low-rank model -> self-describing safetensors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lowrank_cli.cli import console
from lowrank_cli.cli.options import (
    Arch,
    Device,
    Force,
    InputSize,
    Json,
    Library,
    Model,
    ModelArg,
    Output,
    Revision,
    SeqLen,
    parse_input_size,
)

EPILOG = """\
Examples:

  lrc factorize deit_base --kappa 2 -o deit_lr.safetensors

  lrc factorize hf-hub:timm/deit_small_patch16_224.fb_in1k --kappa 3 --rank-multiple 64 -o s.safetensors

  lrc factorize local-dir:./my_vit --kappa 2 --exclude 'blocks\\.11\\..*' -o out.safetensors

  lrc factorize weights.pth --arch vit_small_patch16_224 --model-arg num_classes=10 -o out.safetensors

  lrc factorize deit_base --kappa 2 --plan speed --device cuda -o fast.safetensors

  lrc factorize deit_base --kappa 2 --calib imagenet/train --calib-samples 256 -o aware.safetensors

  lrc factorize deit_base --budget 0.5 --calib imagenet/train -o budget.safetensors

  lrc factorize bert-base-uncased --kappa 2 --save-tokenizer bert_lr_tok/ -o bert_lr.safetensors

  lrc factorize ./my-bert-folder --kappa 2 --calib corpus.txt -o bert_aware.safetensors
"""


def factorize(
    model: Model,
    output: Output,
    kappa: Annotated[float, typer.Option("--kappa", help="Per-layer compression ratio of parameters and MACs (> 1).")] = 2.0,
    rank_multiple: Annotated[str, typer.Option("--rank-multiple", help="Round ranks down to a multiple of this (8: tensor cores; 1: the paper's ranks; auto: what the device likes).")] = "8",
    plan: Annotated[str, typer.Option("--plan", help="pela: the rank rule; speed: also time each layer shape on --device and keep dense what is not faster.")] = "pela",
    plan_batch_size: Annotated[Optional[int], typer.Option("--plan-batch-size", help="Batch size the speed plan times (default 256 on CUDA, 16 on CPU).", show_default=False)] = None,
    plan_dtype: Annotated[Optional[str], typer.Option("--plan-dtype", help="Precision the model will run in, for --plan speed and --rank-multiple auto (default: --dtype, else bf16 on CUDA and the source's on CPU).", show_default=False)] = None,
    rank_pattern: Annotated[Optional[list[str]], typer.Option("--rank-pattern", help="REGEX=RANK override for matching modules (repeatable; first match wins).", show_default=False)] = None,
    include: Annotated[Optional[list[str]], typer.Option("--include", help="Factorize the linears whose name fully matches REGEX (repeatable) instead of the block linears.", show_default=False)] = None,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="Keep the linears whose name fully matches REGEX dense (repeatable; wins over --include).", show_default=False)] = None,
    svd: Annotated[str, typer.Option("--svd", help="exact (torch.linalg.svd) or randomized (torch.svd_lowrank).")] = "exact",
    device: Device = "auto",
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="Store the model as float32, float16 or bfloat16 (default: the source dtype).", show_default=False)] = None,
    arch: Arch = None,
    model_arg: ModelArg = None,
    revision: Revision = None,
    input_size: InputSize = None,
    seq_len: SeqLen = None,
    library: Library = "auto",
    save_tokenizer: Annotated[Optional[Path], typer.Option("--save-tokenizer", help="transformers sources: copy the tokenizer files into this folder.", show_default=False)] = None,
    calib: Annotated[Optional[Path], typer.Option("--calib", help="Data for data-aware truncation: an image folder (ImageFolder or flat), or for text models a .txt / .jsonl file or folder of them.", show_default=False)] = None,
    calib_samples: Annotated[int, typer.Option("--calib-samples", help="Images (or texts) of --calib to use.")] = 256,
    tokenizer: Annotated[Optional[str], typer.Option("--tokenizer", help="Text --calib: folder or Hub repo of the tokenizer (default: the source's).", show_default=False)] = None,
    budget: Annotated[Optional[float], typer.Option("--budget", help="Fraction of the target layers' parameters to keep, ranks allocated per layer (replaces --kappa).", show_default=False)] = None,
    target_macs: Annotated[Optional[str], typer.Option("--target-macs", help="MACs of the whole model to aim for (e.g. 9G), ranks allocated per layer.", show_default=False)] = None,
    force: Force = False,
    json_out: Json = False,
) -> None:
    """Replace every linear of the transformer blocks (timm blocks, transformers encoder layers) by its truncated
    SVD and write an lrc checkpoint."""
    from lowrank_cli.compress.factorize_source import factorize_file
    from lowrank_cli.evaluation.counting import parse_size
    from lowrank_cli.models.sources import parse_model_args

    with console.progress() as bar:
        task = None

        calib_task = None

        def advance(name: str, done: int, total: int) -> None:
            nonlocal task
            if task is None:
                task = bar.add_task("SVD", total=total, status="")
            bar.update(task, completed=done, status=name)

        def calibrated(done: int, total: int) -> None:
            nonlocal calib_task
            if calib_task is None:
                calib_task = bar.add_task("calibration", total=total, status="samples")
            bar.update(calib_task, completed=min(done, total))

        result = factorize_file(
            model, str(output),
            arch=arch, model_args=parse_model_args(model_arg), revision=revision, force=force, library=library,
            seq_len=seq_len, save_tokenizer=str(save_tokenizer) if save_tokenizer else None,
            log=lambda msg: console.info(f"Model: {msg}"),
            kappa=kappa, rank_multiple=rank_multiple, include=include, exclude=exclude, rank_pattern=rank_pattern,
            svd=svd, device=device, dtype=dtype, input_size=parse_input_size(input_size),
            plan_kind=plan, plan_batch_size=plan_batch_size, plan_dtype=plan_dtype,
            calib=str(calib) if calib else None, calib_samples=calib_samples, tokenizer=tokenizer, budget=budget,
            target_macs=parse_size(target_macs) if target_macs else None,
            progress=advance, calib_progress=calibrated, warn=console.warn,
        )
    summary = result.summary()
    if summary["factorized"] == 0:
        console.warn("no layer was factorized (budget or ranks too generous): the output is the dense model")
    summary["output"] = str(output)
    if json_out:
        console.print_json(summary)
        return
    print_summary(summary)


def print_summary(s: dict) -> None:
    from rich.table import Table

    from lowrank_cli.evaluation.counting import format_size

    table = Table(title=f"lrc factorize -> {s['output']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("parameters", f"{format_size(s['params_before'])} -> {format_size(s['params_after'])} "
                  f"({s['compression']:.2f}x smaller)")
    table.add_row("factorized linears", str(s["factorized"]))
    for group, ranks in s["ranks_by_group"].items():
        table.add_row(f"  rank of {group}", ", ".join(map(str, ranks)))
    what = "output error on the calibration data" if "calibration" in s else "||W - W_r||_F / ||W||_F"
    table.add_row("largest relative error", f"{s['max_rel_error']:.4f}  ({what})")
    if s["left_dense"]:
        table.add_row("left dense", "\n".join(f"{k}: {v}" for k, v in s["left_dense"].items()))
    if "calibration" in s:
        c = s["calibration"]
        table.add_row("calibration", f"{c['samples']} samples of {c['data']} ({c['seconds']:.1f} s); data-aware truncation")
    if "budget" in s:
        b = s["budget"]
        table.add_row("budget", f"keep {b['keep_fraction']:g} of the parameters" if b["keep_fraction"] else f"target {b['target_macs']:,} MACs")
    if s.get("speed_plan"):
        p = s["speed_plan"]
        table.add_row("speed plan", f"{p['device']} {p['dtype']}, batch {p['batch_size']}: kept dense "
                      f"{len(p.get('kept_dense') or [])} layer(s), estimated gain {p.get('estimated_gain') or 1:.2f}x on the linears")
    if s.get("tokenizer"):
        table.add_row("tokenizer", f"{', '.join(s['tokenizer']['files'])} -> {s['tokenizer']['folder']}")
    table.add_row("elapsed", f"{s['seconds']:.1f} s")
    console.out.print(table)


def register(app: typer.Typer) -> None:
    app.command(epilog=EPILOG)(factorize)
