"""SIGKILL `lrc factorize` at random moments, again and again, into the same output: after every kill the output
is absent or a whole checkpoint, and the next write leaves no temporary file behind.

    python benchmarks/kill_audit.py [--kills 20] [--seed 0]

Prints one line per kill (when it fired, what was on disk) and a summary: kills, outputs that did not load,
stray files after the final write.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from helpers import make_tiny_vit
    from timm.models import save_for_hf

    import lowrank_cli

    work = Path(tempfile.mkdtemp(prefix="lrc-kills-"))
    model_dir = work / "vit"
    save_for_hf(make_tiny_vit(depth=8), str(model_dir), safe_serialization=True)
    out = work / "out" / "lr.safetensors"
    out.parent.mkdir()
    command = [sys.executable, "-m", "lowrank_cli", "factorize", str(model_dir), "-o", str(out), "--force"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, capture_output=True)
    whole = time.perf_counter() - started
    rng = random.Random(args.seed)
    broken = 0
    for kill in range(1, args.kills + 1):
        delay = rng.uniform(0.5 * whole, whole)  # the write happens at the end of the run
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        code = process.wait()
        files = sorted(p.name for p in out.parent.iterdir())
        try:
            ok = not out.exists() or lowrank_cli.load(out) is not None
        except Exception:
            ok = False
        broken += not ok
        print(f"kill {kill:>2} at {delay:.2f} s of {whole:.2f} (exit {code}): {files} output {'ok' if ok else 'BROKEN'}")
    subprocess.run(command, check=True, env=env, capture_output=True)
    stray = [p.name for p in out.parent.iterdir() if p != out]
    print(f"\n{args.kills} kills, {broken} outputs that did not load, stray files after the next write: {stray or 0}")


if __name__ == "__main__":
    main()
