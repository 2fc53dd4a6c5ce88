"""Decoder-only LMs (models.families.hf_causal_lm): eight transformers families are claimed, factorized in their
decoder layers only, saved, loaded to the same logits and generate the same tokens; GPT-2's Conv1D is the linear
it is (checked against an independent SVD); tied embeddings stay one tensor; remote code never runs."""

from __future__ import annotations

import json

import pytest
import torch
from causal_fixtures import CAUSAL_LM_TYPES, write_remote_code_lm, write_tiny_causal_lm
from safetensors import safe_open

import lowrank_cli
from lowrank_cli.compress.plan import pela_rank
from lowrank_cli.errors import InputError
from lowrank_cli.layers.lowrank_linear import LowRankLinear
from lowrank_cli.models.families import family_of, family_of_config, input_spec
from lowrank_cli.models.families.base import read_config_json

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.randint(0, 319, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("causal")
    return {t: write_tiny_causal_lm(root / t, t) for t in CAUSAL_LM_TYPES}


@pytest.mark.parametrize("model_type", CAUSAL_LM_TYPES)
def test_each_family_factorizes_its_decoder_layers_and_reloads(folders, model_type, tmp_path):
    folder = folders[model_type]
    assert family_of_config(read_config_json(folder)).name == "hf_causal_lm"
    loaded = lowrank_cli.load_model(str(folder))
    model = loaded.model
    assert family_of(model).name == "hf_causal_lm" and loaded.spec.family == "hf_causal_lm"
    assert input_spec(model).tokens and input_spec(model).size == (128,)
    dense = logits(model)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    stack = family_of(model).layer_stack(model)
    expected = {n: pela_rank(m.in_features, m.out_features, 2.0, 4) for n, m in linears.items()
                if n.startswith(stack + ".")}
    result = lowrank_cli.factorize(model, kappa=2, rank_multiple=4)
    assert {r.name: r.rank for r in result.layers} == expected  # every decoder-layer linear, nothing else
    assert not isinstance(model.lm_head, LowRankLinear) and not isinstance(model.get_input_embeddings(), LowRankLinear)
    compressed = logits(model)
    assert not torch.allclose(compressed, dense, atol=1e-3)  # the factorization changed the model
    out = tmp_path / "lr.safetensors"
    lowrank_cli.save(model, out)
    again = lowrank_cli.load(out)
    torch.testing.assert_close(logits(again), compressed, rtol=0, atol=1e-5)
    assert type(again).__name__ == type(model).__name__ and family_of(again).name == "hf_causal_lm"


def test_gqa_keys_and_values_are_smaller_and_q_k_v_gate_up_read_one_input(folders):
    model = lowrank_cli.load_model(str(folders["llama"])).model
    attention = model.model.layers[0].self_attn
    assert (attention.q_proj.out_features, attention.k_proj.out_features, attention.v_proj.out_features) == (32, 16, 16)
    groups = family_of(model).shared_input_groups(model)
    layer = "model.layers.{}.{}"
    assert groups == [g for i in range(2) for g in (
        [layer.format(i, f"self_attn.{n}") for n in ("q_proj", "k_proj", "v_proj")],
        [layer.format(i, f"mlp.{n}") for n in ("gate_proj", "up_proj")])]
    for fused in ("gpt2", "phi3", "gpt_neox"):  # one linear for q/k/v already
        m = lowrank_cli.load_model(str(folders[fused])).model
        assert family_of(m).shared_input_groups(m) == []


def test_gpt2_matches_an_independent_svd_of_each_conv1d(folders):
    """The evidence of issue 24: each factorized Conv1D is the rank-r truncated SVD of its weight (in x out),
    transposed, computed here with torch.linalg.svd on the model transformers loads."""
    import transformers

    reference = transformers.AutoModelForCausalLM.from_pretrained(folders["gpt2"]).eval()
    convs = {n: m for n, m in reference.named_modules() if type(m).__name__ == "Conv1D"}
    assert len(convs) == 8 and {n.rsplit(".", 1)[-1] for n in convs} == {"c_attn", "c_proj", "c_fc"}
    ids = IDS
    dense = logits(reference, ids)
    model = lowrank_cli.load_model(str(folders["gpt2"])).model
    torch.testing.assert_close(logits(model, ids), dense, rtol=0, atol=1e-5)  # Conv1D -> nn.Linear changes nothing
    result = lowrank_cli.factorize(model, kappa=2, rank_multiple=1)
    ranks = {r.name: r.rank for r in result.layers}
    assert set(ranks) == set(convs)
    with torch.no_grad():
        for name, conv in convs.items():
            w = conv.weight.double()  # (in, out): the linear's weight is its transpose
            rank = pela_rank(w.shape[0], w.shape[1], 2.0, 1)
            assert ranks[name] == rank
            u, s, vh = torch.linalg.svd(w.T, full_matrices=False)
            conv.weight.copy_(((u[:, :rank] * s[:rank]) @ vh[:rank]).T.float())
            layer = model.get_submodule(name)
            assert isinstance(layer, LowRankLinear) and layer.rank == rank
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_type", ["gpt2", "opt"])
def test_tied_embeddings_stay_one_tensor_stored_once(folders, model_type, tmp_path):
    model = lowrank_cli.load_model(str(folders[model_type])).model
    embedding = model.get_input_embeddings()
    assert model.lm_head.weight is embedding.weight  # as transformers ties them
    lowrank_cli.factorize(model, kappa=2, rank_multiple=4)
    out = tmp_path / "tied.safetensors"
    lowrank_cli.save(model, out)
    with safe_open(str(out), framework="pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys  # one copy, as save_pretrained writes it
    again = lowrank_cli.load(out)
    assert again.lm_head.weight is again.get_input_embeddings().weight
    torch.testing.assert_close(logits(again), logits(model), rtol=0, atol=1e-5)


def test_untied_lm_head_is_stored_and_stays_its_own(folders, tmp_path):
    model = lowrank_cli.load_model(str(folders["llama"])).model
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    lowrank_cli.factorize(model, kappa=2, rank_multiple=4)
    lowrank_cli.save(model, tmp_path / "x.safetensors")
    again = lowrank_cli.load(tmp_path / "x.safetensors")
    assert again.lm_head.weight is not again.get_input_embeddings().weight
    torch.testing.assert_close(again.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)


def test_a_loaded_lrc_llama_generates_the_tokens_of_the_factorized_model(folders, tmp_path):
    model = lowrank_cli.load_model(str(folders["llama"])).model
    lowrank_cli.factorize(model, kappa=2, rank_multiple=4)
    lowrank_cli.save(model, tmp_path / "llama_lr.safetensors")
    loaded = lowrank_cli.load(tmp_path / "llama_lr.safetensors")
    prompt = IDS[:1, :5]
    expected = model.generate(prompt, max_new_tokens=6, do_sample=False)
    got = loaded.generate(prompt, max_new_tokens=6, do_sample=False)
    assert got.shape == (1, 11) and torch.equal(got, expected)
    assert loaded.generation_config.use_cache  # generation still caches; only lrc's own forwards do not


def test_kv_cache_bytes_from_the_config(folders):
    for model_type, kv_heads in (("llama", 2), ("gpt2", 4), ("opt", 4)):
        model = lowrank_cli.load_model(str(folders[model_type])).model
        # layers x (keys, values) x key/value heads x head size x 4 bytes (float32)
        assert family_of(model).kv_cache_bytes_per_token(model) == 2 * 2 * kv_heads * 8 * 4


def test_a_model_made_elsewhere_is_prepared_by_factorize(folders):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folders["gpt2"]).eval()
    assert model.config.use_cache
    result = lowrank_cli.factorize(model, kappa=2, rank_multiple=4)
    assert len(result.layers) == 8 and not model.config.use_cache
    assert model(IDS).past_key_values is None  # tracers reject cache objects


def test_remote_code_is_refused_and_never_runs(tmp_path, capsys):
    from helpers import error_lines, run_cli

    remote = write_remote_code_lm(tmp_path / "remote")
    out = tmp_path / "x.safetensors"
    code, _, err = run_cli(["factorize", remote, "-o", out], capsys)
    assert code == 3 and len(error_lines(err)) == 1
    assert "auto_map" in err and "never runs" in err and "tiny_remote" in err
    with pytest.raises(InputError, match="needs remote code"):
        lowrank_cli.load_model(str(remote))
    # A model type transformers has itself is built with transformers' own class: the repository's code never runs
    known = write_remote_code_lm(tmp_path / "known", known_type=True)
    assert type(lowrank_cli.load_model(str(known)).model).__name__ == "LlamaForCausalLM"
    assert not out.exists() and not (remote / "REMOTE_CODE_RAN").exists() and not (known / "REMOTE_CODE_RAN").exists()


def test_encoder_configs_stay_the_encoders(bert_folder, tmp_path):
    assert family_of_config(read_config_json(bert_folder)).name == "hf_encoder"
    for cfg, name in (({"model_type": "bert"}, "hf_encoder"), ({"model_type": "llama"}, "hf_causal_lm"),
                      ({"architectures": ["BertForMaskedLM"], "model_type": "bert"}, "hf_encoder"),
                      ({"architectures": ["BertLMHeadModel"], "model_type": "bert"}, "hf_causal_lm"),
                      ({"architecture": "vit_tiny_patch16_224"}, "timm_vision")):
        assert family_of_config(cfg).name == name, cfg
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))  # no architectures: the LM class
    assert family_of_config(read_config_json(tmp_path)).name == "hf_causal_lm"
