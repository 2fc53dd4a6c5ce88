"""Short training runs of every kind, reduced to what they produce: the written weights (per-tensor sums), the
metrics rows, the log / warning lines, the progress phases, the result's summary and the records of the file.

tests/training/test_same_as_before.py compares these with tests/data/reference_runs.json, which main's code wrote
before the training loop was rebuilt by composition (issue 23, part 3):

    OMP_NUM_THREADS=1 PYTHONPATH=/work/main python tests/reference_runs.py tests/data/reference_runs.json

(from this checkout, with main's lowrank_cli first on the path: the helpers it imports sit next to it); it also
writes tests/data/main_NAME.train.safetensors, the training states of two runs stopped part way. Everything runs on one CPU thread, one process, fixed
seeds; times and throughputs are left out, paths are written relative to the run's folder. Since main wrote it, the
metrics rows of the text runs (recover_text, finetune_text_adapters, finetune_regression_full) count `texts` where
main's counted `images` (the throughput is named by modality; the JSON was edited for that key alone).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

VIT = dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
FAST = dict(num_workers=0, device="cpu", log_every=1, batch_size=8, seed=1)
UNTIMED = {"seconds", "images_per_s", "texts_per_s", "windows_per_s", "images_per_second"}  # differ run to run


def weights_of(path: Path) -> dict[str, list[float]]:
    """Every tensor of a safetensors file as [numel, sum, sum of squares, first element] in float64."""
    from safetensors.torch import load_file

    found = {}
    for name, t in load_file(str(path)).items():
        t = t.detach().double().flatten()
        found[name] = [t.numel(), t.sum().item(), t.square().sum().item(), t[0].item() if t.numel() else 0.0]
    return found


def _plain(value: Any, root: Path) -> Any:
    """JSON-ready, with the run's folder as <root> and the untimed keys dropped."""
    if isinstance(value, dict):
        return {str(k): _plain(v, root) for k, v in value.items() if k not in UNTIMED}
    if isinstance(value, (list, tuple)):
        return [_plain(v, root) for v in value]
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        for prefix in {str(root.resolve()), str(root)}:
            value = value.replace(prefix, "<root>")
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class Recorder:
    """The hooks a run is given (log, warn, progress), keeping what they are told."""

    def __init__(self) -> None:
        self.logs: list[str] = []
        self.warnings: list[str] = []
        self.phases: list[list[Any]] = []

    def hooks(self) -> dict[str, Callable[..., None]]:
        return dict(log=self.logs.append, warn=self.warnings.append, progress=self.progress)

    def progress(self, phase: str, done: int, total: int, status: str | None) -> None:
        step = [phase, done, total]
        if not self.phases or self.phases[-1] != step:
            self.phases.append(step)


def _metrics(output: Path) -> list[dict[str, Any]]:
    from lowrank_cli.training.metrics import metrics_path

    path = metrics_path(output)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _records(output: Path) -> dict[str, Any]:
    from lowrank_cli.checkpoint.format import open_header

    meta, _ = open_header(output)
    return {k: json.loads(v) for k, v in sorted(meta.items())
            if k in ("lrc.recovery", "lrc.finetune", "lrc.multitask", "lrc.adapters")}


def _outcome(result: Any, output: Path, recorder: Recorder, root: Path) -> dict[str, Any]:
    return _plain({"weights": weights_of(output), "metrics": _metrics(output), "logs": recorder.logs,
                   "warnings": recorder.warnings, "phases": recorder.phases, "summary": result.summary(),
                   "records": _records(output)}, root)


def make_inputs(root: Path) -> dict[str, Path]:
    """The models and data every scenario reads, written under `root`."""
    sys.path.insert(0, str(Path(__file__).parent))
    from digits import relabel_imagefolder, write_digits_imagefolder, write_flat_images
    from helpers import make_tiny_vit
    from hf_fixtures import write_corpus, write_labelled_texts, write_tiny_bert
    from timm.models import save_for_hf

    import lowrank_cli
    from lowrank_cli.checkpoint.format import record_source

    found = {"digits": write_digits_imagefolder(root / "digits", image_size=16, max_per_class=6)}
    found["parity"] = relabel_imagefolder(found["digits"], root / "parity",
                                          lambda digit: "even" if int(digit) % 2 == 0 else "odd")
    found["flat"] = write_flat_images(root / "flat", 24, image_size=16)
    save_for_hf(make_tiny_vit(**VIT), str(root / "vit"), safe_serialization=True)
    found["vit"] = root / "vit"
    loaded = lowrank_cli.load_model(str(found["vit"]))
    lowrank_cli.factorize(loaded.model, kappa=2, device="cpu")
    record_source(loaded.model, loaded.source)
    found["vit_lr"] = lowrank_cli.save(loaded.model, root / "vit_lr.safetensors")
    found["bert"] = write_tiny_bert(root / "bert")
    found["corpus"] = write_corpus(root / "corpus.txt", n=32)
    found["texts"] = write_labelled_texts(root / "texts.jsonl", 40)
    found["scores"] = write_labelled_texts(root / "scores.csv", 40, task="score")
    return found


def _resumed(train: Callable[..., Any], stop_at: int) -> Callable[[Path, dict[str, Any]], Any]:
    """A run stopped after its `stop_at`-th step (as by Ctrl-C; counted over every task), then resumed to its end."""
    from lowrank_cli.errors import Interrupted

    def run(out: Path, hooks: dict[str, Any]) -> Any:
        calls = iter(range(1, 1000))
        try:
            train(out, {**hooks, "on_step": lambda step, model: next(calls) == stop_at})
        except Interrupted as e:
            hooks["log"](f"interrupted: {e}")
        return train(out, {**hooks, "resume": True})

    return run


def resumable(inputs: dict[str, Path]) -> dict[str, tuple[Callable[[Path, dict[str, Any]], Any], int]]:
    """name -> (run(output, hooks), the step after which it is stopped): the runs that are stopped and resumed."""
    from lowrank_cli import finetune, finetune_tasks, recover

    i = inputs
    digits, parity = f"digit={i['digits']}", f"parity={i['parity']}"
    return {
        "recover_progressive_resumed": (lambda out, h: recover(
            str(i["vit"]), None, i["digits"], output=out, method="progressive", kappa=4, rank_multiple=1, steps=5,
            eval_every=2, save_every=1, lr=1e-3, **FAST, **h), 2),
        "finetune_resumed": (lambda out, h: finetune(
            str(i["vit_lr"]), i["parity"], output=out, method="dora", steps=4, eval_every=2, save_every=1, **FAST,
            **h), 3),
        "shared_resumed": (lambda out, h: finetune_tasks(
            str(i["vit_lr"]), [digits, parity], output=out, mode="shared", steps=4, save_every=1, **FAST, **h), 2),
        "experts_resumed": (lambda out, h: finetune_tasks(
            str(i["vit_lr"]), [digits, parity], output=out, mode="experts", steps=2, save_every=1, **FAST, **h), 3),
    }


SAVED_STATES = ("recover_progressive_resumed", "finetune_resumed")  # states main wrote, in tests/data


def write_states(folder: Path, root: Path, inputs: dict[str, Path]) -> None:
    """The training states of SAVED_STATES as the stopped runs leave them, copied to `folder` as main_NAME.train.*."""
    import shutil

    from lowrank_cli.errors import Interrupted
    from lowrank_cli.training.state import train_state_path

    for name in SAVED_STATES:
        train, stop_at = resumable(inputs)[name]
        out = root / f"{name}.safetensors"
        try:
            train(out, {"on_step": lambda step, model, stop_at=stop_at: step == stop_at})
        except Interrupted:
            shutil.copyfile(train_state_path(out), folder / f"main_{name}.train.safetensors")


def scenarios(inputs: dict[str, Path]) -> dict[str, Callable[[Path, dict[str, Any]], Any]]:
    """name -> run(output, hooks): one short run of each kind the training loop has."""
    from lowrank_cli import finetune, finetune_tasks, recover

    i = inputs
    digits, parity = f"digit={i['digits']}", f"parity={i['parity']}"
    runs = {
        "recover_pela": lambda out, h: recover(
            str(i["vit"]), str(i["vit"]), i["digits"], output=out, kappa=4, rank_multiple=1, steps=4, grad_accum=2,
            beta=0.1, gamma=0.5, eval_every=2, lr=1e-3, **FAST, **h),
        "recover_progressive": lambda out, h: recover(
            str(i["vit"]), None, i["flat"], output=out, method="progressive", init="lora", lora_alpha=8.0,
            kappa=4, rank_multiple=1, steps=5, val_fraction=0.25, eval_every=2, lr=1e-3, **FAST, **h),
        "recover_text": lambda out, h: recover(
            str(i["bert"]), None, i["corpus"], output=out, kappa=2, delta=1.0, steps=3, lr=1e-3, val_fraction=0.25,
            **FAST, **h),
        "finetune_lora": lambda out, h: finetune(
            str(i["vit_lr"]), i["parity"], output=out, method="lora", steps=4, eval_every=2, **FAST, **h),
        "finetune_text_adapters": lambda out, h: finetune(
            str(i["bert"]), i["texts"], output=out, method="rlrr", merge=False, steps=3, val_fraction=0.25,
            **FAST, **h),
        "finetune_regression_full": lambda out, h: finetune(
            str(i["bert"]), i["scores"], output=out, method="full", steps=2, val_fraction=0.25, keep="last",
            **FAST, **h),
        "shared": lambda out, h: finetune_tasks(
            str(i["vit_lr"]), [digits, parity], output=out, mode="shared", schedule="interleaved", steps=4,
            lr=5e-3, **FAST, **h),
        "merge": lambda out, h: finetune_tasks(
            str(i["vit_lr"]), [digits, parity], output=out, mode="merge", steps=3, **FAST, **h),
        "orthogonal": lambda out, h: finetune_tasks(
            str(i["vit_lr"]), [digits, parity], output=out, mode="orthogonal", adapter_rank=2, steps=2, **FAST, **h),
    }
    runs.update({name: _resumed(train, stop_at) for name, (train, stop_at) in resumable(inputs).items()})
    return runs


def run_scenario(name: str, inputs: dict[str, Path], root: Path) -> dict[str, Any]:
    recorder = Recorder()
    output = root / f"{name}.safetensors"
    result = scenarios(inputs)[name](output, recorder.hooks())
    return _outcome(result, output, recorder, root)


def main(path: str) -> None:
    import tempfile

    import lowrank_cli

    print(f"reference runs of {lowrank_cli.__file__}", file=sys.stderr)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        inputs = make_inputs(root)
        found = {name: run_scenario(name, inputs, root) for name in scenarios(inputs)}
        (root / "states").mkdir()
        write_states(Path(path).parent, root / "states", inputs)
    Path(path).write_text(json.dumps(found, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
