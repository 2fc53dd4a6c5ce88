"""`lrc card`: the model card of an lrc checkpoint (what `lrc push` uploads as README.md), on stdout or in a file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lowrank_cli.cli import console
from lowrank_cli.cli.options import Bench, Checkpoint, Eval, Force, License, Revision

EPILOG = """\
Examples:

  lrc card deit_lr_rec.safetensors -o README.md

  lrc card deit_lr_rec.safetensors --repo-id my-org/deit-base-lr2 --bench bench.json --eval eval.json -o README.md

  lrc card hf-hub:my-org/deit-base-lr2 > README.md

The card is built from the checkpoint's own metadata and lrc report's counts.

Front matter the Hub reads: library_name, tags, base_model, pipeline_tag, license, model-index.

Body: the method, the size table, measured accuracy and speed, the loading snippet, the citations.
"""


def card(
    checkpoint: Checkpoint,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the card to this file (written atomically; default: stdout).", show_default=False)] = None,
    repo_id: Annotated[Optional[str], typer.Option("--repo-id", help="ORG/NAME the card will live in (named by its loading snippet).", show_default=False)] = None,
    bench: Bench = None,
    eval_: Eval = None,
    license: License = None,
    revision: Revision = None,
    force: Force = False,
) -> None:
    """Write the model card of an lrc checkpoint: what it is, how it was made, its size and speed, how to load it."""
    from lowrank_cli.atomic import check_output, write_text
    from lowrank_cli.publish.card import build_card
    from lowrank_cli.publish.push import check_repo_id

    if repo_id is not None:
        check_repo_id(repo_id)
    if output is not None:
        check_output(output, force=force)
    result = build_card(checkpoint, repo_id=repo_id, revision=revision, bench=bench, evals=eval_ or [],
                        license=license, log=console.info)
    for note in result.notes:
        console.warn(note)
    if output is None:
        if console.is_main_process():
            console.out.file.write(str(result.card))
            console.out.file.flush()
        return
    write_text(output, str(result.card))
    console.info(f"Wrote {output}")


def register(app: typer.Typer) -> None:
    app.command(epilog=EPILOG)(card)
