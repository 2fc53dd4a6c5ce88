"""Inference speed of PELA-compressed DeiT-B against the dense model, measured in one run (issue 5).

    python benchmarks/inference_speed.py                 # CPU part here; GPU part where CUDA is present
    python benchmarks/inference_speed.py --skip-cpu      # GPU part only (on a borrowed GPU: the CPU part takes minutes)
    python benchmarks/inference_speed.py --json out.json
    python benchmarks/inference_speed.py --skip-cpu --gpu-device cpu --arch vit_tiny_patch16_224 --gpu-batch 4
                                                         # the GPU part's code on the CPU: a smoke run, no figures

Targets:
    CPU (2 threads, fp32, batch 16), deit_base at kappa 2: compressed >= 1.8x dense
    GPU (bf16, batch 256, both compiled the same way):     compressed >= 1.5x dense
    GPU batch 1 (CUDA graphs via mode="reduce-overhead"):   compressed not slower than dense

Random weights (timm pretrained=False): timing does not depend on the values. So by default the factors are random
too (`--factors random`: the real lowrank_cli.factorize swap, with a factor_fn that skips the SVD; 48 randomized
SVDs of DeiT-B take minutes on a 2-core CPU and change no timing). `--factors svd` computes one randomized SVD per
layer at the largest rank any variant needs, sliced for the smaller ranks (the top-k triplets of a truncated SVD
are the rank-k truncation), so that the SVD work is done once rather than once per rank multiple.
The models' repeats are interleaved (see lowrank_cli.evaluation.bench), so drift and other processes on a shared machine
hit every model alike; the ratios are what to read, not the absolute times.
"""

from __future__ import annotations

import os

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # before torch: no profiler chatter on machines without CUDA

import argparse  # noqa: E402
import copy
import json
import math
import statistics
import sys
import time
import zlib
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lowrank_cli  # noqa: E402
from lowrank_cli.evaluation.bench import bench  # noqa: E402
from lowrank_cli.evaluation.profiling import profile  # noqa: E402
from lowrank_cli.devices import device_name  # noqa: E402
from lowrank_cli.evaluation.counting import count_macs  # noqa: E402
from lowrank_cli.compress.plan import make_plan  # noqa: E402
from lowrank_cli.compress.speed_plan import auto_rank_multiple, speed_plan  # noqa: E402
from lowrank_cli.compress.svd import Factors, truncated_svd  # noqa: E402

ARCH = "deit_base_patch16_224"  # --arch changes it (e.g. a small ViT to try the script quickly)
KAPPA = 2.0
T0 = time.perf_counter()


def say(msg: str = "") -> None:
    print(msg, flush=True)


def log(msg: str) -> None:
    print(f"  [{time.perf_counter() - T0:6.0f} s] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ models


class SliceableFactors:
    """factor_fn for lowrank_cli.factorize: one randomized SVD per layer at its largest rank, sliced per rank."""

    def __init__(self, max_ranks: dict[str, int], device: torch.device) -> None:
        self.max_ranks = max_ranks
        self.device = device
        self.cache: dict[str, Factors] = {}

    def __call__(self, name: str, weight: torch.Tensor, rank: int) -> Factors:
        if name not in self.cache:
            self.cache[name] = truncated_svd(weight, max(rank, self.max_ranks.get(name, rank)), method="randomized",
                                             device=self.device, power_iterations=2)
        f = self.cache[name]
        if rank > f.first.shape[0]:
            raise ValueError(f"{name}: rank {rank} above the cached {f.first.shape[0]}")
        # kept_energy of the cached rank is sum(s[:r_max]^2) / ||W||^2: rescale it to the first `rank` values.
        s2 = f.singular_values.square()
        kept = float(s2[:rank].sum() / s2[: f.first.shape[0]].sum()) * f.kept_energy
        return Factors(f.first[:rank], f.second[:, :rank], f.singular_values, kept, math.sqrt(max(0.0, 1.0 - kept)), "randomized")


def random_factors(name: str, weight: torch.Tensor, rank: int) -> Factors:
    """factor_fn for timing only: random factors of the right shapes, scaled like nn.Linear's init (no SVD)."""
    d_out, d_in = weight.shape
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    first = torch.randn((rank, d_in), generator=gen) / math.sqrt(d_in)
    second = torch.randn((d_out, rank), generator=gen) / math.sqrt(rank)
    return Factors(first.to(weight.device), second.to(weight.device), torch.ones(rank), 0.0, 1.0, "random (timing only)")


FACTORS = "random"


def distinct_multiples(dense: nn.Module, multiples: list[int], auto: int) -> list[int]:
    """`multiples` and `auto`, less those whose kappa-2 ranks equal another's (DeiT-B: /16 gives /8's ranks);
    auto is kept, so that its row is the one the targets read."""
    kept: dict[tuple, int] = {}
    for m in [auto, *multiples]:
        kept.setdefault(tuple(make_plan(dense, kappa=KAPPA, rank_multiple=m).ranks.items()), m)
    return sorted(kept.values())


def build_variants(dense: nn.Module, multiples: list[int], device: torch.device) -> tuple[dict[str, nn.Module], object]:
    """kappa-2 copies of `dense`, one per rank multiple; the factor function is returned for later plans."""
    floor = make_plan(dense, kappa=KAPPA, rank_multiple=1).ranks
    factors = SliceableFactors(floor, device) if FACTORS == "svd" else random_factors
    variants: dict[str, nn.Module] = {}
    for m in multiples:
        t = time.perf_counter()
        model = copy.deepcopy(dense)
        lowrank_cli.factorize(model, kappa=KAPPA, rank_multiple=m, check_calls=False, factor_fn=factors, device=device)
        variants[f"k2 /{m}"] = model.eval()
        log(f"factorized kappa {KAPPA:g}, rank multiple {m} ({time.perf_counter() - t:.0f} s)")
    return variants, factors


def ranks_of(model: nn.Module) -> str:
    from lowrank_cli.layers.lowrank_linear import LowRankLinear

    b = model.blocks[0]
    parts = []
    for short, name in (("qkv", "attn.qkv"), ("proj", "attn.proj"), ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")):
        layer = b.get_submodule(name)
        parts.append(f"{short} {layer.rank}" if isinstance(layer, LowRankLinear) else f"{short} dense")
    low = sum(isinstance(m, LowRankLinear) for m in model.modules())
    total = len(make_plan(model, kappa=KAPPA).layers) + low  # LowRankLinear children are linears too
    return ", ".join(parts) + (f" ({low}/{total - 2 * low} factorized)" if 0 < low < total - 2 * low else "")


def linear_macs(model: nn.Module, input_size) -> int:
    return count_macs(model, input_size).by_operator.get("linear", 0)


# ------------------------------------------------------------------------------------------------ printing


def print_rows(rows, models: dict[str, nn.Module], title: str) -> None:
    say(title)
    ranks = {n: ranks_of(m) if n != "dense" else "-" for n, m in models.items()}
    w = max(len("ranks (block 0)"), *(len(v) for v in ranks.values()))
    mem = any(r.peak_memory_bytes for r in rows)
    ref_min = next((r.min_ms for r in rows if r.model == r.reference), None)
    say(f"  {'model':<10} {'ranks (block 0)':<{w}} {'batch':>5} {'median ms':>11} {'p10-p90 ms':>21} {'min ms':>10} "
        f"{'img/s':>9} {'speed-up':>8} {'(min)':>6} {'MAC ratio':>9} {'efficiency':>10}" + (f" {'peak MiB':>9}" if mem else ""))
    for r in rows:
        eff = "" if not (r.speedup and r.mac_ratio) else f"{r.speedup / r.mac_ratio:.0%}"
        spread = f"{r.p10_ms:,.1f}-{r.p90_ms:,.1f}"
        by_min = f"{ref_min / r.min_ms:.2f}x" if ref_min else ""
        line = (f"  {r.model:<10} {ranks.get(r.model, ''):<{w}} {r.batch_size:>5} {r.median_ms:>11,.1f} {spread:>21} "
                f"{r.min_ms:>10,.1f} {r.throughput:>9,.1f} {(r.speedup or 0):>7.2f}x {by_min:>6} "
                f"{(r.mac_ratio or 0):>8.2f}x {eff:>10}")
        if mem:
            line += f" {(r.peak_memory_bytes or 0) / 2**20:>9,.0f}"
        say(line)
    say("  speed-up = dense median / model median (interleaved repeats); (min) = the same from the fastest repeats; "
        "MAC ratio = dense MACs / model MACs; efficiency = speed-up / MAC ratio")


def print_profiles(profiles, notes: dict[str, str]) -> None:
    say(f"  {'model':<14} {'GEMM ms':>10} {'attention':>10} {'other ms':>10} {'total ms':>10} {'GEMM share':>10}")
    for p in profiles:
        say(f"  {p.model:<14} {p.gemm_ms:>10,.1f} {p.attention_ms:>10,.1f} {p.other_ms:>10,.1f} {p.total_ms:>10,.1f} "
            f"{ratio(p.gemm_ms, p.total_ms):>10.0%}")
    for p in profiles:
        say(f"    {p.model}: " + ", ".join(f"{n} {ms:,.1f} ({k})" for k, n, ms in p.top[:5]))
    for k, v in notes.items():
        say(f"  {k}: {v}")


def quietest_profiles(models: dict[str, nn.Module], x: torch.Tensor, rounds: int, **kw) -> list:
    """Profile each model `rounds` times, alternating, and keep each one's least disturbed (shortest) run."""
    best: dict[str, object] = {}
    for i in range(max(rounds, 1)):
        for name in (list(models) if i % 2 == 0 else list(models)[::-1]):
            p = profile(models[name], x, name=name, **kw.get(name, {}))
            if name not in best or p.total_ms < best[name].total_ms:
                best[name] = p
    return [best[name] for name in models]


def ratio(a: float, b: float) -> float:
    """a / b, NaN when b is 0 (a profiler that recorded no kernels must not cost the numbers already taken)."""
    return a / b if b else float("nan")


def page_faults(model: nn.Module, x: torch.Tensor) -> int:
    """Minor page faults of one forward (after one untimed): activations above glibc's mmap threshold (32 MiB
    at most) get fresh pages from the kernel on every call, zeroed first, and that time lands in whichever op
    first writes them (a GEMM or GELU), in both models alike."""
    import resource

    with torch.inference_mode():
        model(x)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        model(x)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def amdahl(dense_prof, linear_mac_ratio: float) -> float:
    """Speed-up if the GEMMs scaled exactly with their MACs and everything else stayed as in the dense model."""
    return ratio(dense_prof.total_ms,
                 dense_prof.total_ms - dense_prof.gemm_ms + ratio(dense_prof.gemm_ms, linear_mac_ratio))


# ------------------------------------------------------------------------------------------------ layer variants


def layer_variants(batch: int, tokens: int, reps: int) -> list[dict]:
    """Is LowRankLinear's forward (two F.linear on 3-D input) as fast as the alternatives on this CPU?"""
    import torch.nn.functional as F

    from lowrank_cli.layers.lowrank_linear import LowRankLinear

    results = []
    gen = torch.Generator().manual_seed(0)
    for d_in, d_out, r in ((768, 3072, 304), (3072, 768, 304), (768, 2304, 288)):
        layer = LowRankLinear(d_in, d_out, r).eval()
        dense = nn.Linear(d_in, d_out).eval()
        x = torch.randn((batch, tokens, d_in), generator=gen)
        a, b, bias = layer.first.weight, layer.second.weight, layer.second.bias
        at, bt = a.t().contiguous(), b.t().contiguous()
        x2 = x.view(-1, d_in)
        fns = {
            "dense nn.Linear": lambda: dense(x),
            "LowRankLinear": lambda: layer(x),
            "2-D mm + addmm": lambda: torch.addmm(bias, torch.mm(x2, a.t()), b.t()).view(batch, tokens, d_out),
            "pre-transposed W^T": lambda: torch.addmm(bias, torch.mm(x2, at), bt).view(batch, tokens, d_out),
            "mm, mm, add_ bias": lambda: torch.mm(torch.mm(x2, a.t()), b.t()).add_(bias),
            "F.linear, no bias +": lambda: F.linear(F.linear(x, a), b) + bias,
        }
        with torch.inference_mode():
            for f in fns.values():
                f()
            times = {k: [] for k in fns}
            for i in range(reps):
                for k, f in (list(fns.items()) if i % 2 == 0 else list(fns.items())[::-1]):
                    t = time.perf_counter()
                    f()
                    times[k].append((time.perf_counter() - t) * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        results.append({"shape": f"{d_in}->{d_out} r{r}", "ms": med})
    return results


# ------------------------------------------------------------------------------------------------ CPU


def cpu_section(args, doc: dict) -> None:
    import timm

    torch.set_num_threads(args.threads)
    dev = torch.device("cpu")
    bs = args.cpu_batch
    say(f"== CPU: {device_name(dev)}, fp32, batch {bs}, {ARCH} (random weights), kappa {KAPPA:g} ==")
    torch.manual_seed(0)
    dense = timm.create_model(ARCH, pretrained=False).eval()
    auto = auto_rank_multiple(dev, torch.float32)
    multiples = distinct_multiples(dense, [1, 8, 64], auto)
    variants, factors = build_variants(dense, multiples, dev)

    # Speed plan on this device and batch shape, from the auto plan.
    t = time.perf_counter()
    base = make_plan(dense, kappa=KAPPA, rank_multiple=auto)
    plan, timings = speed_plan(dense, base, device=dev, dtype=torch.float32, batch_size=bs, repeats=args.plan_repeats,
                               warmup=1)
    log(f"speed plan: {timings['unique_shapes']} shapes timed ({time.perf_counter() - t:.0f} s)")
    say(f"speed plan (from kappa {KAPPA:g}, rank multiple auto = {auto}; per-layer eager timing, batch {bs}):")
    seen = set()
    for name, layer in timings["layers"].items():
        key = (layer["d_in"], layer["d_out"], layer["rank"])
        if key in seen:
            continue
        seen.add(key)
        say(f"  {layer['d_out']}x{layer['d_in']} rank {layer['rank']:>4}: dense {layer['dense_ms']:8.1f} ms, "
            f"factorized {layer['lowrank_ms']:8.1f} ms, gain {layer['gain']:.2f}x -> "
            f"{'factorize' if layer['factorized'] else 'keep dense'}")
    say(f"  kept dense: {len(plan.dense)} of {len(base.ranks)}; estimated gain on the block linears "
        f"{timings['estimated_gain']:.2f}x")
    models: dict[str, nn.Module] = {"dense": dense, **variants}
    auto_name = f"k2 /{auto}"
    if plan.ranks == base.ranks:
        say(f"  the speed plan factorizes every layer: it is the '{auto_name}' model")
        speed_name = auto_name
    else:
        speed_model = copy.deepcopy(dense)
        lowrank_cli.factorize(speed_model, plan=plan, check_calls=False, factor_fn=factors, device=dev)
        models["k2 speed"] = speed_model.eval()
        speed_name = "k2 speed"

    say()
    rows = bench(models, device=dev, dtype="fp32", batch_sizes=[bs], reference="dense", repeats=args.repeats,
                 warmup=1, progress=log)
    print_rows(rows, models, f"whole model, eager, {args.threads} threads, fp32, batch {bs} "
                             f"({args.repeats} interleaved repeats each; auto = /{auto}):")

    # Where the time goes, dense vs the auto model.
    size = (3, 224, 224)
    x = torch.randn((bs, *size), generator=torch.Generator().manual_seed(1))
    log("profiling dense and the auto model")
    profs = quietest_profiles({"dense": models["dense"], auto_name: models[auto_name]}, x, rounds=args.profile_rounds)
    lin_ratio = linear_macs(models["dense"], size) / linear_macs(models[auto_name], size)
    row = {r.model: r for r in rows}
    notes = {
        "MAC ratio (whole model)": f"{row[auto_name].mac_ratio:.2f}x; linear layers alone {lin_ratio:.2f}x",
        "if the GEMMs scaled with their MACs (rest unchanged)": f"{amdahl(profs[0], lin_ratio):.2f}x",
        "GEMM time ratio measured (profile)": f"{ratio(profs[0].gemm_ms, profs[1].gemm_ms):.2f}x vs {lin_ratio:.2f}x in MACs",
        "shared non-GEMM time": f"{profs[0].total_ms - profs[0].gemm_ms:,.0f} ms dense, "
                                f"{profs[1].total_ms - profs[1].gemm_ms:,.0f} ms {auto_name}",
    }
    say()
    faults = {name: page_faults(models[name], x) for name in ("dense", auto_name)}
    notes["minor page faults per forward"] = ", ".join(
        f"{n} {f:,} ({f * 4096 / 2**20:,.0f} MiB of fresh zeroed pages)" for n, f in faults.items())
    say(f"where the time goes (the quieter of {args.profile_rounds} profiled forwards, batch {bs}; CPU op time: linear/conv and attention ops with everything "
        "under them, the rest by self time):")
    print_profiles(profs, notes)

    say()
    log("layer forward variants")
    variants_ms = layer_variants(bs, 197, args.variant_repeats)
    say(f"low-rank layer forward on this CPU (ms, median of {args.variant_repeats} interleaved; {bs}x197 tokens):")
    names = list(variants_ms[0]["ms"])
    say("  " + f"{'shape':<18}" + "".join(f"{n:>21}" for n in names))
    for v in variants_ms:
        say("  " + f"{v['shape']:<18}" + "".join(f"{v['ms'][n]:>21,.1f}" for n in names))

    best = max((r for r in rows if r.model != "dense"), key=lambda r: r.speedup)
    say()
    say(f"CPU target (>= 1.8x dense, kappa 2, fp32, batch {bs}):")
    for r in rows:
        if r.model == "dense":
            continue
        tag = " (auto)" if r.model == auto_name else ""
        tag += " (speed plan)" if r.model == speed_name else ""
        say(f"  {r.model}{tag}: {r.speedup:.2f}x  -> {'MET' if r.speedup >= 1.8 else 'missed'}")
    say(f"  best: {best.model} {best.speedup:.2f}x at MAC ratio {best.mac_ratio:.2f}x")
    noisy = [r.model for r in rows if r.p90_ms > 1.2 * r.p10_ms]
    above = [r.model for r in rows if r.speedup and r.mac_ratio and r.speedup > 1.05 * r.mac_ratio]
    if noisy or above:
        say(f"  CAUTION: noisy run (p90 > 1.2 x p10 for {', '.join(noisy) or 'none'}; speed-up above the MAC ratio "
            f"for {', '.join(above) or 'none'}): other processes shared the CPU; trust the (min) column more, "
            "or rerun on a quiet machine with more --repeats")
    doc["cpu"] = {
        "device": device_name(dev), "batch_size": bs, "auto_rank_multiple": auto,
        "rows": [r.to_json() for r in rows], "ranks": {n: ranks_of(m) for n, m in models.items() if n != "dense"},
        "speed_plan": timings, "profile": [p.to_json() for p in profs], "notes": notes,
        "layer_variants": variants_ms,
    }


# ------------------------------------------------------------------------------------------------ GPU


def gpu_section(args, doc: dict) -> None:
    import timm
    import torch._dynamo

    dev = torch.device(args.gpu_device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        say("== GPU ==")
        say("no CUDA device: GPU targets not measured")
        doc["gpu"] = None
        return
    # --gpu-device cpu runs this section's code on the CPU (with a small --arch and --gpu-batch) so that it is
    # known to work before a GPU is borrowed; CUDA graphs then become a plain compiled run.
    graphs = dev.type == "cuda"
    dt = torch.bfloat16
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    say(f"== GPU: {device_name(dev)}, bf16, {ARCH} (random weights), kappa {KAPPA:g} ==")
    torch.manual_seed(0)
    dense = timm.create_model(ARCH, pretrained=False).to(dev).eval()
    auto = auto_rank_multiple(dev, dt)
    multiples = distinct_multiples(dense, [8, 64], auto)
    variants, factors = build_variants(dense, multiples, dev)
    base = make_plan(dense, kappa=KAPPA, rank_multiple=auto)
    plan, timings = speed_plan(dense, base, device=dev, dtype=dt, batch_size=args.gpu_batch, repeats=20)
    say(f"speed plan (kappa {KAPPA:g}, multiple {auto}, bf16, batch {args.gpu_batch}): kept dense "
        f"{len(plan.dense)} of {len(base.ranks)}; estimated gain on the block linears {timings['estimated_gain']:.2f}x")
    models: dict[str, nn.Module] = {"dense": dense, **variants}
    auto_name = f"k2 /{auto}"
    if plan.ranks != base.ranks:
        speed_model = copy.deepcopy(dense)
        lowrank_cli.factorize(speed_model, plan=plan, check_calls=False, factor_fn=factors, device=dev)
        models["k2 speed"] = speed_model.eval()
    results = {}

    def run(title: str, names: list[str], batch: int, **kw):
        torch._dynamo.reset()  # each compiled run starts from a clean cache: no stale graphs, no recompile limit
        subset = {n: models[n] for n in names}
        rows = bench(subset, device=dev, dtype=dt, batch_sizes=[batch], reference="dense", progress=log, **kw)
        say()
        print_rows(rows, subset, title)
        results[title] = [r.to_json() for r in rows]
        doc["gpu_partial"] = results
        save(args, doc)
        return rows

    every = list(models)
    eager = run(f"eager, batch {args.gpu_batch}", every, args.gpu_batch)
    compiled = run(f"torch.compile (default mode) on every model, batch {args.gpu_batch}", every, args.gpu_batch,
                   compile=True)
    eager1 = run("eager, batch 1", ["dense", auto_name], 1)
    graphs1 = run("torch.compile mode=reduce-overhead (CUDA graphs) on both, batch 1" if graphs else
                  "torch.compile on both, batch 1 (no CUDA graphs off CUDA)", ["dense", auto_name], 1,
                  compile=True, cuda_graphs=graphs)

    # Where the time goes at the big batch: kernels of the compiled models, GEMMs vs the rest.
    x = torch.randn((args.gpu_batch, 3, 224, 224), device=dev, dtype=dt)
    profs = []
    torch._dynamo.reset()
    for name in ("dense", auto_name):
        fn = torch.compile(models[name], dynamic=False)
        with torch.inference_mode():
            for _ in range(3):
                fn(x)
        profs.append(profile(models[name], x, name=name, fn=fn, calls=5))
    size = (3, 224, 224)
    lin_ratio = linear_macs(models["dense"], size) / linear_macs(models[auto_name], size)
    row = {r.model: r for r in compiled}
    notes = {
        "MAC ratio (whole model)": f"{row[auto_name].mac_ratio:.2f}x; linear layers alone {lin_ratio:.2f}x",
        "if the GEMMs scaled with their MACs (rest unchanged)": f"{amdahl(profs[0], lin_ratio):.2f}x",
        "GEMM kernel time ratio": f"{ratio(profs[0].gemm_ms, profs[1].gemm_ms):.2f}x vs {lin_ratio:.2f}x in MACs",
    }
    say()
    say(f"where the time goes (compiled, batch {args.gpu_batch}, " + ("CUDA kernel time per forward):" if graphs else
        "CPU op time per forward; inductor's generated C++ kernels are not profiler ops, so 'other' misses them):"))
    print_profiles(profs, notes)

    say()
    say("GPU targets:")
    c = {r.model: r for r in compiled}
    g1 = {r.model: r for r in graphs1}
    e1 = {r.model: r for r in eager1}
    say(f"  batch {args.gpu_batch}, compiled, {auto_name} (auto): {c[auto_name].speedup:.2f}x dense throughput "
        f"(target >= 1.5x) -> {'MET' if c[auto_name].speedup >= 1.5 else 'missed'}")
    for n, r in c.items():
        if n not in ("dense", auto_name):
            say(f"    {n}: {r.speedup:.2f}x")
    say(f"  batch 1, CUDA graphs, {auto_name}: {g1[auto_name].speedup:.2f}x dense (target >= 1.0x) -> "
        f"{'MET' if g1[auto_name].speedup >= 1.0 else 'missed'}  (eager batch 1: {e1[auto_name].speedup:.2f}x)")
    doc["gpu"] = {"device": device_name(dev), "auto_rank_multiple": auto, "runs": results, "speed_plan": timings,
                  "profile": [p.to_json() for p in profs], "notes": notes,
                  "ranks": {n: ranks_of(m) for n, m in models.items() if n != "dense"},
                  "eager": [r.to_json() for r in eager]}


def save(args, doc: dict) -> None:
    """Write what is measured so far (after each section and each GPU run): a run stopped by a time limit keeps it."""
    if args.json:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2, default=str))
        tmp.replace(args.json)


def main() -> None:
    global ARCH, FACTORS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--skip-gpu", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cpu-batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per model on the CPU (interleaved)")
    parser.add_argument("--plan-repeats", type=int, default=5)
    parser.add_argument("--profile-rounds", type=int, default=2, help="profiles per model (the shortest is kept)")
    parser.add_argument("--variant-repeats", type=int, default=5)
    parser.add_argument("--gpu-batch", type=int, default=256)
    parser.add_argument("--gpu-device", default="cuda",
                        help="device of the GPU section (cpu: a smoke run of its code, e.g. with --arch vit_tiny_patch16_224 "
                             "--gpu-batch 4)")
    parser.add_argument("--factors", choices=("random", "svd"), default="random",
                        help="random factors (timing only, default) or a randomized SVD per layer")
    parser.add_argument("--arch", default=ARCH, help="timm architecture (default deit_base_patch16_224)")
    parser.add_argument("--json", type=Path, help="also write every number to this JSON file")
    args = parser.parse_args()
    ARCH = args.arch
    FACTORS = args.factors
    doc: dict = {"torch": torch.__version__, "arch": ARCH, "kappa": KAPPA, "factors": FACTORS}
    say(f"lrc inference speed benchmark: torch {torch.__version__}, {ARCH}, kappa {KAPPA:g}, factors: {FACTORS}")
    if not args.skip_cpu:
        cpu_section(args, doc)
        save(args, doc)
        say()
    if not args.skip_gpu:
        gpu_section(args, doc)
    say()
    say(f"total time {time.perf_counter() - T0:.0f} s")
    doc.pop("gpu_partial", None)
    save(args, doc)


if __name__ == "__main__":
    main()
