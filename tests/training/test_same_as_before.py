"""The training loop rebuilt by composition (issue 23, part 3) trains as main's did: each short run of
tests/reference_runs.py (recover: PELA, progressive, a text encoder; finetune: LoRA, adapters alone, a full
regression; multi-task: shared, merge, orthogonal) writes the same weights, metrics rows, log lines, progress
phases, summary and records as tests/data/reference_runs.json, which main's code at 0a77780 wrote (the command is
in tests/reference_runs.py); a training state main wrote resumes here to main's weights. Everything exactly (dict keys
in the same order) but floats and file hashes: the reference was written on another CPU, whose random init and BLAS
differ from this one's in the last bits, and a few AdamW steps (which divide by the root of tiny second moments)
carry that to about 1e-5 of a weight's size; a changed loss, schedule or data order moves them by far more. The
teacher file's hash follows its bytes, so it is checked for its shape only."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from reference_runs import SAVED_STATES, make_inputs, resumable, run_scenario, weights_of

DATA = Path(__file__).parents[1] / "data"
REFERENCE = json.loads((DATA / "reference_runs.json").read_text())

pytestmark = pytest.mark.usefixtures("one_thread")


def _differences(found, expected, where: str = "") -> list[str]:
    if isinstance(expected, dict) and isinstance(found, dict):
        if list(found) != list(expected):  # in the same order too: `--json` prints them so
            return [f"{where}: keys {list(found)} != {list(expected)}"]
        return [d for k in expected for d in _differences(found[k], expected[k], f"{where}.{k}")]
    if isinstance(expected, list) and isinstance(found, list):
        if len(found) != len(expected):
            return [f"{where}: {len(found)} items, expected {len(expected)}: {found!r:.300}"]
        return [d for i, (a, b) in enumerate(zip(found, expected)) for d in _differences(a, b, f"{where}[{i}]")]
    if isinstance(expected, float) and isinstance(found, (int, float)) and not isinstance(found, bool):
        close = math.isclose(found, expected, rel_tol=1e-3, abs_tol=1e-4)
        return [] if close else [f"{where}: {found} != {expected}"]
    if where.endswith(".sha256") and isinstance(found, str) and found != expected:
        shaped = all(re.fullmatch("[0-9a-f]{64}", h) for h in (found, expected))
        return [] if shaped else [f"{where}: {found!r} != {expected!r}"]
    return [] if (found == expected and type(found) is type(expected)) else [f"{where}: {found!r} != {expected!r}"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    return root, make_inputs(root)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_run_gives_what_main_gave(name, inputs):
    root, found_inputs = inputs
    found = run_scenario(name, found_inputs, root)
    assert _differences(found, REFERENCE[name], name) == []


@pytest.mark.parametrize("name", SAVED_STATES)
def test_a_state_main_saved_resumes_to_main_s_weights(name, inputs, tmp_path):
    """The training-state file (weights, AdamW, data position, the best state and the scores before) keeps its
    format: a run main stopped part way continues here to the weights of main's uninterrupted run."""
    import shutil

    from lowrank_cli.training.state import train_state_path

    root, found_inputs = inputs
    out = tmp_path / f"{name}.safetensors"
    shutil.copyfile(DATA / f"main_{name}.train.safetensors", train_state_path(out))
    train, stop_at = resumable(found_inputs)[name]
    warnings: list[str] = []
    result = train(out, {"resume": True, "warn": warnings.append})
    assert result.resumed_from == stop_at
    assert all("`data` was" in w or "`teacher` was" in w for w in warnings), warnings  # main's paths were others
    assert _differences(weights_of(out), REFERENCE[name]["weights"], name) == []
