"""`lowrank_cli.demo()`: factorize -> report -> recover -> eval on the shipped teacher and digits, offline.

    result = lowrank_cli.demo()                    # a temporary folder, removed at the end
    result = lowrank_cli.demo("demo/", quick=True) # keep the files; a few seconds (tests, CI)
    result.rows                                    # teacher, factorized, recovered: top-1, params, MACs, file size

Each step is the function its command runs: `factorize_file` (lrc factorize), `build_report` (lrc report),
`recover` (lrc recover), `load_model` + `evaluate` (lrc eval), on real files in the work folder. The top-1 figures
are on the test split, which neither the teacher's training nor the recovery (its training and its choice of the
best state, both on data/) ever saw.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lowrank_cli.errors import OutputError

ProgressFn = Callable[[str, int, int, "str | None"], None]  # (phase, done, total, status), as recover's


@dataclass(frozen=True)
class DemoPlan:
    """What the demo runs: the compression (kappa, rank multiple), the recovery and how many images."""

    kappa: float = 4.0
    rank_multiple: int = 1  # layers 32 wide: rounding ranks to 8 would leave them dense
    steps: int = 300
    batch_size: int = 32
    lr: float = 2e-3
    every: int = 1  # every n-th image of each split
    held_out: bool = True  # recovery scores its val split and keeps its best state


FULL = DemoPlan()
QUICK = DemoPlan(steps=30, every=4, held_out=False)


@dataclass
class DemoRow:
    """One model of the demo, as measured on its file."""

    name: str  # teacher | factorized | recovered
    model: str  # the MODEL source the figures were measured on
    top1: float  # on the test split
    images: int
    params: int  # `lrc report`'s total
    macs: int  # per image, fvcore
    file_bytes: int  # the weights file on disk


@dataclass
class DemoResult:
    rows: list[DemoRow]
    plan: DemoPlan
    splits: dict[str, int]  # images per split
    seconds: float
    output_dir: Path | None  # where the files are kept, None when the temporary folder was removed
    recovery: dict[str, Any] = field(default_factory=dict)  # what `lrc recover --json` prints of the run

    def row(self, name: str) -> DemoRow:
        return next(r for r in self.rows if r.name == name)

    def summary(self) -> dict[str, Any]:
        """JSON-ready (the `--json` output of `lrc demo`)."""
        return {"rows": [asdict(r) for r in self.rows], "plan": asdict(self.plan), "splits": self.splits,
                "seconds": round(self.seconds, 2), "output_dir": str(self.output_dir) if self.output_dir else None,
                "recovery": self.recovery}


def demo(output_dir: str | os.PathLike | None = None, *, quick: bool = False, progress: ProgressFn | None = None,
         log: Callable[[str], None] | None = None, warn: Callable[[str], None] | None = None) -> DemoResult:
    """Run the demo in `output_dir` (a new or empty folder, kept) or in a temporary folder (removed); on CPU, in
    one thread. What torch and the loader leave in $TMPDIR goes to a folder of the run's own, removed too
    (atomic.private_tmpdir).

    `quick=True`: a quarter of the images and 30 recovery steps without held-out scoring, in seconds; its
    accuracies say little. `progress(phase, done, total, status)` follows each phase; `log` and `warn` get the
    commands' messages."""
    from lowrank_cli.atomic import private_tmpdir
    from lowrank_cli.tour.teacher import shipped_teacher

    plan = QUICK if quick else FULL
    progress = progress or (lambda phase, done, total, status: None)
    started = time.perf_counter()
    with private_tmpdir(), _one_thread(), _workspace(output_dir) as work, shipped_teacher() as teacher:
        rows, splits, recovery = _steps(work, teacher, plan, progress, log, warn)
    return DemoResult(rows, plan, splits, time.perf_counter() - started,
                      Path(output_dir) if output_dir is not None else None, recovery)


def _steps(work: Path, teacher_dir: Path, plan: DemoPlan, progress: ProgressFn, log, warn):
    from lowrank_cli.compress.factorize_source import factorize_file
    from lowrank_cli.tour.digits import write_digits
    from lowrank_cli.training.recovery import recover

    folders = write_digits(work, every=plan.every, progress=lambda done, total: progress("data", done, total, "images"))
    splits = {split: _count(folder) for split, folder in (("train", folders["data"] / "train"),
                                                         ("val", folders["data"] / "val"), ("test", folders["test"]))}
    teacher = f"local-dir:{teacher_dir}"
    rows = [_measure("teacher", teacher, teacher_dir / "model.safetensors", folders["test"], progress, log)]

    factorized = work / "factorized.safetensors"
    factorize_file(teacher, str(factorized), kappa=plan.kappa, rank_multiple=plan.rank_multiple, device="cpu",
                   log=log, warn=warn, progress=lambda name, done, total: progress("factorize", done, total, name))
    rows.append(_measure("factorized", str(factorized), factorized, folders["test"], progress, log))

    recovered = work / "recovered.safetensors"
    result = recover(str(factorized), teacher, folders["data"], output=recovered, steps=plan.steps,
                     batch_size=plan.batch_size, lr=plan.lr, num_workers=0, device="cpu",
                     evaluate_accuracy=plan.held_out, log=log, warn=warn,
                     progress=lambda phase, *rest: progress(phase if phase == "recover" else f"recover: {phase}", *rest))
    rows.append(_measure("recovered", str(recovered), recovered, folders["test"], progress, log))
    return rows, splits, result.summary()


def _measure(name: str, source: str, weights: Path, test: Path, progress: ProgressFn, log) -> DemoRow:
    """`lrc report SOURCE` and `lrc eval SOURCE --data test/` of one model."""
    from lowrank_cli.evaluation.accuracy import evaluate, val_split
    from lowrank_cli.evaluation.report import build_report
    from lowrank_cli.adapters.loading import load_model

    report = build_report(source, log=log).document
    loaded = load_model(source, log=log)
    loaded.model.to("cpu").float()
    scores = evaluate(loaded.model, val_split(test), batch_size=256, device="cpu", num_workers=0,
                      progress=lambda done, total: progress(f"test {name}", done, total, "batches"))
    return DemoRow(name, source, scores["top1"], scores["images"], report["params"]["total"],
                   report["macs"]["total"], weights.stat().st_size)


def _count(folder: Path) -> int:
    return sum(1 for _ in folder.rglob("*.png"))


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One torch thread for the run: the layers are 32 wide, too small for two threads to gain anything, and on a
    busy machine their synchronisation makes every op wait for the slower core (the quick demo took 16.7 s with one
    thread and 32.2 s with two on a 2-core machine running other jobs)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _workspace(output_dir: str | os.PathLike | None) -> Iterator[Path]:
    """The folder the demo writes in: a temporary one (always removed), or `output_dir` (new or empty: kept on
    success; what the demo wrote there is removed when it fails)."""
    if output_dir is None:
        with tempfile.TemporaryDirectory(prefix="lrc-demo-") as folder:
            yield Path(folder)
        return
    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"`output_dir` '{folder}' is a file: give a new or empty folder")
    if folder.is_dir() and any(folder.iterdir()):
        raise OutputError(f"`output_dir` '{folder}' is not empty: give a new or empty folder (the demo writes its "
                          "data, models and metrics there)")
    if not folder.parent.is_dir():
        raise OutputError(f"the folder of `output_dir` '{folder}' does not exist: create '{folder.parent}' first")
    created = not folder.exists()
    folder.mkdir(exist_ok=True)
    try:
        yield folder
    except BaseException:
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            for entry in folder.iterdir():
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        raise
