"""What the FSDP tests share (tests/training/test_fsdp.py and test_fsdp_causal.py): running torchrun on this CPU
with gloo, comparing two state dicts, and checking that a run interrupted mid-way left its sharded state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch


def env() -> dict[str, str]:
    """The environment of a child process: one thread each (two processes share the CI's 2 cores), offline, and
    tests/ importable for the fixtures the driver uses."""
    tests = str(Path(__file__).parents[1])
    path = os.pathsep.join(p for p in [os.environ.get("PYTHONPATH"), tests] if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}


def torchrun(nproc: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=cwd, timeout=300)


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference between two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def assert_stopped_at(stopped: subprocess.CompletedProcess, parts: Path, step: int) -> None:
    """A 2-process fsdp run interrupted after `step`: its state says so, and no output file was written."""
    assert stopped.returncode == 0 and "interrupted" in stopped.stdout, stopped.stderr[-3000:]
    state = json.loads(parts.with_suffix(".train").joinpath("state.json").read_text())
    assert (state["step"], state["processes"], state["layout"]) == (step, 2, "fsdp")
    assert not parts.exists()
