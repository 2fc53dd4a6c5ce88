"""`lrc demo` and `lowrank_cli.demo()`: the table's figures are those of the files the run wrote, the accuracies
mean something (teacher well above chance, recovery clearly above the factorized model), the run writes nothing
outside its folder, and what it needs ships in the package."""

from __future__ import annotations

import ast
import fnmatch
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from helpers import error_lines, run_cli

import lowrank_cli
from lowrank_cli.tour.digits import load_digits, split_indices

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "lowrank_cli" / "tour" / "assets"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """`lrc demo --quick --output-dir DIR --json`, run once: (its JSON, DIR)."""
    import contextlib
    import io

    from lowrank_cli.cli.app import main

    folder = tmp_path_factory.mktemp("demo") / "kept"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as done:
        main(["demo", "--quick", "--output-dir", str(folder), "--json"])
    assert done.value.code in (0, None), err.getvalue()
    return json.loads(out.getvalue()), folder


def test_the_table_is_what_report_and_eval_say_of_the_files(quick, capsys):
    summary, folder = quick
    rows = {row["name"]: row for row in summary["rows"]}
    assert list(rows) == ["teacher", "factorized", "recovered"]
    assert sorted(p.name for p in folder.iterdir()) == ["data", "factorized.safetensors", "recovered.metrics.jsonl",
                                                        "recovered.safetensors", "test"]
    for name in ("factorized", "recovered"):
        path = folder / f"{name}.safetensors"
        code, out, err = run_cli(["report", path, "--json"], capsys)
        assert code == 0, err
        report = json.loads(out)
        assert rows[name]["params"] == report["params"]["total"] and rows[name]["macs"] == report["macs"]["total"]
        assert rows[name]["file_bytes"] == path.stat().st_size
        code, out, err = run_cli(["eval", path, "--data", folder / "test", "--workers", "0", "--json"], capsys)
        assert code == 0, err
        scored = json.loads(out)
        assert rows[name]["top1"] == scored["top1"] and rows[name]["images"] == scored["images"] == 115
    teacher = lowrank_cli.load_model(rows["teacher"]["model"]).model
    assert rows["teacher"]["params"] == sum(p.numel() for p in teacher.parameters()) == 52_202
    assert rows["recovered"]["params"] < rows["teacher"]["params"] / 3  # kappa 4 on the linears, the rest dense
    assert summary["splits"] == {"train": 290, "val": 45, "test": 115} and summary["plan"]["steps"] == 30
    assert summary["recovery"]["steps"] == 30 and summary["recovery"]["settings"]["train_images"] == 290


def test_table_and_plain_progress_lines_off_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = set(os.listdir(tempfile.gettempdir()))
    code, out, err = run_cli(["demo", "--quick"], capsys)
    assert code == 0, err
    assert "teacher" in out and "factorized" in out and "recovered" in out and "3.52x fewer parameters" in out
    assert "now removed: keep them with --output-dir DIR" in out
    lines = err.splitlines()
    assert "demo: factorize 16/16 (blocks.3.mlp.fc2)" in lines and "demo: test recovered 1/1 (batches)" in lines
    assert any(line.startswith("demo: recover 30/30 (loss ") for line in lines), err
    assert not any("\r" in line or "\x1b" in line for line in lines)  # no bar redrawn in a log
    assert set(os.listdir(tempfile.gettempdir())) == before and list(tmp_path.iterdir()) == []
    code, out, err = run_cli(["demo", "--quick", "--no-progress"], capsys)
    assert code == 0 and err == "", err


def test_the_demo_shows_compression_and_recovery():
    """The full demo, as `lrc demo` runs it: on the 459 test images, the teacher is far above chance (10 %), the
    factorized model clearly below it, and the recovered one clearly above the factorized one."""
    result = lowrank_cli.demo()
    teacher, factorized, recovered = (result.row(n) for n in ("teacher", "factorized", "recovered"))
    assert result.splits == {"train": 1158, "val": 180, "test": 459} and teacher.images == 459
    assert teacher.top1 > 0.9
    assert factorized.top1 < teacher.top1 - 0.05
    assert recovered.top1 > factorized.top1 + 0.07 and recovered.top1 > 0.88
    assert factorized.params == recovered.params < teacher.params / 3 and recovered.macs < teacher.macs / 3
    assert result.output_dir is None and result.plan.steps == 300


@pytest.mark.parametrize(("kind", "message"), [("not empty", "is not empty: give a new or empty folder"),
                                             ("a file", "is a file: give a new or empty folder"),
                                             ("no parent", "does not exist: create")])
def test_bad_output_dirs(tmp_path, capsys, kind, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("mine")
    target = {"not empty": out, "a file": out / "mine.txt", "no parent": out / "missing" / "demo"}[kind]
    code, _, err = run_cli(["demo", "--quick", "--output-dir", target], capsys)
    lines = error_lines(err)
    assert code == 4 and lines == err.splitlines()[-1:] and message in lines[0], err
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "mine"


def test_the_shipped_digits_are_scikit_learns():
    from sklearn.datasets import load_digits as sklearn_digits

    images, labels = load_digits()
    reference = sklearn_digits()
    assert images.dtype == labels.dtype == np.uint8
    assert np.array_equal(images, reference.images) and np.array_equal(labels, reference.target)


def test_the_split_is_fixed_disjoint_and_complete():
    _, labels = load_digits()
    splits = split_indices(labels)
    assert {k: len(v) for k, v in splits.items()} == {"train": 1158, "val": 180, "test": 459}
    assert sorted(sum(splits.values(), [])) == list(range(len(labels)))
    assert list(np.bincount(labels[splits["test"]])) == [45, 47, 45, 48, 46, 47, 46, 45, 45, 45]  # a quarter of each
    assert list(np.bincount(labels[splits["val"]])) == [18] * 10


def test_every_asset_is_declared_as_package_data():
    """A non-editable install carries only what pyproject.toml declares (a wheel built from it was checked by hand:
    pip wheel . --no-deps)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = declared["lowrank_cli.tour"]
    files = [p.relative_to(ASSETS.parent).as_posix() for p in ASSETS.rglob("*") if p.is_file()]
    assert sorted(files) == ["assets/README.md", "assets/digits.npz", "assets/teacher/config.json",
                             "assets/teacher/model.safetensors"]
    assert all(any(fnmatch.fnmatch(f, pattern) for pattern in patterns) for f in files)
    assert sum((ASSETS.parent / f).stat().st_size for f in files) < 300_000


def test_the_examples_import_nothing_from_tests():
    tests = {p.stem for p in (ROOT / "tests").glob("*.py")}
    for example in (ROOT / "examples").glob("*.py"):
        tree = ast.parse(example.read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & (tests | {"tests"}), example.name
        assert "sys.path" not in example.read_text(), example.name


def test_ci_runs_the_readmes_three_commands():
    import re

    block = re.search(r"^```bash\n(.*?)^```$", (ROOT / "README.md").read_text(), re.M | re.S).group(1)
    commands = [line for line in block.splitlines() if line.strip()]
    assert len(commands) == 3 and commands[0].startswith("pip install") and commands[1] == "lrc demo"
    assert commands[2] == "python -m pytest -q"
    ci = (ROOT / ".ci" / "run").read_text()
    assert '-eq 3 ]' in ci and "for n in 1 2 3; do" in ci


def test_a_plain_progress_line_is_never_folded(capsys):
    from lowrank_cli.cli.console import PhaseProgress

    lines = PhaseProgress("demo: ")
    lines("recover", 0, 2, None)
    lines("recover", 1, 2, "x" * 30)  # within 10 s of the last line: not printed
    lines("recover", 2, 2, "loss " + "0.123 " * 40)  # the end of a phase, however long its status
    assert capsys.readouterr().err.splitlines() == ["demo: recover 0/2", "demo: recover 2/2 (loss " + "0.123 " * 39
                                                    + "0.123 )"]
