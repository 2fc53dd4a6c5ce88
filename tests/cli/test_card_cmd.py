"""`lrc card` as a user runs it: the card on stdout or in a file, and each bad input as one Error line."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import error_lines, run_cli, write_lowrank_vit
from huggingface_hub import ModelCard


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_lowrank_vit(tmp_path_factory.mktemp("ckpt") / "vit_lr.safetensors")


def test_card_on_stdout_and_in_a_file(checkpoint, tmp_path, capsys):
    code, out, err = run_cli(["card", checkpoint, "--repo-id", "acme/vit-lr2"], capsys)
    assert code == 0, err
    card = ModelCard(out)  # stdout holds the card and nothing else
    assert card.data.library_name == "lowrank-cli" and card.data.license == "apache-2.0"
    assert 'lowrank_cli.load("hf-hub:acme/vit-lr2")' in card.text
    target = tmp_path / "README.md"
    code, out, err = run_cli(["card", checkpoint, "--repo-id", "acme/vit-lr2", "-o", target], capsys)
    assert code == 0 and out == "" and f"Wrote {target}" in err
    assert ModelCard.load(target).content == card.content  # the same card, deterministic


def test_bad_inputs(checkpoint, tmp_path, tiny_vit_folder, capsys):
    target = tmp_path / "README.md"
    target.write_text("mine")
    cases = [
        (["card", checkpoint, "-o", target], 4,
         f"Error: output '{target}' exists: pass --force to overwrite it, or choose another name"),
        (["card", checkpoint, "--repo-id", "vit-lr2"], 2,
         "Error: the repo id 'vit-lr2' is not ORG/NAME: write it like my-name/deit-base-lr2"),
        (["card", tiny_vit_folder / "model.safetensors"], 3,
         f"Error: '{tiny_vit_folder / 'model.safetensors'}' is not an lrc checkpoint (a safetensors file without lrc "
         "metadata): write one with lrc factorize MODEL -o FILE.safetensors"),
        (["card", tiny_vit_folder], 3,
         f"Error: folder '{tiny_vit_folder}' has no lrc_config.json: it is not an lrc checkpoint folder (lrc push "
         "--dry-run DIR writes one); load other models with lowrank_cli.load_model"),
        (["card", checkpoint, "--bench", tmp_path / "nope.json"], 3,
         f"Error: --bench '{tmp_path / 'nope.json'}' does not exist: write it with lrc bench CHECKPOINT --json > FILE"),
        (["card", checkpoint, "--eval", tmp_path / "nope.json"], 3,
         f"Error: --eval '{tmp_path / 'nope.json'}' does not exist: write it with lrc eval CHECKPOINT --data DIR "
         "--json > FILE"),
    ]
    for args, expected_code, line in cases:
        code, out, err = run_cli(args, capsys)
        assert (code, error_lines(err)) == (expected_code, [line]), args
        assert out == ""
    assert target.read_text() == "mine"


def test_unknown_license_is_a_warning(bert_folder, tmp_path, capsys):
    code, _, err = run_cli(["factorize", bert_folder, "--kappa", "2", "-o", tmp_path / "b.safetensors"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["card", tmp_path / "b.safetensors"], capsys)
    assert code == 0 and "license" not in ModelCard(out).data.to_dict()
    assert "Warning: no license is known for the source model: pass --license (e.g. apache-2.0)" in " ".join(
        err.split())
    assert Path(tmp_path / "b.safetensors").is_file()
