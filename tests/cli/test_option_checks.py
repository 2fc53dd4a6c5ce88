"""Option values checked at the CLI edge (cli/options.py and each command's conflicts): a value that cannot work,
or an option that another makes useless, is a usage error (exit 2, one Error: line) before anything is loaded or
written; the values that do work reach the library as it expects them."""

import json

import pytest
from helpers import error_lines, run_cli

from lowrank_cli.cli import console

# (command, arguments, a piece of the one Error: line). {model} is a real model, {data} an existing folder, {out}
# the output file: each case would run without its bad part, so the refusal is the option's.
BAD = [
    ("factorize", ["--plan", "speed", "--plan-batch-size", "0"], "--plan-batch-size"),
    ("factorize", ["--plan-batch-size", "2"], "--plan-batch-size is the batch that --plan speed times"),
    ("factorize", ["--plan-dtype", "bf16"], "--plan-dtype is the precision"),
    ("factorize", ["--no-plan-fused"], "--plan-fused / --no-plan-fused say how --plan speed times"),
    ("factorize", ["--calib", "{data}", "--calib-samples", "0"], "--calib-samples"),
    ("factorize", ["--calib-samples", "8"], "--calib-samples applies to the --calib data"),
    ("factorize", ["--tokenizer", "{data}"], "--tokenizer applies to the --calib data"),
    ("factorize", ["--kappa", "1"], "kappa must be a number > 1"),
    ("factorize", ["--kappa", "0.5"], "kappa must be a number > 1"),
    ("factorize", ["--kappa", "nan"], "kappa must be a number > 1"),
    ("factorize", ["--kappa", "inf"], "kappa must be a number > 1"),
    ("factorize", ["--budget", "0.5", "--kappa", "3"], "--budget allocates the ranks per layer, --kappa"),
    ("factorize", ["--target-macs", "9G", "--kappa", "2"], "--target-macs allocates the ranks per layer, --kappa"),
    ("factorize", ["--budget", "0.5", "--target-macs", "9G"], "--budget and --target-macs"),
    ("factorize", ["--budget", "0.5", "--rank-pattern", r"blocks\.0\.attn\.qkv=8"], "--rank-pattern"),
    ("factorize", ["--budget", "-0.5"], "--budget must be in (0, 1)"),
    ("factorize", ["--target-macs", "0"], "--target-macs must be at least 1"),
    ("factorize", ["--plan", "fast"], "--plan 'fast' is not one of pela, speed"),
    ("factorize", ["--svd", "qr"], "--svd 'qr' is not one of exact, randomized"),
    ("factorize", ["--calib", "{data}", "--svd", "randomized"], "--svd does not apply"),
    ("factorize", ["--library", "keras"], "--library 'keras' is not one of auto, timm, transformers"),
    ("factorize", ["--dtype", "int8"], "--dtype 'int8' is not one of fp32, bf16, fp16, fp64"),
    ("factorize", ["--plan", "speed", "--plan-dtype", "fp8"], "--plan-dtype 'fp8' is not one of fp32"),
    ("factorize", ["--rank-multiple", "0"], "--rank-multiple '0' is not a whole number >= 1 or auto"),
    ("factorize", ["--rank-multiple", "many"], "--rank-multiple 'many'"),
    ("factorize", ["--device", "gpu"], "--device 'gpu' is not one of auto, cpu, cuda or cuda:N"),
    ("factorize", ["--seq-len", "0"], "--seq-len"),
    ("recover", ["--steps", "0"], "--steps"),
    ("recover", ["--epochs", "0"], "--epochs must be a number > 0"),
    ("recover", ["--epochs", "-1"], "--epochs must be a number > 0"),
    ("recover", ["--batch-size", "0"], "--batch-size"),
    ("recover", ["--eval-batch-size", "0"], "--eval-batch-size"),
    ("recover", ["--max-length", "0"], "--max-length"),
    ("recover", ["--grad-accum", "0"], "--grad-accum"),
    ("recover", ["--warmup-steps", "-1"], "--warmup-steps"),
    ("recover", ["--save-every", "0"], "--save-every"),
    ("recover", ["--log-every", "0"], "--log-every"),
    ("recover", ["--workers", "-1"], "--workers"),
    ("recover", ["--lr", "0"], "--lr must be a number > 0"),
    ("recover", ["--lr", "nan"], "--lr must be a number > 0"),
    ("recover", ["--weight-decay", "-0.1"], "--weight-decay must be a number >= 0"),
    ("recover", ["--clip-grad", "-1"], "--clip-grad must be a number >= 0"),
    ("recover", ["--alpha", "-1"], "--alpha must be a number >= 0"),
    ("recover", ["--gamma", "inf"], "--gamma must be a number >= 0"),
    ("recover", ["--temperature", "0"], "--temperature must be a number > 0"),
    ("recover", ["--label-smoothing", "1"], "--label-smoothing must be in [0, 1)"),
    ("recover", ["--kappa", "1"], "kappa must be a number > 1"),
    ("recover", ["--kappa", "2", "--rank-multiple", "0"], "--rank-multiple '0'"),
    ("recover", ["--rank-multiple", "8"], "--rank-multiple rounds the ranks that --kappa gives"),
    ("recover", ["--no-eval", "--eval-batch-size", "8"], "--eval-batch-size sizes the accuracy runs"),
    ("recover", ["--library", "keras"], "--library 'keras'"),
    ("eval", ["--batch-size", "0"], "--batch-size"),
    ("eval", ["--workers", "-1"], "--workers"),
    ("eval", ["--device", "tpu"], "--device 'tpu'"),
    ("bench", ["--min-time", "-1"], "--min-time must be a number >= 0"),
    ("bench", ["--min-time", "nan"], "--min-time must be a number >= 0"),
    ("bench", ["--threads", "0"], "--threads"),
    ("bench", ["--warmup", "0"], "--warmup"),
    ("bench", ["--repeats", "0"], "--repeats"),
    ("bench", ["--dtype", "int8"], "--dtype 'int8'"),
    ("bench", ["--compile-mode", "fast"], "--compile-mode 'fast' is not one of default, reduce-overhead"),
    ("bench", ["--seq-len", "0"], "--seq-len"),
    ("report", ["--seq-len", "0"], "--seq-len"),
    ("report", ["--library", "keras"], "--library 'keras'"),
    ("report", ["--max-params", "0"], "--max-params 0 is a gate no model passes"),
    ("report", ["--max-macs", "-5"], "--max-macs: invalid size '-5'"),
    ("report", ["--min-compression", "0"], "--min-compression '0' is not a ratio"),
    ("report", ["--input-size", "3,0,32"], "--input-size '3,0,32' is not C,H,W"),
]

# What each command needs besides the option under test.
BASE = {
    "factorize": ["{model}", "-o", "{out}"],
    "recover": ["{model}", "--teacher", "{model}", "--data", "{data}", "--steps", "2", "-o", "{out}"],
    "eval": ["{model}", "--data", "{data}"],
    "bench": ["{model}", "--device", "cpu"],
    "report": ["{model}"],
}


@pytest.mark.parametrize("command,args,message", BAD, ids=[f"{c} {' '.join(a)}" for c, a, _ in BAD])
def test_bad_values_are_usage_errors(command, args, message, tiny_vit_folder, tmp_path, capsys):
    data, out_dir = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    out_dir.mkdir()
    fields = {"model": tiny_vit_folder, "data": data, "out": out_dir / "x.safetensors"}
    argv = [a.format(**fields) for a in [command, *BASE[command], *args]]
    code, stdout, err = run_cli(argv, capsys)
    lines = error_lines(err)
    assert code == 2, err
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err and stdout == ""
    assert list(out_dir.iterdir()) == []


@pytest.fixture
def fake_factorize(monkeypatch):
    """factorize_file replaced by a stub that records what the CLI passed and whether bars would be drawn."""
    from lowrank_cli.compress import factorize_source

    seen: dict = {}

    class Result:
        def summary(self):
            return {"factorized": 1}

    def stub(source, output, **kwargs):
        seen.update(kwargs, progress_bars=console.progress_wanted())
        return Result()

    monkeypatch.setattr(factorize_source, "factorize_file", stub)
    yield seen
    console.show_progress(None)


def test_factorize_passes_the_library_defaults_when_options_are_absent(fake_factorize, tmp_path, capsys):
    code, stdout, err = run_cli(["factorize", "m", "-o", tmp_path / "x.safetensors", "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["factorized"] == 1
    # kappa and svd absent: the library fills in its defaults (2.0, exact), so that it can refuse a kappa given
    # together with a budget
    assert fake_factorize["kappa"] is None and fake_factorize["calib_samples"] == 256
    assert fake_factorize["rank_multiple"] == 8 and fake_factorize["budget"] is None
    assert fake_factorize["svd"] is None and fake_factorize["plan_kind"] == "pela"
    assert fake_factorize["progress_bars"] is False  # stderr is not a terminal here


@pytest.mark.parametrize("args,expected", [
    (["--kappa", "3", "--rank-multiple", "auto", "--plan-dtype", "bfloat16"],
     {"kappa": 3.0, "rank_multiple": "auto", "plan_dtype": "bf16"}),
    (["--budget", "0.5", "--calib", "{tmp}", "--calib-samples", "32", "--dtype", "float16"],
     {"kappa": None, "budget": 0.5, "calib_samples": 32, "dtype": "fp16"}),
    (["--target-macs", "9G", "--plan", "speed", "--plan-batch-size", "4", "--svd", "randomized"],
     {"target_macs": 9_000_000_000, "plan_kind": "speed", "plan_batch_size": 4, "svd": "randomized"}),
    (["--progress"], {"progress_bars": True}),
    (["--no-progress"], {"progress_bars": False}),
])
def test_factorize_passes_given_values(args, expected, fake_factorize, tmp_path, capsys):
    args = [a.format(tmp=tmp_path) for a in args]
    code, _, err = run_cli(["factorize", "m", "-o", tmp_path / "x.safetensors", "--json", *args], capsys)
    assert code == 0, err
    assert {k: fake_factorize[k] for k in expected} == expected


@pytest.fixture
def fake_recover(monkeypatch):
    from lowrank_cli.training import recovery

    seen: dict = {}

    class Result:
        def summary(self):
            return {"steps": 2}

    def stub(student, teacher, data, **kwargs):
        seen.update(kwargs, progress_bars=console.progress_wanted())
        return Result()

    monkeypatch.setattr(recovery, "recover", stub)
    yield seen
    console.show_progress(None)


@pytest.mark.parametrize("args,expected", [
    ([], {"kappa": None, "rank_multiple": 8, "eval_batch_size": None, "max_length": None, "progress_bars": False}),
    (["--kappa", "2", "--rank-multiple", "auto"], {"kappa": 2.0, "rank_multiple": "auto"}),
    (["--kappa", "4", "--rank-multiple", "1"], {"kappa": 4.0, "rank_multiple": 1}),
    (["--eval-batch-size", "8", "--max-length", "16", "--progress"],
     {"eval_batch_size": 8, "max_length": 16, "progress_bars": True}),
    (["--no-eval", "--workers", "0", "--no-progress"], {"evaluate_accuracy": False, "num_workers": 0,
                                                         "progress_bars": False}),
])
def test_recover_passes_given_values(args, expected, fake_recover, tmp_path, capsys):
    code, stdout, err = run_cli(["recover", "s", "--teacher", "t", "--data", tmp_path, "--steps", "2",
                                 "-o", tmp_path / "x.safetensors", "--json", *args], capsys)
    assert code == 0, err
    assert json.loads(stdout) == {"steps": 2}
    assert {k: fake_recover[k] for k in expected} == expected


def test_eval_progress_switch(monkeypatch, tmp_path, capsys):
    """--progress / --no-progress reach the console before the work (the data check here is the first step)."""
    from lowrank_cli.evaluation import accuracy

    wanted = []

    def stop(data):
        wanted.append(console.progress_wanted())
        raise KeyboardInterrupt

    monkeypatch.setattr(accuracy, "val_split", stop)
    for switch, expected in (("--progress", True), ("--no-progress", False), (None, False)):
        code, _, _ = run_cli(["eval", "m", "--data", tmp_path, *([switch] if switch else [])], capsys)
        assert code == 130
        assert wanted[-1] is expected
    console.show_progress(None)
