"""The models of issue 27's speed table, built with random weights (timing does not depend on them), and the
ways to time them; shared by benchmarks/cpu_speed.py and benchmarks/gpu_speed.py.

    BERT-base (12 layers, 768 wide), DeiT-B (timm deit_base_patch16_224), a Llama-style decoder (hidden 2048,
    intermediate 8192, 32 heads, 8 key/value heads: Llama-3.2-1B's layer; `layers` of them; vocab 32000, lm_head
    dense). Compressed at kappa 2 with random factors of the planned ranks (no SVD): `lrc` is that model.
"""

from __future__ import annotations

import copy
import math
import sys
import time
import zlib
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lowrank_cli
from lowrank_cli.compress.svd import Factors
from lowrank_cli.evaluation.bench import weight_bytes
from lowrank_cli.evaluation.bench_ways import bench_ways, mark_fastest, ways_for
from lowrank_cli.evaluation.counting import count_macs
from lowrank_cli.evaluation.generation_bench import bench_generate
from lowrank_cli.models.grouping import group_lowrank, ungroup_lowrank
from lowrank_cli.models.inputs import example_input

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"  [{time.perf_counter() - T0:6.0f} s] {msg}", file=sys.stderr, flush=True)


def random_factors(name: str, weight: torch.Tensor, rank: int) -> Factors:
    """factor_fn for timing: random factors of the right shapes, scaled like nn.Linear's init (no SVD)."""
    d_out, d_in = weight.shape
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    first = torch.randn((rank, d_in), generator=gen) / math.sqrt(d_in)
    second = torch.randn((d_out, rank), generator=gen) / math.sqrt(rank)
    return Factors(first.to(weight.device), second.to(weight.device), torch.ones(rank), 0.0, 1.0, "random")


def bert_base(smoke: bool) -> tuple[nn.Module, tuple[int, ...]]:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.BertConfig(num_hidden_layers=2 if smoke else 12)  # bert-base-uncased's shapes
    return transformers.BertModel(config, add_pooling_layer=True).eval(), ((16,) if smoke else (128,))


def deit_base(smoke: bool) -> tuple[nn.Module, tuple[int, ...]]:
    import timm

    torch.manual_seed(0)
    kw = {"img_size": 32, "patch_size": 8, "depth": 2} if smoke else {}
    side = 32 if smoke else 224
    return timm.create_model("deit_base_patch16_224", pretrained=False, **kw).eval(), (3, side, side)


def llama_decoder(smoke: bool, layers: int = 8, vocab: int = 32000) -> tuple[nn.Module, tuple[int, ...]]:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    size = {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_hidden_layers": 2, "vocab_size": 512} if smoke else {
        "hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 8,
        "num_hidden_layers": layers, "vocab_size": vocab}
    config = transformers.LlamaConfig(**size, max_position_embeddings=4096, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).eval(), ((16,) if smoke else (128,))


def compressed(dense: nn.Module, size: tuple[int, ...], kappa: float, rank_multiple: int) -> tuple[nn.Module, dict]:
    """The lrc model (random factors at the planned ranks) and what it promises: MAC and weight-bytes ratios."""
    low = copy.deepcopy(dense)
    lowrank_cli.factorize(low, kappa=kappa, rank_multiple=rank_multiple, check_calls=False,
                          factor_fn=random_factors, input_size=size)
    one = example_input(dense, size, device="cpu")
    info = {"ranks": sorted({m.rank for m in low.modules() if hasattr(m, "rank")}),
            "mac_ratio": round(count_macs(dense, one).total / count_macs(low, one).total, 4),
            "weight_bytes_ratio": round(weight_bytes(dense) / weight_bytes(low), 4)}
    info["groups"] = group_lowrank(low).groups
    ungroup_lowrank(low)
    return low, info


def forward_rows(models: dict[str, nn.Module], size: tuple[int, ...], batch: int, runtimes: list[str], device,
                 dtype, min_time: float) -> list[dict]:
    """bench_ways rows (every runtime, lrc grouped and not), JSON-ready, `fastest` ones last."""
    ways = ways_for(device, runtimes, None, list(models.values()))  # grouped and not where lrc has groups
    rows = bench_ways(models, ways, device=device, dtype=dtype, batch_sizes=[batch], input_size=size,
                      reference="dense", fused=False, count_macs=False, min_time=min_time, warn=log,
                      progress=None)
    if len(ways) == 1:  # one way: its rows are the fastest
        rows = mark_fastest(rows)
    out = []
    for r in rows:
        d = r.to_json()
        d.pop("samples_ms")
        out.append(d)
        if r.fastest:
            log(f"batch {batch} fastest {r.model}: {r.runtime}{' grouped' if r.grouped else ''} "
                f"{r.median_ms:.2f} ms, {r.speedup:.2f}x")
    return out


def decode_rows(models: dict[str, nn.Module], batch: int, prompt: int, new_tokens: int, runtimes: list[str],
                device, dtype, repeats: int, groupings: tuple[bool, ...] = (False, True)) -> list[dict]:
    """bench_generate rows for every runtime, lrc grouped and not (`groupings`; each model fresh per runtime:
    compile and a static cache stay on a model), then each model's fastest, decode ratio best against best."""
    out = []
    for runtime in runtimes:
        for grouped in groupings:
            fresh = {name: copy.deepcopy(m) for name, m in models.items()}
            if grouped:
                group_lowrank(fresh["lrc"])
            try:
                rows = bench_generate(fresh, new_tokens=new_tokens, batch_sizes=[batch], prompt_tokens=prompt,
                                      device=device, dtype=dtype, runtime=runtime, reference="dense",
                                      repeats=repeats)
            except Exception as e:  # noqa: BLE001 (one failed way must not cost the others)
                log(f"decode b{batch} {runtime} FAILED: {type(e).__name__}: {str(e)[:300]}")
                out.append({"batch_size": batch, "runtime": runtime, "grouped": grouped,
                            "error": f"{type(e).__name__}: {str(e)[:300]}"})
                continue
            out += [r.to_json() for r in rows]
            log(f"decode b{batch} {runtime}{' grouped' if grouped else ''}: " + ", ".join(
                f"{r.model} {r.decode_tokens_per_s:.1f} tok/s" for r in rows))
            del fresh
    return out + fastest_decode(out)


def fastest_decode(rows: list[dict]) -> list[dict]:
    """Each model's fastest decode row (most tokens/s) per batch, with `decode_speedup` best against best."""
    best: dict[tuple, dict] = {}
    for r in rows:
        key = (r.get("model"), r["batch_size"])
        if "error" not in r and (key not in best or r["decode_tokens_per_s"] > best[key]["decode_tokens_per_s"]):
            best[key] = r
    out = []
    for r in best.values():
        ref = best.get(("dense", r["batch_size"]))
        out.append({**r, "fastest": True, "decode_speedup": round(r["decode_tokens_per_s"] /
                                                                  ref["decode_tokens_per_s"], 4) if ref else None})
    return out
