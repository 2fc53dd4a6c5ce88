"""Writes tests/data/legacy_bert.* and legacy_multitask.*: files written by lrc at main 3e9849a (before the model
families and the training-loop redesign), with what that version computed from them. Kept for the record of how
they were made; run from the repository root with `python tests/data/write_legacy_files.py` (it overwrites them).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
DATA = ROOT / "tests" / "data"
WORK = Path("/tmp/legacy")

from hf_fixtures import write_labelled_texts, write_tiny_bert  # noqa: E402
from multitask import write_vit_tasks  # noqa: E402

import lowrank_cli  # noqa: E402


def cli(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "lowrank_cli", *args], capture_output=True, text=True, cwd=DATA)
    assert out.returncode == 0, out.stderr
    return out.stdout


def ids() -> torch.Tensor:
    return torch.randint(5, 200, (2, 12), generator=torch.Generator().manual_seed(0))


def main() -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    bert = write_tiny_bert(WORK / "bert", head="sequence-classification", num_labels=2, initializer_range=0.2)
    texts = write_labelled_texts(WORK / "texts" / "train.jsonl", n=64)
    write_labelled_texts(WORK / "texts" / "val.jsonl", n=32, seed=1)
    # A compressed BERT, fine-tuned 3 steps with LoRA (merged) on labelled texts: lrc.finetune, lrc.ranks, classes,
    # and a source whose tokenizer is no longer where it was.
    subprocess.run([sys.executable, "-m", "lowrank_cli", "factorize", str(bert), "--kappa", "2",
                    "-o", str(WORK / "bert_lr.safetensors"), "--force"], check=True, cwd=ROOT)
    subprocess.run([sys.executable, "-m", "lowrank_cli", "finetune", str(WORK / "bert_lr.safetensors"), "--data",
                    str(texts), "--method", "lora", "--steps", "3", "--batch-size", "8", "--workers", "0",
                    "--tokenizer", str(bert), "-o", str(DATA / "legacy_bert.safetensors"), "--force"],
                   check=True, cwd=ROOT)
    (DATA / "legacy_bert.metrics.jsonl").unlink(missing_ok=True)
    model = lowrank_cli.load(DATA / "legacy_bert.safetensors")
    with torch.no_grad():
        logits = model(input_ids=ids()).logits
    bert_expected = {
        "written_by": f"lowrank_cli at main {commit} (before the model families)",
        "input": "input_ids = torch.randint(5, 200, (2, 12), generator=torch.Generator().manual_seed(0))",
        "logits": logits.tolist(),
        "report": json.loads(cli("report", "legacy_bert.safetensors", "--json", "--per-layer")),
        "eval": json.loads(cli("eval", "legacy_bert.safetensors", "--data", str(WORK / "texts" / "val.jsonl"),
                               "--tokenizer", str(bert), "--json", "--workers", "0")),
    }
    (DATA / "legacy_bert.expected.json").write_text(json.dumps(bert_expected, indent=1) + "\n")

    # A two-task ViT in experts mode (each task's LoRA adapters stored apart, merged when a task is read).
    write_vit_tasks(DATA / "legacy_multitask.safetensors", mode="experts")
    from digits import write_digits_imagefolder

    from lowrank_cli.data.images import find_images
    from lowrank_cli.evaluation.accuracy import evaluate

    images = find_images(write_digits_imagefolder(WORK / "digits16", image_size=16, max_per_class=12), split="val")
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    outputs = {}
    for task in ("digits", "parity"):
        with torch.no_grad():
            outputs[task] = lowrank_cli.load(DATA / "legacy_multitask.safetensors", task=task)(x).tolist()
    multi_expected = {
        "written_by": f"lowrank_cli at main {commit} (before the model families)",
        "input": "torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))",
        "logits": outputs,
        "report": json.loads(cli("report", "legacy_multitask.safetensors", "--json", "--per-layer")),
        "eval": {task: evaluate(lowrank_cli.load(DATA / "legacy_multitask.safetensors", task=task), images,
                                batch_size=8, num_workers=0)["top1"] for task in ("digits",)},  # parity: 2 classes
    }
    (DATA / "legacy_multitask.expected.json").write_text(json.dumps(multi_expected, indent=1) + "\n")


if __name__ == "__main__":
    main()
