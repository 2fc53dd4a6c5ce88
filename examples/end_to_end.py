"""The whole lrc flow, offline, on a small ViT built and trained here.

    python examples/end_to_end.py [--workdir DIR] [--epochs 15] [--recover-steps 300]

1. writes scikit-learn's handwritten digits (1,797 real scans, shipped with scikit-learn) as an ImageFolder;
2. trains a small timm ViT on them and saves it with timm's save_for_hf (a folder, like a Hub repo);
3. runs the CLI exactly as a user would:
       lrc factorize  (hard: kappa 6, so that accuracy drops)
       lrc report     (params / MACs, compression, per layer)
       lrc eval       (top-1 of the factorized model)
       lrc recover    (PELA distillation from the dense model; the defaults fit 32-pixel digits: no random
                       crops, a held-out val/ split, the best state kept)
       lrc eval       (top-1 after recovery)
A few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def lrc(*args: object) -> None:
    cmd = [sys.executable, "-m", "lowrank_cli", *map(str, args)]
    print("\n$ lrc " + " ".join(map(str, args)), flush=True)
    subprocess.run(cmd, check=True)


sys.path.insert(0, str(ROOT / "tests"))  # tests/digits.py: the digits as an ImageFolder, a plain training loop

from digits import train_classifier, write_digits_imagefolder  # noqa: E402


def write_digits(root: Path) -> Path:
    return write_digits_imagefolder(root, image_size=32)


def train_teacher(data: Path, folder: Path, epochs: int) -> None:
    import timm
    from timm.models import save_for_hf

    from lowrank_cli.data.images import find_images, make_loader, make_transform

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=4, num_classes=10,
                              embed_dim=128, depth=6, num_heads=4)
    loader, _ = make_loader(find_images(data, split="train"), make_transform(model, training=False), 64,
                            shuffle=True, seed=0)
    train_classifier(model, loader, epochs, on_epoch=lambda epoch, loss: print(
        f"teacher epoch {epoch + 1}/{epochs}: loss {loss:.3f}", flush=True))
    save_for_hf(model.eval(), str(folder), safe_serialization=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--recover-steps", type=int, default=300)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lrc-example-"))
    work.mkdir(parents=True, exist_ok=True)
    data = write_digits(work / "digits")
    teacher = work / "teacher"
    train_teacher(data, teacher, args.epochs)

    lrc("eval", teacher, "--data", data)
    lrc("factorize", teacher, "--kappa", 6, "--rank-multiple", 8, "-o", work / "student.safetensors", "--force")
    lrc("report", work / "student.safetensors", "--compare", teacher)
    lrc("eval", work / "student.safetensors", "--data", data)
    lrc("recover", work / "student.safetensors", "--teacher", teacher, "--data", data, "--steps", args.recover_steps,
        "--batch-size", 32, "--lr", "2e-3", "--workers", 0, "-o", work / "recovered.safetensors", "--force")
    lrc("eval", work / "recovered.safetensors", "--data", data)
    print(f"\nfiles in {work}")


if __name__ == "__main__":
    main()
