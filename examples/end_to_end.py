"""The whole lrc flow, offline, on a small ViT built and trained here.

    python examples/end_to_end.py [--workdir DIR] [--epochs 15] [--recover-steps 300]

1. writes the handwritten digits that ship with lrc (1,797 real scans, lowrank_cli/tour/assets) at 32 pixels:
   data/train/ and data/val/ (an ImageFolder) and test/ (images that neither training nor recovery sees);
2. trains a timm ViT on data/train and saves it with timm's save_for_hf (a folder, like a Hub repo);
3. runs the CLI exactly as a user would:
       lrc factorize  (hard: kappa 6, so that accuracy drops)
       lrc report     (params / MACs, compression, per layer)
       lrc eval       (top-1 of the factorized model on test/)
       lrc recover    (PELA distillation from the dense model; the defaults fit 32-pixel digits: no random
                       crops, the best state kept by its score on data/val)
       lrc eval       (top-1 after recovery, on test/)
Larger and slower than `lrc demo` (a 1.2M-parameter ViT at 32 pixels): tens of minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from lowrank_cli.tour.digits import write_digits


def lrc(*args: object) -> None:
    cmd = [sys.executable, "-m", "lowrank_cli", *map(str, args)]
    print("\n$ lrc " + " ".join(map(str, args)), flush=True)
    subprocess.run(cmd, check=True)


def train_teacher(data: Path, folder: Path, epochs: int) -> None:
    import timm
    from timm.models import save_for_hf

    from lowrank_cli.data.images import find_images, make_loader, make_transform
    from lowrank_cli.tour.teacher import train_classifier

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
    folders = write_digits(work / "digits", image_size=32)
    data, test = folders["data"], folders["test"]
    teacher = work / "teacher"
    train_teacher(data, teacher, args.epochs)

    lrc("eval", teacher, "--data", test)
    lrc("factorize", teacher, "--kappa", 6, "--rank-multiple", 8, "-o", work / "student.safetensors", "--force")
    lrc("report", work / "student.safetensors", "--compare", teacher)
    lrc("eval", work / "student.safetensors", "--data", test)
    lrc("recover", work / "student.safetensors", "--teacher", teacher, "--data", data, "--steps", args.recover_steps,
        "--batch-size", 32, "--lr", "2e-3", "--workers", 0, "-o", work / "recovered.safetensors", "--force")
    lrc("eval", work / "recovered.safetensors", "--data", test)
    print(f"\nfiles in {work}")


if __name__ == "__main__":
    main()
