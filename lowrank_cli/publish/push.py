"""`lrc push`: an lrc checkpoint, its card and (text models) its tokenizer to a Hub repo, in one commit.

    result = push("deit_lr_rec.safetensors", "org/deit-base-lr2", private=True)
    result.commit_url
    push("deit_lr_rec.safetensors", "org/deit-base-lr2", dry_run="out_dir")   # the exact folder, not uploaded

Through huggingface_hub: `create_repo(exist_ok=True)` then `upload_folder` (one commit: the repo gets all the
files or none of them), with its token handling (HF_TOKEN, else the token 'hf auth login' stored). Everything
that can be refused is refused before the card is counted and before anything is sent: the repo id, the
checkpoint, the measurement files, the dry-run folder, offline mode, a missing or invalid token. Each Hub failure
is one typed error naming its cause and fix.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowrank_cli.checkpoint.format import read_info
from lowrank_cli.errors import EnvironmentProblem, LrcError, OutputError, UsageError
from lowrank_cli.publish.card import build_card, resolve_checkpoint
from lowrank_cli.publish.folder import (check_folder_output, find_tokenizer, sentence_files, stage_folder,
                                        tokenizer_names, write_folder)

TOKENS_URL = "https://huggingface.co/settings/tokens"


@dataclass
class PushResult:
    repo_id: str
    files: list[str]  # what was (or, with dry_run, would be) uploaded
    revision: str
    dry_run: Path | None = None
    commit_url: str | None = None
    commit: str | None = None
    user: str | None = None
    notes: list[str] = field(default_factory=list)


def push(
    checkpoint: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run: str | Path | None = None,
    force: bool = False,
    bench: str | Path | None = None,
    evals: list[str | Path] | tuple = (),
    license: str | None = None,
    tokenizer: str | Path | bool | None = None,
    token: str | None = None,
    log: Callable[[str], None] | None = None,
) -> PushResult:
    """Upload an lrc checkpoint (a file, an lrc folder or `hf-hub:` repo) to `repo_id` (ORG/NAME) on branch
    `revision` (default main; created if missing). `dry_run` DIR writes the exact folder instead and sends nothing
    (`force` replaces a non-empty DIR). `bench`, `evals`, `license` go into the card (see build_card).
    `tokenizer`: a folder or hf-hub:REPO with a text model's tokenizer (default: found from the checkpoint's
    source), False for none. `token` defaults to huggingface_hub's (HF_TOKEN, then 'hf auth login')."""
    log = log or (lambda msg: None)
    check_repo_id(repo_id)
    out = check_folder_output(dry_run, force) if dry_run is not None else None
    path, files = resolve_checkpoint(checkpoint)
    info, _ = read_info(path)
    sentence_files(info)  # a sentence model's layout is refused here, if it must be, not half-way through staging
    tokenizer_dir = find_tokenizer(info, files, tokenizer, log)
    names = tokenizer_names(tokenizer_dir) if tokenizer_dir is not None else []
    api = user = None
    if out is None:
        api, user = hub_login(token, repo_id)
        log(f"Pushing to {repo_id} as {user}")
    card = build_card(path, files=files, repo_id=repo_id, bench=bench, evals=evals, license=license,
                      tokenizer=names, log=log)
    branch = revision or "main"
    if out is not None:
        written = write_folder(card, out, tokenizer_dir, force=force)
        return PushResult(repo_id, written, branch, dry_run=out, notes=card.notes)
    message = commit_message or default_message(card.report, info.spec.architecture)
    with tempfile.TemporaryDirectory(prefix="lrc-push-") as staging:
        uploaded = stage_folder(card, Path(staging), tokenizer_dir)
        commit = upload(api, repo_id, Path(staging), private=private, revision=revision, message=message, user=user)
    return PushResult(repo_id, uploaded, branch, commit_url=str(getattr(commit, "commit_url", commit)),
                      commit=getattr(commit, "oid", None), user=user, notes=card.notes)


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if repo_id.count("/") != 1 or repo_id.startswith("hf-hub:"):
        raise UsageError(f"the repo id '{repo_id}' is not ORG/NAME: write it like my-name/deit-base-lr2")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UsageError(f"the repo id '{repo_id}' is not a valid Hub repo id: use letters, digits, '-', '_' and '.', "
                         "at most 96 characters, not starting or ending with '-' or '.'") from e


def default_message(report: dict[str, Any], architecture: str) -> str:
    ratio = (report.get("compression") or {}).get("params")
    smaller = f", {ratio:.2f}x fewer parameters" if ratio else ""
    return f"lrc: low-rank {architecture}{smaller}"


def hub_login(token: str | None, repo_id: str) -> tuple[Any, str]:
    """(HfApi, user name) once the Hub is reachable and the token is valid: nothing is built before that."""
    from huggingface_hub import HfApi, constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise EnvironmentProblem("HF_HUB_OFFLINE is set, so nothing can be uploaded: unset it, or write the folder "
                                 "with `dry_run` DIR and upload it later")
    token = token or get_token()
    if not token:
        raise EnvironmentProblem(f"no Hugging Face token: run 'hf auth login' or set HF_TOKEN (a token with write "
                                 f"access, from {TOKENS_URL})")
    api = HfApi(token=token)
    try:
        who = api.whoami()
    except Exception as e:
        raise hub_error(e, repo_id, None, "sign-in") from None
    return api, str(who.get("name") or "?")


def upload(api: Any, repo_id: str, folder: Path, *, private: bool, revision: str | None, message: str,
           user: str | None) -> Any:
    """create_repo (exist_ok) + the branch when it is not main + upload_folder: the CommitInfo."""
    step = "creation"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision not in (None, "main"):
            step = f"branch '{revision}'"
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        step = "upload"
        return api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision, commit_message=message,
                                 repo_type="model")
    except Exception as e:
        raise hub_error(e, repo_id, user, step) from None


def hub_error(e: Exception, repo_id: str, user: str | None, step: str) -> Exception:
    """The typed error for a Hub failure: token (6), network or offline (6), no right to write (4), other (4);
    anything that is not a Hub or network failure is returned as it is (a bug)."""
    from huggingface_hub import errors as hf_errors

    if isinstance(e, LrcError):
        return e
    if isinstance(e, hf_errors.OfflineModeIsEnabled):
        return EnvironmentProblem("HF_HUB_OFFLINE is set, so nothing can be uploaded: unset it, or write the folder "
                                  "with `dry_run` DIR")
    if isinstance(e, hf_errors.HfHubHTTPError):
        return _http_error(e, repo_id, user, step)
    if is_network_error(e):
        first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        return EnvironmentProblem(f"cannot reach the Hugging Face Hub ({first}): check the network (and HF_ENDPOINT), "
                                  "or write the folder with `dry_run` DIR and upload it later")
    if isinstance(e, hf_errors.LocalTokenNotFoundError):
        return EnvironmentProblem(f"no Hugging Face token: run 'hf auth login' or set HF_TOKEN ({TOKENS_URL})")
    return e


def _http_error(e: Any, repo_id: str, user: str | None, step: str) -> LrcError:
    from huggingface_hub import errors as hf_errors

    status = getattr(getattr(e, "response", None), "status_code", None)
    who = f"'{user}'" if user else "your token"
    done = "" if step in ("creation", "sign-in") else " (the repo exists; nothing was committed)"
    if status == 401:
        return EnvironmentProblem(f"the Hugging Face token is invalid or expired (HF_TOKEN, else 'hf auth login'): "
                                  f"create one with write access at {TOKENS_URL} and log in again")
    if isinstance(e, hf_errors.RevisionNotFoundError):
        return OutputError(f"{repo_id} has no such branch and it could not be created{done}: check `revision`")
    if isinstance(e, hf_errors.RepositoryNotFoundError):
        return OutputError(f"{repo_id} does not exist or {who} cannot see it{done}: check the name, or push to your "
                           f"own namespace ({user or 'YOUR-NAME'}/{repo_id.split('/')[-1]})")
    if status == 403:
        return OutputError(f"{who} may not write to {repo_id} ({_server_says(e)}){done}: push to your own namespace "
                           f"({user or 'YOUR-NAME'}/{repo_id.split('/')[-1]}), or use a token with write access to "
                           f"{repo_id.split('/')[0]}")
    return OutputError(f"the Hub refused the {step} of {repo_id} (HTTP {status}: {_server_says(e)}){done}: try again "
                       "later")


def _server_says(e: Any) -> str:
    text = getattr(e, "server_message", None) or str(e)
    return (text.strip().splitlines() or ["no reason given"])[0][:160]


def is_network_error(e: Exception) -> bool:
    """A connection that failed or timed out, for whichever HTTP client this huggingface_hub uses."""
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    return any(c.__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3")
               for c in type(e).__mro__)
