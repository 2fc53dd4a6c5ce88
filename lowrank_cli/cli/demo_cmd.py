"""`lrc demo`: factorize -> report -> recover -> eval on a small ViT and handwritten digits shipped with lrc."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lowrank_cli.cli import console
from lowrank_cli.cli.command import LrcCommand
from lowrank_cli.cli.options import Json, Progress

EPILOG = """\
Examples:

  lrc demo

  lrc demo --output-dir demo/      # keep the data, the models and the metrics

  lrc demo --quick --json          # a few seconds (tests, CI)
"""

OutputDir = Annotated[Optional[Path], typer.Option(
    "--output-dir", metavar="DIR", show_default=False,
    help="A new or empty folder to keep the files in (default: a temporary folder, removed at the end).")]
Quick = Annotated[bool, typer.Option(
    "--quick", help="A quarter of the images and 30 recovery steps: seconds, not a meaningful accuracy.")]


def demo(output_dir: OutputDir = None, quick: Quick = False, json_out: Json = False,
         progress: Progress = None) -> None:
    """Run the whole flow offline on a default that ships with lrc, and show the before / after table.

    A ViT of 52k parameters trained on 8x8 handwritten digits is factorized at kappa 4, reported, recovered by
    distillation and evaluated, through the same code as lrc factorize, report, recover and eval; on the CPU.
    """
    from lowrank_cli.tour.run import demo as run_demo

    console.show_progress(progress)
    bars = console.PhaseProgress("demo: ")
    try:
        result = run_demo(output_dir, quick=quick, progress=bars, warn=console.warn)
    finally:
        bars.close()
    if json_out:
        console.print_json(result.summary())
        return
    print_table(result)


def print_table(result) -> None:
    from rich.table import Table

    from lowrank_cli.evaluation.counting import format_size

    plan, test = result.plan, result.splits["test"]
    title = (f"lrc demo: a ViT on 8x8 handwritten digits, factorized at kappa {plan.kappa:g}, recovered in "
             f"{plan.steps} steps ({result.seconds:.1f} s{', --quick' if plan.every > 1 else ''})")
    table = Table(title=title, title_justify="left")
    for column in ("model", f"top-1 ({test} test images)", "params", "MACs", "file"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in result.rows:
        table.add_row(row.name, f"{100 * row.top1:.2f} %", format_size(row.params), format_size(row.macs),
                      f"{row.file_bytes / 1000:.1f} kB")
    console.out.print(table)
    teacher, recovered = result.row("teacher"), result.row("recovered")
    console.out.print(f"{teacher.params / recovered.params:.2f}x fewer parameters, {teacher.macs / recovered.macs:.2f}x"
                      f" fewer MACs; the test images were seen by neither the teacher's training nor the recovery "
                      f"(train {result.splits['train']}, val {result.splits['val']}).", highlight=False, markup=False)
    if result.output_dir is None:
        console.out.print("The files were in a temporary folder, now removed: keep them with --output-dir DIR.",
                          highlight=False, markup=False)
        return
    out = result.output_dir
    console.out.print(f"Files in {out}; the same steps by hand:\n"
                      f"  lrc factorize {teacher.model} --kappa {plan.kappa:g} --rank-multiple {plan.rank_multiple} "
                      f"--device cpu -o {out / 'factorized.safetensors'}\n"
                      f"  lrc report {out / 'factorized.safetensors'} --compare {teacher.model}\n"
                      f"  lrc recover {out / 'factorized.safetensors'} --teacher {teacher.model} --data {out / 'data'} "
                      f"--steps {plan.steps} --batch-size {plan.batch_size} --lr {plan.lr:g} --device cpu"
                      f"{'' if plan.held_out else ' --no-eval'} -o {out / 'recovered.safetensors'}\n"
                      f"  lrc eval {out / 'recovered.safetensors'} --data {out / 'test'}", highlight=False, markup=False,
                      soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command(cls=LrcCommand, epilog=EPILOG)(demo)
