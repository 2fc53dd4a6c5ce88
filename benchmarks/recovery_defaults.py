"""Do the recovery defaults work on ordinary data? Digits (32 px) and larger pictures, and a small text model.

    python benchmarks/recovery_defaults.py [--workdir DIR] [--steps 300]

1. Digits (scikit-learn's 1,797 scans) at 32 px: a ViT trained on them, factorized at kappa 16, then
   `recover` with no flags (augment auto, held-out val/, keep best) next to `--augment strong` (timm's recipe,
   the default before) and `--augment none`, same steps / batch / lr as the issue's run (300 x 64, lr 5e-4).
2. Larger pictures (the digits drawn at 128 px, for the same 32 px model): what `auto` picks for a short and a
   long run, and one short recovery to show it runs.
3. A small BERT (masked LM, random weights) on sentences from the standard library's docstrings: no flags,
   so a tenth of the texts is held out; held-out distillation loss and pooled-output cosine before / after.
Prints one table per part. About 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from digits import train_classifier, write_digits_imagefolder  # noqa: E402
from hf_fixtures import write_corpus, write_tiny_bert  # noqa: E402

import lowrank_cli  # noqa: E402


def teacher_on_digits(data: Path, folder: Path, epochs: int = 15) -> None:
    import timm
    from timm.models import save_for_hf

    from lowrank_cli.data.images import find_images, make_loader, make_transform

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=4, num_classes=10,
                              embed_dim=128, depth=6, num_heads=4)
    loader, _ = make_loader(find_images(data, split="train"), make_transform(model, training=False), 64,
                            shuffle=True, seed=0)
    train_classifier(model, loader, epochs)
    save_for_hf(model.eval(), str(folder), safe_serialization=True)


def factorized(teacher: Path, out: Path, kappa: float) -> Path:
    loaded = lowrank_cli.load_model(str(teacher))
    lowrank_cli.factorize(loaded.model, kappa=kappa, rank_multiple=1)
    lowrank_cli.save(loaded.model, out)
    return out


def run(student, teacher, data, out, **kw):
    started = time.perf_counter()
    result = lowrank_cli.recover(str(student), str(teacher), str(data), output=out, num_workers=0, device="cpu",
                                 log=lambda m: None, warn=lambda m: None, **kw)
    return result, time.perf_counter() - started


def digits_table(work: Path, steps: int) -> None:
    data = write_digits_imagefolder(work / "digits", image_size=32)
    teacher = work / "teacher"
    teacher_on_digits(data, teacher)
    student = factorized(teacher, work / "lr16.safetensors", 16)
    print(f"\n== digits 32 px, ViT (img 32, patch 4), kappa 16, {steps} steps x 64, lr 5e-4 ==")
    print(f"{'options':<22} {'augment chosen':<15} {'teacher':>8} {'before':>8} {'after':>8} {'kept':>10} {'s':>6}")
    reasons = []
    for name, kw in (("(none: the defaults)", {}), ("--augment strong", {"augment": "strong"}),
                     ("--augment none", {"augment": "none"})):
        r, seconds = run(student, teacher, data, work / f"rec_{len(kw)}_{kw.get('augment', 'auto')}.safetensors",
                         steps=steps, batch_size=64, lr=5e-4, **kw)
        a, kept = r.accuracy, r.settings.get("kept", {})
        print(f"{name:<22} {r.settings['augment']:<15} {100 * a['teacher']['top1']:>7.1f}% "
              f"{100 * a['before']['top1']:>7.1f}% {100 * a['after']['top1']:>7.1f}% "
              f"{kept.get('which', '-')}@{kept.get('step', '-'):<5} {seconds:>6.0f}")
        reasons.append(r.settings["augment_reason"])
    print(f"auto chose: {reasons[0]}")


def large_table(work: Path) -> None:
    from lowrank_cli.data.augment import choose
    from lowrank_cli.data.images import find_images

    data = write_digits_imagefolder(work / "large", image_size=128, max_per_class=30)
    images = find_images(data, "train")
    print("\n== the same digits drawn at 128 px, for the 32 px model ==")
    for passes in (2, 40):
        level, why = choose(images, (3, 32, 32), passes)
        print(f"  {passes:>2} passes over the images: {level:<6} ({why})")


def text_table(work: Path, steps: int, kappa: float) -> None:
    bert = write_tiny_bert(work / "bert", head="masked-lm", dropout=0.0)
    corpus = write_corpus(work / "corpus.txt", n=400)
    loaded = lowrank_cli.load_model(str(bert))
    lowrank_cli.factorize(loaded.model, kappa=kappa, rank_multiple=1)
    lowrank_cli.save(loaded.model, work / "bert_lr.safetensors")
    r, seconds = run(work / "bert_lr.safetensors", bert, corpus, work / "bert_rec.safetensors", steps=steps,
                     batch_size=16, lr=5e-3, delta=1.0)
    held = r.settings["held_out"]
    print(f"\n== tiny BERT (masked LM), kappa {kappa:g}, {steps} steps x 16 texts, no held-out flag given ==")
    print(f"held out: {held['data']}; kept: {r.settings['kept']}")
    print(f"{'metric':<12} {'before':>10} {'after':>10}")
    for name in sorted(held["after"]):
        print(f"{name:<12} {held['before'][name]:>10.4g} {held['after'][name]:>10.4g}")
    print(f"({seconds:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--only-text", action="store_true", help="the text part alone")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lrc-defaults-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, work in {work}")
    if not args.only_text:
        digits_table(work, args.steps)
        large_table(work)
    text_table(work, 120, kappa=16)


if __name__ == "__main__":
    main()
