"""`lrc factorize`: any timm or transformers model -> low-rank model -> self-describing safetensors."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Optional

import typer

from lowrank_cli.cli import console
from lowrank_cli.cli.command import LrcCommand
from lowrank_cli.cli.option_params import given, options_of, with_options
from lowrank_cli.cli.options import Force, Json, Model, Output, Progress
from lowrank_cli.compress.factorize_options import (
    CONFIGS,
    Calibration,
    FactorizeOptions,
    Ranking,
    Targets,
    Truncation,
    Writing,
)
from lowrank_cli.models.source_options import SourceOptions

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

  lrc factorize ./llama-folder --ratio 0.4 --calib wiki.train.txt --seq-len 2048 -o llama_lr.safetensors
                    (a causal LM: 40 % of its decoder layers' parameters removed, calibrated layer by layer)
"""

SaveTokenizer = Annotated[Optional[Path], typer.Option(
    "--save-tokenizer", metavar="DIR", show_default=False,
    help="transformers sources: copy the tokenizer files into this folder.")]
_SPEED = ("plan_kind", "plan_batch_size", "plan_dtype", "plan_fused")
CONFIG_FIELDS = [f.name for cls in CONFIGS for f in dataclasses.fields(cls)]


@with_options(options_of(Ranking, only=("budget", "target_macs")), options_of(Calibration), options_of(Writing),
              options_of(Ranking, only=_SPEED), options_of(SourceOptions, only=("arch", "model_args", "revision",
                                                                                "library", "input_size", "seq_len")))
@with_options(options_of(Ranking, only=("kappa", "ratio", "rank_multiple")), options_of(Targets),
              options_of(Truncation), after="output")
def factorize(
    ctx: typer.Context,
    model: Model,
    output: Output,
    save_tokenizer: SaveTokenizer = None,
    force: Force = False,
    json_out: Json = False,
    progress: Progress = None,
    **options,
) -> None:
    """Factorize the linears of a transformer's blocks (truncated SVD) into an lrc checkpoint.

    The targets are every nn.Linear of the repeated blocks (timm blocks, transformers encoder and decoder layers,
    GPT-2's Conv1D included); the rank of each comes from --kappa (or --ratio), a --rank-pattern, or a --budget /
    --target-macs shared by all of them.
    """
    from lowrank_cli.compress.factorize_source import factorize_file

    console.show_progress(progress)
    configs = FactorizeOptions.of(**{k: options.pop(k) for k in CONFIG_FIELDS})
    configs.check(given=set(given(ctx, *CONFIG_FIELDS)))  # what was typed: --calib-samples 256 alone is refused too
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
            model, str(output), **options, force=force, save_tokenizer=str(save_tokenizer) if save_tokenizer else None,
            log=lambda msg: console.info(f"Model: {msg}"), **configs.keywords(), progress=advance,
            calib_progress=calibrated, warn=console.warn,
        )
    from lowrank_cli.timing import peak_rss_bytes

    summary = result.summary()
    summary["output"] = str(output)
    summary["peak_rss_bytes"] = peak_rss_bytes()
    console.info(f"Peak resident memory: {summary['peak_rss_bytes'] / 2**30:.2f} GiB "
                 f"({'streamed block by block' if summary.get('streamed') else 'model loaded whole'})")
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
        mode = f", {c['mode']}" if c.get("mode") else ""
        table.add_row("calibration", f"{c['samples']} samples of {c['data']} ({c['seconds']:.1f} s{mode}); "
                      "data-aware truncation")
    if "budget" in s:
        b = s["budget"]
        table.add_row("budget", f"keep {b['keep_fraction']:g} of the parameters" if b["keep_fraction"] else f"target {b['target_macs']:,} MACs")
    if s.get("speed_plan"):
        p = s["speed_plan"]
        table.add_row("speed plan", f"{p['device']} {p['dtype']}, batch {p['batch_size']}: kept dense "
                      f"{len(p.get('kept_dense') or [])} layer(s), estimated gain {p.get('estimated_gain') or 1:.2f}x on the linears")
    if s.get("tokenizer"):
        table.add_row("tokenizer", f"{', '.join(s['tokenizer']['files'])} -> {s['tokenizer']['folder']}")
    if s.get("files") and len(s["files"]) > 1:
        table.add_row("files", f"{len(s['files']) - 1} shards + {Path(s['files'][-1]).name}")
    table.add_row("peak memory", f"{s['peak_rss_bytes'] / 2**30:.2f} GiB resident"
                  f"{', streamed block by block' if s.get('streamed') else ''}")
    table.add_row("elapsed", f"{s['seconds']:.1f} s")
    console.out.print(table)


def register(app: typer.Typer) -> None:
    app.command(cls=LrcCommand, epilog=EPILOG)(factorize)
