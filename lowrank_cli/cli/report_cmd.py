"""`lrc report`: parameters, MACs, compression and provenance of any model or lrc checkpoint; CI gates."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lowrank_cli.cli import console
from lowrank_cli.cli.command import LrcCommand
from lowrank_cli.cli.option_params import options_of, with_options
from lowrank_cli.cli.options import Json, Model
from lowrank_cli.models.source_options import SourceOptions

EPILOG = """\
Examples:

  lrc report deit_lr.safetensors

  lrc report deit_lr.safetensors --per-layer

  lrc report deit_base

  lrc report deit_lr.safetensors --compare deit_base

  lrc report deit_lr.safetensors --json

  lrc report deit_lr.safetensors --markdown >> "$GITHUB_STEP_SUMMARY"

  lrc report deit_lr.safetensors --max-params 50M --max-macs 9G --min-compression 1.8

  lrc report weights.safetensors --arch vit_small_patch16_224 --model-arg num_classes=10

  lrc report deit_lr.safetensors --plot spectrum.png

  lrc report llama_lr.safetensors --seq-len 2048 --context-len 4096
                  (a causal LM: prefill MACs at 2048 tokens; one generated token at 4096 of context, its KV cache)

A failed gate exits with code 1 after printing the report. MACs are fvcore multiply-accumulates for one
image (FLOPs = 2 x MACs). The JSON keys are documented in docs/report_schema.md.
"""


GATES_PANEL = "CI gates (exit 1 when one fails)"

ContextLen = Annotated[Optional[int], typer.Option(
    "--context-len", min=1, show_default=False,
    help="Causal LMs: the context of the generated token whose MACs and KV cache are reported (default: --seq-len).")]
PerLayer = Annotated[bool, typer.Option(
    "--per-layer", help="One row per linear: d_in, d_out, rank, params, MACs, kept energy.")]
Compare = Annotated[Optional[str], typer.Option(
    "--compare", metavar="MODEL", show_default=False,
    help="Dense MODEL to measure the compression against (default: rebuilt from the lrc metadata).")]
Markdown = Annotated[bool, typer.Option(
    "--markdown", help="Print GitHub-flavoured markdown (e.g. >> $GITHUB_STEP_SUMMARY).")]
Plot = Annotated[Optional[Path], typer.Option(
    "--plot", metavar="FILE", show_default=False,
    help="Draw spectra with the kept ranks and the kept energy per layer to this image (needs matplotlib: the plot "
    "extra).")]
MaxParams = Annotated[Optional[str], typer.Option(
    "--max-params", metavar="N", show_default=False, rich_help_panel=GATES_PANEL,
    help="Fail above this many parameters, e.g. 50M.")]
MaxMacs = Annotated[Optional[str], typer.Option(
    "--max-macs", metavar="N", show_default=False, rich_help_panel=GATES_PANEL,
    help="Fail above this many MACs per image, e.g. 9G.")]
MinCompression = Annotated[Optional[str], typer.Option(
    "--min-compression", metavar="RATIO", show_default=False, rich_help_panel=GATES_PANEL,
    help="Fail below this parameter compression vs the dense reference, e.g. 1.8.")]


@with_options(options_of(SourceOptions, skip=("device",)))
def report(
    model: Model,
    per_layer: PerLayer = False,
    compare: Compare = None,
    json_out: Json = False,
    markdown: Markdown = False,
    plot: Plot = None,
    max_params: MaxParams = None,
    max_macs: MaxMacs = None,
    min_compression: MinCompression = None,
    context_len: ContextLen = None,
    **source,
) -> None:
    """Count parameters and MACs, and show the compression and provenance of a model.

    --max-params, --max-macs and --min-compression turn the report into a CI gate.
    """
    from lowrank_cli.errors import GateFailed, UsageError
    from lowrank_cli.evaluation.gates import apply_gates, describe_gate
    from lowrank_cli.evaluation.report import build_report
    from lowrank_cli.evaluation.report_format import to_markdown

    if json_out and markdown:
        raise UsageError("--json and --markdown both print the report on stdout: choose one")
    limits = _gate_limits(max_params, max_macs, min_compression)
    if plot is not None:
        from lowrank_cli.evaluation.plot import check_plot_output

        check_plot_output(plot)

    result = build_report(model, **source, compare=compare, context_len=context_len, log=lambda msg: console.info(msg))
    failed = apply_gates(result, **limits)

    if json_out:
        console.print_json(result.document)
    elif markdown:
        if console.is_main_process():
            console.out.file.write(to_markdown(result.document, per_layer=per_layer))
            console.out.file.flush()
    else:
        print_report(result.document, per_layer)

    if plot is not None:
        from lowrank_cli.evaluation.plot import plot_report

        console.info(f"Wrote {plot_report(result, plot)}")
    if failed:
        raise GateFailed("gates failed: " + "; ".join(describe_gate(g) for g in failed))
    if result.document["gates"]:
        console.info("gates passed: " + "; ".join(describe_gate(g) for g in result.document["gates"]))


def _gate_limits(max_params: str | None, max_macs: str | None, min_compression: str | None) -> dict:
    """The gate options as apply_gates takes them (a bad size or ratio is refused before any loading)."""
    from lowrank_cli.errors import UsageError
    from lowrank_cli.evaluation.counting import parse_size
    from lowrank_cli.evaluation.gates import parse_ratio

    def size_option(option: str, text: str | None) -> int | None:
        if text is None:
            return None
        try:
            size = parse_size(text)
        except UsageError as e:
            raise UsageError(f"{option}: {e}") from None
        if size < 1:
            raise UsageError(f"{option} {text} is a gate no model passes: give a size of at least 1")
        return size

    return {
        "max_params": size_option("--max-params", max_params),
        "max_macs": size_option("--max-macs", max_macs),
        "min_compression": parse_ratio(min_compression),
    }


def print_report(doc: dict, per_layer: bool) -> None:
    from rich.markup import escape
    from rich.table import Table

    from lowrank_cli.evaluation.report_format import layer_cells, layer_columns, summary_rows

    if not console.is_main_process():  # under torchrun, rank 0 alone prints
        return
    out = console.out  # a terminal wraps tables to its width; a pipe or a file gets them whole (console.out)
    name = doc["source"]["argument"] or doc["source"]["id"]
    table = Table(title=f"lrc report: {escape(str(name))}", show_header=False, title_justify="left")
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for label, value in summary_rows(doc):
        style = "red" if value.startswith("FAILED") or label.strip() == "NOT counted" else None
        table.add_row(escape(label), escape(value), style=style)
    out.print(table)
    if doc.get("tasks"):
        from lowrank_cli.evaluation.report_format import TASK_COLUMNS, task_cells

        tasks = Table(title="tasks", title_justify="left")
        for i, col in enumerate(TASK_COLUMNS):
            tasks.add_column(col, justify="right" if col in ("held-out", "trainable") else "left", no_wrap=i == 0)
        for row in doc["tasks"]:
            tasks.add_row(*(escape(c) for c in task_cells(row)))
        out.print(tasks)
    if doc["macs"]["uncounted"]:
        console.warn("some ops were not counted (listed under 'NOT counted'): the MAC figure is a lower bound")
    if per_layer:
        if not doc["layers"]:
            console.info("--per-layer: no layer rows (the model was not built: pass --arch to build it)")
            return
        cols = layer_columns(doc)
        layers = Table(title="linear layers", title_justify="left")
        for i, col in enumerate(cols):
            layers.add_column(col, justify="left" if i == 0 else "right", no_wrap=i == 0)
        for row in doc["layers"]:
            layers.add_row(*(escape(c) for c in layer_cells(row, len(cols) > 7)))
        out.print(layers)


def register(app: typer.Typer) -> None:
    app.command(cls=LrcCommand, epilog=EPILOG)(report)
