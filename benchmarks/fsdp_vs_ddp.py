"""Recovery throughput and peak memory per process: `--shard fsdp` (FSDP2) against `--shard ddp`, under torchrun.

    python benchmarks/fsdp_vs_ddp.py                                   # CUDA when there is one, else CPU (gloo)
    python benchmarks/fsdp_vs_ddp.py --nproc 8 --depth 24 --dim 1024 --steps 50 --batch-size 32   # a GPU node
    OMP_NUM_THREADS=1 python benchmarks/fsdp_vs_ddp.py --smoke          # seconds, on the CPU: the script works

A random timm ViT (depth x dim, patch 16 on 224 px, or 8 on 32 px with --smoke) is the dense teacher; its
factorization at kappa 4 the student; the data random RGB images in 10 class folders. Each shard mode runs
`lowrank_cli.recover` in `--nproc` fresh torchrun processes (this script is the worker: `--worker SPEC`); every
process reports its own peak (resident memory, ru_maxrss; on CUDA also torch.cuda.max_memory_allocated) and
the run's images per second (training time only, rank 0's clock), times the tokens per image (patches + class
token) for tokens/s. The first steps (allocation, FSDP's lazy init) are part of the timing: give enough steps
that they do not matter. Timings on a shared machine are meaningless; the memory figures are not.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def write_inputs(root: Path, depth: int, dim: int, image_size: int, patch: int, images: int) -> None:
    """teacher/ (save_for_hf), student.safetensors (kappa 4), data/train/<class>/*.png (random pixels)."""
    import numpy as np
    import timm
    import torch
    from PIL import Image
    from timm.models import save_for_hf

    import lowrank_cli
    from lowrank_cli.checkpoint.format import record_source

    torch.manual_seed(0)
    heads = max(1, dim // 64)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=image_size, patch_size=patch,
                              embed_dim=dim, depth=depth, num_heads=heads, num_classes=10)
    save_for_hf(model.eval(), str(root / "teacher"), safe_serialization=True)
    loaded = lowrank_cli.load_model(str(root / "teacher"))
    lowrank_cli.factorize(loaded.model, kappa=4)
    record_source(loaded.model, loaded.source)
    lowrank_cli.save(loaded.model, root / "student.safetensors")
    rng = np.random.default_rng(0)
    for i in range(images):
        folder = root / "data" / "train" / str(i % 10)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.png")


def worker(spec: dict) -> None:
    """One process of a torchrun run: the recovery, then this process's peaks into SPEC's folder."""
    import torch

    import lowrank_cli

    result = lowrank_cli.recover(spec["student"], spec["teacher"], spec["data"], output=spec["output"],
                                 shard=spec["shard"], steps=spec["steps"], batch_size=spec["batch_size"],
                                 num_workers=0, evaluate_accuracy=False, save_every=10**6, log_every=10**6,
                                 device=spec["device"], force=True)
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available() and spec["device"] == "cuda"
    record = {"rank": rank, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              "peak_cuda_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
              "images": result.images_seen, "seconds": result.seconds}
    Path(spec["records"], f"rank{rank}.json").write_text(json.dumps(record))


def run_mode(root: Path, shard: str, args: argparse.Namespace, device: str) -> dict:
    """One shard mode in fresh processes; its records, one per process, and the summary."""
    records = root / f"records-{shard}"
    records.mkdir(exist_ok=True)
    spec = {"student": str(root / "student.safetensors"), "teacher": str(root / "teacher"),
            "data": str(root / "data"), "output": str(root / f"{shard}.safetensors"), "shard": shard,
            "steps": args.steps, "batch_size": args.batch_size, "records": str(records), "device": device}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"),
                                                                      str(Path(__file__).parents[1])]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           __file__, "--worker", json.dumps(spec)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{shard} failed:\n{done.stderr[-4000:]}")
    per_rank = sorted((json.loads(p.read_text()) for p in records.glob("rank*.json")), key=lambda r: r["rank"])
    main = per_rank[0]
    images_per_s = main["images"] / main["seconds"] if main["seconds"] else None
    tokens = (args.image_size // args.patch) ** 2 + 1
    return {"shard": shard, "processes": args.nproc, "device": device,
            "images_per_s": images_per_s, "tokens_per_s": images_per_s * tokens if images_per_s else None,
            "peak_rss_gib_per_process": [round(r["peak_rss_gib"], 3) for r in per_rank],
            "peak_cuda_gib_per_process": [round(r["peak_cuda_gib"], 3) for r in per_rank]
            if main["peak_cuda_gib"] is not None else None}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--smoke", action="store_true", help="a 2-block ViT of width 64 on 32 px, 3 steps")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    args.image_size, args.patch = (32, 8) if args.smoke else (224, 16)
    if args.smoke:
        args.depth, args.dim, args.steps, args.batch_size = 2, 64, 3, 4
    return args


def main() -> None:
    args = parse()
    if args.worker:
        return worker(json.loads(args.worker))
    import torch

    device = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= args.nproc else "cpu"
    with tempfile.TemporaryDirectory(prefix="fsdp-vs-ddp-") as tmp:
        root = Path(tmp)
        write_inputs(root, args.depth, args.dim, args.image_size, args.patch,
                     images=max(40, 2 * args.batch_size * args.nproc))
        results = [run_mode(root, shard, args, device) for shard in ("ddp", "fsdp")]
    report = {"model": {"depth": args.depth, "dim": args.dim, "image_size": args.image_size, "patch": args.patch},
              "steps": args.steps, "batch_size_per_process": args.batch_size, "results": results}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
