"""The folder `lrc push` uploads, exactly: the checkpoint under a fixed name, the card, the tokenizer of a text
model, and the marker that makes `hf-hub:` / `local-dir:` loading recognise it (layout: models.lrc_folder).

`write_folder` is `lrc push --dry-run DIR`: the folder is staged next to DIR and renamed into place, so DIR is
either the old folder or the complete new one, never half of it. `stage_folder` fills an empty folder (push
stages into a temporary one).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lowrank_cli._version import __version__
from lowrank_cli.checkpoint.format import CheckpointInfo
from lowrank_cli.errors import InputError, OutputError, UsageError
from lowrank_cli.models.lrc_folder import CHECKPOINT_FILE, MARKER, LrcFiles, marker_document
from lowrank_cli.publish.card import Card, is_text_spec

CARD_FILE = "README.md"


def find_tokenizer(info: CheckpointInfo, files: LrcFiles | None, tokenizer: str | Path | bool | None,
                   log: Callable[[str], None]) -> Path | None:
    """The folder whose tokenizer files are published with a text model: `tokenizer` (a folder, or hf-hub:REPO),
    else the lrc folder the checkpoint came from, else the source the checkpoint records (a local folder, or a
    Hub repo through the cache). None for image models and for `tokenizer=False`."""
    from lowrank_cli.models.hub import hub_tokenizer_folder

    if tokenizer is False:
        return None
    text = is_text_spec(info.spec)
    if tokenizer not in (None, True):
        if not text:
            raise UsageError(f"`tokenizer` is for text models; {info.spec.architecture} takes images: leave it out")
        return given_tokenizer(str(tokenizer))
    if not text:
        return None
    if files is not None and files.tokenizer:
        return files.folder
    source = (info.provenance or {}).get("source") or {}
    found = None
    if source.get("kind") == "local-dir" and tokenizer_names(Path(str(source.get("id")))):
        found = Path(str(source["id"]))
    elif source.get("kind") == "hf-hub":
        found = hub_tokenizer_folder(str(source.get("id")), source.get("revision"))
    if found is None:
        where = source.get("id") or "unknown"
        raise InputError(f"{info.spec.architecture} is a text model and the tokenizer of its source ({where}) was not "
                         "found: pass `tokenizer` DIR (e.g. the folder lrc factorize --save-tokenizer wrote), or "
                         "`tokenizer=False` to publish without one")
    log(f"Tokenizer: {', '.join(tokenizer_names(found))} from {found}")
    return found


def given_tokenizer(text: str) -> Path:
    from lowrank_cli.models.hub import hub_tokenizer_folder

    folder = Path(text).expanduser()
    if text.startswith("hf-hub:"):
        repo, _, revision = text[len("hf-hub:"):].partition("@")
        found = hub_tokenizer_folder(repo, revision or None)
        if found is None:
            raise InputError(f"`tokenizer` {text} has no tokenizer files (or, offline, none in the cache): check it")
        return found
    if not folder.is_dir():
        raise InputError(f"`tokenizer` '{folder}' is not a folder: give the folder with the tokenizer files, or "
                         "hf-hub:REPO")
    if not tokenizer_names(folder):
        raise InputError(f"`tokenizer` '{folder}' has no tokenizer files (tokenizer.json, vocab.txt, ...): check it")
    return folder


def tokenizer_names(folder: Path) -> list[str]:
    from lowrank_cli.models.transformers_models import TOKENIZER_FILES

    return [n for n in TOKENIZER_FILES if (folder / n).is_file()]


def stage_folder(card: Card, folder: Path, tokenizer: Path | None) -> list[str]:
    """Fill the empty `folder` with what is uploaded; returns the file paths relative to it, sorted. `card.card`
    must already name the tokenizer files (build_card's `tokenizer`). A checkpoint that records a
    sentence-transformers embedding also gets that layout (sentence_files)."""
    names = tokenizer_names(tokenizer) if tokenizer is not None else []
    _place_checkpoint(card.checkpoint, folder / CHECKPOINT_FILE)
    for name in names:
        _link_or_copy(tokenizer / name, folder / name)
    for name, doc in sentence_files(card.info).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    (folder / CARD_FILE).write_text(str(card.card), encoding="utf-8")
    marker = marker_document(library=card.info.spec.library, architecture=card.info.spec.architecture,
                             lrc_version=__version__, tokenizer=names)
    (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for path in files:
        _fsync(path)
    return sorted(p.relative_to(folder).as_posix() for p in files)


def sentence_files(info: CheckpointInfo) -> dict[str, Any]:
    """The sentence-transformers files (relative path -> JSON document) of a checkpoint that records an
    embedding (models.sentence.staged_files), so that `lowrank_cli.sentence_transformer(REPO)` needs no source
    folder; none for any other checkpoint."""
    from lowrank_cli.models.sentence import recorded_embedding, staged_files

    embedding = recorded_embedding(info)
    if embedding is None:
        return {}
    args = info.spec.model_args or {}
    dimension = next((args[k] for k in ("hidden_size", "d_model", "dim", "n_embd") if isinstance(args.get(k), int)),
                     None)
    if dimension is None:
        raise InputError(f"the config of {info.spec.architecture} names no hidden size (hidden_size, d_model, ...), "
                         "which the sentence-transformers pooling config needs: push it with a config that has one")
    return staged_files(embedding, dimension)


def check_folder_output(out: str | Path, force: bool) -> Path:
    """Refuse early (before the card is built) a dry-run folder that cannot be written or would overwrite."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputError(f"`dry_run` '{out}' is a file: give a folder name")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputError(f"`dry_run` folder '{out}' exists and is not empty: pass `force=True` to replace it, or "
                          "choose another folder")
    if not out.parent.is_dir():
        raise OutputError(f"the parent of `dry_run` '{out}' does not exist: create '{out.parent}' first")
    return out


def write_folder(card: Card, out: str | Path, tokenizer: Path | None, *, force: bool = False) -> list[str]:
    """`lrc push --dry-run OUT`: the exact upload folder, staged next to OUT and renamed into place."""
    out = check_folder_output(out, force)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    try:
        staging.mkdir()
        names = stage_folder(card, staging, tokenizer)
        if out.exists():
            os.replace(out, old)
        try:
            os.replace(staging, out)
        except OSError:
            if old.exists():
                os.replace(old, out)  # the old folder comes back
            raise
    except OSError as e:
        raise OutputError(f"cannot write the folder '{out}' ({e.strerror or e}): check the disk space and "
                          "permissions") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return names


def _place_checkpoint(src: Path, dst: Path) -> None:
    """The checkpoint as the folder's one file: linked, or, for a sharded set (its index), its shards joined into
    one safetensors file tensor by tensor (never the whole set in memory), with the set's lrc record."""
    from lowrank_cli.checkpoint.shard_writer import SetWriter
    from lowrank_cli.checkpoint.shards import TensorSet, index_of

    if index_of(src) is None:
        _link_or_copy(src, dst)
        return
    tensors = TensorSet.open(src)
    layout = {name: (tensors.dtype(name), e.shape) for name, e in tensors.entries.items()}
    with SetWriter(dst, layout, max_size=tensors.nbytes + 1) as writer:
        for name in layout:
            writer.write(name, tensors.read(name))
        writer.finish(tensors.metadata)


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the file system allows it (a checkpoint can be gigabytes), a copy elsewhere."""
    src = src.resolve()  # a Hub cache file is a symlink into blobs/
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError), open(path, "rb") as f:
        os.fsync(f.fileno())
