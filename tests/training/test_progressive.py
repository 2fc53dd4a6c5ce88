"""Progressive compression (`method="progressive"`, PC-LoRA): the schedule, the swap in and out, resume (also
after SIGKILL), the output file, the errors, and a text model.

The models are small random ViTs (16x16 digits, 8x8 patches) saved in timm's Hub layout; the point here is the
mechanics, not accuracy (benchmarks/progressive_vs_pela.py measures that on trained models)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import error_lines, make_tiny_vit, run_cli

import lowrank_cli
from lowrank_cli.checkpoint.format import read_info
from lowrank_cli.errors import Interrupted, UsageError
from lowrank_cli.evaluation.counting import count_params
from lowrank_cli.layers.lowrank_linear import LowRankLinear
from lowrank_cli.layers.progressive_linear import ProgressiveLinear
from lowrank_cli.training.metrics import metrics_path
from lowrank_cli.training.options import RecoverOptions
from lowrank_cli.training.progressive import Progressive, decay_factor, decay_steps
from lowrank_cli.training.recovery import recover
from lowrank_cli.training.state import read_train_state, train_state_path
from lowrank_cli.training.teacher import load_pair

FAST = dict(num_workers=0, device="cpu", log_every=1)
VIT = dict(img_size=16, patch_size=8, embed_dim=64, num_heads=2)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    from timm.models import save_for_hf

    folder = tmp_path_factory.mktemp("dense_vit")
    save_for_hf(make_tiny_vit(**VIT), str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def data(digits_folder) -> Path:
    return digits_folder(16, 6)  # 40 training and 20 validation images


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _env() -> dict[str, str]:
    """For subprocesses: one thread (as in this module, so that sums come out the same), this checkout first."""
    here = str(Path(lowrank_cli.__file__).parents[1])
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}


def _run(dense, data, output, **kw):
    options = dict(steps=10, batch_size=8, grad_accum=2, lr=1e-3, alpha=1.0, beta=0.1, gamma=0.5, save_every=3,
                   evaluate_accuracy=False, seed=3, kappa=4, rank_multiple=1, method="progressive", **FAST)
    options.update(kw)
    return recover(str(dense), None, data, output=output, **options)


# ---------------------------------------------------------------------------------------------- the schedule


@pytest.mark.parametrize("kind, expected", [
    ("linear", lambda t, q: 1 - t / q),
    ("sine", lambda t, q: 1 - math.sin(math.pi * t / (2 * q))),
    ("cosine", lambda t, q: math.cos(math.pi * t / (2 * q))),
])
def test_lambda_follows_each_schedule(kind, expected) -> None:
    q = 8
    values = [decay_factor(kind, t, q) for t in range(12)]
    assert values[0] == 1.0 and values[q:] == [0.0] * 4  # 1 at the start, 0 for t >= q
    for t in range(q):
        assert values[t] == pytest.approx(expected(t, q))
    assert all(a > b for a, b in zip(values[:q], values[1:q + 1]))  # strictly falling until q
    # q <= total - 1: the last step trains the low-rank model that is written
    assert decay_steps(0.8, 10) == 8 and decay_steps(1.0, 10) == 9 and decay_steps(0.01, 10) == 1
    with pytest.raises(ValueError, match="unknown decay"):
        decay_factor("exp", 1, 2)


@pytest.mark.parametrize("kind", ["linear", "sine", "cosine"])
def test_the_run_sets_lambda_of_the_step_on_every_layer(kind, dense, data, tmp_path) -> None:
    seen = []

    def look(step, model):
        layers = [m for m in model.modules() if isinstance(m, ProgressiveLinear)]
        seen.append({float(m.lam) for m in layers})  # float32 buffers

    result = _run(dense, data, tmp_path / "o.safetensors", decay=kind, decay_end=0.5, on_step=look)
    q = result.settings["decay_steps"]
    assert q == 5 and result.settings["decay"] == kind
    expected = [decay_factor(kind, t, q) for t in range(10)]
    assert [line["lambda"] for line in result.history] == pytest.approx(expected)  # logged with the step
    assert all(len(values) == 1 for values in seen)  # one lambda for every layer
    assert [values.pop() for values in seen] == pytest.approx(expected, abs=1e-7)


# ---------------------------------------------------------------------------------------------- swap in and out


@pytest.mark.parametrize("init", ["svd", "lora"])
def test_the_student_starts_as_the_dense_model(init, dense) -> None:
    opts = RecoverOptions(steps=1, kappa=4, rank_multiple=1, method="progressive", init=init)
    s, t, pairs, linears = load_pair(str(dense), None, opts, device=torch.device("cpu"), log=print, warn=print)
    method = Progressive.from_options(opts)
    qkv = linears["blocks.0.attn.qkv"].weight
    swapped = method.swap_in(s.model, linears)
    assert len(swapped) == len(pairs) == 16 and all(isinstance(m, ProgressiveLinear) for _, m in swapped)
    assert not set(linears) & {name for name, _ in swapped}  # the dense linears are let go
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(s.model.eval()(x), t.model.eval()(x), rtol=1e-4, atol=1e-5)
    first = dict(swapped)["blocks.0.attn.qkv"]
    if init == "lora":  # the residual is the dense weight itself, not a copy
        assert torch.count_nonzero(first.second.weight) == 0 and first.residual.data_ptr() == qkv.data_ptr()
    method.finish(s.model)
    assert not any(isinstance(m, ProgressiveLinear) for m in s.model.modules())
    assert not any("residual" in k for k in s.model.state_dict())


def test_output_is_an_ordinary_checkpoint_with_no_dense_residual(dense, data, tmp_path, capsys) -> None:
    out = tmp_path / "prog.safetensors"
    result = _run(dense, data, out, evaluate_accuracy=True, init="lora", lora_alpha=8.0, decay="sine")
    assert not any(isinstance(m, ProgressiveLinear) for m in result.model.modules())
    assert not any("residual" in key or key.endswith(".lam") for key in _weights(out))
    info, _ = read_info(out)
    rec = info.recovery
    assert (rec["method"], rec["init"], rec["decay"], rec["decay_end"], rec["decay_steps"], rec["lora_alpha"]) == (
        "progressive", "lora", "sine", 0.8, 8, 8.0)
    assert info.provenance["kappa"] == 4 and info.provenance["svd"].startswith("none")
    # keep best only chooses among states that no longer lean on W_res (lambda 0 from step q on)
    assert rec["kept"]["which"] == "best" and rec["kept"]["step"] >= rec["decay_steps"]
    model = lowrank_cli.load(out)
    assert {n for n, m in model.named_modules() if isinstance(m, LowRankLinear)} == set(info.ranks)
    # the teacher was the dense model itself; accuracy before = the dense model's (lambda 1, second 0)
    assert result.accuracy["before"]["top1"] == result.accuracy["teacher"]["top1"]
    code, out_json, err = run_cli(["report", out, "--json"], capsys)
    assert code == 0, err
    assert json.loads(out_json)["params"]["lowrank"] > 0


def test_progressive_and_pela_outputs_of_one_plan_have_the_same_shapes_and_size(dense, data, tmp_path) -> None:
    outputs = {}
    for method in ("pela", "progressive"):
        outputs[method] = tmp_path / f"{method}.safetensors"
        _run(dense, data, outputs[method], method=method, steps=2, kappa=None, rank=8,
             **({"init": "lora"} if method == "progressive" else {}))
    shapes = {m: {k: tuple(v.shape) for k, v in _weights(p).items()} for m, p in outputs.items()}
    assert shapes["pela"] == shapes["progressive"]
    params = {m: count_params(lowrank_cli.load(p)) for m, p in outputs.items()}
    assert params["pela"] == params["progressive"]
    infos = {m: read_info(p)[0] for m, p in outputs.items()}
    assert infos["pela"].ranks == infos["progressive"].ranks and set(infos["pela"].ranks.values()) == {8}
    assert infos["pela"].provenance["rank"] == 8 and infos["pela"].recovery["method"] == "pela"


# ---------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("init", ["svd", "lora"])
def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(init, dense, data, tmp_path) -> None:
    # q = 8: the stop at step 4 falls between two saves and before lambda reaches 0, the resumed part crosses it.
    whole = _run(dense, data, tmp_path / "whole.safetensors", init=init)
    out = tmp_path / "parts.safetensors"
    with pytest.raises(Interrupted, match="at step 4/10"):
        _run(dense, data, out, init=init, on_step=lambda step, model: step == 4)
    assert read_train_state(train_state_path(out))[0].step == 4
    resumed = _run(dense, data, out, init=init, resume=True)
    assert resumed.resumed_from == 4
    a, b = _weights(whole.output), _weights(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    lambdas = [json.loads(line)["lambda"] for line in metrics_path(out).read_text().splitlines()]
    assert lambdas == [line["lambda"] for line in whole.history]


def test_resume_refuses_another_method_or_init(dense, data, tmp_path) -> None:
    out = tmp_path / "r.safetensors"
    with pytest.raises(Interrupted):
        _run(dense, data, out, on_step=lambda step, model: step == 1)
    with pytest.raises(UsageError, match="init was svd .* is lora"):
        _run(dense, data, out, init="lora", resume=True)
    with pytest.raises(UsageError, match="method was progressive .* is pela"):
        _run(dense, data, out, method="pela", resume=True)
    messages = []
    _run(dense, data, out, resume=True, decay="cosine", warn=messages.append)
    assert any("`decay` was linear" in m for m in messages)


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(dense, data, tmp_path) -> None:
    """A real `kill -9` of `python -m lowrank_cli recover --method progressive` while it trains; `--resume` then
    continues from the last saved state to the very weights of an uninterrupted run."""
    steps, out = 40, tmp_path / "killed.safetensors"
    cmd = [sys.executable, "-m", "lowrank_cli", "recover", str(dense), "--method", "progressive", "--kappa", "4",
           "--rank-multiple", "1", "--data", str(data), "--steps", str(steps), "--batch-size", "8", "--lr", "1e-3",
           "--gamma", "0.5", "--save-every", "3", "--seed", "3", "--workers", "0", "--device", "cpu", "--no-eval",
           "-o", str(out)]
    env = _env()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    state = train_state_path(out)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and read_train_state(state)[0].step >= 6:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = read_train_state(state)[0].step
    assert 6 <= killed_at < steps and not out.exists()
    done = subprocess.run([*cmd, "--resume", "--json"], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["resumed_from"] == killed_at
    whole = recover(str(dense), None, data, output=tmp_path / "whole.safetensors", steps=steps, batch_size=8, lr=1e-3,
                    gamma=0.5, save_every=3, seed=3, kappa=4, rank_multiple=1, method="progressive",
                    evaluate_accuracy=False, num_workers=0, device="cpu")
    a, b = _weights(whole.output), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    print(f"\nkilled (SIGKILL) with the state at step {killed_at}/{steps}; resumed: {len(a)} tensors bit-identical")


def test_two_gloo_processes_train_progressively_and_write_one_output(dense, data, tmp_path) -> None:
    out = tmp_path / "ddp.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lowrank_cli",
           "recover", str(dense), "--method", "progressive", "--rank", "8", "--data", str(data), "--steps", "4",
           "--batch-size", "4", "--workers", "0", "--device", "cpu", "--no-eval", "-o", str(out), "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)  # one document: only rank 0 prints
    assert summary["settings"]["processes"] == 2 and summary["settings"]["method"] == "progressive"
    assert not any("residual" in k for k in _weights(out))
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".safetensors"] == ["ddp.safetensors"]


# ---------------------------------------------------------------------------------------------- errors


def test_bad_input_is_one_usage_error_line(dense, data, tmp_path, capsys) -> None:
    student = tmp_path / "lr.safetensors"
    code, _, err = run_cli(["factorize", dense, "--kappa", "4", "--rank-multiple", "1", "-o", student], capsys)
    assert code == 0, err
    base = ["recover", "--data", data, "--steps", "1", "--workers", "0", "--device", "cpu",
            "-o", tmp_path / "o.safetensors"]
    cases = [
        ([student, "--teacher", dense, "--method", "progressive"], "already low-rank, so it has no dense weights to "
                                                                  "fade: give the dense model with --kappa"),
        ([student, "--teacher", dense, "--method", "progressive", "--kappa", "4"], "already low-rank: --method "
                                                                                   "progressive fades out"),
        ([dense, "--method", "progressive", "--kappa", "4", "--decay-end", "0"], "--decay-end must be in (0, 1]"),
        ([dense, "--method", "progressive", "--kappa", "4", "--decay-end", "1.5"], "--decay-end must be in (0, 1]"),
        ([dense, "--method", "progressive", "--kappa", "4", "--init", "lora", "--calib", data],
         "--init lora starts from random factors"),
        ([dense, "--kappa", "4", "--init", "lora"], "--init belong to --method progressive"),
        ([dense, "--method", "progressive", "--kappa", "4", "--lora-alpha", "8"], "goes with --init lora"),
        ([dense, "--method", "progressive", "--kappa", "4", "--decay", "step"], "--decay 'step' is not one of"),
        ([dense, "--method", "progressive", "--kappa", "4", "--rank", "8"], "--kappa and --rank both set the ranks"),
        ([dense, "--method", "progressive", "--rank", "100"], "--rank 100 is above the full rank 64"),
        ([student], "no --teacher given: only a dense student factorized on the fly"),
    ]
    for args, message in cases:
        code, _, err = run_cli([*base[:1], *args, *base[1:]], capsys)
        lines = error_lines(err)
        assert code == 2 and len(lines) == 1 and message in lines[0], (args, err)


# ---------------------------------------------------------------------------------------------- text


def test_text_model_with_data_aware_svd_start(bert_folder, tmp_path, capsys) -> None:
    from hf_fixtures import write_corpus

    corpus = write_corpus(tmp_path / "corpus.txt", n=24)
    out = tmp_path / "bert_prog.safetensors"
    code, stdout, err = run_cli(["recover", bert_folder, "--method", "progressive", "--rank", "8", "--calib", corpus,
                                 "--calib-samples", "16", "--decay", "cosine", "--data", corpus, "--steps", "4",
                                 "--batch-size", "8", "--delta", "1", "--workers", "0", "--device", "cpu",
                                 "--json", "-o", out], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["settings"]["method"] == "progressive" and summary["settings"]["decay_steps"] == 3
    info, shapes = read_info(out)
    assert info.provenance["svd"] == "data-aware" and set(info.ranks.values()) == {8}
    assert not any("residual" in k for k in shapes)
    model = lowrank_cli.load(out)
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == len(info.ranks) == 12


def test_the_last_step_always_trains_the_pure_low_rank_model():
    from lowrank_cli.errors import UsageError
    from lowrank_cli.training.progressive import decay_steps

    assert [decay_steps(end, 10) for end in (0.05, 0.5, 0.8, 0.95, 1.0)] == [1, 5, 8, 9, 9]
    assert decay_steps(0.8, 2) == 1
    with pytest.raises(UsageError, match="at least 2 steps"):
        decay_steps(0.8, 1)
