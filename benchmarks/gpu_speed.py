"""Compressed vs dense on a GPU (issues 18 and 27): the issues' tables in one run.

    python benchmarks/gpu_speed.py --json OUT.json        # on a GPU, bf16 (estimated 6-9 minutes on an H100)
    python benchmarks/gpu_speed.py --models llama_decoder --json OUT.json   # the decoder (~6-9 minutes)
    python benchmarks/gpu_speed.py --smoke --models deit_base,bert_base,llama_decoder   # tiny, on the CPU
    bash benchmarks/gpu_session.sh speed                  # DeiT-B and BERT-base on a borrowed GPU, tests first
    bash benchmarks/gpu_session.sh decode                 # the Llama-style decoder, in a second call

Issue 27 adds `lrc grouped` (models.grouping: BERT's query/key/value first factors as one GEMM, the seconds as one
batched GEMM) to every way, and a Llama-style decoder (hidden 2048, intermediate 8192, 32 heads, 8 key/value heads,
16 layers, vocab 32000, kappa 2, lm_head dense): the forward at 512 tokens (prefill) every way, then greedy decode
tokens/s at batch 1 and 16, eager (dynamic cache) and graphs (static KV cache, compiled decode with CUDA graphs),
lrc grouped and not, the ratio best against best; the target is >= 0.9 of the weight-bytes ratio at batch 1.

For DeiT-B (224 px) and BERT-base (128 tokens), kappa 2, rank multiple 64 (what `--rank-multiple auto` picks on CUDA
bf16), both models treated alike, random weights (timing does not depend on them): dense, `lrc` (each low-rank layer
two nn.Linear) and `lrc fused` (`models.fusion.fuse_lowrank`: one Triton kernel per layer, BERT's query/key/value
as one launch, the MLP's GELU in the kernel), at batch 1 and a large batch (DeiT 256, BERT 64), each way:
    eager        the models as they are
    graphs       each model captured in one CUDA graph (launch overhead gone; what a served model runs)
    compiled     torch.compile, default mode (large batch; `--compile-batch-1` adds batch 1)
Speed-ups are against dense in the same way, with interleaved repeats (lowrank_cli.evaluation.bench). Then a profile
of one eager forward at the large batch (GEMMs / attention / the rest, the largest kernels) and the agreement of
`lrc fused` with `lrc` (bf16 tolerance). Targets (the issue's): DeiT-B batch 256 >= 1.45x dense, batch 1 >= 1.0x;
BERT-base batch 64 >= 1.3x, batch 1 >= 1.0x (best of the deployed ways: graphs or compiled).
Every step appends to the JSON as it finishes, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import os

os.environ.setdefault("KINETO_LOG_LEVEL", "5")

import argparse  # noqa: E402
import copy
import json
import math
import sys
import time
import zlib
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lowrank_cli  # noqa: E402
from lowrank_cli.compress.svd import Factors  # noqa: E402
from lowrank_cli.devices import device_name  # noqa: E402
from lowrank_cli.evaluation.bench import bench  # noqa: E402
from lowrank_cli.evaluation.counting import count_macs  # noqa: E402
from lowrank_cli.evaluation.profiling import profile  # noqa: E402
from lowrank_cli.models.fusion import fuse_lowrank  # noqa: E402
from lowrank_cli.models.grouping import group_lowrank  # noqa: E402
from lowrank_cli.models.inputs import example_input  # noqa: E402

T0 = time.perf_counter()
TARGETS = {("deit_base", "large"): 1.45, ("deit_base", 1): 1.0, ("bert_base", "large"): 1.3, ("bert_base", 1): 1.0}


def log(msg: str) -> None:
    print(f"  [{time.perf_counter() - T0:6.0f} s] {msg}", file=sys.stderr, flush=True)


def random_factors(name: str, weight: torch.Tensor, rank: int) -> Factors:
    """factor_fn for timing: random factors of the right shapes, scaled like nn.Linear's init (no SVD)."""
    d_out, d_in = weight.shape
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    first = torch.randn((rank, d_in), generator=gen) / math.sqrt(d_in)
    second = torch.randn((d_out, rank), generator=gen) / math.sqrt(rank)
    return Factors(first.to(weight.device), second.to(weight.device), torch.ones(rank), 0.0, 1.0, "random")


def build(arch: str, smoke: bool) -> tuple[nn.Module, tuple[int, ...]]:
    """The dense model (random weights, eval mode) and its input size."""
    torch.manual_seed(0)
    if arch == "deit_base":
        import timm

        kw = dict(img_size=32, patch_size=8, depth=2) if smoke else {}
        side = 32 if smoke else 224
        return timm.create_model("deit_base_patch16_224", pretrained=False, **kw).eval(), (3, side, side)
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.BertConfig(num_hidden_layers=2 if smoke else 12)  # bert-base-uncased's shapes
    model = transformers.BertModel(config, add_pooling_layer=True).eval()
    return model, ((16,) if smoke else (128,))


def variants(arch: str, args) -> tuple[dict[str, nn.Module], tuple[int, ...], dict]:
    dense, size = build(arch, args.smoke)
    low = copy.deepcopy(dense)
    lowrank_cli.factorize(low, kappa=args.kappa, rank_multiple=args.rank_multiple, check_calls=False,
                          factor_fn=random_factors, device=args.device, input_size=size)
    info = {"ranks": sorted({m.rank for m in low.modules() if hasattr(m, "rank")})}
    one = example_input(dense, size, device="cpu")
    dense_macs, low_macs = count_macs(dense, one).total, count_macs(low, one).total
    info["mac_ratio"] = dense_macs / low_macs
    fused = copy.deepcopy(low).to(args.device, args.dtype)
    info["fusion"] = fuse_lowrank(fused, input_size=size).describe()
    grouped = copy.deepcopy(low).to(args.device, args.dtype)
    info["groups"] = group_lowrank(grouped).groups
    models = {"dense": dense.to(args.device, args.dtype), "lrc": low.to(args.device, args.dtype)}
    if info["groups"]:
        models["lrc grouped"] = grouped
    if args.device.type == "cuda" and not args.quick:
        models["lrc fused"] = fused
    log(f"{arch}: ranks {info['ranks']}, MAC ratio {info['mac_ratio']:.2f}x; {info['fusion']}")
    return models, size, info


def timed(models, size, batch: int, way: str, args) -> list[dict]:
    """bench() rows for one batch and one way of running (eager / graphs / compiled)."""
    kw = dict(cuda_graphs=way == "graphs", compile="default" if way == "compiled" else False)
    rows = bench(models, device=args.device, dtype=args.dtype, batch_sizes=[batch], input_size=size,
                 reference="dense", fused=False, count_macs=False, min_time=args.min_time, warn=log, **kw)
    out = []
    for r in rows:
        d = r.to_json()
        d.pop("samples_ms")
        d["way"] = way
        out.append(d)
    speed = ", ".join(f"{r.model} {r.speedup:.2f}x" for r in rows if r.model != "dense")
    log(f"batch {batch}, {way}: dense {rows[0].median_ms:.2f} ms; {speed}")
    return out


def agreement(models, size, batch: int, args) -> dict:
    """`lrc fused` against `lrc` (the two linears) on the same input: the kernel's numerical error."""
    x = example_input(models["lrc"], size, batch, device=args.device, dtype=args.dtype,
                      generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref, got = (_output(models[n](x)).float() for n in ("lrc", "lrc fused" if "lrc fused" in models else "lrc"))
    err = (got - ref).abs().max().item() / max(ref.abs().max().item(), 1e-12)
    cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0).item()
    return {"batch": batch, "max_abs_err_rel_to_max": err, "cosine": cos, "ok": err < 3e-2 and cos > 0.999}


def _output(out) -> torch.Tensor:
    from lowrank_cli.models.inputs import output_tensor

    return output_tensor(out)


def profiles(models, size, batch: int, args) -> list[dict]:
    x = example_input(models["dense"], size, batch, device=args.device, dtype=args.dtype,
                      generator=torch.Generator().manual_seed(2))
    found = []
    for name, m in models.items():
        p = profile(m, x, name=name, calls=2)
        found.append(p.to_json())
        top = ", ".join(f"{n[:40]} {ms:.2f}" for _, n, ms in p.top[:3])
        log(f"profile {name} b{batch}: GEMM {p.gemm_ms:.2f} attn {p.attention_ms:.2f} other {p.other_ms:.2f} "
            f"total {p.total_ms:.2f} ms; {top}")
    return found


def run_arch(arch: str, args, doc: dict, save) -> None:
    models, size, info = variants(arch, args)
    entry = doc["models"].setdefault(arch, {**info, "input_size": list(size), "rows": []})
    large = args.large[arch]
    plan = [(1, "eager"), (large, "eager")]
    if args.device.type == "cuda":  # the most telling first: a run cut short keeps them
        plan += [(1, "graphs"), (large, "compiled"), (large, "graphs")]
        plan += [(1, "compiled")] if args.compile_batch_1 else []
    entry["agreement"] = [agreement(models, size, b, args) for b in (1, min(large, 8))]
    save()
    for batch, way in plan:
        try:
            entry["rows"] += timed(models, size, batch, way, args)
        except Exception as e:  # one failed way must not cost the others
            entry.setdefault("errors", []).append(f"batch {batch} {way}: {type(e).__name__}: {str(e)[:300]}")
            log(f"batch {batch} {way} FAILED: {type(e).__name__}: {str(e)[:300]}")
        save()
    entry["profile"] = [] if args.quick else profiles(models, size, large, args)
    save()
    del models
    if args.device.type == "cuda":
        torch.cuda.empty_cache()


def table(doc: dict) -> str:
    """The issue's table: speed-up over dense per way, for lrc / lrc fused, and the targets."""
    lines = ["| model, kappa 2 | batch | way | lrc | lrc grouped | lrc fused | MAC ratio | target (best deployed) |",
             "|---|---|---|---|---|---|---|---|"]
    for arch, entry in doc["models"].items():
        by = {(r["batch_size"], r["way"], r["model"]): r for r in entry["rows"]}
        for batch, way in dict.fromkeys((r["batch_size"], r["way"]) for r in entry["rows"]):
            s = [by.get((batch, way, m), {}).get("speedup") for m in ("lrc", "lrc grouped", "lrc fused")]
            kind = 1 if batch == 1 else "large"
            deployed = [by.get((batch, w, m), {}).get("speedup") for w in ("graphs", "compiled")
                        for m in ("lrc", "lrc grouped", "lrc fused")]
            deployed = [v for v in deployed if v]
            goal = TARGETS.get((arch, kind))
            mark = "" if not (goal and deployed and way == "eager") else (
                f">= {goal}x: {max(deployed):.2f}x {'met' if max(deployed) >= goal else 'NOT met'}")
            lines.append(f"| {arch} | {batch} | {way} | " + " | ".join("-" if v is None else f"{v:.2f}x" for v in s)
                         + f" | {entry['mac_ratio']:.2f}x | {mark} |")
    return "\n".join(lines)


def run_decoder(args, doc: dict, save) -> None:
    """The Llama-style decoder: prefill (a forward at --prefill tokens) every way, then decode tokens/s."""
    from speed_cases import compressed, decode_rows, llama_decoder

    dense, _ = llama_decoder(args.smoke, layers=args.decoder_layers)
    size = (16,) if args.smoke else (args.prefill,)
    low, info = compressed(dense, size, args.kappa, args.rank_multiple)
    log(f"llama_decoder: ranks {info['ranks']}, weight-bytes ratio {info['weight_bytes_ratio']:.2f}x")
    entry = doc["decoder"] = {**info, "layers": dense.config.num_hidden_layers, "prefill_tokens": size[0], "prefill": [],
                              "decode": []}
    grouped = copy.deepcopy(low)
    group_lowrank(grouped)
    models = {"dense": dense.to(args.device, args.dtype), "lrc": low.to(args.device, args.dtype),
              "lrc grouped": grouped.to(args.device, args.dtype)}
    ways = ["eager", "graphs", "compiled"] if args.device.type == "cuda" else ["eager"]
    for way in ways[:2] if args.quick else ways:
        try:
            entry["prefill"] += timed(models, size, 1, way, args)
        except Exception as e:  # noqa: BLE001 (one failed way must not cost the others)
            entry.setdefault("errors", []).append(f"prefill {way}: {type(e).__name__}: {str(e)[:300]}")
        save()
    runtimes = ["eager", "graphs"] if args.device.type == "cuda" else ["eager"]
    pair = {"dense": models["dense"], "lrc": models["lrc"]}
    del models
    for batch in args.decode_batches:
        entry["decode"] += decode_rows(pair, batch, 8 if args.smoke else args.decode_prompt, 4 if args.smoke else
                                       args.decode_tokens, runtimes[-1:] if args.quick else runtimes, args.device,
                                       args.dtype, 1 if args.smoke else 3, (True,) if args.quick else (False, True))
        save()
    best = [r for r in entry["decode"] if r.get("fastest") and r.get("model") == "lrc"]
    for r in best:
        log(f"decode b{r['batch_size']}: lrc {r['decode_speedup']}x dense tokens/s (bytes ratio "
            f"{info['weight_bytes_ratio']:.2f}x, target >= {0.9 * info['weight_bytes_ratio']:.2f}x at batch 1)")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write every result here (updated after each step)")
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU, fp32: the script's code paths only")
    ap.add_argument("--models", default="deit_base,bert_base")
    ap.add_argument("--kappa", type=float, default=2.0)
    ap.add_argument("--rank-multiple", type=int, default=64)
    ap.add_argument("--deit-batch", type=int, default=256)
    ap.add_argument("--bert-batch", type=int, default=64)
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds of timed repeats per model and way")
    ap.add_argument("--compile-batch-1", action="store_true", help="also torch.compile at batch 1")
    ap.add_argument("--quick", action="store_true", help="issue 27's table in one device call: no fused variant, "
                    "no profiles, the decoder's prefill eager and graphs, its decode graphs with lrc grouped only")
    ap.add_argument("--decoder-layers", type=int, default=16)
    ap.add_argument("--prefill", type=int, default=512, help="tokens of the decoder's prefill forward")
    ap.add_argument("--decode-batches", type=lambda t: [int(v) for v in t.split(",")], default=[1, 16])
    ap.add_argument("--decode-prompt", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.smoke:
        args.device, args.dtype, args.min_time = torch.device("cpu"), torch.float32, min(args.min_time, 0.05)
        args.rank_multiple, args.deit_batch, args.bert_batch = 16, 4, 4
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            sys.exit("Error: no CUDA device: run on a GPU, or pass --smoke to check the script on the CPU")
        args.device, args.dtype = torch.device("cuda"), torch.bfloat16
    args.large = {"deit_base": args.deit_batch, "bert_base": args.bert_batch}
    doc = {"device": device_name(args.device), "dtype": str(args.dtype), "torch": torch.__version__,
           "kappa": args.kappa, "rank_multiple": args.rank_multiple, "smoke": args.smoke, "models": {}}
    try:
        import triton

        doc["triton"] = triton.__version__
    except ImportError:
        doc["triton"] = None

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(doc, indent=1))

    for arch in args.models.split(","):
        if arch == "llama_decoder":
            run_decoder(args, doc, save)
        else:
            run_arch(arch, args, doc, save)
        print(table(doc), flush=True)  # so far: the log keeps it if a later model runs out of time
    doc["table"] = table(doc)
    doc["seconds"] = round(time.perf_counter() - T0, 1)
    save()
    print(f"# gpu_speed on {doc['device']}, {doc['dtype']}, torch {doc['torch']}, triton {doc['triton']}")
    print(doc["table"])
    for arch, entry in doc["models"].items():
        for a in entry.get("agreement", []):
            print(f"{arch} fused vs two linears, batch {a['batch']}: max error {a['max_abs_err_rel_to_max']:.2e} of "
                  f"the largest output, cosine {a['cosine']:.6f} ({'ok' if a['ok'] else 'NOT ok'})")
        for p in entry.get("profile", []):
            print(f"{arch} {p['model']} b{p['batch_size']} eager profile: GEMM {p['gemm_ms']:.2f} ms, attention "
                  f"{p['attention_ms']:.2f}, other {p['other_ms']:.2f}, total {p['total_ms']:.2f} ms")
        for e in entry.get("errors", []):
            print(f"{arch} ERROR {e}")
    print(decoder_table(doc.get("decoder")))


def decoder_table(entry: dict | None) -> str:
    """The decoder's rows: prefill speed-ups per way, decode tokens/s of each model's fastest way."""
    if not entry:
        return ""
    lines = [f"llama_decoder ({entry['layers']} layers, weight-bytes ratio {entry['weight_bytes_ratio']:.2f}x):"]
    for r in entry["prefill"]:
        if r["model"] != "dense":
            lines.append(f"  prefill {entry['prefill_tokens']} tokens, {r['way']}: {r['model']} {r['speedup']:.2f}x")
    for r in entry["decode"]:
        if r.get("fastest"):
            lines.append(f"  decode batch {r['batch_size']}: {r['model']} {r['decode_tokens_per_s']:.1f} tok/s "
                         f"({r['runtime']}{', grouped' if r['grouped'] else ''}), {r['decode_speedup']:.2f}x dense")
    for e in entry.get("errors", []):
        lines.append(f"  ERROR {e}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
