"""`lrc bench`, speed plans and --rank-multiple auto: sane rows, honest ratios, clear errors.

Speed itself is measured in benchmarks/inference_speed.py (ratios in one run), never asserted here.
"""

from __future__ import annotations

import copy
import json
import statistics

import pytest
import torch
from helpers import error_lines, make_tiny_vit, run_cli

import lowrank_cli
from lowrank_cli.compress.plan import make_plan
from lowrank_cli.compress.speed_plan import (
    LayerShape,
    auto_rank_multiple,
    parse_rank_multiple,
    speed_plan,
    time_layer,
)
from lowrank_cli.devices import resolve_dtype
from lowrank_cli.errors import EnvironmentProblem, InputError, UsageError
from lowrank_cli.evaluation.bench import BenchRow, bench, noise_warning
from lowrank_cli.evaluation.bench_options import parse_batch_sizes
from lowrank_cli.evaluation.counting import count_macs
from lowrank_cli.evaluation.profiling import classify, profile

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is missing")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair():
    dense = make_tiny_vit()
    low = copy.deepcopy(dense)
    lowrank_cli.factorize(low, kappa=2, rank_multiple=8, check_calls=False)
    return dense, low


@pytest.fixture(scope="module")
def rows(pair):
    dense, low = pair
    return bench({"lrc": low, "dense": dense}, device="cpu", dtype="fp32", batch_sizes="1,4", reference="dense",
                 repeats=4, warmup=1, min_sample_s=0.005)


# ------------------------------------------------------------------------------------------------ bench()


def test_bench_rows_are_sane(rows, pair):
    assert [(r.model, r.batch_size) for r in rows] == [("lrc", 1), ("dense", 1), ("lrc", 4), ("dense", 4)]
    for r in rows:
        assert isinstance(r, BenchRow)
        assert r.repeats == 4 and len(r.samples_ms) == 4 and r.calls_per_repeat >= 1
        assert 0 < r.min_ms <= r.p10_ms <= r.median_ms <= r.p90_ms
        assert r.median_ms == pytest.approx(statistics.median(r.samples_ms))
        assert r.throughput == pytest.approx(r.batch_size / (r.median_ms / 1e3))
        assert r.peak_memory_bytes is None  # no per-model figure on the CPU
        assert r.device == "cpu" and r.dtype == "fp32" and r.compile is None and r.reference == "dense"
        json.dumps(r.to_json())


def test_bench_ratios_come_from_the_two_medians_and_the_mac_counts(rows, pair):
    dense, low = pair
    size = (3, 32, 32)
    macs = {"dense": count_macs(dense, size).total, "lrc": count_macs(low, size).total}
    for bs in (1, 4):
        ref = next(r for r in rows if r.model == "dense" and r.batch_size == bs)
        row = next(r for r in rows if r.model == "lrc" and r.batch_size == bs)
        assert ref.speedup == pytest.approx(1.0) and ref.mac_ratio == pytest.approx(1.0)
        assert row.speedup == pytest.approx(ref.median_ms / row.median_ms)
        assert row.macs == macs["lrc"] * bs and ref.macs == macs["dense"] * bs
        assert row.mac_ratio == pytest.approx(macs["dense"] / macs["lrc"])
        assert row.mac_ratio > 1.3  # kappa 2 on the block linears


def test_bench_one_model_has_no_ratios():
    rows = bench({"only": make_tiny_vit()}, device="cpu", batch_sizes=[2], repeats=2, count_macs=False,
                 min_sample_s=0.001)
    assert len(rows) == 1 and rows[0].speedup is None and rows[0].mac_ratio is None and rows[0].macs is None


def test_bench_refuses_what_cannot_work():
    model = make_tiny_vit()
    with pytest.raises(UsageError, match="reference"):
        bench({"a": model}, device="cpu", reference="b")
    with pytest.raises(UsageError, match="cuda_graphs"):
        bench({"a": model}, device="cpu", cuda_graphs=True)
    with pytest.raises(UsageError, match="compile"):
        bench({"a": model}, device="cpu", compile="fastest")
    with pytest.raises(UsageError, match="batch_sizes"):
        parse_batch_sizes("1,x")
    with pytest.raises(UsageError, match="dtype"):
        resolve_dtype("int8")
    assert parse_batch_sizes("1, 32,256,32") == [1, 32, 256]
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype(None, torch.float32) is torch.float32


@no_cuda
def test_bench_on_missing_cuda_is_an_environment_problem():
    with pytest.raises(EnvironmentProblem, match="device=cpu"):
        bench({"a": make_tiny_vit()}, device="cuda")


def test_profile_splits_gemms_from_the_rest(pair):
    dense, _ = pair
    p = profile(dense, torch.randn(2, 3, 32, 32), name="dense")
    assert p.gemm_ms > 0 and p.other_ms > 0 and p.total_ms == pytest.approx(p.gemm_ms + p.attention_ms + p.other_ms)
    assert p.top and all(kind in ("gemm", "attention", "other") for kind, _, _ in p.top)
    json.dumps(p.to_json())
    assert classify("aten::addmm") == "gemm" and classify("sm90_xmma_gemm_bf16bf16_bf16f32") == "gemm"
    assert classify("nvjet_hsh_128x256_64x4_1x2_h_bz_coopA_NTN") == "gemm"
    assert classify("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert classify("pytorch_flash::flash_fwd_kernel<...>") == "attention"
    assert classify("aten::native_layer_norm") == "other" and classify("triton_poi_fused_gelu_0") == "other"



def test_profile_takes_a_compiled_module(pair):
    # A compiled module has no truth value (its len() raises): profile(fn=...) must not test it with `or`.
    dense, _ = pair
    compiled = torch.compile(dense, backend="eager", dynamic=False)
    x = torch.randn(2, 3, 32, 32)
    p = profile(dense, x, name="dense", fn=compiled, calls=2)
    assert p.gemm_ms > 0 and p.batch_size == 2


def _row(name: str, samples: list[float]) -> BenchRow:
    ordered = sorted(samples)
    return BenchRow(model=name, batch_size=16, median_ms=statistics.median(samples), p10_ms=ordered[0],
                    p90_ms=ordered[-1], min_ms=ordered[0], repeats=len(samples), calls_per_repeat=1,
                    throughput=1.0, macs=None, peak_memory_bytes=None, samples_ms=samples)


def test_noisy_timings_are_named_with_what_to_do():
    steady, shaky = _row("dense", [100.0, 101.0, 103.0]), _row("lr", [50.0, 71.0, 64.0])
    assert not steady.noisy and shaky.noisy and shaky.to_json()["noisy"] is True
    assert noise_warning([steady]) is None
    message = noise_warning([steady, shaky])
    assert "lr at batch 16" in message and "dense" not in message and "1.42x" in message and "`repeats`" in message
    assert not _row("two", [50.0, 90.0]).noisy  # two repeats say nothing about the spread

def test_the_fused_kernel_is_cudas_only(rows, pair):
    assert all(r.fused is False for r in rows)  # on the CPU the low-rank layers stay the two linears
    with pytest.raises(EnvironmentProblem, match="^fused=True asks for the fused low-rank kernel"):
        bench({"lrc": pair[1]}, device="cpu", fused=True)
    with pytest.raises(EnvironmentProblem, match="^fused=True"):
        speed_plan(make_tiny_vit(), make_plan(make_tiny_vit(), kappa=2), device="cpu", fused=True)
    dense_ms, low_ms = time_layer(LayerShape(32, 48, 16, (4, 32), True), device=torch.device("cpu"),
                                  dtype=torch.float32, repeats=1, warmup=1, fused=True)  # the reference path here
    assert dense_ms > 0 and low_ms > 0


# ------------------------------------------------------------------------------------------------ speed plan


def test_speed_plan_keeps_dense_exactly_the_slower_layers():
    model = make_tiny_vit()
    base = make_plan(model, kappa=2, rank_multiple=8)
    calls: list[LayerShape] = []

    def fake_timer(shape: LayerShape) -> tuple[float, float]:
        calls.append(shape)
        # fc2 (768 -> 192) slower factorized, qkv a tie (stays dense), the rest faster.
        if shape.d_in > shape.d_out:
            return 1.0, 1.5
        if shape.d_out == 3 * shape.d_in:
            return 1.0, 1.0
        return 2.0, 1.0

    plan, info = speed_plan(model, base, device="cpu", batch_size=8, timer=fake_timer)
    # Four shapes in the blocks (qkv, proj, fc1, fc2), each timed once for 16 layers.
    assert len(calls) == len(set(calls)) == 4 == info["unique_shapes"]
    assert all(s.input_shape == (8, 17, s.d_in) for s in calls)  # 16 patches + class token, batch 8
    slower = {n for n in base.ranks if n.endswith(("mlp.fc2", "attn.qkv"))}
    assert set(plan.dense) == slower == set(info["kept_dense"])
    assert set(plan.ranks) == set(base.ranks) - slower
    assert all(plan.ranks[n] == base.ranks[n] for n in plan.ranks)  # ranks are never changed
    assert [p.name for p in plan.layers] == [p.name for p in base.layers]
    assert "dense: factorized" in plan.dense[next(iter(slower))]
    doc = json.loads(json.dumps(info))  # JSON-ready, as stored in the checkpoint's lrc.plan
    assert doc["device_type"] == "cpu" and doc["dtype"] == "fp32" and doc["batch_size"] == 8
    fc2 = doc["layers"]["blocks.0.mlp.fc2"]
    assert fc2 == {**fc2, "dense_ms": 1.0, "lowrank_ms": 1.5, "factorized": False}
    assert fc2["gain"] == pytest.approx(1 / 1.5, rel=1e-3)
    assert doc["layers"]["blocks.0.mlp.fc1"]["factorized"] is True
    # 16 layers at 2 ms dense / (4 x [fc1 1 + proj 1 + qkv 1 (dense) + fc2 1 (dense)]) ...
    assert doc["estimated_gain"] == pytest.approx((4 * (2 + 2 + 1 + 1)) / (4 * (1 + 1 + 1 + 1)))


def test_speed_plan_with_tokens_skips_the_forward_and_real_timer_runs():
    model = make_tiny_vit()
    base = make_plan(model, kappa=2, include=[r"blocks\.0\.mlp\.fc1"])
    plan, info = speed_plan(model, base, device="cpu", batch_size=2, tokens=5, repeats=2, warmup=1)
    layer = info["layers"]["blocks.0.mlp.fc1"]
    assert layer["input_shape"] == [2, 5, 192] and layer["dense_ms"] > 0 and layer["lowrank_ms"] > 0
    assert layer["factorized"] == (layer["dense_ms"] / layer["lowrank_ms"] > 1.0)
    assert set(plan.ranks) | set(plan.dense) == {"blocks.0.mlp.fc1"}


def test_speed_plan_keeps_uncalled_linears_dense_without_timing_them():
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(16, 32)
            self.down = nn.Linear(32, 16)

        def forward(self, x):
            return F.linear(self.up(x), self.down.weight, self.down.bias)  # `down` is not called as a module

    model = nn.Sequential(Block(), Block())
    base = make_plan(model, kappa=2, rank_multiple=1)
    assert set(base.ranks) == {"0.up", "0.down", "1.up", "1.down"}
    timed: list[LayerShape] = []
    plan, info = speed_plan(model, base, device="cpu", batch_size=2, input_size=(4, 16),
                            timer=lambda s: timed.append(s) or (2.0, 1.0))
    assert set(plan.ranks) == {"0.up", "1.up"} and len(timed) == 1 and timed[0].input_shape == (2, 4, 16)
    assert set(plan.dense) == {"0.down", "1.down"} == set(info["kept_dense"])
    assert all("not called" in why for why in plan.dense.values()) and set(info["layers"]) == {"0.up", "1.up"}


def test_auto_rank_multiple(monkeypatch):
    import lowrank_cli.compress.speed_plan

    for isa, floats in (("AVX2", 8), ("AVX512", 16), ("DEFAULT", 8)):  # one vector register of fp32
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda isa=isa: isa)
        assert auto_rank_multiple("cpu", "fp32") == auto_rank_multiple("cpu", torch.bfloat16) == floats
        assert parse_rank_multiple("auto", "cpu") == floats
    assert lowrank_cli.compress.speed_plan._cpu_capability() == "DEFAULT"
    assert parse_rank_multiple("64") == 64
    with pytest.raises(UsageError, match="^rank_multiple"):
        parse_rank_multiple("0")


def test_the_plan_is_timed_in_the_precision_the_model_will_run_in():
    from lowrank_cli.compress.speed_plan import run_dtype

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert run_dtype(None, None, cuda, torch.float32) is torch.bfloat16  # a GPU serves in bf16
    assert run_dtype(None, None, cpu, torch.float32) is torch.float32
    assert run_dtype(None, torch.float16, cuda, torch.float32) is torch.float16  # the stored dtype
    assert run_dtype("fp32", torch.float16, cuda, torch.float32) is torch.float32  # --plan-dtype wins
    with pytest.raises(UsageError, match="plan_dtype 'int8'"):
        run_dtype("int8", None, cpu, torch.float32)


@no_cuda
def test_auto_rank_multiple_on_missing_cuda_is_an_environment_problem():
    with pytest.raises(EnvironmentProblem):
        auto_rank_multiple("cuda", "bf16")


@needs_cuda
@pytest.mark.gpu
def test_auto_rank_multiple_on_cuda():
    assert auto_rank_multiple("cuda", "bf16") == auto_rank_multiple("cuda", "fp16") == 64
    assert auto_rank_multiple("cuda", "fp32") == 8


@needs_cuda
@pytest.mark.gpu
def test_bench_and_speed_plan_on_cuda(pair):
    from lowrank_cli.evaluation.bench import weight_bytes

    dense, low = (copy.deepcopy(m) for m in pair)
    for graphs in (False, True):
        rows = bench({"lrc": low, "dense": dense}, device="cuda", dtype="bf16", batch_sizes=[1, 8], reference="dense",
                     repeats=3, cuda_graphs=graphs)
        for r in rows:
            assert r.median_ms > 0 and r.cuda_graphs is graphs and r.dtype == "bf16"
            assert r.peak_memory_bytes is not None and r.peak_memory_bytes >= weight_bytes(low if r.model == "lrc" else dense)
    plan, info = speed_plan(make_tiny_vit().cuda(), make_plan(make_tiny_vit(), kappa=2), device="cuda", dtype="bf16",
                            batch_size=8, repeats=3, cuda_graphs=True)
    assert info["device_type"] == "cuda" and info["cuda_graphs"] is True and json.dumps(info)
    p = profile(low, torch.randn(8, 3, 32, 32, device="cuda", dtype=torch.bfloat16), name="lrc")
    assert p.where == "cuda kernels" and p.gemm_ms > 0


@needs_cuda
@pytest.mark.gpu
def test_gpu_bench_fuses_and_shows_compiled_rows(checkpoints, capsys):
    lr, dense = checkpoints
    code, out, err = run_cli(["bench", lr, "--against", dense, "--device", "cuda", "--dtype", "bf16", "--batch-size",
                              "2", "--repeats", "2", "--min-time", "0", "--json", "--fused"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    # every way on CUDA (eager, compile, graphs), then each model's fastest
    assert doc["modes"][:3] == ["eager", "compiled", "compiled + CUDA graphs"] and doc["fused"] is True
    assert all(m.startswith("fastest: ") for m in doc["modes"][3:]) and sum(r["fastest"] for r in doc["rows"]) == 2
    assert {r["fused"] for r in doc["rows"] if r["model"] == "lr.safetensors"} == {True}
    code, out, err = run_cli(["bench", lr, "--device", "cuda", "--dtype", "bf16", "--batch-size", "2", "--repeats",
                              "2", "--min-time", "0", "--json", "--eager-only"], capsys)
    assert code == 0 and json.loads(out)["fused"] is False  # not by default: it lost to cuBLAS on an H200
    plan, info = speed_plan(make_tiny_vit().cuda(), make_plan(make_tiny_vit(), kappa=2, rank_multiple=16),
                            device="cuda", dtype="bf16", batch_size=8, repeats=3, fused=True)
    assert info["fused"] is True


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, pair):
    dense, low = pair
    folder = tmp_path_factory.mktemp("bench")
    lowrank_cli.save(low, folder / "lr.safetensors")
    lowrank_cli.save(dense, folder / "dense.safetensors")
    return folder / "lr.safetensors", folder / "dense.safetensors"


@no_cuda
def test_cli_device_cuda_without_cuda_exits_6(checkpoints, capsys):
    lr, dense = checkpoints
    code, out, err = run_cli(["bench", lr, "--against", dense, "--device", "cuda"], capsys)
    assert code == 6 and out == ""
    assert len(error_lines(err)) == 1 and "CUDA" in error_lines(err)[0]


def test_cli_json_has_the_documented_keys(checkpoints, capsys):
    lr, dense = checkpoints
    code, out, err = run_cli(["bench", lr, "--against", dense, "--device", "cpu", "--batch-size", "1,2",
                              "--repeats", "2", "--threads", "1", "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert {"device", "device_name", "dtype", "compile", "cuda_graphs", "threads", "input_size", "reference",
            "models", "rows", "peak_memory_note", "process_peak_rss_bytes"} <= set(doc)
    assert doc["device"] == "cpu" and doc["dtype"] == "fp32" and doc["input_size"] == [3, 32, 32]
    assert doc["modes"] == ["eager"] and doc["fused"] is False  # on the CPU: no compiled rows by default, no kernel
    assert doc["reference"] == "dense.safetensors" and doc["threads"] == 1
    assert set(doc["models"]) == {"lr.safetensors", "dense.safetensors"}
    assert len(doc["rows"]) == 4
    for row in doc["rows"]:
        assert {"model", "batch_size", "median_ms", "p10_ms", "p90_ms", "repeats", "throughput", "speedup",
                "mac_ratio", "macs", "peak_memory_bytes", "reference"} <= set(row)
        assert row["repeats"] == 2 and row["median_ms"] > 0
    lr_row = next(r for r in doc["rows"] if r["model"] == "lr.safetensors" and r["batch_size"] == 2)
    ref_row = next(r for r in doc["rows"] if r["model"] == "dense.safetensors" and r["batch_size"] == 2)
    assert lr_row["speedup"] == pytest.approx(ref_row["median_ms"] / lr_row["median_ms"], rel=1e-3)
    assert lr_row["mac_ratio"] > 1.3


def test_cli_table_and_profile(checkpoints, capsys):
    lr, dense = checkpoints
    code, out, err = run_cli(["bench", lr, "--against", dense, "--device", "cpu", "--batch-size", "2",
                              "--repeats", "1", "--profile"], capsys)
    assert code == 0, err
    assert "speed-up" in out and "MAC ratio" in out and "(ref)" in out and "1.00x" in out
    assert "where the time goes" in out and "GEMM" in out


def test_cli_table_has_a_mode_column_when_the_rows_ran_two_ways(capsys, monkeypatch):
    from lowrank_cli.cli import console
    from lowrank_cli.cli.bench_cmd import mode_label, print_table

    def row(model, compile_, graphs, fused=False):
        return BenchRow(model=model, batch_size=1, median_ms=2.0, p10_ms=1.9, p90_ms=2.1, min_ms=1.9, repeats=5,
                        calls_per_repeat=1, throughput=500.0, macs=None, peak_memory_bytes=2**20, speedup=1.0,
                        reference="dense", compile=compile_, cuda_graphs=graphs, fused=fused)

    rows = [row("dense", None, False), row("lr", None, False, True), row("dense", "reduce-overhead", True),
            row("lr", "reduce-overhead", True, True)]
    assert [mode_label(r) for r in rows[1:3]] == ["eager", "compiled + CUDA graphs"]
    doc = {"device_name": "cuda:0 (a GPU)", "dtype": "bf16", "input_size": [3, 32, 32], "reference": "dense",
           "modes": ["eager", "compiled + CUDA graphs"], "fused": True, "peak_memory_note": "weights",
           "process_peak_rss_bytes": None, "device": "cuda"}
    monkeypatch.setattr(console.out, "width", 200)
    print_table(doc, rows)
    out = capsys.readouterr().out
    assert " mode " in out and "compiled + CUDA graphs" in out and "lr (fused)" in out and "(fused): the low-rank" in out


def test_cli_refuses_bad_options_with_one_error_line(checkpoints, capsys):
    lr, _ = checkpoints
    for args, code_expected in ((["--batch-size", "0"], 2), (["--dtype", "int8"], 2), (["--cuda-graphs", "--device", "cpu"], 2),
                                (["--input-size", "3,48,48"], 3)):
        code, out, err = run_cli(["bench", lr, "--device", "cpu", "--repeats", "1", *args], capsys)
        assert code == code_expected, (args, err)
        assert len(error_lines(err)) == 1, err


def test_a_device_failure_is_not_blamed_on_the_input_size(monkeypatch):
    from lowrank_cli.devices import is_device_failure
    from lowrank_cli.evaluation.bench import check_input_size

    class Broken(torch.nn.Module):
        def __init__(self, error: Exception):
            super().__init__()
            self.fc, self.error = torch.nn.Linear(3, 3), error

        def forward(self, x):
            raise self.error

    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert is_device_failure(oom) and is_device_failure(RuntimeError("CUDA error: device-side assert triggered"))
    assert is_device_failure(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB"))
    assert not is_device_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x3)"))
    with pytest.raises(torch.OutOfMemoryError):
        check_input_size(Broken(oom), (3, 8, 8), torch.device("cpu"), torch.float32)
    with pytest.raises(InputError, match="input_size"):
        check_input_size(Broken(RuntimeError("shapes cannot be multiplied")), (3, 8, 8), torch.device("cpu"),
                         torch.float32)


def test_out_of_memory_ends_with_one_error_line(checkpoints, capsys, monkeypatch):
    # The device boundary is mocked: this machine has no GPU to run out of.
    import lowrank_cli.evaluation.bench

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)\nmore")

    monkeypatch.setattr(lowrank_cli.evaluation.bench, "bench", out_of_memory)
    lr, _ = checkpoints
    code, out, err = run_cli(["bench", lr, "--device", "cpu"], capsys)
    assert code == 6 and error_lines(err) == [line for line in err.splitlines() if line.strip()][-1:]
    assert "ran out of memory" in err and "Tried to allocate 2.00 GiB" in err and "--batch-size" in err
    assert "more" not in error_lines(err)[0]
