"""Streaming factorize: peak memory and time of `lrc factorize` on models far larger than what it holds.

    python benchmarks/streaming_factorize.py --llama 8b                  # Llama-3-8B shapes, ~16 GB bf16, kappa 8
    python benchmarks/streaming_factorize.py --llama 8b --layers 4 --ratio 0.4 --svd exact   # extrapolate exact
    python benchmarks/streaming_factorize.py --llama 1g                  # hidden 2048, 8 layers, ~1 GiB bf16
    python benchmarks/streaming_factorize.py --vit vit_large_patch16_224 # peak RSS against the dense file
    python benchmarks/streaming_factorize.py --overhead deit_base_patch16_224   # streaming / bare cost, kappa 2
    python benchmarks/streaming_factorize.py --smoke                     # all three, tiny, in a minute

--llama writes a random Llama (GQA) as bf16 shards with an index, tensor by tensor (it never holds the model),
runs `lrc factorize --ratio R --svd randomized` (or `--kappa K`) in a fresh process, and reports the child's peak
RSS (the command's own VmHWM line and ru_maxrss), its wall time, and that the output reloads and generates a few
tokens. --vit saves a timm ViT (pretrained=False) as a timm folder and reports the same against its file size.
--overhead times, in one process and alternating, streaming factorize at kappa 2 and the bare cost of the same work
(read every tensor, the same SVDs at the same ranks, write the factors and the rest): their ratio. Every file is
deleted at the end (a folder under --dir, default the system's temporary folder).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KEYS = ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab")
LLAMAS = {"8b": dict(zip(KEYS, (4096, 32, 32, 8, 14336, 128256))),
          "1g": dict(zip(KEYS, (2048, 8, 16, 4, 6144, 32000))),  # 0.96 GiB in bf16
          "mid": dict(zip(KEYS, (1024, 4, 8, 2, 4096, 32000))),  # 0.23 GiB: a quick check of the memory shape
          "smoke": dict(zip(KEYS, (256, 2, 4, 2, 512, 1024)))}


def llama_tensors(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    head = c["hidden"] // c["heads"]
    kv = head * c["kv_heads"]
    names = [("model.embed_tokens.weight", (c["vocab"], c["hidden"]))]
    for i in range(c["layers"]):
        p = f"model.layers.{i}."
        names += [(p + "input_layernorm.weight", (c["hidden"],)),
                  (p + "self_attn.q_proj.weight", (c["hidden"], c["hidden"])),
                  (p + "self_attn.k_proj.weight", (kv, c["hidden"])), (p + "self_attn.v_proj.weight", (kv, c["hidden"])),
                  (p + "self_attn.o_proj.weight", (c["hidden"], c["hidden"])),
                  (p + "post_attention_layernorm.weight", (c["hidden"],)),
                  (p + "mlp.gate_proj.weight", (c["intermediate"], c["hidden"])),
                  (p + "mlp.up_proj.weight", (c["intermediate"], c["hidden"])),
                  (p + "mlp.down_proj.weight", (c["hidden"], c["intermediate"]))]
    return names + [("model.norm.weight", (c["hidden"],)), ("lm_head.weight", (c["vocab"], c["hidden"]))]


def write_llama(folder: Path, c: dict, shard: str = "2GB") -> int:
    """A random bf16 Llama as save_pretrained lays it out, written tensor by tensor; returns its bytes."""
    import torch
    import transformers

    from lowrank_cli.checkpoint.shard_writer import SetWriter
    from lowrank_cli.option_fields import parse_bytes

    config = transformers.LlamaConfig(hidden_size=c["hidden"], num_hidden_layers=c["layers"],
                                      num_attention_heads=c["heads"], num_key_value_heads=c["kv_heads"],
                                      intermediate_size=c["intermediate"], vocab_size=c["vocab"],
                                      tie_word_embeddings=False, dtype="bfloat16", max_position_embeddings=2048)
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    tensors = llama_tensors(c)
    generator = torch.Generator().manual_seed(0)
    with SetWriter(folder / "model.safetensors", {n: (torch.bfloat16, s) for n, s in tensors},
                   parse_bytes(shard)) as writer:
        for name, shape in tensors:
            t = (torch.ones(shape) if len(shape) == 1 else
                 torch.randn(shape, generator=generator, dtype=torch.bfloat16) * 0.02).to(torch.bfloat16)
            writer.write(name, t)
            del t
        writer.finish({"format": "pt"})  # one model.safetensors, or model-0000i-of-0000N + the index
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def factorize_child(source: Path, output: Path, args: list[str]) -> dict:
    """`lrc factorize` in a fresh process: its JSON summary, wall time and the child's ru_maxrss."""
    command = [sys.executable, "-m", "lowrank_cli", "factorize", str(source), "-o", str(output), "--json", *args]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"lrc factorize failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout)
    peak_line = next((line for line in done.stderr.splitlines() if "Peak resident memory" in line), "")
    return {"wall_s": round(wall, 1), "peak_rss_gib": round(summary["peak_rss_bytes"] / 2**30, 3),
            "children_maxrss_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 3),
            "peak_line": peak_line.strip(), "streamed": summary.get("streamed"), "factorized": summary["factorized"],
            "compression": round(summary["compression"], 3), "files": len(summary.get("files") or [])}


def reload_and_generate(output: Path) -> dict:
    import torch

    import lowrank_cli

    start = time.perf_counter()
    model = lowrank_cli.load(output)
    with torch.no_grad():
        tokens = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    return {"reload_generate_s": round(time.perf_counter() - start, 1), "generated": tokens[0, 3:].tolist()}


def run_llama(root: Path, name: str, layers: int | None, rank_args: list[str], whole: bool = False) -> list[dict]:
    """The streamed run (and with `whole`, the same run loaded whole, --no-stream, for the comparison)."""
    c = dict(LLAMAS[name], **({"layers": layers} if layers else {}))
    source, output = root / f"llama-{name}", root / f"llama-{name}-lr.safetensors"
    size = write_llama(source, c)
    rows = []
    for extra in [[], ["--no-stream"]] if whole else [[]]:
        row = {"model": f"random Llama {name}", **c, "file_gib": round(size / 2**30, 3),
               "args": " ".join(rank_args + extra), **factorize_child(source, output, rank_args + extra + ["--force"])}
        row.update(reload_and_generate(output))
        rows.append(row)
    return rows


def run_vit(root: Path, arch: str, rank_args: list[str]) -> dict:
    import timm
    from timm.models import save_for_hf

    source = root / arch
    save_for_hf(timm.create_model(arch, pretrained=False).eval(), str(source), safe_serialization=True)
    size = (source / "model.safetensors").stat().st_size
    row = {"model": arch, "file_gib": round(size / 2**30, 3), "args": " ".join(rank_args),
           **factorize_child(source, root / f"{arch}-lr.safetensors", rank_args)}
    row["peak_over_file"] = round(row["peak_rss_gib"] / max(row["file_gib"], 1e-9), 2)
    return row


def bare_cost(source: Path, output: Path, ranks: dict[str, int]) -> None:
    """Read every tensor, the same SVDs at the same ranks, write the result: the work factorize cannot avoid."""
    from lowrank_cli.checkpoint.shard_writer import SetWriter
    from lowrank_cli.checkpoint.shards import TensorSet
    from lowrank_cli.compress.svd import linalg_threads, truncated_svd

    tensors = TensorSet.open(source / "model.safetensors")
    out: dict = {}
    for name in tensors.entries:
        t = tensors.read(name)
        module = name.removesuffix(".weight")
        if module in ranks and name.endswith(".weight"):
            with linalg_threads(t.shape):
                f = truncated_svd(t, ranks[module])
            out[f"{module}.first.weight"], out[f"{module}.second.weight"] = f.first.to(t.dtype), f.second.to(t.dtype)
        else:
            out[name] = t
    with SetWriter(output, {k: (v.dtype, tuple(v.shape)) for k, v in out.items()}, 5 * 10**9) as writer:
        for k, v in out.items():
            writer.write(k, v)
        writer.finish({"format": "pt"})


def run_overhead(root: Path, arch: str, repeats: int) -> dict:
    import json as json_

    import timm
    from timm.models import save_for_hf

    from lowrank_cli.checkpoint.shards import TensorSet
    from lowrank_cli.compress.factorize_source import factorize_file

    source = root / arch
    save_for_hf(timm.create_model(arch, pretrained=False).eval(), str(source), safe_serialization=True)
    streamed, bare = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        result = factorize_file(str(source), str(root / "s.safetensors"), kappa=2, force=True)
        streamed.append(time.perf_counter() - start)
        ranks = json_.loads(TensorSet.open(root / "s.safetensors").metadata["lrc.ranks"])
        start = time.perf_counter()
        bare_cost(source, root / "b.safetensors", ranks)
        bare.append(time.perf_counter() - start)
    return {"model": arch, "kappa": 2, "streamed": result.extra["streamed"], "factorize_s": round(min(streamed), 2),
            "bare_s": round(min(bare), 2), "ratio": round(min(streamed) / min(bare), 3), "target": "<= 1.15"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llama", choices=sorted(LLAMAS))
    parser.add_argument("--layers", type=int, help="Fewer decoder layers than the config (timing extrapolation).")
    parser.add_argument("--ratio", type=float)
    parser.add_argument("--kappa", type=float)
    parser.add_argument("--svd", default="randomized")
    parser.add_argument("--vit", help="A timm ViT to factorize at kappa 2 (e.g. vit_large_patch16_224).")
    parser.add_argument("--overhead", help="A timm model for the streaming / bare cost ratio (deit_base_patch16_224).")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--whole", action="store_true", help="--llama: also run it loaded whole (--no-stream).")
    parser.add_argument("--smoke", action="store_true", help="A tiny Llama, vit_tiny and deit_tiny.")
    parser.add_argument("--dir", help="Where the temporary files go (deleted at the end).")
    args = parser.parse_args()
    rank = ["--ratio", str(args.ratio)] if args.ratio is not None else ["--kappa", str(args.kappa or 8)]
    rank += ["--svd", args.svd]
    root = Path(tempfile.mkdtemp(prefix="lrc-stream-", dir=args.dir))
    rows = []
    try:
        if args.smoke:
            rows += [*run_llama(root, "smoke", None, rank), run_vit(root, "vit_tiny_patch16_224", ["--kappa", "2"]),
                     run_overhead(root, "deit_tiny_patch16_224", 1)]
        if args.llama:
            rows += run_llama(root, args.llama, args.layers, rank, args.whole)
        if args.vit:
            rows.append(run_vit(root, args.vit, ["--kappa", "2"]))
        if args.overhead:
            rows.append(run_overhead(root, args.overhead, args.repeats))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
