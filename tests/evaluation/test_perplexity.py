"""Perplexity of a causal LM (evaluation.perplexity, `lrc eval --data TEXT`): the WikiText-2 protocol checked
against transformers' own loss, windows and strides counted right, dense folders and lrc files scored by the same
command, and the bad inputs of issue 24 refused with one line."""

from __future__ import annotations

import json
import math

import pytest
import torch
from causal_fixtures import tokenizer, write_tiny_causal_lm, write_token_text
from helpers import error_lines, run_cli

import lowrank_cli
from lowrank_cli.data.token_windows import scoring_windows, token_stream, window_count
from lowrank_cli.errors import InputError
from lowrank_cli.evaluation.perplexity import evaluate_perplexity, perplexity

pytestmark = pytest.mark.usefixtures("one_thread")
L = 16


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppl")
    folder = write_tiny_causal_lm(root / "llama", "llama")
    return folder, write_token_text(root / "text.txt", 5 * L + 1 + 7)  # 5 windows and a tail of 7


def _hf_nll(model, ids: torch.Tensor, stride: int) -> tuple[float, int]:
    """transformers' loss with the labels of HF's "perplexity of fixed-length models" recipe: each window of L + 1
    tokens scores its last `trg` targets (-100 elsewhere)."""
    total, tokens, start = 0.0, 0, 0
    while start + L + 1 <= len(ids):
        window = ids[start:start + L + 1][None]
        trg = L if start == 0 else stride
        labels = window.clone()
        labels[:, :-trg] = -100
        with torch.no_grad():
            total += float(model(window, labels=labels).loss) * trg
        tokens, start = tokens + trg, start + stride
    return total, tokens


@pytest.mark.parametrize("stride", [L, 5])
def test_perplexity_is_transformers_loss_over_the_windows(lm, stride):
    folder, text = lm
    model = lowrank_cli.load_model(str(folder)).model
    ids = token_stream(text, tokenizer())
    assert len(ids) == 5 * L + 8
    result = perplexity(model, ids, seq_len=L, stride=stride, batch_size=3)
    nll, tokens = _hf_nll(model, ids, stride)
    windows = window_count(len(ids), L, stride)
    assert (result["windows"], result["tokens"]) == (windows, tokens)
    assert tokens == L + (windows - 1) * stride and windows == (5 if stride == L else (len(ids) - L - 1) // 5 + 1)
    assert result["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert 50 < result["perplexity"] < 1000  # a random model over 320 tokens: near the vocabulary size


def test_windows_cover_the_stream_without_overlap_at_stride_seq_len():
    ids = torch.arange(3 * L + 1)
    windows = list(scoring_windows(ids, length=L))
    assert [(int(x[0]), int(y[-1]), n) for x, y, n in windows] == [(0, L, L), (L, 2 * L, L), (2 * L, 3 * L, L)]
    assert all(torch.equal(y, x + 1) for x, y, _ in windows)


def test_dense_and_lrc_files_by_the_same_command(lm, tmp_path, capsys):
    folder, text = lm
    out = tmp_path / "llama_lr.safetensors"
    assert run_cli(["factorize", folder, "--ratio", "0.5", "--rank-multiple", "4", "-o", out], capsys)[0] == 0
    scores = {}
    for source in (folder, out):
        code, stdout, err = run_cli(["eval", source, "--data", text, "--seq-len", L, "--json"], capsys)
        assert code == 0, err
        scores[source] = json.loads(stdout)
        assert (scores[source]["tokens"], scores[source]["windows"], scores[source]["text_tokens"]) == (5 * L, 5, 88)
    api = evaluate_perplexity(lowrank_cli.load(out), text, tokenizer(), seq_len=L)
    assert scores[out]["perplexity"] == pytest.approx(api["perplexity"], rel=1e-6)
    assert scores[out]["perplexity"] != pytest.approx(scores[folder]["perplexity"], rel=1e-3)
    assert scores[out]["tokenizer"] == str(folder.resolve())  # found through the file's provenance
    code, stdout, _ = run_cli(["eval", out, "--data", text, "--seq-len", L], capsys)
    assert code == 0 and stdout.startswith("perplexity ") and "80 tokens scored in 5 windows of 16" in stdout


def test_jsonl_and_folders_of_text(lm, tmp_path):
    folder, text = lm
    model = lowrank_cli.load_model(str(folder)).model
    (tmp_path / "docs").mkdir()
    lines = text.read_text().split(" ")
    half = len(lines) // 2
    (tmp_path / "docs" / "a.jsonl").write_text(json.dumps({"text": " ".join(lines[:half])}) + "\n"
                                               + json.dumps({"text": " ".join(lines[half:])}) + "\n")
    one = evaluate_perplexity(model, tmp_path / "docs" / "a.jsonl", tokenizer(), seq_len=L)
    both = evaluate_perplexity(model, tmp_path / "docs", tokenizer(), seq_len=L)
    assert one == both and one["windows"] >= 4


@pytest.mark.parametrize("tokens", [0, 3])
def test_too_little_text(lm, tmp_path, capsys, tokens):
    folder, _ = lm
    short = tmp_path / "short.txt"
    short.write_text("") if tokens == 0 else write_token_text(short, tokens)
    with pytest.raises(InputError, match=rf"has {tokens} tokens; a window of seq_len {L} needs at least seq-len \+ 1"):
        evaluate_perplexity(lowrank_cli.load_model(str(folder)).model, short, tokenizer(), seq_len=L)
    code, stdout, err = run_cli(["eval", folder, "--data", short, "--seq-len", L], capsys)
    assert code == 3 and stdout == "" and len(error_lines(err)) == 1
    assert f"needs at least seq-len + 1 = {L + 1} tokens" in err and "--seq-len" in err


def test_images_for_a_causal_lm_and_a_tokenizer_too_big(lm, digits_folder, tmp_path, capsys):
    folder, text = lm
    code, stdout, err = run_cli(["eval", folder, "--data", digits_folder(8, 4)], capsys)
    assert code == 3 and stdout == "" and len(error_lines(err)) == 1
    assert "holds images" in err and "causal LM" in err and ".txt / .jsonl" in err
    small = write_tiny_causal_lm(tmp_path / "small", "llama", vocab=260)
    code, stdout, err = run_cli(["eval", small, "--data", text, "--seq-len", L], capsys)
    assert code == 3 and stdout == "" and len(error_lines(err)) == 1
    assert "but the model's vocabulary has 260 entries" in err and "tokenizer" in err
