"""lrc checkpoint folders and Hub repos (lrc_config.json + model.safetensors) load wherever a MODEL is accepted,
from a Hugging Face cache laid out as huggingface_hub lays it out, offline; broken ones are refused clearly."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import error_lines, run_cli, write_lowrank_vit

import lowrank_cli
from lowrank_cli.errors import InputError
from lowrank_cli.models.sources import load_model
from lowrank_cli.publish.push import push

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def lrc_folder(tmp_path_factory):
    """A checkpoint and the folder lrc push would upload for it (written by its dry run)."""
    root = tmp_path_factory.mktemp("lrc")
    ckpt = write_lowrank_vit(root / "vit_lr.safetensors")
    push(ckpt, "acme/vit-lr2", dry_run=root / "folder")
    return ckpt, root / "folder"


def outputs(model):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(x)


def test_hub_repo_from_the_offline_cache(lrc_folder, hub_cache, capsys):
    ckpt, folder = lrc_folder
    commit = hub_cache("acme/vit-lr2", {p.name: p for p in folder.iterdir()}, commit=COMMIT)
    expected = outputs(lowrank_cli.load(ckpt))
    assert torch.equal(outputs(lowrank_cli.load("hf-hub:acme/vit-lr2")), expected)
    assert torch.equal(outputs(lowrank_cli.load("hf-hub:acme/vit-lr2", revision=commit)), expected)
    loaded = load_model(f"hf-hub:acme/vit-lr2@{commit}")
    assert loaded.source == {"kind": "hf-hub", "id": "acme/vit-lr2", "revision": commit}
    assert loaded.checkpoint.ranks == lowrank_cli.read_info(ckpt)[0].ranks and loaded.files is None
    code, out, err = run_cli(["report", "hf-hub:acme/vit-lr2", "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["source"]["kind"] == "hf-hub" and doc["source"]["revision"] == commit
    assert doc["params"]["total"] == sum(p.numel() for p in lowrank_cli.load(ckpt).parameters())
    # the compressed model is refused as a source for factorize, as an lrc file is
    code, _, err = run_cli(["factorize", "hf-hub:acme/vit-lr2", "-o", folder.parent / "x.safetensors"], capsys)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("Error: 'hf-hub:acme/vit-lr2' is already factorized (an "
                                                                 "lrc checkpoint with ")
    assert lines[0].endswith("low-rank layers): factorize its dense source model instead")


def test_not_cached_offline(lrc_folder, hub_cache, capsys):
    _, folder = lrc_folder
    hub_cache("acme/half", {"lrc_config.json": folder / "lrc_config.json"})  # the marker, not the weights
    with pytest.raises(InputError, match="model.safetensors of hf-hub:acme/half@.* is not in the Hugging Face cache "
                                         "and HF_HUB_OFFLINE is set"):
        lowrank_cli.load("hf-hub:acme/half")
    code, _, err = run_cli(["report", "hf-hub:acme/never-downloaded"], capsys)
    assert code == 3 and len(error_lines(err)) == 1 and "not in the Hugging Face cache" in err
    with pytest.raises(InputError, match="hf-hub:acme/never-downloaded is not an lrc checkpoint repo"):
        lowrank_cli.load("hf-hub:acme/never-downloaded")


def test_timm_repos_still_load_and_are_not_lrc_checkpoints(tiny_vit_folder, hub_cache):
    hub_cache("acme/tiny-vit", {"config.json": tiny_vit_folder / "config.json",
                                "model.safetensors": tiny_vit_folder / "model.safetensors"})
    assert load_model("hf-hub:acme/tiny-vit").checkpoint is None  # lrc_config.json not cached: config.json decides
    with pytest.raises(InputError, match="is not an lrc checkpoint repo .* load other models with "
                                         "lowrank_cli.load_model"):
        lowrank_cli.load("hf-hub:acme/tiny-vit")
    with pytest.raises(InputError, match="has no lrc_config.json: it is not an lrc checkpoint folder"):
        lowrank_cli.load(tiny_vit_folder)


def test_text_repo_brings_its_tokenizer(bert_folder, tmp_path, hub_cache):
    from lowrank_cli.compress.factorize_source import factorize_file
    from lowrank_cli.models.hub import tokenizer_folder

    ckpt = tmp_path / "bert_lr.safetensors"
    factorize_file(str(bert_folder), str(ckpt), kappa=2, device="cpu")
    push(ckpt, "acme/bert-lr2", dry_run=tmp_path / "folder")
    hub_cache("acme/bert-lr2", {p.name: p for p in (tmp_path / "folder").iterdir()})
    loaded = load_model("hf-hub:acme/bert-lr2")
    assert (tokenizer_folder(loaded) / "vocab.txt").read_bytes() == (bert_folder / "vocab.txt").read_bytes()


def broken(folder, tmp_path, name, **marker):
    copy = tmp_path / name
    copy.mkdir()
    for p in folder.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    doc = json.loads((folder / "lrc_config.json").read_text())
    (copy / "lrc_config.json").write_text(json.dumps({**doc, **marker}))
    return copy


def test_broken_folders_are_refused(lrc_folder, tmp_path, capsys):
    _, folder = lrc_folder
    newer = broken(folder, tmp_path, "newer", lrc_folder=2, lrc_version="9.0")
    with pytest.raises(InputError, match=r"written by lrc 9.0 \(folder layout 2\); this lrc reads layout <= 1: "
                                         "upgrade lrc"):
        lowrank_cli.load(newer)
    outside = broken(folder, tmp_path, "outside", checkpoint="../vit_lr.safetensors")
    with pytest.raises(InputError, match="names files outside its folder"):
        load_model(str(outside))
    missing = broken(folder, tmp_path, "missing", tokenizer=["vocab.txt"])
    with pytest.raises(InputError, match=r"lists tokenizer files it does not have \(vocab.txt\)"):
        load_model(f"local-dir:{missing}")
    (missing / "lrc_config.json").write_text("{")
    code, _, err = run_cli(["report", f"local-dir:{missing}"], capsys)
    assert code == 3 and error_lines(err)[0].startswith("Error: lrc_config.json of ") and "is not valid JSON" in err
    no_weights = broken(folder, tmp_path, "no-weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(InputError, match="has lrc_config.json but no model.safetensors"):
        lowrank_cli.load(f"local-dir:{no_weights}")
