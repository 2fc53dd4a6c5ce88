"""`lrc push`: an lrc checkpoint with its card (and a text model's tokenizer) to a Hugging Face Hub repo."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer

from lowrank_cli.cli import console
from lowrank_cli.cli.options import Bench, Checkpoint, Eval, Json, License

EPILOG = """\
Examples:

  lrc push deit_lr_rec.safetensors my-org/deit-base-lr2

  lrc push deit_lr_rec.safetensors my-org/deit-base-lr2 --private --bench bench.json --eval eval.json

  lrc push deit_lr_rec.safetensors my-org/deit-base-lr2 --dry-run out_dir/     (the exact folder, nothing sent)

  lrc report local-dir:out_dir/          (the folder loads like the repo will: hf-hub:my-org/deit-base-lr2)

The token is huggingface_hub's: HF_TOKEN, else the one 'hf auth login' stored (it needs write access).

The repo is created if it does not exist; the files go up in one commit.
"""


def push(
    checkpoint: Checkpoint,
    repo_id: Annotated[str, typer.Argument(help="The Hub repo to push to, ORG/NAME (created if missing).", show_default=False)],
    private: Annotated[bool, typer.Option("--private", help="Create the repo private (an existing repo keeps its visibility).")] = False,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Branch to commit to (default main; created if missing).", show_default=False)] = None,
    commit_message: Annotated[Optional[str], typer.Option("--commit-message", help="Commit message (default: what the model is and its compression).", show_default=False)] = None,
    dry_run: Annotated[Optional[Path], typer.Option("--dry-run", help="Write the exact folder that would be uploaded to this folder instead; nothing is sent.", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --dry-run folder.")] = False,
    bench: Bench = None,
    eval_: Eval = None,
    license: License = None,
    tokenizer: Annotated[Optional[str], typer.Option("--tokenizer", help="Text models: the folder (or hf-hub:REPO) with the tokenizer files (default: the checkpoint's source's).", show_default=False)] = None,
    no_tokenizer: Annotated[bool, typer.Option("--no-tokenizer", help="Text models: publish without a tokenizer.")] = False,
    json_out: Json = False,
) -> None:
    """Upload an lrc checkpoint, its model card and a text model's tokenizer to a Hub repo, in one commit."""
    from lowrank_cli.errors import UsageError
    from lowrank_cli.publish.push import push as run_push

    if tokenizer is not None and no_tokenizer:
        raise UsageError("--tokenizer and --no-tokenizer contradict each other: choose one")
    result = run_push(
        checkpoint, repo_id, private=private, revision=revision, commit_message=commit_message, dry_run=dry_run,
        force=force, bench=bench, evals=eval_ or [], license=license,
        tokenizer=False if no_tokenizer else tokenizer, log=console.info,
    )
    for note in result.notes:
        console.warn(note)
    if json_out:
        console.print_json({k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(result).items()})
        return
    files = ", ".join(result.files)
    if result.dry_run is not None:
        console.out.print(f"Wrote {result.dry_run}/ ({files}): nothing was uploaded. Check it with: lrc report "
                          f"local-dir:{result.dry_run}", highlight=False, soft_wrap=True)
        return
    console.out.print(f"Pushed {files} to {result.repo_id} ({result.revision}): {result.commit_url}", highlight=False,
                      soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command(epilog=EPILOG)(push)
