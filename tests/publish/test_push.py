"""`push` against a Hub mocked at its network boundary (HfApi's whoami / create_repo / create_branch /
upload_folder): what would be sent, in which order, with which token; and each Hub failure as one typed error."""

from __future__ import annotations

import pytest
from helpers import hub_http_error as http_error
from helpers import network_down, write_lowrank_vit
from huggingface_hub import errors as hf_errors

from lowrank_cli.errors import EnvironmentProblem, OutputError, UsageError
from lowrank_cli.publish.push import push


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_lowrank_vit(tmp_path_factory.mktemp("ckpt") / "vit_lr.safetensors")


def test_push_sends_the_dry_run_folder_in_one_commit(checkpoint, tmp_path, fake_hub):
    dry = push(checkpoint, "acme/vit-lr2", dry_run=tmp_path / "out")
    assert fake_hub.calls == []  # a dry run sends nothing, not even a sign-in
    result = push(checkpoint, "acme/vit-lr2", private=True)
    assert [c[0] for c in fake_hub.calls] == ["whoami", "create_repo", "upload_folder"]
    assert all(c[3] == "hf_test_token" for c in fake_hub.calls)  # HF_TOKEN, through huggingface_hub's handling
    _, args, kwargs, _ = fake_hub.calls[1]
    assert args == ("acme/vit-lr2",) and kwargs == {"private": True, "exist_ok": True, "repo_type": "model"}
    _, _, kwargs, _ = fake_hub.calls[2]
    assert kwargs["repo_id"] == "acme/vit-lr2" and kwargs["revision"] is None and kwargs["repo_type"] == "model"
    assert kwargs["commit_message"] == "lrc: low-rank vit_tiny_patch16_224, 2.02x fewer parameters"
    # exactly the files of the dry run, byte for byte (the card included: it is built from the file alone)
    assert fake_hub.uploaded == {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert sorted(fake_hub.uploaded) == dry.files == result.files
    assert result.commit_url == "https://huggingface.co/acme/vit-lr2/commit/abc1234" and result.commit == "abc1234"
    assert result.user == "alice" and result.revision == "main"


def test_push_to_a_branch_creates_it(checkpoint, fake_hub):
    push(checkpoint, "acme/vit-lr2", revision="v1", commit_message="release v1")
    assert [c[0] for c in fake_hub.calls] == ["whoami", "create_repo", "create_branch", "upload_folder"]
    assert fake_hub.calls[2][2] == {"branch": "v1", "exist_ok": True, "repo_type": "model"}
    assert fake_hub.calls[3][2]["revision"] == "v1" and fake_hub.calls[3][2]["commit_message"] == "release v1"


@pytest.mark.parametrize(("method", "error", "kind", "message"), [
    ("whoami", lambda: http_error(hf_errors.HfHubHTTPError, 401, "Invalid user token."), EnvironmentProblem,
     "the Hugging Face token is invalid or expired"),
    ("whoami", network_down, EnvironmentProblem, r"cannot reach the Hugging Face Hub \(\[Errno 101\] Network is "
                                                 r"unreachable\): check the network"),
    ("create_repo", lambda: http_error(hf_errors.HfHubHTTPError, 403, "You don't have the rights"), OutputError,
     r"'alice' may not write to acme/vit-lr2 \(You don't have the rights\): push to your own namespace "
     r"\(alice/vit-lr2\)"),
    ("upload_folder", lambda: http_error(hf_errors.RepositoryNotFoundError, 404), OutputError,
     r"acme/vit-lr2 does not exist or 'alice' cannot see it \(the repo exists; nothing was committed\)"),
    ("upload_folder", lambda: http_error(hf_errors.HfHubHTTPError, 500, "Internal Error"), OutputError,
     r"the Hub refused the upload of acme/vit-lr2 \(HTTP 500: Internal Error\)"),
])
def test_hub_failures_are_typed_errors(checkpoint, fake_hub, method, error, kind, message):
    fake_hub.fail[method] = error()
    with pytest.raises(kind, match=message):
        push(checkpoint, "acme/vit-lr2")
    sent = [c[0] for c in fake_hub.calls]
    assert sent[-1] == method and "upload_folder" not in sent[:-1]


def test_refused_before_anything_is_sent(checkpoint, fake_hub, monkeypatch, tmp_path):
    from huggingface_hub import constants

    with pytest.raises(UsageError, match="the repo id 'vit-lr2' is not ORG/NAME"):
        push(checkpoint, "vit-lr2")
    with pytest.raises(UsageError, match="not a valid Hub repo id"):
        push(checkpoint, "acme/vit lr2")
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(EnvironmentProblem, match="no Hugging Face token: run 'hf auth login' or set HF_TOKEN"):
        push(checkpoint, "acme/vit-lr2")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(EnvironmentProblem, match="HF_HUB_OFFLINE is set, so nothing can be uploaded: unset it, or "
                                                 "write the folder with dry_run DIR"):
        push(checkpoint, "acme/vit-lr2", token="hf_given")
    assert fake_hub.calls == []
