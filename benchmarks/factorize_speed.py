"""Wall time of `lrc factorize` next to the bare cost of the same work, measured in one run.

    python benchmarks/factorize_speed.py [--model deit_base_patch16_224] [--kappa 2] [--repeats 2]

deit_base (random weights: the SVD costs the same) is first saved as a local folder in timm's Hub layout.
Then, alternating, in fresh processes:
  lrc   `lrc factorize FOLDER --kappa K -o OUT --force`
  bare  a Python script that imports torch + safetensors, reads model.safetensors, runs the same
        torch.linalg.svd on the same 48 block linears, builds the factors and writes them with save_file.
Both include the interpreter start and their imports. Target (issue 2): lrc <= 1.2x bare.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BARE = r"""
import sys, torch
from safetensors.torch import load_file, save_file
from lowrank_cli.compress.plan import pela_rank
folder, out, kappa, multiple = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
sd = load_file(folder + "/model.safetensors")
for name in [k[:-len(".weight")] for k in list(sd) if k.startswith("blocks.") and k.endswith(".weight") and sd[k].ndim == 2]:
    w = sd.pop(name + ".weight")
    r = pela_rank(w.shape[1], w.shape[0], kappa, multiple)
    u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
    root = s[:r].sqrt()
    sd[name + ".first.weight"] = (root[:, None] * vh[:r]).contiguous()
    sd[name + ".second.weight"] = (u[:, :r] * root[None, :]).contiguous()
    if name + ".bias" in sd:
        sd[name + ".second.bias"] = sd.pop(name + ".bias")
save_file(sd, out)
"""


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_base_patch16_224")
    parser.add_argument("--kappa", type=float, default=2.0)
    parser.add_argument("--rank-multiple", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import timm
    from timm.models import save_for_hf

    work = Path(tempfile.mkdtemp(prefix="lrc-bench-"))
    try:
        folder = work / "model"
        save_for_hf(timm.create_model(args.model, pretrained=False), str(folder), safe_serialization=True)
        lrc = [sys.executable, "-m", "lowrank_cli", "factorize", str(folder), "--kappa", str(args.kappa),
               "--rank-multiple", str(args.rank_multiple), "--device", "cpu", "-o", str(work / "lrc.safetensors"), "--force"]
        bare = [sys.executable, "-c", BARE, str(folder), str(work / "bare.safetensors"), str(args.kappa), str(args.rank_multiple)]
        times: dict[str, list[float]] = {"lrc": [], "bare": []}
        for _ in range(args.repeats):  # alternate, so drift in machine speed hits both alike
            times["bare"].append(timed(bare))
            times["lrc"].append(timed(lrc))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"model {args.model}, kappa {args.kappa:g}, rank multiple {args.rank_multiple}, "
              f"{os.cpu_count()} CPUs, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
        print(f"{'':6} {'median s':>9}  runs")
        for k in ("bare", "lrc"):
            print(f"{k:6} {med[k]:9.2f}  {', '.join(f'{t:.2f}' for t in times[k])}")
        print(f"ratio lrc / bare: {med['lrc'] / med['bare']:.2f}x   (target <= 1.20x)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
