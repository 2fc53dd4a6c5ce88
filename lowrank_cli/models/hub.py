"""The Hugging Face Hub, through huggingface_hub: its cache, revisions, HF_TOKEN and HF_HUB_OFFLINE apply everywhere."""

from __future__ import annotations

import functools
import json
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lowrank_cli.errors import InputError
from lowrank_cli.models.weights import PICKLE_WEIGHTS, SAFE_WEIGHTS


class NotOnHub(InputError):
    """A Hub repo that is not there: absent, or not in the cache while the Hub cannot be reached."""

    def __init__(self, message: str, *, reason: str):
        super().__init__(message)
        self.reason = reason  # what to say about the repo in a combined message


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


@functools.cache
def hub_reachable() -> bool:
    """Whether the Hub's host answers at all (one TCP connect, 3 s at most, once per process).

    Without a network huggingface_hub retries every request five times with backoff (~25 s per file); knowing
    up front lets lrc read the cache only and fail at once. Behind a proxy the direct connect says nothing, so it
    is not tried."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return True
    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
    except OSError:
        return False
    return True


class NotCached(NotOnHub):
    """A Hub file that is not in the local cache while the Hub cannot be reached (HF_HUB_OFFLINE, no network):
    whether the repo has it is unknown."""


def offline_reason() -> str:
    return "HF_HUB_OFFLINE is set" if _offline() else "the Hub cannot be reached"


def hub_download(repo: str, filename: str, revision: str | None) -> Path:
    """One file from the Hub through huggingface_hub: its cache, HF_TOKEN and HF_HUB_OFFLINE apply; when the Hub
    cannot be reached, the cache alone answers (at once, without huggingface_hub's retries)."""
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import hf_hub_download

    cache_only = not _offline() and not hub_reachable()
    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename, revision=revision, local_files_only=cache_only))
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled) as e:
        why = offline_reason()
        fix = "unset HF_HUB_OFFLINE and run once with network access" if _offline() else "run once with network access"
        raise NotCached(
            f"{filename} of hf-hub:{repo}{'@' + revision if revision else ''} is not in the Hugging Face cache "
            f"and {why}: {fix}, or point at a local folder",
            reason=f"it is not in the Hugging Face cache and {why}",
        ) from e
    except hf_errors.EntryNotFoundError:  # the repo has no such file: the caller may try another name
        raise
    except hf_errors.RevisionNotFoundError:
        raise InputError(f"hf-hub:{repo} has no revision '{revision}': check `revision`") from None
    except hf_errors.GatedRepoError:
        raise InputError(f"hf-hub:{repo} is gated: accept its terms on the Hub and set HF_TOKEN") from None
    except hf_errors.RepositoryNotFoundError:
        raise NotOnHub(
            f"hf-hub:{repo} does not exist or is private: check the name, or set HF_TOKEN for a private repo",
            reason="it does not exist or is private",
        ) from None
    except hf_errors.HfHubHTTPError as e:
        raise InputError(f"downloading {filename} of hf-hub:{repo} failed ({e}): try again later") from None


def hub_weights(repo: str, revision: str | None) -> Path:
    from huggingface_hub import errors as hf_errors

    try:
        return hub_download(repo, SAFE_WEIGHTS, revision)
    except hf_errors.EntryNotFoundError:
        pass
    try:
        return hub_download(repo, PICKLE_WEIGHTS, revision)
    except hf_errors.EntryNotFoundError:
        raise InputError(f"hf-hub:{repo} has neither {SAFE_WEIGHTS} nor {PICKLE_WEIGHTS}: it is not a timm model repo") from None


def snapshot_revision(path: Path) -> str | None:
    """The commit a cached Hub file belongs to (…/snapshots/<commit>/file)."""
    parts = path.parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else None


# What a sentence-transformers repo says of its embedding (models.sentence), fetched beside the weights when present.
SENTENCE_FILES = ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json",
                  "config_sentence_transformers.json")


def hub_transformers_files(repo: str, revision: str | None) -> Path:
    """Fetch what transformers needs of a Hub repo (weights, shards, image preprocessing) through hub_download,
    so that the cache, HF_TOKEN, HF_HUB_OFFLINE and the error messages are lrc's everywhere; returns the local
    snapshot folder that `from_pretrained` then reads."""
    from huggingface_hub import errors as hf_errors

    from lowrank_cli.models.transformers_models import PREPROCESSOR

    def optional(name: str) -> Path | None:
        try:
            return hub_download(repo, name, revision)
        except hf_errors.EntryNotFoundError:
            return None

    folder = None
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          (PICKLE_WEIGHTS, "pytorch_model.bin.index.json")):
        path = optional(single)
        if path is None and (index_path := optional(index)) is not None:
            try:
                shards = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as e:
                raise InputError(f"{index} of hf-hub:{repo} is unreadable ({e}): the repo is broken") from None
            path = [hub_download(repo, shard, revision) for shard in shards][0]
        if path is not None:
            folder = path.parent
            break
    if folder is None:
        raise InputError(f"hf-hub:{repo} has no model.safetensors or {PICKLE_WEIGHTS} (nor sharded ones): it is "
                         "not a transformers model repo")
    for name in (PREPROCESSOR, *SENTENCE_FILES):  # vision models keep their mean / std / size in the first;
        try:  # sentence-transformers repos their embedding in the others
            optional(name)
        except InputError:  # offline, and never downloaded
            pass
    return folder


def hub_tokenizer_folder(repo: str, revision: str | None) -> Path | None:
    """The snapshot folder of a Hub repo's tokenizer files, fetched through hub_download; None when the repo has
    none (or, offline, none in the cache)."""
    from huggingface_hub import errors as hf_errors

    from lowrank_cli.models.transformers_models import TOKENIZER_FILES

    found = None
    for name in TOKENIZER_FILES:
        try:
            found = hub_download(repo, name, revision).parent
        except (hf_errors.EntryNotFoundError, InputError):  # absent, or not cached while offline
            continue
    return found


def tokenizer_folder(loaded: Any) -> Path:
    """The local folder with the tokenizer files of a transformers source (a LoadedModel; Hub files are fetched to
    the cache)."""
    from lowrank_cli.models.transformers_models import TOKENIZER_FILES

    if loaded.files is None:
        raise InputError("the source has no tokenizer files (only transformers folders and Hub repos have them): "
                         "leave out `save_tokenizer`, or pass `tokenizer` DIR_OR_REPO")
    folder = Path(loaded.files)
    if folder.is_dir():
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            raise InputError(f"'{folder}' has no tokenizer files ({', '.join(TOKENIZER_FILES[:5])}, ...): leave out "
                             "`save_tokenizer`, or pass `tokenizer` DIR_OR_REPO")
        return folder
    found = hub_tokenizer_folder(loaded.files, loaded.revision)
    if found is None:
        raise InputError(f"hf-hub:{loaded.files} has no tokenizer files (or, offline, none in the cache): leave out "
                         "`save_tokenizer`, or pass `tokenizer` DIR_OR_REPO")
    return found
