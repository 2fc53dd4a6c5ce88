"""`lrc factorize`: any timm or transformers model -> low-rank model -> self-describing safetensors."""

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
    InputSize,
    Json,
    Library,
    Model,
    ModelArg,
    Output,
    Progress,
    Revision,
    SeqLen,
    choice,
    dtype_choice,
    number,
    parse_input_size,
    rank_multiple_option,
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

DEFAULT_KAPPA = 2.0
DEFAULT_CALIB_SAMPLES = 256
BUDGET_PANEL, CALIB_PANEL, SPEED_PANEL = "Rank budget (instead of --kappa)", "Data-aware truncation", "Speed plan"

Kappa = Annotated[Optional[float], typer.Option(
    "--kappa", help=f"Per-layer compression ratio of parameters and MACs (> 1; default {DEFAULT_KAPPA:g}).",
    show_default=False, callback=number(low=1, low_open=True, note=" (the compression ratio of each layer)"))]
RankMultiple = Annotated[str, typer.Option(
    "--rank-multiple", metavar="N|auto", callback=rank_multiple_option,
    help="Round ranks down to a multiple of this (8: tensor cores; 1: the paper's ranks; auto: what the device "
    "likes).")]
RankPattern = Annotated[Optional[list[str]], typer.Option(
    "--rank-pattern", metavar="REGEX=RANK", show_default=False,
    help="Rank of the modules whose name fully matches REGEX (repeatable; first match wins).")]
Include = Annotated[Optional[list[str]], typer.Option(
    "--include", metavar="REGEX", show_default=False,
    help="Factorize the linears whose name fully matches REGEX (repeatable) instead of the block linears.")]
Exclude = Annotated[Optional[list[str]], typer.Option(
    "--exclude", metavar="REGEX", show_default=False,
    help="Keep the linears whose name fully matches REGEX dense (repeatable; wins over --include).")]
Svd = Annotated[Optional[str], typer.Option(
    "--svd", show_default=False, **choice("exact", "randomized"),
    help="exact (torch.linalg.svd, the default) or randomized (torch.svd_lowrank); --calib decomposes its own way.")]
Dtype = Annotated[Optional[str], typer.Option(
    "--dtype", help="Store the model in this precision (default: the source's).", show_default=False,
    **dtype_choice())]
SaveTokenizer = Annotated[Optional[Path], typer.Option(
    "--save-tokenizer", metavar="DIR", show_default=False,
    help="transformers sources: copy the tokenizer files into this folder.")]
Budget = Annotated[Optional[float], typer.Option(
    "--budget", help="Fraction of the target layers' parameters to keep, between 0 and 1; ranks allocated per layer.",
    show_default=False, rich_help_panel=BUDGET_PANEL,
    callback=number(low=0, high=1, low_open=True, high_open=True,
                    note=" (the fraction of the target layers' parameters to keep)"))]
TargetMacs = Annotated[Optional[str], typer.Option(
    "--target-macs", metavar="MACS", show_default=False, rich_help_panel=BUDGET_PANEL,
    help="MACs of the whole model to aim for (e.g. 9G), ranks allocated per layer.")]
Calib = Annotated[Optional[Path], typer.Option(
    "--calib", metavar="PATH", show_default=False, rich_help_panel=CALIB_PANEL,
    help="An image folder (ImageFolder or flat), or for text models a .txt / .jsonl file or folder of them.")]
CalibSamples = Annotated[Optional[int], typer.Option(
    "--calib-samples", min=1, show_default=False, rich_help_panel=CALIB_PANEL,
    help=f"Images (or texts) of --calib to use (default {DEFAULT_CALIB_SAMPLES}).")]
Tokenizer = Annotated[Optional[str], typer.Option(
    "--tokenizer", metavar="DIR|REPO", show_default=False, rich_help_panel=CALIB_PANEL,
    help="Text --calib: folder or Hub repo of the tokenizer (default: the source's).")]
Plan = Annotated[str, typer.Option(
    "--plan", rich_help_panel=SPEED_PANEL, **choice("pela", "speed"),
    help="pela: the rank rule; speed: also time each layer shape on --device and keep dense what is not faster.")]
PlanBatchSize = Annotated[Optional[int], typer.Option(
    "--plan-batch-size", min=1, show_default=False, rich_help_panel=SPEED_PANEL,
    help="Batch size --plan speed times (default 256 on CUDA, 16 on CPU).")]
PlanDtype = Annotated[Optional[str], typer.Option(
    "--plan-dtype", show_default=False, rich_help_panel=SPEED_PANEL, **dtype_choice(),
    help="Precision the model will run in, for --plan speed and --rank-multiple auto (default: --dtype, else bf16 "
    "on CUDA and the source's on CPU).")]
PlanFused = Annotated[Optional[bool], typer.Option(
    "--plan-fused/--no-plan-fused", show_default=False, rich_help_panel=SPEED_PANEL,
    help="Time the factorized layers of --plan speed as the fused Triton kernel runs them (CUDA with Triton only; "
    "default off, as lrc bench and lowrank_cli.load run them).")]


def factorize(
    model: Model,
    output: Output,
    kappa: Kappa = None,
    rank_multiple: RankMultiple = "8",
    include: Include = None,
    exclude: Exclude = None,
    rank_pattern: RankPattern = None,
    svd: Svd = None,
    device: Device = "auto",
    dtype: Dtype = None,
    save_tokenizer: SaveTokenizer = None,
    force: Force = False,
    json_out: Json = False,
    progress: Progress = None,
    budget: Budget = None,
    target_macs: TargetMacs = None,
    calib: Calib = None,
    calib_samples: CalibSamples = None,
    tokenizer: Tokenizer = None,
    plan: Plan = "pela",
    plan_batch_size: PlanBatchSize = None,
    plan_dtype: PlanDtype = None,
    plan_fused: PlanFused = None,
    arch: Arch = None,
    model_arg: ModelArg = None,
    revision: Revision = None,
    library: Library = "auto",
    input_size: InputSize = None,
    seq_len: SeqLen = None,
) -> None:
    """Factorize the linears of a transformer's blocks (truncated SVD) into an lrc checkpoint.

    The targets are every nn.Linear of the repeated blocks (timm blocks, transformers encoder layers); the rank of
    each comes from --kappa, a --rank-pattern, or a --budget / --target-macs shared by all of them.
    """
    from lowrank_cli.compress.factorize_source import factorize_file
    from lowrank_cli.models.pretrained import parse_model_args

    console.show_progress(progress)
    macs = _refuse_conflicts(kappa, budget, target_macs, rank_pattern, plan, plan_batch_size, plan_dtype,
                             rank_multiple, calib, calib_samples, tokenizer, svd, plan_fused)
    size = parse_input_size(input_size)
    with console.progress() as bar:
        tasks: dict[str, int] = {}

        def advance(name: str, done: int, total: int) -> None:
            if "svd" not in tasks:
                tasks["svd"] = bar.add_task("SVD", total=total, status="")
            bar.update(tasks["svd"], completed=done, status=name)

        def calibrated(done: int, total: int) -> None:
            if "calib" not in tasks:
                tasks["calib"] = bar.add_task("calibration", total=total, status="samples")
            bar.update(tasks["calib"], completed=min(done, total))

        result = factorize_file(
            model, str(output),
            arch=arch, model_args=parse_model_args(model_arg), revision=revision, force=force, library=library,
            seq_len=seq_len, save_tokenizer=str(save_tokenizer) if save_tokenizer else None,
            log=lambda msg: console.info(f"Model: {msg}"),
            kappa=kappa, rank_multiple=rank_multiple, include=include,
            exclude=exclude, rank_pattern=rank_pattern, svd=svd, device=device, dtype=dtype,
            input_size=size, plan_kind=plan, plan_batch_size=plan_batch_size, plan_dtype=plan_dtype,
            plan_fused=plan_fused, calib=str(calib) if calib else None, tokenizer=tokenizer,
            calib_samples=DEFAULT_CALIB_SAMPLES if calib_samples is None else calib_samples,
            budget=budget, target_macs=macs, progress=advance, calib_progress=calibrated, warn=console.warn,
        )
    summary = result.summary()
    if summary["factorized"] == 0:
        console.warn("no layer was factorized (budget or ranks too generous): the output is the dense model")
    summary["output"] = str(output)
    if json_out:
        console.print_json(summary)
        return
    print_summary(summary)


def _refuse_conflicts(kappa: float | None, budget: float | None, target_macs: str | None,
                      rank_pattern: list[str] | None, plan: str, plan_batch_size: int | None, plan_dtype: str | None,
                      rank_multiple: int | str, calib: Path | None, calib_samples: int | None,
                      tokenizer: str | None, svd: str | None, plan_fused: bool | None = None) -> int | None:
    """Options that contradict each other, or that would be ignored, are a usage error (exit 2) before any
    loading; returns --target-macs as a number."""
    from lowrank_cli.errors import UsageError
    from lowrank_cli.evaluation.counting import parse_size

    budgets = [name for name, value in (("--budget", budget), ("--target-macs", target_macs)) if value is not None]
    if len(budgets) == 2:
        raise UsageError("--budget and --target-macs both allocate the ranks: give one of them")
    if budgets and kappa is not None:
        raise UsageError(f"{budgets[0]} allocates the ranks per layer, --kappa gives every layer one ratio: "
                         "give one of them")
    if budgets and rank_pattern:
        raise UsageError(f"{budgets[0]} allocates the ranks that --rank-pattern would set: give one of them")
    if plan_batch_size is not None and plan != "speed":
        raise UsageError("--plan-batch-size is the batch that --plan speed times: add --plan speed, or drop it")
    if plan_fused is not None and plan != "speed":
        raise UsageError("--plan-fused / --no-plan-fused say how --plan speed times the layers: add --plan speed, or "
                         "drop it")
    if plan_dtype is not None and plan != "speed" and rank_multiple != "auto":
        raise UsageError("--plan-dtype is the precision that --plan speed and --rank-multiple auto time in: add one "
                         "of them, or drop it")
    for name, value in (("--calib-samples", calib_samples), ("--tokenizer", tokenizer)):
        if value is not None and calib is None:
            raise UsageError(f"{name} applies to the --calib data: add --calib PATH, or drop it")
    if svd is not None and calib is not None:
        raise UsageError("--calib truncates each layer by its own decomposition of the whitened weight, so --svd "
                         "does not apply: drop one of them")
    if target_macs is None:
        return None
    try:
        macs = parse_size(target_macs)
    except UsageError as e:
        raise UsageError(f"--target-macs: {e}") from None
    if macs < 1:
        raise UsageError(f"--target-macs must be at least 1, got {target_macs}")
    return macs


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
    app.command(cls=LrcCommand, epilog=EPILOG)(factorize)
