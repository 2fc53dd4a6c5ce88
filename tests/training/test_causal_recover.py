"""Recovery of a factorized causal LM (issue 24): the text is one token stream in windows of `seq_len` tokens; the
loss is the hidden-state MSE per decoder layer and the token-level KL on the logits (on by default); held-out
perplexity is the tracked metric (lower is better) and picks the state kept; progressive works; a resumed run
(GPT-2: tied embeddings) ends where the uninterrupted one does; bad input is one Error: line."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from causal_fixtures import write_tiny_causal_lm, write_token_text
from helpers import error_lines, run_cli

import lowrank_cli
from lowrank_cli.errors import Interrupted
from lowrank_cli.compress.factorize_source import factorize_file
from lowrank_cli.models.pretrained import open_pretrained

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lms(tmp_path_factory):
    root = tmp_path_factory.mktemp("causal_recover")
    text = write_token_text(root / "text.txt", 2000)
    found = {"text": text, "root": root}
    for kind in ("llama", "gpt2"):
        folder = write_tiny_causal_lm(root / kind, kind)
        factorize_file(str(folder), str(root / f"{kind}_lr.safetensors"), kappa=3, rank_multiple=1)
        found[kind] = folder
    return found


def _recover(lms, kind, out, **kw):
    options = dict(steps=8, batch_size=8, lr=3e-3, seq_len=32, save_every=3, log_every=1, eval_every=4, seed=0,
                   device="cpu", warn=lambda msg: None)
    options.update(kw)
    student = kw.pop("student", None) or str(lms["root"] / f"{kind}_lr.safetensors")
    options.pop("student", None)
    return lowrank_cli.recover(student, str(lms[kind]), str(lms["text"]), output=out, **options)


def _perplexity(model, windows):
    """exp(mean next-token NLL) over the windows, computed here without lrc's helpers."""
    model.eval()
    with torch.no_grad():
        logits = model(windows[:, :-1], use_cache=False).logits.float()
    return math.exp(F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item())


def test_recover_a_llama_on_a_token_stream_tracks_held_out_perplexity(lms, tmp_path):
    result = _recover(lms, "llama", tmp_path / "r.safetensors")
    assert set(result.losses) == {"loss", "fd", "kd"}  # the KL is on by default for a causal LM
    assert result.losses["kd"]["last"] < result.losses["kd"]["first"]
    settings = result.settings
    assert settings["data_kind"] == "token stream" and settings["seq_len"] == 32 and settings["gamma"] == 1.0
    held = settings["held_out"]
    # 2000 tokens: 62 windows of 32, the last 6 held out (the auto share), 56 trained on
    assert held["samples"] == 6 and settings["train_images"] == 56 and held["metric"] == "val_perplexity"
    assert held["after"]["val_kd"] < held["before"]["val_kd"]
    from lowrank_cli.data.token_windows import token_stream
    from lowrank_cli.data.texts import load_tokenizer

    ids = token_stream(lms["text"], load_tokenizer(lms["llama"]))
    windows = ids[:62 * 32].view(62, 32)[-6:]
    teacher = open_pretrained(str(lms["llama"])).model
    assert held["teacher_perplexity"] == pytest.approx(_perplexity(teacher, windows), rel=1e-4)
    written = lowrank_cli.load(result.output)
    assert held["after"]["val_perplexity"] == pytest.approx(_perplexity(written, windows), rel=1e-4)
    lines = [json.loads(line) for line in result.metrics.read_text().splitlines()]
    scored = {line["step"]: line["val_perplexity"] for line in lines if "val_perplexity" in line}
    assert sorted(scored) == [4, 8]
    # the throughput counts token windows (of seq_len tokens), not images
    assert [line["windows"] for line in lines] == [8 * line["step"] for line in lines] and lines[-1]["windows"] == 64
    assert all(line["windows_per_s"] > 0 and not {"images_per_s", "images"} & set(line) for line in lines)
    assert result.images_seen == 64
    best = min(scored, key=scored.get)
    assert settings["kept"]["step"] == best and settings["kept"]["value"] == pytest.approx(scored[best])


def test_progressive_and_resume_on_gpt2_with_tied_embeddings(lms, tmp_path):
    whole = _recover(lms, "gpt2", tmp_path / "whole.safetensors", student=str(lms["gpt2"]), kappa=3,
                     rank_multiple=1, method="progressive", keep="last")
    assert whole.settings["method"] == "progressive" and "val_perplexity" in whole.settings["held_out"]["after"]
    out = tmp_path / "parts.safetensors"
    with pytest.raises(Interrupted, match="interrupted by request at step 4/8"):
        _recover(lms, "gpt2", out, student=str(lms["gpt2"]), kappa=3, rank_multiple=1, method="progressive",
                 keep="last", on_step=lambda step, m: step == 4)
    resumed = _recover(lms, "gpt2", out, student=str(lms["gpt2"]), kappa=3, rank_multiple=1, method="progressive",
                       keep="last", resume=True)
    assert resumed.resumed_from == 4
    from safetensors.torch import load_file

    a, b = load_file(str(whole.output)), load_file(str(out))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    model = lowrank_cli.load(out)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # still tied


def test_recover_cli_on_a_causal_lm_says_windows_and_tokens(lms, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    code, stdout, err = run_cli(["recover", lms["root"] / "llama_lr.safetensors", "--teacher", lms["llama"],
                                 "--data", lms["text"], "--steps", 2, "--batch-size", 4, "--seq-len", 32, "-o", out],
                                capsys)
    assert code == 0, err
    assert "2 x 4 windows" in stdout and "tokens seen" in stdout and "256 (windows of 32)" in stdout
    assert "val_perplexity" in stdout and "teacher perplexity" in stdout


def test_bad_input_for_a_causal_lm_recovery(lms, tmp_path, capsys):
    student = lms["root"] / "llama_lr.safetensors"
    images = tmp_path / "images" / "cat"
    images.mkdir(parents=True)
    from PIL import Image

    for i in range(4):
        Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(images / f"{i}.png")
    small_vocab = write_tiny_causal_lm(tmp_path / "small", "llama", vocab=200, tokenizer_files=False)
    model = open_pretrained(str(small_vocab)).model
    lowrank_cli.factorize(model, kappa=3, rank_multiple=1)
    lowrank_cli.save(model, tmp_path / "small_lr.safetensors")
    short = write_token_text(tmp_path / "short.txt", 20)
    cases = [
        (["--teacher", lms["llama"], "--data", tmp_path / "images"], "holds images but the teacher"),
        (["--teacher", small_vocab, "--tokenizer", lms["llama"], "--data", lms["text"]], "vocabulary has 200"),
        (["--teacher", lms["llama"], "--data", lms["text"], "--alpha", 0, "--gamma", 0], "nothing to learn"),
        (["--teacher", lms["llama"], "--data", short, "--seq-len", 32], "fewer than one window"),
        (["--teacher", lms["llama"], "--data", lms["text"], "--max-length", 32], "use --seq-len"),
    ]
    for i, (args, message) in enumerate(cases):
        who = tmp_path / "small_lr.safetensors" if "vocabulary" in message else student
        out = tmp_path / f"out{i}.safetensors"
        code, _, err = run_cli(["recover", who, *args, "--steps", 2, "--batch-size", 2, "-o", out], capsys)
        lines = error_lines(err)
        assert code != 0 and len(lines) == 1 and message in lines[0], (args, err)
        assert not out.exists() and not list(tmp_path.glob(f"out{i}*"))
