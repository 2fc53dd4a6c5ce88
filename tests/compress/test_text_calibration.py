"""Data-aware factorization of a text encoder, pinned against an independent computation of what it should use.

A quality figure such as the embedding cosine of a compressed all-MiniLM-L6-v2 (benchmarks/minilm_quality.py)
moves silently when the calibration path changes: which texts are read, where they are truncated, whether padding
goes into the statistic, which statistic reaches the truncation. Here the statistic is recomputed one text at a time
(no padding at all) with transformers alone, and every factorized layer must be the whitened truncation of it (the
whitening itself, its jitter and fallbacks, is checked against Eckart-Young in test_whitened_svd.py).
"""

import pytest
import torch
from hf_fixtures import corpus_sentences, write_sentence_transformers

import lowrank_cli
from lowrank_cli.compress.whitened_svd import data_aware_factors

SAMPLES = 40  # of the file's 70 texts: two batches of calibrate's 32, the second cut at 8
MAX_TOKENS = 64  # the tiny model's max_position_embeddings, where lrc truncates


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    # No dropout and weights large enough that the layers matter (a sentence-transformers folder, as MiniLM's).
    return write_sentence_transformers(tmp_path_factory.mktemp("st") / "tiny-st", seed=3, dropout=0.0,
                                       initializer_range=0.2)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    lines = corpus_sentences(70, seed=5)
    lines[3] = " ".join(corpus_sentences(12, seed=6))  # longer than MAX_TOKENS: truncated
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, lines


def reference_moments(folder, lines: list[str], names: list[str], *,
                      padded: bool = False) -> tuple[dict[str, torch.Tensor], int]:
    """sum x x^T (float64) of each named linear's inputs over the real tokens of the first SAMPLES texts, each
    text run alone and truncated at MAX_TOKENS; and the token count. `padded`: the texts in one batch, padding
    tokens counted too (the mistake the test must catch)."""
    import transformers

    model = transformers.BertModel.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    sums = {n: torch.zeros(model.get_submodule(n).in_features, model.get_submodule(n).in_features,
                           dtype=torch.float64) for n in names}

    def hook_for(name):
        def hook(module, args):
            x = args[0].reshape(-1, module.in_features).double()
            sums[name].addmm_(x.T, x)
        return hook

    hooks = [model.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    tokens = 0
    with torch.no_grad():
        for chunk in [lines[:SAMPLES]] if padded else lines[:SAMPLES]:
            batch = tokenizer(chunk, truncation=True, max_length=MAX_TOKENS, padding=True, return_tensors="pt")
            model(**batch)
            tokens += batch["input_ids"].numel()
    for h in hooks:
        h.remove()
    return sums, tokens


def test_whitened_factors_are_those_of_the_real_tokens_of_the_first_texts(encoder, texts):
    path, lines = texts
    model = lowrank_cli.load_model(str(encoder)).model
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    result = lowrank_cli.factorize(model, kappa=2, rank_multiple=1, calib=str(path), calib_samples=SAMPLES,
                                   tokenizer=str(encoder))
    names = [layer.name for layer in result.layers]
    # the inputs of q/k/v and fc1 come from a LayerNorm with zero shift (a random BERT): C is singular there
    assert len(names) == 12 and all(layer.method.startswith("whitened/cholesky") for layer in result.layers)
    sums, tokens = reference_moments(encoder, lines, names)
    assert result.extra["calibration"]["samples"] == SAMPLES
    assert result.extra["calibration"]["tokens"] == tokens  # padding left out, the long text cut at MAX_TOKENS
    for layer in result.layers:
        got = model.get_submodule(layer.name)
        approx = (got.second.weight @ got.first.weight).double()
        first, second, _ = data_aware_factors(dense[layer.name], sums[layer.name], layer.rank)
        want = second @ first
        # batched with padding vs one text at a time: the same statistic up to float32 rounding
        assert (approx - want).norm() / want.norm() < 1e-4, layer.name


@pytest.mark.parametrize("mistake", ["padding counted", "the last texts"])
def test_the_pin_is_tight_enough_to_see_a_changed_statistic(encoder, texts, mistake):
    """The check above can fail: padding in the statistic, or other texts, give factors far outside its 1e-4."""
    _, lines = texts
    name = "encoder.layer.1.output.dense"
    weight = lowrank_cli.load_model(str(encoder)).model.get_submodule(name).weight.detach()
    ours, _ = reference_moments(encoder, lines, [name])
    wrong, _ = (reference_moments(encoder, lines, [name], padded=True) if mistake == "padding counted"
                else reference_moments(encoder, lines[-SAMPLES:], [name]))
    a, b = (data_aware_factors(weight, c[name], 8) for c in (ours, wrong))
    assert (a[1] @ a[0] - b[1] @ b[0]).norm() / (a[1] @ a[0]).norm() > 1e-2
