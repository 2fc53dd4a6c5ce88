"""`lrc bench`'s ways (runtime x grouping, each model's fastest, the ratio best against best), `--runtime` and
`--group` in bench and eval, and `lrc bench --generate` on a causal LM. Speed is never asserted: the numbers that
could be wrong here are which rows exist and how the ratios are made from them."""

from __future__ import annotations

import json

import pytest
import torch
from causal_fixtures import write_tiny_causal_lm, write_token_text
from helpers import error_lines, run_cli

import lowrank_cli
from lowrank_cli.evaluation.bench_ways import Way, bench_ways, ways_for

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = ["--repeats", "2", "--warmup", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory, bert_folder):
    root = tmp_path_factory.mktemp("ways")
    model = lowrank_cli.load_model(str(bert_folder)).model
    lowrank_cli.factorize(model, kappa=2, rank_multiple=8, check_calls=False)
    lowrank_cli.save(model, root / "bert_lr.safetensors")
    return root / "bert_lr.safetensors", bert_folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("ways_lm")
    folder = write_tiny_causal_lm(root / "llama", "llama", hidden=64, heads=4, kv_heads=2, intermediate=128)
    model = lowrank_cli.load_model(str(folder)).model
    lowrank_cli.factorize(model, kappa=2, rank_multiple=8)
    lowrank_cli.save(model, root / "llama_lr.safetensors")
    return root / "llama_lr.safetensors", folder, write_token_text(root / "text.txt", 400)


def test_every_way_is_timed_and_the_fastest_are_compared_best_against_best(bert):
    lr, dense = bert
    models = {"lrc": lowrank_cli.load(lr, group=False), "dense": lowrank_cli.load_model(str(dense)).model}
    ways = ways_for("cpu", ["eager"], None, list(models.values()))
    assert ways == [Way("eager", False), Way("eager", True)]  # the lrc model has q/k/v groups: both ways
    rows = bench_ways(models, ways, device="cpu", batch_sizes=[2], input_size=(16,), reference="dense", repeats=2,
                      warmup=1, min_sample_s=0.001)
    timed = [r for r in rows if not r.fastest]
    assert [(r.model, r.grouped) for r in timed] == [("lrc", False), ("dense", False), ("lrc", True), ("dense", False)]
    best = {r.model: r for r in rows if r.fastest}
    assert set(best) == {"lrc", "dense"}
    for name, row in best.items():
        assert row.median_ms == min(r.median_ms for r in timed if r.model == name)
    assert best["lrc"].speedup == pytest.approx(best["dense"].median_ms / best["lrc"].median_ms)
    assert best["dense"].speedup == pytest.approx(1.0)
    assert ways_for("cpu", ["eager"], False, list(models.values())) == [Way("eager", False)]
    assert ways_for("cpu", ["eager"], None, [models["dense"]]) == [Way("eager", None)]  # nothing to group


def test_cli_bench_reports_grouped_ungrouped_and_the_fastest(bert, capsys):
    lr, dense = bert
    code, out, err = run_cli(["bench", str(lr), "--against", str(dense), "--device", "cpu", "--batch-size", "2",
                              "--seq-len", "16", *FAST, "--json"], capsys)
    assert code == 0, err
    rows = json.loads(out)["rows"]
    lrc = [r for r in rows if r["model"] == "bert_lr.safetensors"]
    assert {r["grouped"] for r in lrc if not r["fastest"]} == {False, True}
    assert sum(r["fastest"] for r in rows) == 2 and all(r["runtime"] == "eager" for r in rows)
    code, out, err = run_cli(["bench", str(lr), "--against", str(dense), "--device", "cpu", "--batch-size", "2",
                              "--seq-len", "16", *FAST, "--no-group", "--json"], capsys)
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert len(rows) == 2 and not any(r["grouped"] or r["fastest"] for r in rows)


@pytest.mark.parametrize("command", ["bench", "eval"])
def test_runtime_graphs_on_the_cpu_is_one_usage_error(bert, tmp_path, capsys, command):
    lr, _ = bert
    extra = ["--data", str(tmp_path)] if command == "eval" else []
    code, out, err = run_cli([command, str(lr), *extra, "--device", "cpu", "--runtime", "graphs"], capsys)
    lines = error_lines(err)
    assert code == 2 and out == "" and len(lines) == 1
    assert "--runtime graphs" in lines[0] and "CUDA device" in lines[0]


def test_eval_perplexity_is_the_same_grouped_ungrouped_and_compiled(llama, capsys):
    lr, folder, text = llama
    scores = {}
    for way in (["--no-group"], ["--group"], ["--runtime", "compile"]):
        code, out, err = run_cli(["eval", str(lr), "--data", str(text), "--device", "cpu", "--seq-len", "32",
                                  "--tokenizer", str(folder), "--json", *way], capsys)
        assert code == 0, err
        scores[" ".join(way)] = json.loads(out)["perplexity"]
    assert scores["--group"] == pytest.approx(scores["--no-group"], rel=1e-5)
    assert scores["--runtime compile"] == pytest.approx(scores["--no-group"], rel=1e-4)


def test_group_on_a_model_without_groups_is_a_note(tiny_vit_folder, capsys):
    code, out, err = run_cli(["bench", str(tiny_vit_folder), "--device", "cpu", "--batch-size", "1", *FAST,
                              "--group", "--json"], capsys)
    assert code == 0, err
    assert "runs ungrouped" in err and "Error" not in err and json.loads(out)["rows"]


def test_bench_generate_times_prefill_and_decode_of_both_models(llama, capsys):
    lr, dense, _ = llama
    code, out, err = run_cli(["bench", str(lr), "--against", str(dense), "--device", "cpu", "--generate", "4",
                              "--batch-size", "1,2", "--seq-len", "8", "--repeats", "2", "--threads", "1", "--json"],
                             capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["runtime"] == "eager" and doc["new_tokens"] == 4 and doc["prompt_tokens"] == 8
    rows = doc["rows"]
    assert [(r["model"], r["batch_size"]) for r in rows] == [("llama_lr.safetensors", 1), ("llama", 1),
                                                            ("llama_lr.safetensors", 2), ("llama", 2)]
    for r in rows:
        assert r["cache"] == "dynamic" and r["prefill_ms"] > 0 and len(r["decode_samples_ms"]) == 2
        assert r["decode_tokens_per_s"] == pytest.approx(r["batch_size"] * 1e3 / r["decode_ms_per_token"], rel=1e-3)
        ref = next(x for x in rows if x["model"] == "llama" and x["batch_size"] == r["batch_size"])
        assert r["decode_speedup"] == pytest.approx(ref["decode_ms_per_token"] / r["decode_ms_per_token"], rel=1e-2)
    assert rows[0]["grouped"] and not rows[1]["grouped"]


def test_bench_generate_without_seq_len_fits_the_prompt_to_the_models_positions(llama, capsys):
    # The tiny model's default input length is all of its 128 positions: the default prompt leaves room for the
    # new tokens instead of running past them.
    lr, dense, _ = llama
    code, out, err = run_cli(["bench", str(lr), "--against", str(dense), "--device", "cpu", "--generate", "5",
                              "--batch-size", "1", "--repeats", "1", "--threads", "1", "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["prompt_tokens"] == 128 - 5 and all(r["prompt_tokens"] == 123 for r in doc["rows"])


def test_bench_generate_refuses_a_prompt_and_new_tokens_past_the_positions(llama, capsys):
    lr, dense, _ = llama
    code, out, err = run_cli(["bench", str(lr), "--against", str(dense), "--device", "cpu", "--generate", "10",
                              "--seq-len", "120", "--threads", "1"], capsys)
    expected = ("Error: a prompt of 120 tokens and 10 new ones need 130 positions, and 'llama_lr.safetensors' has "
                "128: lower --seq-len or --generate")
    assert code == 2 and out == "" and error_lines(err) == [expected]


def test_bench_generate_refuses_a_model_that_does_not_generate(bert, capsys):
    lr, _ = bert
    code, out, err = run_cli(["bench", str(lr), "--device", "cpu", "--generate", "4"], capsys)
    expected = ("Error: --generate times a causal LM's decoding, and 'bert_lr.safetensors' is not one (it has no KV "
                "cache to fill): leave --generate out to time its forward pass")
    assert code == 2 and out == "" and error_lines(err) == [expected]


def test_greedy_generation_is_the_same_grouped_and_not(llama):
    lr, _, _ = llama
    prompt = torch.randint(0, 300, (2, 6), generator=torch.Generator().manual_seed(1))
    tokens = []
    for group in (False, True):
        model = lowrank_cli.load(lr, group=group)
        with torch.no_grad():
            tokens.append(model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                         do_sample=False, pad_token_id=0))
    assert torch.equal(tokens[0], tokens[1])


@pytest.mark.parametrize("columns", [None, "80"])
def test_bench_generate_table_is_whole_off_a_terminal(llama, capsys, monkeypatch, columns):
    # stdout captured (a pipe, a CI log, which may export COLUMNS=80): rich's 80 columns cut every cell to "ba…",
    # "dyna…" and dropped the model column; off a terminal the table is printed at its natural width
    lr, dense, _ = llama
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    code, out, err = run_cli(["bench", str(lr), "--against", str(dense), "--device", "cpu", "--generate", "2",
                              "--batch-size", "1", "--seq-len", "8", "--repeats", "1", "--threads", "1"], capsys)
    assert code == 0, err
    assert "…" not in out
    header = next(line for line in out.splitlines() if line.lstrip().startswith("model"))
    assert header.split() == ["model", "batch", "cache", "prefill", "ms", "decode", "ms/step", "tokens/s", "prefill",
                              "speed-up", "decode", "speed-up"]
    assert len(header.rstrip()) > 80  # wider than rich's fallback: the table was not squeezed into it
    rows = {line.split()[0]: line.split() for line in out.splitlines() if " dynamic " in line}
    assert set(rows) == {"llama_lr.safetensors", "llama"}
    assert rows["llama_lr.safetensors"][1:4] == ["(grouped)", "1", "dynamic"]
    assert rows["llama"][1:4] == ["(ref)", "1", "dynamic"] and rows["llama"][-2:] == ["1.00x", "1.00x"]
    assert "lrc bench --generate on" in out and "prompt 8 tokens, 2 new (greedy)" in out


def test_bench_table_is_whole_off_a_terminal(llama, capsys, monkeypatch):
    # the forward-pass table (no --generate) goes through the same console (console.out): whole off a terminal
    lr, dense, _ = llama
    monkeypatch.setenv("COLUMNS", "50")
    code, out, err = run_cli(["bench", str(lr), "--against", str(dense), "--device", "cpu", "--batch-size", "1",
                              "--seq-len", "8", "--group", *FAST], capsys)
    assert code == 0, err
    assert "…" not in out
    header = next(line for line in out.splitlines() if line.lstrip().startswith("model"))
    assert header.split() == ["model", "mode", "batch", "median", "ms", "p10-p90", "ms", "img/s", "speed-up", "MAC",
                              "ratio"]
    rows = {line.split()[0]: line.split() for line in out.splitlines() if " eager" in line}
    assert rows["llama_lr.safetensors"][1:4] == ["eager,", "grouped", "1"]
    assert rows["llama"][1:4] == ["(ref)", "eager", "1"] and rows["llama"][-2:] == ["1.00x", "1.00x"]
