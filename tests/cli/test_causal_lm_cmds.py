"""Causal LMs through the commands (issue 24): `factorize --ratio` on a GQA Llama gives the rule's ranks and the
report states the ratio asked and achieved; `report` counts prefill and one decoded token with its KV cache;
`--target-macs`, `card` and `push --dry-run` run on them; a model with nothing to factorize is an error; every bad
input is one `Error:` line with its exit code, and nothing is written."""

from __future__ import annotations

import json

import pytest
from causal_fixtures import write_tiny_causal_lm, write_token_text
from helpers import error_lines, make_tiny_vit, run_cli

from lowrank_cli.compress.plan import pela_rank

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmds")
    folder = write_tiny_causal_lm(root / "llama", "llama", hidden=64, heads=4, kv_heads=2, intermediate=128)
    return folder, write_token_text(root / "calib.txt", 600)


# Llama with hidden 64, 4 heads of 16, 2 key/value heads, MLP 128: (d_in, d_out) of each linear of a layer
SHAPES = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (64, 32), "self_attn.v_proj": (64, 32),
          "self_attn.o_proj": (64, 64), "mlp.gate_proj": (64, 128), "mlp.up_proj": (64, 128),
          "mlp.down_proj": (128, 64)}


@pytest.mark.parametrize("multiple", [1, 8])
def test_ratio_gives_the_rules_ranks_and_the_report_says_asked_and_achieved(llama, tmp_path, capsys, multiple):
    folder, _ = llama
    out = tmp_path / "lr.safetensors"
    code, stdout, err = run_cli(["factorize", folder, "--ratio", "0.4", "--rank-multiple", multiple, "-o", out,
                                 "--json"], capsys)
    assert code == 0, err
    ranks = {r["name"]: r["rank"] for r in json.loads(stdout)["layers"]}
    # R = 1 - 1/kappa: r = floor(d_in d_out (1 - R) / (d_in + d_out)), rounded down to the multiple
    expected = {f"model.layers.{i}.{n}": (int(d_in * d_out * 0.6 / (d_in + d_out)) // multiple) * multiple
                for i in range(2) for n, (d_in, d_out) in SHAPES.items()}
    assert ranks == expected
    assert ranks == {n: pela_rank(*SHAPES[n.split(".", 3)[3]], 1 / 0.6, multiple) for n in ranks}
    if multiple == 1:
        assert ranks["model.layers.0.self_attn.k_proj"] == 12 and ranks["model.layers.0.mlp.down_proj"] == 25
    dense = 2 * sum(d_in * d_out for d_in, d_out in SHAPES.values())
    removed = 2 * sum(d_in * d_out - ranks[f"model.layers.0.{n}"] * (d_in + d_out)
                      for n, (d_in, d_out) in SHAPES.items())
    code, stdout, err = run_cli(["report", out, "--json"], capsys)
    assert code == 0, err
    ratio = json.loads(stdout)["ratio"]
    assert ratio["asked"] == pytest.approx(0.4) and ratio["kappa_asked"] == pytest.approx(1 / 0.6)
    assert (ratio["target_params"], ratio["removed"]) == (dense, removed)
    assert ratio["achieved"] == pytest.approx(removed / dense) and ratio["achieved"] >= 0.4
    assert ratio["kappa_achieved"] == pytest.approx(dense / (dense - removed))
    code, stdout, _ = run_cli(["report", out], capsys)
    assert f"{100 * removed / dense:.1f} % of the target layers' parameters removed" in stdout
    assert "asked 40.0 %, kappa 1.67" in stdout


def test_report_counts_prefill_and_one_decoded_token_with_its_cache(llama, tmp_path, capsys):
    folder, _ = llama
    out = tmp_path / "lr.safetensors"
    assert run_cli(["factorize", folder, "--kappa", "2", "--rank-multiple", "4", "-o", out], capsys)[0] == 0
    code, stdout, err = run_cli(["report", out, "--seq-len", "32", "--context-len", "100", "--json"], capsys)
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["model"]["input_size"] == [32] and not doc["macs"]["uncounted"]
    decode = doc["decode"]
    layers, heads, head_dim = 2, 4, 16
    assert decode["context"] == 100
    assert decode["attention_macs_per_token"] == layers * heads * 100 * 2 * head_dim  # q.k and attn.v over 100 keys
    assert decode["kv_cache_bytes_per_token"] == layers * 2 * 2 * head_dim * 4  # 2 key/value heads, float32
    assert decode["kv_cache_bytes"] == 100 * decode["kv_cache_bytes_per_token"]
    lowrank = [r for r in doc["layers"] if r["kind"] == "lowrank"]
    per_token = sum(r["macs"] for r in doc["layers"]) // 32  # every linear sees each token once
    linear_saving = sum(r["dense_macs"] - r["macs"] for r in lowrank) // 32
    assert decode["macs_per_token"] - decode["attention_macs_per_token"] >= per_token  # + norms
    assert decode["dense_macs_per_token"] - decode["macs_per_token"] == linear_saving
    code, stdout, err = run_cli(["report", out, "--context-len", "129"], capsys)
    assert code == 2 and "--context-len must be between 1 and the model's 128 positions" in err
    code, stdout, _ = run_cli(["report", out], capsys)
    assert "decode" in stdout and "KV cache" in stdout and "per token" in stdout


def test_target_macs_card_and_push_dry_run(llama, tmp_path, capsys):
    folder, text = llama
    code, stdout, err = run_cli(["report", folder, "--seq-len", "32", "--json"], capsys)
    dense_macs = json.loads(stdout)["macs"]["total"]
    out = tmp_path / "macs.safetensors"
    code, _, err = run_cli(["factorize", folder, "--target-macs", str(int(0.8 * dense_macs)), "--seq-len", "32",
                            "--calib", text, "--calib-samples", "4", "-o", out], capsys)
    assert code == 0, err
    code, stdout, err = run_cli(["report", out, "--seq-len", "32", "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["macs"]["total"] <= 0.8 * dense_macs
    code, _, err = run_cli(["card", out, "-o", tmp_path / "README.md"], capsys)
    assert code == 0, err
    assert "LlamaForCausalLM" in (tmp_path / "README.md").read_text()
    code, _, err = run_cli(["push", out, "me/llama-lr", "--dry-run", tmp_path / "repo"], capsys)
    assert code == 0, err
    assert {"README.md", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "repo").iterdir()}


@pytest.mark.parametrize("args, code, message", [
    (["--ratio", "0"], 2, "--ratio must be in (0, 1) (the fraction of the target layers' parameters removed), got 0"),
    (["--ratio", "1"], 2, "--ratio must be in (0, 1)"),
    (["--ratio", "1.5"], 2, "--ratio must be in (0, 1)"),
    (["--ratio", "0.4", "--kappa", "2"], 2, "--ratio and --kappa both set every layer's ratio"),
    (["--ratio", "0.4", "--budget", "0.5"], 2, "--budget allocates the ranks per layer, --ratio gives"),
    (["--calib-mode", "sequential"], 2, "--calib-mode applies to the --calib data"),
    (["--calib", "{text}", "--calib-mode", "sequential", "--budget", "0.5"], 2, "use --calib-mode parallel"),
    (["--calib", "{text}", "--seq-len", "64", "--tokenizer", "{small}"], 3, "reach id"),
    (["--rank-multiple", "64"], 2, "every target layer's rank is too small to save parameters"),
])
def test_bad_inputs(llama, tmp_path, capsys, args, code, message):
    folder, text = llama
    small = tmp_path / "small"
    if "{small}" in args:  # a tokenizer whose ids a smaller model's vocabulary does not have: the model is small
        folder = write_tiny_causal_lm(small, "llama", vocab=260)
        args = [a.replace("{small}", str(folder)) for a in args]
    args = [a.replace("{text}", str(text)) for a in args]
    out = tmp_path / "out" / "x.safetensors"
    out.parent.mkdir()
    got, stdout, err = run_cli(["factorize", folder, *args, "-o", out], capsys)
    assert (got, stdout) == (code, "") and len(error_lines(err)) == 1, err
    assert message in err
    assert list(out.parent.iterdir()) == []


def test_sequential_on_a_model_without_decoder_layers(tiny_vit_folder, digits_folder, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    code, _, err = run_cli(["factorize", tiny_vit_folder, "--calib", digits_folder(32, 2), "--calib-mode",
                            "sequential", "-o", out], capsys)
    assert code == 2 and len(error_lines(err)) == 1 and not out.exists()
    assert "has no repeated decoder layers: use --calib-mode parallel" in err


def test_nothing_to_factorize_is_an_error_naming_what_was_looked_for(tmp_path, capsys):
    import timm
    from timm.models import save_for_hf

    for name in ("resnet18", "convnext_atto"):
        folder = tmp_path / name
        save_for_hf(timm.create_model(name, pretrained=False, num_classes=4), str(folder), safe_serialization=True)
        out = tmp_path / f"{name}.safetensors"
        code, stdout, err = run_cli(["factorize", folder, "-o", out], capsys)
        assert code == 3 and stdout == "" and len(error_lines(err)) == 1 and not out.exists()
        assert "(timm_vision) has no layer to factorize: found no nn.Linear inside repeated blocks" in err
        assert "--include" in err
    vit = tmp_path / "vit"
    save_for_hf(make_tiny_vit(), str(vit), safe_serialization=True)
    code, _, err = run_cli(["factorize", vit, "--exclude", ".*", "-o", tmp_path / "v.safetensors"], capsys)
    assert code == 2 and "--exclude leaves none of the target layers" in err
