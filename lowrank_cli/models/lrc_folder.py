"""An lrc checkpoint as a folder or Hub repo: what `lrc push` uploads and `lrc push --dry-run DIR` writes.

    lrc_config.json      the marker: {"lrc_folder": 1, "checkpoint": "model.safetensors", "tokenizer": [...], ...}
    model.safetensors    the lrc checkpoint, byte for byte (its metadata rebuilds the model)
    README.md            the model card
    tokenizer files      for text models: what transformers' AutoTokenizer reads

A folder or repo holding the marker is an lrc checkpoint wherever a MODEL is accepted (`hf-hub:ORG/REPO`,
`local-dir:PATH`, a plain folder) and for `lowrank_cli.load`. There is no config.json, so timm and transformers
do not mistake the repo for one of theirs. Hub files come through `models.hub.hub_download`: the cache,
revisions, HF_TOKEN and HF_HUB_OFFLINE apply as for every Hub source.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowrank_cli.errors import InputError
from lowrank_cli.models.hub import NotCached, hub_download, snapshot_revision

MARKER = "lrc_config.json"
CHECKPOINT_FILE = "model.safetensors"
FOLDER_SCHEMA = 1  # version of this layout; a newer one is refused with "upgrade lrc"
HUB_PREFIX = "hf-hub:"
LOCAL_PREFIX = "local-dir:"


@dataclass
class LrcFiles:
    """Where the pieces of an lrc folder or repo are on this machine (Hub files: in the Hugging Face cache)."""

    checkpoint: Path
    folder: Path  # the local folder, or the cache snapshot the files were fetched into
    tokenizer: list[str] = field(default_factory=list)  # tokenizer file names present in `folder`
    source: dict[str, Any] = field(default_factory=dict)  # kind (local-dir | hf-hub), id, revision


def marker_document(*, library: str, architecture: str, lrc_version: str, tokenizer: list[str]) -> dict[str, Any]:
    """The marker lrc_config.json of a folder holding CHECKPOINT_FILE (and `tokenizer` files)."""
    return {"lrc_folder": FOLDER_SCHEMA, "checkpoint": CHECKPOINT_FILE, "library": library,
            "architecture": architecture, "lrc_version": lrc_version, "tokenizer": list(tokenizer)}


def is_lrc_folder(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def read_marker(path: Path, where: str) -> dict[str, Any]:
    """The marker's content, checked: a JSON object of a layout this lrc reads, naming plain file names only."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{MARKER} of {where} is not valid JSON ({e}): the folder is broken; write it again with "
                         "lrc push") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("lrc_folder"), int):
        raise InputError(f"{MARKER} of {where} is not an lrc folder marker (no 'lrc_folder' version): write the "
                         "folder again with lrc push")
    if doc["lrc_folder"] > FOLDER_SCHEMA:
        raise InputError(f"{where} was written by lrc {doc.get('lrc_version', '?')} (folder layout "
                         f"{doc['lrc_folder']}); this lrc reads layout <= {FOLDER_SCHEMA}: upgrade lrc")
    names = [doc.get("checkpoint", CHECKPOINT_FILE), *(doc.get("tokenizer") or [])]
    if not all(isinstance(n, str) and n and "/" not in n and "\\" not in n and n not in (".", "..") for n in names):
        raise InputError(f"{MARKER} of {where} names files outside its folder ({names}): refusing to read it")
    return doc


def folder_files(folder: Path) -> LrcFiles:
    """The lrc checkpoint of a local folder with the marker."""
    from lowrank_cli.models.weights import sha256_later

    where = f"'{folder}'"
    doc = read_marker(folder / MARKER, where)
    checkpoint = folder / doc.get("checkpoint", CHECKPOINT_FILE)
    if not checkpoint.is_file():
        raise InputError(f"{where} has {MARKER} but no {checkpoint.name}: the folder is incomplete; write it again "
                         "with lrc push --dry-run")
    tokenizer = list(doc.get("tokenizer") or [])
    missing = [n for n in tokenizer if not (folder / n).is_file()]
    if missing:
        raise InputError(f"{where} lists tokenizer files it does not have ({', '.join(missing)}): the folder is "
                         "incomplete; write it again with lrc push --dry-run")
    return LrcFiles(checkpoint, folder, tokenizer,
                    {"kind": "local-dir", "id": str(folder.resolve()), "sha256": sha256_later(checkpoint)})


def hub_files(repo: str, revision: str | None) -> LrcFiles | None:
    """The lrc checkpoint of a Hub repo with the marker, fetched through the cache; None when the repo has no
    marker (a timm or transformers repo), or when, offline, the marker is not cached (the caller's next file
    decides: an lrc repo has no config.json)."""
    from huggingface_hub import errors as hf_errors

    try:
        marker = hub_download(repo, MARKER, revision)
    except NotCached:
        return None
    except hf_errors.EntryNotFoundError:
        return None
    where = f"hf-hub:{repo}"
    doc = read_marker(marker, where)
    commit = snapshot_revision(marker) or revision  # every file from the marker's commit, even if the branch moves
    names = [doc.get("checkpoint", CHECKPOINT_FILE), *(doc.get("tokenizer") or [])]
    paths = []
    for name in names:
        try:
            paths.append(hub_download(repo, name, commit))
        except hf_errors.EntryNotFoundError:
            raise InputError(f"{where} has {MARKER} but no {name}: the repo is incomplete; push it again with "
                             "lrc push") from None
    return LrcFiles(paths[0], paths[0].parent, names[1:], {"kind": "hf-hub", "id": repo, "revision": commit})


def split_hub_source(source: str, revision: str | None) -> tuple[str, str | None]:
    """hf-hub:ORG/REPO[@REV] -> (ORG/REPO, revision): `revision` wins over @REV."""
    repo, _, at = source[len(HUB_PREFIX):].partition("@")
    return repo, revision or at or None


def lrc_files(source: str | Path, revision: str | None = None) -> LrcFiles | None:
    """The lrc folder or repo a source names (hf-hub:, local-dir:, an existing folder); None for a file."""
    text = str(source)
    if text.startswith(HUB_PREFIX):
        repo, rev = split_hub_source(text, revision)
        files = hub_files(repo, rev)
        if files is None:
            raise InputError(f"hf-hub:{repo} is not an lrc checkpoint repo (it has no {MARKER}, or, offline, none in "
                             "the cache): load other models with lowrank_cli.load_model, or run once with network "
                             "access")
        return files
    folder = Path(text[len(LOCAL_PREFIX):] if text.startswith(LOCAL_PREFIX) else text).expanduser()
    if text.startswith(LOCAL_PREFIX) and not folder.is_dir():
        raise InputError(f"local-dir:{folder} is not a folder: check the path")
    if not folder.is_dir():
        return None
    if not is_lrc_folder(folder):
        raise InputError(f"folder '{folder}' has no {MARKER}: it is not an lrc checkpoint folder (lrc push --dry-run "
                         "DIR writes one); load other models with lowrank_cli.load_model")
    return folder_files(folder)


def checkpoint_path(source: str | Path, revision: str | None = None) -> Path:
    """The lrc checkpoint file a source names: the file itself, or the one inside an lrc folder or repo."""
    files = lrc_files(source, revision)
    if files is not None:
        return files.checkpoint
    path = Path(source).expanduser()
    if not path.exists() and not path.with_name(path.name + ".index.json").is_file():  # shards: X.safetensors.index.json
        raise InputError(f"'{source}' does not exist: check the path (an lrc checkpoint on the Hub is written "
                         "hf-hub:ORG/REPO)")
    return path
