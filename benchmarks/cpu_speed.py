"""Issue 27's CPU rows, dense against lrc (kappa 2), every way, ratios in one run (benchmarks/speed_cases.py):

    python benchmarks/cpu_speed.py --threads 2                  # the table (a quiet machine: ~15-25 minutes)
    python benchmarks/cpu_speed.py --smoke                      # tiny models, one thread: the code paths only

    BERT-base, 128 tokens, batch 16, fp32          target >= 1.5x (MAC ratio 1.62x)
    DeiT-B, 224 px, batch 16, fp32                 target >= 1.8x (MAC ratio 1.91x)
    Llama-style decode, hidden 2048, 8 layers,     target >= 1.6x tokens/s (weight bytes allow ~1.74x, lm_head
      fp32, batch 1, greedy                        dense)

Every way: eager, and torch.compile unless --no-compile (inductor's C++ build takes minutes per model on a small
CPU), each with lrc's shared-input layers grouped and not (models.grouping); the dense model runs every way too,
and each row of the table is each model's fastest, the ratio best against best (evaluation.bench_ways). The models'
repeats are interleaved within a way. JSON to benchmarks/results/cpu_speed.json (--json elsewhere), rewritten
after every case, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from speed_cases import (
    bert_base,
    compressed,
    decode_rows,
    deit_base,
    forward_rows,
    llama_decoder,
    log,
)

from lowrank_cli.devices import device_name

RESULTS = Path(__file__).resolve().parent / "results" / "cpu_speed.json"
TARGETS = {"bert_base": 1.5, "deit_base": 1.8, "llama_decode": 1.6}


def forward_case(name: str, args, doc: dict, save) -> None:
    dense, size = {"bert_base": bert_base, "deit_base": deit_base}[name](args.smoke)
    low, info = compressed(dense, size, args.kappa, args.rank_multiple)
    log(f"{name}: ranks {info['ranks']}, MAC ratio {info['mac_ratio']:.2f}x, {info['groups']} groups")
    entry = doc["cases"].setdefault(name, {**info, "input_size": list(size), "batch": args.batch})
    entry["rows"] = forward_rows({"dense": dense, "lrc": low}, size, args.batch, args.runtimes, "cpu",
                                 torch.float32, args.min_time)
    save()


def decode_case(args, doc: dict, save) -> None:
    dense, size = llama_decoder(args.smoke, layers=args.layers)
    low, info = compressed(dense, size, args.kappa, args.rank_multiple)
    log(f"llama decode: ranks {info['ranks']}, weight-bytes ratio {info['weight_bytes_ratio']:.2f}x")
    entry = doc["cases"].setdefault("llama_decode", {**info, "prompt_tokens": args.prompt, "new_tokens": args.new})
    entry["rows"] = decode_rows({"dense": dense, "lrc": low}, 1, args.prompt, args.new, args.runtimes, "cpu",
                                torch.float32, args.repeats)
    save()


def table(doc: dict) -> str:
    lines = ["| case (CPU, fp32) | dense fastest | lrc fastest | ratio | promise | target |", "|---|---|---|---|---|---|"]
    for name, entry in doc["cases"].items():
        best = {r["model"]: r for r in entry.get("rows", []) if r.get("fastest")}
        if "lrc" not in best or "dense" not in best:
            continue
        decode = name == "llama_decode"

        def way(r: dict) -> str:
            return f"{r['runtime']}{' grouped' if r.get('grouped') else ''}"

        value = (lambda r: f"{r['decode_tokens_per_s']:.2f} tok/s") if decode else (lambda r: f"{r['median_ms']:.1f} ms")
        ratio = best["lrc"]["decode_speedup"] if decode else best["lrc"]["speedup"]
        promise = f"bytes {entry['weight_bytes_ratio']:.2f}x" if decode else f"MACs {entry['mac_ratio']:.2f}x"
        lines.append(f"| {name} | {value(best['dense'])} ({way(best['dense'])}) | {value(best['lrc'])} "
                     f"({way(best['lrc'])}) | {ratio:.2f}x | {promise} | >= {TARGETS[name]}x "
                     f"{'met' if ratio >= TARGETS[name] else 'NOT met'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=None, help=f"where to write (default {RESULTS}; --smoke: none)")
    ap.add_argument("--smoke", action="store_true", help="tiny models, one thread, short timings")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", default="bert_base,deit_base,llama_decode")
    ap.add_argument("--kappa", type=float, default=2.0)
    ap.add_argument("--rank-multiple", type=int, default=8, help="8: --rank-multiple auto on AVX2 (16 on AVX-512)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--layers", type=int, default=8, help="decoder layers of the Llama-style model")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens for decoding")
    ap.add_argument("--new", type=int, default=32, help="tokens generated per repeat")
    ap.add_argument("--repeats", type=int, default=3, help="timed generate calls per model and way")
    ap.add_argument("--min-time", type=float, default=3.0, help="seconds of timed repeats per model and way")
    ap.add_argument("--no-compile", action="store_true", help="eager only (no torch.compile rows)")
    args = ap.parse_args()
    if args.smoke:
        args.threads, args.batch, args.min_time, args.new, args.prompt, args.repeats = 1, 2, 0.05, 4, 8, 1
        args.no_compile = True
    args.runtimes = ["eager"] if args.no_compile else ["eager", "compile"]
    torch.set_num_threads(args.threads)
    out = args.json or (None if args.smoke else RESULTS)
    doc = {"device": device_name(torch.device("cpu")), "threads": args.threads, "torch": torch.__version__,
           "kappa": args.kappa, "rank_multiple": args.rank_multiple, "runtimes": args.runtimes, "smoke": args.smoke,
           "cases": {}}

    def save() -> None:
        doc["table"] = table(doc)
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(doc, indent=1))

    t0 = time.perf_counter()
    for name in args.cases.split(","):
        decode_case(args, doc, save) if name == "llama_decode" else forward_case(name, args, doc, save)
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    save()
    print(f"# cpu_speed on {doc['device']}, {args.threads} threads, torch {doc['torch']}")
    print(doc["table"])


if __name__ == "__main__":
    sys.exit(main())
