"""examples/ci/compress.yml: its factorize and report steps, run as GitHub Actions runs them (bash -e, the env
block, $GITHUB_STEP_SUMMARY) on a tiny model, with `lrc` being this checkout; the gates pass, then fail."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / "examples" / "ci" / "compress.yml"


def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def step(name: str) -> str:
    steps = workflow()["jobs"]["compress"]["steps"]
    return next(s["run"] for s in steps if s.get("name") == name)


@pytest.fixture
def runner(tmp_path, tiny_vit_folder):
    """Run one step's shell lines in `tmp_path` with the workflow's env (MODEL: the tiny ViT) and `lrc` on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    lrc = bin_dir / "lrc"
    lrc.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m lowrank_cli "$@"\n')
    lrc.chmod(0o755)
    summary = tmp_path / "summary.md"
    env = {**os.environ, **{k: str(v) for k, v in workflow()["env"].items()}}
    env.update(MODEL=f"local-dir:{tiny_vit_folder}", PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
               PYTHONPATH=str(ROOT), GITHUB_STEP_SUMMARY=str(summary))

    def run(name: str, **overrides: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-e", "-c", step(name)], cwd=tmp_path, env={**env, **overrides},
                              capture_output=True, text=True, timeout=300)

    run.summary = summary
    return run


def test_workflow_shape():
    wf = workflow()
    assert {"MODEL", "KAPPA", "MAX_PARAMS", "MAX_MACS", "MIN_COMPRESSION", "HUB_REPO"} <= set(wf["env"])
    names = [s.get("name") or s.get("uses") for s in wf["jobs"]["compress"]["steps"]]
    assert names.index("Factorize") < names.index("Report and gates") < names.index("Push to the Hub (tags only)")
    assert "actions/upload-artifact@v4" in names
    push = next(s for s in wf["jobs"]["compress"]["steps"] if s.get("name") == "Push to the Hub (tags only)")
    assert "refs/tags/" in push["if"] and push["env"]["HF_TOKEN"] == "${{ secrets.HF_TOKEN }}"
    assert '"$GITHUB_STEP_SUMMARY"' in step("Report and gates")


def test_factorize_and_report_steps_pass_then_fail_the_gates(runner, tmp_path):
    done = runner("Factorize")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "model_lr.safetensors").is_file()
    # the tiny ViT: 900,682 parameters, 15.60M MACs, 2.02x fewer parameters (MIN_COMPRESSION stays the workflow's)
    done = runner("Report and gates", MAX_PARAMS="1M", MAX_MACS="20M")
    assert done.returncode == 0, done.stderr
    summary = runner.summary.read_text()
    assert summary.startswith("### lrc report: `model_lr.safetensors`") and summary.count("✅") == 3
    assert "gates passed" in done.stderr
    done = runner("Report and gates", MAX_PARAMS="500k", MAX_MACS="20M")
    assert done.returncode == 1
    assert [line for line in done.stderr.splitlines() if line.startswith("Error:")] == [
        "Error: gates failed: params 900.68k > 500.00k allowed"]
    second = runner.summary.read_text()[len(summary):]  # appended: the failed run's summary still says why
    assert "❌" in second and second.count("✅") == 2
