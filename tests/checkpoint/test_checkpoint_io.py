"""The lrc checkpoint: round trip from the file alone, metadata, validation, atomic writes."""

import json
import os
from pathlib import Path

import pytest
import timm.data
import torch
from helpers import make_tiny_vit
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lowrank_cli
from lowrank_cli import checkpoint
from lowrank_cli.errors import InputError, OutputError
from lowrank_cli.layers.lowrank_linear import LowRankLinear


@pytest.fixture(scope="module")
def factorized(tmp_path_factory):
    model = make_tiny_vit()
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6), "crop_pct": 0.8}
    result = lowrank_cli.factorize(model, kappa=2, rank_multiple=8, rank_pattern=[r"blocks\.0\.mlp\.fc1=16"])
    path = tmp_path_factory.mktemp("ckpt") / "tiny_lr.safetensors"
    lowrank_cli.save(model, path)
    return model, result, path


def test_save_load_gives_identical_logits(factorized):
    model, _, path = factorized
    loaded = lowrank_cli.load(path)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert not loaded.training
    assert isinstance(loaded.blocks[0].mlp.fc1, LowRankLinear) and loaded.blocks[0].mlp.fc1.rank == 16
    assert "rank=16" in repr(loaded.blocks[0].mlp.fc1)


def test_metadata_describes_the_model(factorized):
    model, result, path = factorized
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    assert meta["lrc.schema"] == str(checkpoint.SCHEMA)
    assert meta["lrc.version"] == lowrank_cli.__version__
    assert meta["lrc.architecture"] == "vit_tiny_patch16_224"
    assert json.loads(meta["lrc.model_args"])["num_classes"] == 10
    ranks = json.loads(meta["lrc.ranks"])
    assert ranks == {r.name: r.rank for r in result.layers}
    layers = json.loads(meta["lrc.layers"])
    assert layers["blocks.0.mlp.fc1"]["rank"] == 16 and 0 < layers["blocks.0.mlp.fc1"]["kept_energy"] < 1
    spectra = json.loads(meta["lrc.spectra"])
    assert len(spectra["blocks.0.mlp.fc1"]) == 192 and spectra["blocks.0.mlp.fc1"][0] == 1.0
    prov = json.loads(meta["lrc.provenance"])
    assert prov["kappa"] == 2 and prov["rank_multiple"] == 8 and prov["svd"] == "exact"


def test_pretrained_cfg_survives_the_round_trip(factorized):
    model, _, path = factorized
    loaded = lowrank_cli.load(path)
    got = timm.data.resolve_data_config({}, model=loaded)
    # the size the model was built with (timm's own pretrained_cfg would still say 224)
    assert tuple(got["input_size"]) == (3, 32, 32)
    assert tuple(got["mean"]) == (0.1, 0.2, 0.3) and tuple(got["std"]) == (0.4, 0.5, 0.6)
    assert got["crop_pct"] == 0.8


def _rewrite(src, dst, *, meta_update=None, drop=None):
    tensors = load_file(str(src))
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    meta.update(meta_update or {})
    for key in drop or []:
        tensors.pop(key)
    save_file(tensors, str(dst), metadata=meta)


def test_ranks_are_checked_against_tensor_shapes_before_loading(factorized, tmp_path, monkeypatch):
    _, _, path = factorized
    ranks = checkpoint.read_info(path)[0].ranks
    ranks["blocks.0.mlp.fc1"] = 24
    bad = tmp_path / "bad_ranks.safetensors"
    _rewrite(path, bad, meta_update={"lrc.ranks": json.dumps(ranks)})
    # nothing may be read from the file before the shapes are known to fit
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: pytest.fail("tensors loaded before the check"))
    with pytest.raises(InputError, match=r"blocks\.0\.mlp\.fc1\.first\.weight \(16, 192\) vs \(24, 192\)"):
        lowrank_cli.load(bad)


def test_strict_loading_names_missing_tensors(factorized, tmp_path):
    _, _, path = factorized
    bad = tmp_path / "missing.safetensors"
    _rewrite(path, bad, drop=["head.bias"])
    with pytest.raises(InputError, match=r"1 missing key\(s\) \(head.bias\)"):
        lowrank_cli.load(bad)


def test_corrupt_truncated_and_foreign_files(factorized, tmp_path):
    _, _, path = factorized
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="not a readable safetensors file.*truncated or corrupt"):
        lowrank_cli.load(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(InputError, match="not a readable safetensors file"):
        lowrank_cli.load(garbage)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(InputError, match="without lrc metadata"):
        lowrank_cli.load(plain)
    with pytest.raises(InputError, match="does not exist"):
        lowrank_cli.load(tmp_path / "nope.safetensors")


def test_newer_schema_and_broken_metadata_are_refused(factorized, tmp_path):
    _, _, path = factorized
    newer = tmp_path / "newer.safetensors"
    _rewrite(path, newer, meta_update={"lrc.schema": str(checkpoint.SCHEMA + 1)})
    with pytest.raises(InputError, match="upgrade lrc"):
        lowrank_cli.load(newer)
    broken = tmp_path / "broken.safetensors"
    _rewrite(path, broken, meta_update={"lrc.ranks": "{not json"})
    with pytest.raises(InputError, match="lrc.ranks' is not valid JSON"):
        lowrank_cli.load(broken)


def test_interrupted_write_leaves_the_old_file_or_none(factorized, tmp_path, monkeypatch):
    model, _, path = factorized
    real_write = Path.write_bytes

    def half_then_interrupt(self, data):
        if ".tmp-" not in self.name:  # the test's own writes
            return real_write(self, data)
        real_write(self, data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_bytes", half_then_interrupt)
    out = tmp_path / "new.safetensors"
    with pytest.raises(KeyboardInterrupt):
        lowrank_cli.save(model, out)
    assert list(tmp_path.iterdir()) == []  # no output, no temporary file
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(path.read_bytes())
    with pytest.raises(KeyboardInterrupt):
        lowrank_cli.save(model, existing, force=True)
    assert existing.read_bytes() == path.read_bytes()  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.safetensors"]


def test_output_checks(factorized, tmp_path):
    model, _, path = factorized
    with pytest.raises(OutputError, match="exists: pass force=True"):
        lowrank_cli.save(model, path, force=False)
    with pytest.raises(OutputError, match="does not exist: create"):
        lowrank_cli.save(model, tmp_path / "no" / "such" / "x.safetensors")
    with pytest.raises(OutputError, match="is a folder"):
        lowrank_cli.save(model, tmp_path)


def test_save_dtype_and_plain_timm_model(tmp_path):
    model = make_tiny_vit()
    path = lowrank_cli.save(model, tmp_path / "dense.safetensors", dtype=torch.bfloat16)
    loaded = lowrank_cli.load(path)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert not any(isinstance(m, LowRankLinear) for m in loaded.modules())
