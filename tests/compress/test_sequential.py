"""Sequential calibration (compress.sequential): decoder layer i is truncated on the inputs that layers 0..i-1,
already compressed, give; the result equals doing it by hand layer by layer with full forward passes, differs from
the one-pass (parallel) calibration, and holds one layer's hidden states; the calibration text is cut into seeded
windows of `seq_len` tokens; bad combinations are refused before any work."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from causal_fixtures import write_tiny_causal_lm, write_token_text
from hf_fixtures import write_corpus

import lowrank_cli
from lowrank_cli.compress.calibration import calibration_windows, collect_second_moments, data_aware_factor_fn
from lowrank_cli.errors import InputError, UsageError
from lowrank_cli.layers.lowrank_linear import LowRankLinear

pytestmark = pytest.mark.usefixtures("one_thread")
SEQ, WINDOWS = 32, 6


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("seq")
    return write_tiny_causal_lm(root / "llama", "llama", layers=3), write_token_text(root / "calib.txt", 400)


def _factorize(model, text, folder, **kw):
    return lowrank_cli.factorize(model, kappa=2, rank_multiple=4, calib=str(text), calib_samples=WINDOWS,
                                 tokenizer=str(folder), input_size=(SEQ,), **kw)


def _layer_names(model, i):
    prefix = f"model.layers.{i}."
    return [n for n, m in model.named_modules() if n.startswith(prefix) and isinstance(m, torch.nn.Linear)]


def test_sequential_equals_layer_by_layer_by_hand(llama):
    folder, text = llama
    model = lowrank_cli.load_model(str(folder)).model
    by_hand = copy.deepcopy(model)
    targets = [_layer_names(model, i) for i in range(3)]
    windows = calibration_windows(model, text, samples=WINDOWS, seq_len=SEQ, tokenizer=str(folder))
    assert windows.shape == (WINDOWS, SEQ)
    logs = []
    result = _factorize(model, text, folder, log=logs.append)
    assert result.extra["calibration"]["mode"] == "sequential"  # the causal LMs' default
    assert result.extra["calibration"]["samples"] == WINDOWS and result.extra["calibration"]["tokens"] == WINDOWS * SEQ
    held = WINDOWS * SEQ * 32 * 4  # windows x tokens x hidden x float32: one layer's inputs, whatever the depth
    assert result.extra["calibration"]["held_bytes"] == held and "hidden states entering each decoder layer" in logs[0]
    for names in targets:  # each layer on a full forward of the model whose earlier layers are compressed already
        stats = collect_second_moments(by_hand, names, [windows], device="cpu")
        lowrank_cli.factorize(by_hand, kappa=2, rank_multiple=4, include=[re.escape(n) for n in names],
                              factor_fn=data_aware_factor_fn(stats), check_calls=False)
    ids = windows[:2]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, by_hand(ids).logits, rtol=0, atol=1e-5)
    assert all(isinstance(model.get_submodule(n), LowRankLinear) for names in targets for n in names)


def test_parallel_calibrates_every_layer_on_the_dense_model(llama):
    folder, text = llama
    sequential, parallel = (lowrank_cli.load_model(str(folder)).model for _ in range(2))
    _factorize(sequential, text, folder)
    result = _factorize(parallel, text, folder, calib_mode="parallel")
    assert result.extra["calibration"]["mode"] == "parallel"
    first = "model.layers.0.self_attn.q_proj"
    last = "model.layers.2.mlp.down_proj"
    # layer 0 sees the same inputs either way; later layers see what the compressed layers before them give
    torch.testing.assert_close(sequential.get_submodule(first).first.weight,
                               parallel.get_submodule(first).first.weight, rtol=0, atol=1e-6)
    gap = (sequential.get_submodule(last).first.weight - parallel.get_submodule(last).first.weight).abs().max()
    assert gap > 1e-4


def test_windows_are_seeded_and_refuse_ids_beyond_the_vocabulary(llama, tmp_path):
    folder, text = llama
    model = lowrank_cli.load_model(str(folder)).model
    a = calibration_windows(model, text, samples=4, seq_len=16, tokenizer=str(folder))
    b = calibration_windows(model, text, samples=4, seq_len=16, tokenizer=str(folder))
    assert torch.equal(a, b) and len({tuple(w.tolist()) for w in a}) == 4
    small = write_tiny_causal_lm(tmp_path / "small", "llama", vocab=260)  # the tokenizer's merges go up to 319
    with pytest.raises(InputError, match=r"reach id 3\d\d, but the model's vocabulary has 260 entries"):
        _factorize(lowrank_cli.load_model(str(small)).model, text, small)
    with pytest.raises(InputError, match="fewer than one window"):
        calibration_windows(model, write_token_text(tmp_path / "short.txt", 10), samples=2, seq_len=16,
                            tokenizer=str(folder))


def test_refusals_before_any_work(llama, bert_folder, tmp_path):
    folder, text = llama
    model = lowrank_cli.load_model(str(folder)).model
    with pytest.raises(UsageError, match="calib_mode applies to the calib data: add calib PATH"):
        lowrank_cli.factorize(model, kappa=2, calib_mode="sequential")
    with pytest.raises(UsageError, match="calib_mode sequential needs each layer's rank .*: use calib_mode parallel"):
        lowrank_cli.factorize(model, budget=0.5, calib=str(text), calib_mode="sequential")
    with pytest.raises(UsageError, match="is not one of sequential, parallel"):
        lowrank_cli.factorize(model, kappa=2, calib=str(text), calib_mode="both")
    bert = lowrank_cli.load_model(str(bert_folder)).model
    corpus = write_corpus(tmp_path / "corpus.txt", 16)
    with pytest.raises(UsageError, match="has no repeated decoder layers: use calib_mode parallel"):
        lowrank_cli.factorize(bert, kappa=2, rank_multiple=1, calib=str(corpus), tokenizer=str(bert_folder),
                              calib_mode="sequential")
    assert not any(isinstance(m, LowRankLinear) for m in bert.modules())


def test_a_budget_calibrates_in_one_pass_by_default(llama):
    folder, text = llama
    model = lowrank_cli.load_model(str(folder)).model
    result = lowrank_cli.factorize(model, budget=0.5, rank_multiple=4, calib=str(text), calib_samples=WINDOWS,
                                   tokenizer=str(folder), input_size=(SEQ,))
    assert result.extra["calibration"]["mode"] == "parallel" and result.layers
