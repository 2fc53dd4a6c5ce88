"""The folder `lrc push` uploads, as `push(..., dry_run=DIR)` writes it: exactly these files, loadable by
`lowrank_cli.load` and `lrc report local-dir:`, written whole or not at all; a text model's tokenizer found."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_cli, write_lowrank_vit

import lowrank_cli
from lowrank_cli.errors import InputError, OutputError, UsageError
from lowrank_cli.publish import folder as folder_module
from lowrank_cli.publish.push import push


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_lowrank_vit(tmp_path_factory.mktemp("ckpt") / "vit_lr.safetensors")


def test_dry_run_folder_loads_back_and_reports_the_same(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    result = push(checkpoint, "acme/vit-lr2", dry_run=out)
    assert result.files == ["README.md", "lrc_config.json", "model.safetensors"] == sorted(p.name for p in out.iterdir())
    assert result.commit_url is None and result.dry_run == out
    assert (out / "model.safetensors").read_bytes() == checkpoint.read_bytes()  # the checkpoint, byte for byte
    marker = json.loads((out / "lrc_config.json").read_text())
    assert marker == {"lrc_folder": 1, "checkpoint": "model.safetensors", "library": "timm",
                      "architecture": "vit_tiny_patch16_224", "lrc_version": lowrank_cli.__version__, "tokenizer": []}
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(lowrank_cli.load(f"local-dir:{out}")(x), lowrank_cli.load(checkpoint)(x))
        assert torch.equal(lowrank_cli.load(out)(x), lowrank_cli.load(checkpoint)(x))
    code, from_folder, err = run_cli(["report", f"local-dir:{out}", "--json"], capsys)
    assert code == 0, err
    code, from_file, _ = run_cli(["report", checkpoint, "--json"], capsys)
    folder_doc, file_doc = json.loads(from_folder), json.loads(from_file)
    assert folder_doc["source"]["kind"] == "local-dir" and folder_doc["source"]["id"] == str(out.resolve())
    assert folder_doc["source"]["sha256"] == file_doc["source"]["sha256"]
    for key in ("params", "macs", "compression", "layers", "dense_reference"):
        assert folder_doc[key] == file_doc[key]
    assert "acme/vit-lr2" in (out / "README.md").read_text()


def test_an_existing_folder_is_kept_unless_forced(checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(OutputError, match="exists and is not empty: pass force=True"):
        push(checkpoint, "acme/vit-lr2", dry_run=out)
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    push(checkpoint, "acme/vit-lr2", dry_run=out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "lrc_config.json", "model.safetensors"]
    empty = tmp_path / "empty"
    empty.mkdir()
    push(checkpoint, "acme/vit-lr2", dry_run=empty)  # an empty folder is filled
    assert len(list(empty.iterdir())) == 3
    with pytest.raises(OutputError, match="the parent of dry_run .* does not exist"):
        push(checkpoint, "acme/vit-lr2", dry_run=tmp_path / "no" / "such")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file: give a folder name"):
        push(checkpoint, "acme/vit-lr2", dry_run=tmp_path / "file")


def test_a_failed_write_leaves_the_old_folder_and_no_debris(checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "out"
    push(checkpoint, "acme/vit-lr2", dry_run=out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = folder_module.stage_folder

    def fail_half_way(card, folder, tokenizer):
        real(card, folder, tokenizer)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(folder_module, "stage_folder", fail_half_way)
    with pytest.raises(OutputError, match="cannot write the folder .*No space left on device"):
        push(checkpoint, "acme/other", dry_run=out, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left behind
    with pytest.raises(OutputError):
        push(checkpoint, "acme/other", dry_run=tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_a_text_model_goes_with_its_tokenizer(bert_folder, tmp_path):
    from lowrank_cli.compress.factorize_source import factorize_file

    ckpt = tmp_path / "bert_lr.safetensors"
    factorize_file(str(bert_folder), str(ckpt), kappa=2, device="cpu")
    out = tmp_path / "out"
    result = push(ckpt, "acme/bert-lr2", dry_run=out)  # found in the source folder the checkpoint records
    tokenizer = ["tokenizer.json", "tokenizer_config.json", "vocab.txt"]
    assert result.files == sorted(["README.md", "lrc_config.json", "model.safetensors", *tokenizer])
    assert json.loads((out / "lrc_config.json").read_text())["tokenizer"] == tokenizer
    for name in tokenizer:
        assert (out / name).read_bytes() == (bert_folder / name).read_bytes()
    loaded = lowrank_cli.load_model(f"local-dir:{out}")
    assert loaded.files == str(out)  # recover / factorize --calib find the tokenizer next to the checkpoint
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(out))(["the water"], return_tensors="pt")
    assert loaded.model(**ids).logits.shape == (1, 3)
    again = push(f"local-dir:{out}", "acme/bert-lr2", dry_run=tmp_path / "again")  # an lrc folder keeps its own
    assert again.files == result.files
    bare = push(ckpt, "acme/bert-lr2", dry_run=tmp_path / "bare", tokenizer=False)
    assert "vocab.txt" not in bare.files
    assert "no tokenizer: use the original model's" in (tmp_path / "bare" / "README.md").read_text()


def test_tokenizer_errors(bert_folder, checkpoint, tmp_path):
    from lowrank_cli.compress.factorize_source import factorize_file

    source = tmp_path / "bert"
    source.mkdir()
    for name in ("config.json", "model.safetensors"):
        (source / name).write_bytes((bert_folder / name).read_bytes())
    ckpt = tmp_path / "bert_lr.safetensors"
    factorize_file(str(source), str(ckpt), kappa=2, device="cpu")
    with pytest.raises(InputError, match=r"is a text model and the tokenizer of its source .* was not found: pass "
                                         r"tokenizer DIR .* or tokenizer=False"):
        push(ckpt, "acme/bert-lr2", dry_run=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    result = push(ckpt, "acme/bert-lr2", dry_run=tmp_path / "out", tokenizer=str(bert_folder))
    assert "vocab.txt" in result.files
    with pytest.raises(InputError, match="tokenizer .* has no tokenizer files"):
        push(ckpt, "acme/bert-lr2", dry_run=tmp_path / "x", tokenizer=str(source))
    with pytest.raises(UsageError, match="tokenizer is for text models"):
        push(checkpoint, "acme/vit-lr2", dry_run=tmp_path / "x", tokenizer=str(bert_folder))


def test_dry_run_of_a_sharded_checkpoint_is_one_loadable_file(tmp_path, capsys):
    """Seam stream x push: a --max-shard-size output (its index) used to be hard-linked as model.safetensors, a
    JSON file no reader opens; the folder now holds the shards joined, with the same lrc record."""
    from causal_fixtures import write_tiny_causal_lm
    from safetensors import safe_open

    source = write_tiny_causal_lm(tmp_path / "llama", "llama", hidden=64, intermediate=128)
    code, _, err = run_cli(["factorize", str(source), "-o", str(tmp_path / "lr.safetensors"), "--stream",
                            "--max-shard-size", "40KB", "--no-progress"], capsys)
    assert code == 0, err
    index = tmp_path / "lr.safetensors.index.json"
    assert len(list(tmp_path.glob("lr-*-of-*.safetensors"))) > 1
    out = tmp_path / "out"
    result = push(index, "acme/llama-lr", dry_run=out)
    assert "model.safetensors" in result.files
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata()["lrc.ranks"] == json.loads(index.read_text())["metadata"]["lrc.ranks"]
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(lowrank_cli.load(out)(ids).logits, lowrank_cli.load(index)(ids).logits)
