"""`lrc push` as a user runs it: a dry run then the real push (the Hub mocked at its network boundary), and
every failure the issue lists as one Error line with its exit code."""

from __future__ import annotations

import json

import pytest
from helpers import error_lines, hub_http_error, run_cli, write_lowrank_vit
from huggingface_hub import errors as hf_errors


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_lowrank_vit(tmp_path_factory.mktemp("ckpt") / "vit_lr.safetensors")


def test_dry_run_then_push(checkpoint, tmp_path, fake_hub, capsys):
    out = tmp_path / "out"
    code, stdout, err = run_cli(["push", checkpoint, "acme/vit-lr2", "--dry-run", out], capsys)
    assert code == 0, err
    assert stdout.strip() == (f"Wrote {out}/ (README.md, lrc_config.json, model.safetensors): nothing was uploaded. "
                              f"Check it with: lrc report local-dir:{out}")
    code, stdout, err = run_cli(["report", f"local-dir:{out}", "--json"], capsys)
    assert code == 0 and json.loads(stdout)["compression"]["params"] > 1.9
    code, stdout, err = run_cli(["push", checkpoint, "acme/vit-lr2", "--private", "--json"], capsys)
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["commit_url"] == "https://huggingface.co/acme/vit-lr2/commit/abc1234" and doc["user"] == "alice"
    assert doc["files"] == ["README.md", "lrc_config.json", "model.safetensors"] and doc["dry_run"] is None
    assert fake_hub.uploaded == {p.name: p.read_bytes() for p in out.iterdir()}
    assert "Pushing to acme/vit-lr2 as alice" in err


def test_failures(checkpoint, tmp_path, fake_hub, monkeypatch, capsys):
    from huggingface_hub import constants

    cases = [
        (["push", checkpoint, "vit-lr2"], 2, "Error: the repo id 'vit-lr2' is not ORG/NAME: write it like "
                                             "my-name/deit-base-lr2"),
        (["push", checkpoint, "acme/x", "--tokenizer", "t", "--no-tokenizer"], 2,
         "Error: --tokenizer and --no-tokenizer contradict each other: choose one"),
        (["push", tmp_path / "missing.safetensors", "acme/x"], 3,
         f"Error: '{tmp_path / 'missing.safetensors'}' does not exist: check the path (an lrc checkpoint on the Hub "
         "is written hf-hub:ORG/REPO)"),
    ]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    cases.append((["push", checkpoint, "acme/x", "--dry-run", tmp_path / "full"], 4,
                  f"Error: --dry-run folder '{tmp_path / 'full'}' exists and is not empty: pass --force to replace it, "
                  "or choose another folder"))
    for args, expected, line in cases:
        code, out, err = run_cli(args, capsys)
        assert (code, error_lines(err), out) == (expected, [line], ""), args
    fake_hub.fail["create_repo"] = hub_http_error(hf_errors.HfHubHTTPError, 403, "You don't have the rights")
    code, _, err = run_cli(["push", checkpoint, "other-org/vit-lr2"], capsys)
    assert code == 4 and error_lines(err) == [
        "Error: 'alice' may not write to other-org/vit-lr2 (You don't have the rights): push to your own namespace "
        "(alice/vit-lr2), or use a token with write access to other-org"]
    monkeypatch.delenv("HF_TOKEN")
    code, _, err = run_cli(["push", checkpoint, "acme/vit-lr2"], capsys)
    assert code == 6 and error_lines(err) == [
        "Error: no Hugging Face token: run 'hf auth login' or set HF_TOKEN (a token with write access, from "
        "https://huggingface.co/settings/tokens)"]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, _, err = run_cli(["push", checkpoint, "acme/vit-lr2"], capsys)
    assert code == 6 and error_lines(err) == [
        "Error: HF_HUB_OFFLINE is set, so nothing can be uploaded: unset it, or write the folder with --dry-run DIR "
        "and upload it later"]
    assert [c[0] for c in fake_hub.calls] == ["whoami", "create_repo"]  # only the 403 case got that far
