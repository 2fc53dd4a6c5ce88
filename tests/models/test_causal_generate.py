"""`lowrank_cli.load` of a causal lrc file gives a model whose `generate()` works (issue 24): at full rank (every
target factorized at rank min(d_in, d_out), the product is W) greedy decoding gives the dense model's tokens, with
GPT-2's tied embeddings and a GQA Llama; at kappa 2 it runs; the source's generation settings come back."""

from __future__ import annotations

import json

import pytest
import torch
from causal_fixtures import write_tiny_causal_lm

import lowrank_cli
from lowrank_cli.compress.factorize_source import factorize_file
from lowrank_cli.compress.plan import LayerPlan, Plan
from lowrank_cli.layers.lowrank_linear import LowRankLinear
from lowrank_cli.models.pretrained import open_pretrained
from lowrank_cli.models.structure import select_targets

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = torch.tensor([[5, 17, 42, 99, 3], [250, 1, 7, 7, 64]])


def _greedy(model, new=12):
    with torch.no_grad():
        return model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=new, do_sample=False,
                              min_new_tokens=new)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_at_full_rank_gives_the_dense_tokens(tmp_path, kind):
    folder = write_tiny_causal_lm(tmp_path / kind, kind)
    dense = open_pretrained(str(folder)).model.eval()
    model = open_pretrained(str(folder)).model
    layers = []
    for name in select_targets(model):
        linear = model.get_submodule(name)
        d_in, d_out = linear.in_features, linear.out_features
        layers.append(LayerPlan(name, d_in, d_out, min(d_in, d_out), "full rank"))
    lowrank_cli.factorize(model, plan=Plan(layers))
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == len(layers) > 0
    lowrank_cli.save(model, tmp_path / "full.safetensors")
    loaded = lowrank_cli.load(tmp_path / "full.safetensors")
    assert not loaded.config.use_cache and loaded.generation_config.use_cache  # generate() keeps its KV cache
    expected, found = _greedy(dense), _greedy(loaded)
    assert found.shape == (2, PROMPT.shape[1] + 12)
    assert torch.equal(found, expected)
    if kind == "gpt2":
        assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()


def test_generate_at_kappa_2_runs_with_the_sources_generation_settings(tmp_path):
    folder = write_tiny_causal_lm(tmp_path / "llama", "llama")
    settings = json.loads((folder / "generation_config.json").read_text())
    settings.update(max_new_tokens=7, eos_token_id=[319, 5])
    (folder / "generation_config.json").write_text(json.dumps(settings))
    factorize_file(str(folder), str(tmp_path / "lr.safetensors"), kappa=2, rank_multiple=1)
    loaded = lowrank_cli.load(tmp_path / "lr.safetensors")
    assert loaded.generation_config.max_new_tokens == 7 and loaded.generation_config.eos_token_id == [319, 5]
    assert any(isinstance(m, LowRankLinear) for m in loaded.modules())
    out = _greedy(loaded, new=9)
    assert out.shape == (2, PROMPT.shape[1] + 9) and int(out.max()) < loaded.config.vocab_size
    with torch.no_grad():  # greedy: the first new token is the argmax of the prompt's last logits
        first = loaded(PROMPT, use_cache=False).logits[:, -1].argmax(-1)
    assert torch.equal(out[:, PROMPT.shape[1]], first)
