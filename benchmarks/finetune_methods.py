"""Fine-tuning methods on a new task, dense vs compressed, same steps, measured in one run (issue 15's evidence).

    python benchmarks/finetune_methods.py [--pretrain-epochs 12] [--steps 120] [--kappa 2]
    python benchmarks/finetune_methods.py --text [--steps 120] [--kappa 2]

A small ViT is trained here on scikit-learn's digits 0-4 (real 8x8 scans upscaled to 16x16; no download): that
is the "pretrained" model. It is factorized at kappa (the compressed model). The new task is the digits 5-9,
classes neither model has seen: every method gets a new 5-class head and the same steps, batch and seed, with
its default learning rate, on the dense and on the compressed model. The table gives the held-out top-1 of the
kept state and the share of the parameters that trained. Then, as a new user would: `lrc finetune` on the
compressed model, `lrc report` of input and output (the same parameters but the head), `lrc bench` of the output
against the input (the same speed). With --text: examples/text_encoder.py's small BERT classifier, trained here on
docstring sentences of 8 standard-library modules; the new task is the sentences of the next 8 modules.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import lowrank_cli  # noqa: E402
from lowrank_cli.adapters.base import METHODS  # noqa: E402
from lowrank_cli.checkpoint.format import record_source  # noqa: E402
from lowrank_cli.data.images import find_images, make_loader, make_transform  # noqa: E402
from lowrank_cli.training.finetune import finetune  # noqa: E402

VIT = dict(img_size=16, patch_size=4, embed_dim=64, depth=4, num_heads=4)


def subset(source: Path, root: Path, classes: list[str]) -> Path:
    """An ImageFolder with only `classes` of `source` (train/ and val/)."""
    for split in ("train", "val"):
        for name in classes:
            shutil.copytree(source / split / name, root / split / name)
    return root


def pretrain(data: Path, folder: Path, epochs: int) -> float:
    """Train the small ViT on the pretraining classes, save it with save_for_hf; return its held-out top-1."""
    import timm
    from digits import train_classifier
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, **VIT)
    loader, _ = make_loader(find_images(data, "train"), make_transform(model, training=False), 32, shuffle=True)
    train_classifier(model, loader, epochs)
    save_for_hf(model, str(folder), safe_serialization=True)
    return lowrank_cli.evaluate(model, data, num_workers=0)["top1"]


def lrc(*args: object) -> str:
    result = subprocess.run([sys.executable, "-m", "lowrank_cli", *map(str, args)], check=True, text=True,
                            stdout=subprocess.PIPE)
    return result.stdout


def new_user(compressed: Path, task: Path, work: Path, steps: int) -> None:
    out = work / "user.safetensors"
    print(f"\n$ lrc finetune {compressed.name} --data task/ --method lora --steps {steps} -o {out.name}", flush=True)
    lrc("finetune", compressed, "--data", task, "--method", "lora", "--steps", steps, "--workers", "0", "-o", out)
    before, after = (json.loads(lrc("report", p, "--json"))["params"] for p in (compressed, out))
    print(f"parameters: input {before['total']:,}, output {after['total']:,} (the head: 5 x 64 + 5 in both; "
          f"low-rank {before['lowrank']:,} -> {after['lowrank']:,})")
    bench = json.loads(lrc("bench", out, "--against", compressed, "--device", "cpu", "--batch-size", "1,64",
                           "--threads", "1", "--min-time", "5", "--json"))
    for row in bench["rows"]:
        if row["speedup"] is not None and row["model"] != row["reference"]:
            print(f"lrc bench, batch {row['batch_size']}: output vs input {row['speedup']:.2f}x "
                  f"({row['median_ms']:.2f} ms median{', noisy' if row['noisy'] else ''})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-epochs", type=int, default=12)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--kappa", type=float, default=2.0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--text", action="store_true", help="the text classifier of examples/text_encoder.py instead")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.text:
        text_table(args)
        return
    from digits import write_digits_imagefolder

    work = args.workdir or Path(tempfile.mkdtemp(prefix="lrc-finetune-"))
    print(f"working in {work}")
    digits = write_digits_imagefolder(work / "digits", image_size=16)
    pre = subset(digits, work / "pre", ["0", "1", "2", "3", "4"])
    task = subset(digits, work / "task", ["5", "6", "7", "8", "9"])
    started = time.perf_counter()
    top1 = pretrain(pre, work / "dense", args.pretrain_epochs)
    print(f"pretrained on digits 0-4: held-out top-1 {100 * top1:.1f} % ({time.perf_counter() - started:.0f} s)")
    loaded = lowrank_cli.load_model(str(work / "dense"))
    lowrank_cli.factorize(loaded.model, kappa=args.kappa, device="cpu")
    record_source(loaded.model, loaded.source)
    compressed = lowrank_cli.save(loaded.model, work / "compressed.safetensors")
    print(f"compressed at kappa {args.kappa:g}: {lowrank_cli.evaluate(loaded.model, pre, num_workers=0)['top1']:.3f}"
          " top-1 on digits 0-4 before any training")
    rows = method_rows({"dense": work / "dense", "compressed": compressed}, task, work, args.steps, "val_top1")
    print(f"\nNew task: digits 5-9 ({args.steps} steps of 32 images, seed 0, each method's default lr)\n")
    print_table(rows, "top-1")
    new_user(compressed, task, work, args.steps)


def print_table(rows: dict, metric: str) -> None:
    print(f"| method | dense: {metric} | dense: trainable | compressed: {metric} | compressed: trainable |")
    print("|---|---|---|---|---|")
    for method in METHODS:
        cells = []
        for kind in ("dense", "compressed"):
            acc, share, count, _ = rows[kind, method]
            cells += [f"{100 * acc:.1f} %", f"{count:,} ({100 * share:.1f} %)"]
        print(f"| {method} | " + " | ".join(cells) + " |")


def method_rows(sources: dict, data: Path, work: Path, steps: int, metric: str, **kw) -> dict:
    rows = {}
    for kind, source in sources.items():
        for method in METHODS:
            started = time.perf_counter()
            r = finetune(str(source), data, output=work / f"{kind}_{method}.safetensors", method=method, steps=steps,
                         batch_size=32, num_workers=0, device="cpu", seed=0, **kw)
            rows[kind, method] = (r.scores["after"][metric], r.trainable_share, r.trainable,
                                  time.perf_counter() - started)
            print(f"{kind:10s} {method:5s} {metric} {100 * rows[kind, method][0]:.1f} %, trainable "
                  f"{r.trainable:,} ({100 * r.trainable_share:.2f} %), {rows[kind, method][3]:.0f} s", flush=True)
    return rows


def text_table(args) -> None:
    """examples/text_encoder.py's BERT classifier, trained here on the sentences of the 8 standard-library modules
    with the most docstring sentences; the new task: the sentences of the next 8 modules."""
    import random

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from text_encoder import build_teacher, stdlib_sentences

    work = args.workdir or Path(tempfile.mkdtemp(prefix="lrc-finetune-text-"))
    print(f"working in {work}")
    data = stdlib_sentences(16)
    random.Random(0).shuffle(data)
    old = [(t, y) for t, y in data if y < 8]
    new = [(t, y - 8) for t, y in data if y >= 8]
    build_teacher(work / "bert", old, 8, 400)
    loaded = lowrank_cli.load_model(str(work / "bert"))
    lowrank_cli.factorize(loaded.model, kappa=args.kappa, device="cpu")
    record_source(loaded.model, loaded.source)
    compressed = lowrank_cli.save(loaded.model, work / "bert_lr.safetensors")
    held = len(new) // 5
    for name, part in (("dev.jsonl", new[:held]), ("train.jsonl", new[held:])):
        (work / name).write_text("".join(json.dumps({"text": t, "label": f"module{y}"}) + "\n" for t, y in part))
    print(f"new task: {len(new) - held} training and {held} held-out sentences of 8 other modules")
    rows = method_rows({"dense": work / "bert", "compressed": compressed}, work / "train.jsonl", work, args.steps,
                       "val_accuracy", val_data=work / "dev.jsonl")
    print(f"\nNew task: 8 other modules ({args.steps} steps of 32 sentences, seed 0, each method's default lr)\n")
    print_table(rows, "accuracy")


if __name__ == "__main__":
    main()
