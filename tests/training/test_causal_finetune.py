"""Fine-tuning a factorized causal LM on plain text (issue 24): next-token training with LoRA / DoRA (peft) merged
back at the same ranks, full fine-tuning, the held-out perplexity tracked and the best state kept; `method` head and
a teacher are clear usage errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from causal_fixtures import write_tiny_causal_lm, write_token_text
from helpers import error_lines, run_cli

import lowrank_cli
from lowrank_cli.checkpoint.format import lowrank_ranks
from lowrank_cli.compress.factorize_source import factorize_file

pytestmark = pytest.mark.usefixtures("one_thread")
pytest.importorskip("peft")


@pytest.fixture(scope="module")
def lms(tmp_path_factory):
    root = tmp_path_factory.mktemp("causal_finetune")
    found = {"text": write_token_text(root / "text.txt", 2000, seed=3), "root": root}
    for kind in ("llama", "gpt2"):
        folder = write_tiny_causal_lm(root / kind, kind)
        factorize_file(str(folder), str(root / f"{kind}_lr.safetensors"), kappa=3, rank_multiple=1)
        found[kind] = folder
    return found


def _finetune(lms, kind, out, **kw):
    options = dict(steps=12, batch_size=8, lr=1e-2, seq_len=32, eval_every=6, seed=0, device="cpu",
                   warn=lambda msg: None)
    options.update(kw)
    return lowrank_cli.finetune(str(lms["root"] / f"{kind}_lr.safetensors"), str(lms["text"]), output=out, **options)


def _held_out_perplexity(model, lms, kind):
    from lowrank_cli.data.texts import load_tokenizer
    from lowrank_cli.data.token_windows import token_stream

    ids = token_stream(lms["text"], load_tokenizer(lms[kind]))
    windows = ids[:62 * 32].view(62, 32)[-6:]  # 62 windows of 32 tokens, the last 6 held out
    model.eval()
    with torch.no_grad():
        logits = model(windows[:, :-1], use_cache=False).logits.float()
    return math.exp(F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item())


@pytest.mark.parametrize("kind, method", [("llama", "lora"), ("gpt2", "dora")])
def test_next_token_finetune_merges_at_the_same_ranks_and_lowers_perplexity(lms, tmp_path, kind, method):
    result = _finetune(lms, kind, tmp_path / "ft.safetensors", method=method)
    scores, settings = result.scores, result.settings
    assert settings["task"] == "next-token" and settings["data_kind"] == "token stream"
    assert settings["train_samples"] == 56 and scores["samples"] == 6 and scores["metric"] == "val_perplexity"
    before, after = scores["before"]["val_perplexity"], scores["after"]["val_perplexity"]
    assert after < 0.9 * before, (before, after)  # a random model learns the text's token statistics at once
    lines = [json.loads(line) for line in result.metrics.read_text().splitlines()]
    assert lines[-1]["step"] == 12 and [line["windows"] for line in lines] == [8 * line["step"] for line in lines]
    assert all("windows_per_s" in line and not {"images_per_s", "images"} & set(line) for line in lines)
    source = lowrank_cli.load(lms["root"] / f"{kind}_lr.safetensors")
    written = lowrank_cli.load(result.output)
    assert lowrank_ranks(written) == lowrank_ranks(source) and lowrank_ranks(written)
    assert _held_out_perplexity(written, lms, kind) == pytest.approx(after, rel=1e-4)
    assert _held_out_perplexity(source, lms, kind) == pytest.approx(before, rel=1e-4)
    if kind == "gpt2":
        assert written.lm_head.weight.data_ptr() == written.transformer.wte.weight.data_ptr()


def test_full_finetune_of_a_causal_lm_trains_every_weight(lms, tmp_path):
    result = _finetune(lms, "llama", tmp_path / "full.safetensors", method="full", lr=1e-3, keep="last")
    assert result.trainable_share == 1.0
    assert result.scores["after"]["val_perplexity"] < result.scores["before"]["val_perplexity"]


def test_finetune_cli_on_a_causal_lm_and_its_usage_errors(lms, tmp_path, capsys):
    student = lms["root"] / "llama_lr.safetensors"
    out = tmp_path / "cli.safetensors"
    code, stdout, err = run_cli(["finetune", student, "--data", lms["text"], "--steps", 2, "--batch-size", 4,
                                 "--seq-len", 32, "-o", out], capsys)
    assert code == 0, err
    assert "next-token training" in stdout and "2 x 4 windows" in stdout and "val_perplexity" in stdout
    for i, (args, message) in enumerate([(["--method", "head"], "use lora, dora, rlrr or full"),
                                         (["--teacher", lms["llama"]], "leave out --teacher")]):
        bad = tmp_path / f"bad{i}.safetensors"
        code, _, err = run_cli(["finetune", student, "--data", lms["text"], *args, "--steps", 2, "-o", bad], capsys)
        lines = error_lines(err)
        assert code == 2 and len(lines) == 1 and message in lines[0], err
        assert not list(tmp_path.glob(f"bad{i}*"))


def test_next_token_finetune_of_gpt2_resumes_to_the_same_weights(lms, tmp_path):
    from safetensors.torch import load_file

    from lowrank_cli.errors import Interrupted

    whole = _finetune(lms, "gpt2", tmp_path / "whole.safetensors", save_every=3)
    out = tmp_path / "parts.safetensors"
    with pytest.raises(Interrupted, match="interrupted by request at step 5/12"):
        _finetune(lms, "gpt2", out, save_every=3, on_step=lambda step, m: step == 5)
    resumed = _finetune(lms, "gpt2", out, save_every=3, resume=True)
    assert resumed.resumed_from == 5
    a, b = load_file(str(whole.output)), load_file(str(out))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert resumed.scores["after"]["val_perplexity"] == pytest.approx(whole.scores["after"]["val_perplexity"],
                                                                      rel=1e-5)
