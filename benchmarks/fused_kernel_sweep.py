"""Can the fused low-rank kernel beat cuBLAS with other block sizes? One layer at a time, on a GPU (issue 18).

    python benchmarks/fused_kernel_sweep.py --json OUT.json     # on a GPU, bf16 (~2 minutes, most of it compiling)
    TRITON_INTERPRET=1 python benchmarks/fused_kernel_sweep.py --smoke   # tiny shapes on the CPU: the code paths

For the layer shapes of DeiT-B / BERT-base at kappa 2 (rank multiple 64), at the token counts of gpu_speed.py
(DeiT-B batch 256 = 50432 tokens, BERT-base batch 64 = 8192, batch 1), it times with triton.testing.do_bench:
    dense      x @ W^T + b, one cuBLAS GEMM
    two        (x @ W1^T) @ W2^T + b, the two cuBLAS GEMMs lrc runs by default
    fused      the Triton kernel with the autotuner's choice (what `--fused` runs)
    sweep      the kernel at each block size / warps / stages of a grid wider than the autotuner's
and prints, per shape, the best sweep config against `two`. gpu_speed.py found the autotuned kernel 2.2x slower
than `two` on DeiT-B at batch 256 (H200): this says whether block sizes can close that gap or the design must
change (e.g. split the two GEMMs again and fuse only the epilogue).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowrank_cli.layers.kernels import lowrank_triton as lt

# (name, d_in, d_out, rank, groups, activation): DeiT-B qkv / fc1 (+GELU) / fc2 / proj, BERT q,k,v (3 in one launch)
SHAPES = [("deit qkv", 768, 2304, 256, 1, "none"), ("deit fc1", 768, 3072, 256, 1, "gelu"),
          ("deit fc2", 3072, 768, 256, 1, "none"), ("deit proj", 768, 768, 192, 1, "none"),
          ("bert q,k,v", 768, 768, 192, 3, "none")]
SMOKE_SHAPES = [("tiny", 64, 96, 32, 1, "gelu"), ("tiny x3", 64, 64, 16, 3, "none")]


def bench_ms(fn, smoke: bool) -> float:
    if smoke:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton

    return triton.testing.do_bench(fn, warmup=10, rep=40)


def sweep_configs(smoke: bool) -> list[dict]:
    if smoke:
        return [{"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}]
    return [{"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "num_warps": w, "num_stages": s}
            for m, n, k, w, s in itertools.product((64, 128), (64, 128, 256), (32, 64), (4, 8), (3,))]


def run_shape(shape, tokens: int, args) -> dict:
    name, d_in, d_out, rank, groups, act = shape
    dev, dt = args.device, args.dtype
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(tokens, d_in, generator=gen).to(dev, dt)
    first = [(torch.randn(rank, d_in, generator=gen) / d_in ** 0.5).to(dev, dt) for _ in range(groups)]
    second = [(torch.randn(d_out, rank, generator=gen) / rank ** 0.5).to(dev, dt) for _ in range(groups)]
    bias = [torch.randn(d_out, generator=gen).to(dev, dt) for _ in range(groups)]
    dense_w = [torch.randn(d_out, d_in, generator=gen).to(dev, dt) for _ in range(groups)]
    f = torch.nn.functional
    post = f.gelu if act == "gelu" else (lambda t: t)

    def dense():
        return [post(f.linear(x, w, b)) for w, b in zip(dense_w, bias)]

    def two():
        return [post(f.linear(f.linear(x, a), b2, b)) for a, b2, b in zip(first, second, bias)]

    row = {"shape": name, "tokens": tokens, "rank": rank, "groups": groups,
           "dense_ms": bench_ms(dense, args.smoke), "two_ms": bench_ms(two, args.smoke)}
    ref = torch.cat(two(), dim=-1).float()
    if not args.smoke:
        row["fused_ms"] = bench_ms(lambda: lt.fused_lowrank(x, first, second, bias, act), args.smoke)
    found = []
    for cfg in sweep_configs(args.smoke):
        try:
            out = lt.fused_lowrank(x, first, second, bias, act, config=cfg).float()
            err = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
            ms = bench_ms(lambda c=cfg: lt.fused_lowrank(x, first, second, bias, act, config=c), args.smoke)
            found.append({**cfg, "ms": ms, "err": err})
        except Exception as e:  # noqa: BLE001 - a config that does not compile (registers, shared memory) is data
            found.append({**cfg, "error": f"{type(e).__name__}: {str(e)[:120]}"})
    ok = [c for c in found if "ms" in c and c["err"] < 3e-2]
    row["best"] = min(ok, key=lambda c: c["ms"]) if ok else None
    row["configs"] = found
    best = row["best"]["ms"] if row["best"] else float("nan")
    print(f"{name:11s} tokens {tokens:6d} r {rank}: dense {row['dense_ms']:.3f} ms, two {row['two_ms']:.3f}, "
          f"fused(autotuned) {row.get('fused_ms', float('nan')):.3f}, best sweep {best:.3f} "
          f"({row['best'] and {k: v for k, v in row['best'].items() if k not in ('ms', 'err')}}); "
          f"best/two {best / row['two_ms']:.2f}x", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes under the Triton interpreter on the CPU")
    args = ap.parse_args()
    if args.smoke:
        args.device, args.dtype = torch.device("cpu"), torch.float32
        plan = [(shape, t) for t in (5, 33) for shape in SMOKE_SHAPES]
    else:
        if not torch.cuda.is_available():
            sys.exit("Error: no CUDA device: run on a GPU, or pass --smoke with TRITON_INTERPRET=1 on the CPU")
        args.device, args.dtype = torch.device("cuda"), torch.bfloat16
        deit, bert = SHAPES[:4], SHAPES[4]
        # DeiT-B batch 256 (50432 tokens) first, then BERT-base batch 64, then batch 1 of each
        plan = [(s, 50432) for s in deit] + [(bert, 8192), (SHAPES[1], 197), (bert, 128)]
    rows = []
    for shape, tokens in plan:
        rows.append(run_shape(shape, tokens, args))
        if args.json:
            device = torch.cuda.get_device_name(0) if args.device.type == "cuda" else "cpu"
            args.json.write_text(json.dumps({"device": device, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
