"""The demo's teacher: a small timm ViT trained on the train split of the shipped digits, shipped beside them.

    python -m lowrank_cli.tour.teacher OUT_DIR [--epochs 80]     # how assets/teacher/ was made

It is timm's `vit_tiny_patch16_224` architecture made small (8x8 input in 2x2 patches, 32 wide, 4 blocks of 2
heads: 52,202 parameters, 214 kB as float32), saved with timm's `save_for_hf` (config.json + model.safetensors),
the layout `lrc` reads as `local-dir:PATH`. Training it takes about a minute on 2 CPU cores; its top-1 on the test
split is about 96 % (the exact figure depends on the CPU's arithmetic; the shipped file is the reference).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path

ARCHITECTURE = "vit_tiny_patch16_224"
MODEL_ARGS = {"img_size": 8, "patch_size": 2, "embed_dim": 32, "depth": 4, "num_heads": 2, "num_classes": 10}
# What timm's transforms read: the scans are already 8x8 (no resize, no crop), grey levels centred at 0.
PRETRAINED_CFG = {"tag": "lrc_demo_digits", "input_size": (3, 8, 8), "fixed_input_size": True, "crop_pct": 1.0,
                  "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "num_classes": 10,
                  "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0"}


@contextlib.contextmanager
def shipped_teacher() -> Iterator[Path]:
    """The folder of the shipped teacher (a real folder even when the package is zipped)."""
    with resources.as_file(resources.files(__package__) / "assets" / "teacher") as folder:
        yield Path(folder)


def build_teacher(seed: int = 0):
    """The teacher's architecture with fresh weights (timm, `pretrained=False`)."""
    import timm
    import torch

    torch.manual_seed(seed)
    return timm.create_model(ARCHITECTURE, pretrained=False, pretrained_cfg_overlay=dict(PRETRAINED_CFG),
                             **MODEL_ARGS)


def train_classifier(model, loader, epochs: int, *, lr: float = 2e-3,
                     on_epoch: Callable[[int, float], None] | None = None):
    """Plain supervised training (AdamW, one-cycle schedule) of `model` on a loader of `Batch`es; returns it in
    eval mode. How the teacher (and the examples' and tests' trained models) got their weights."""
    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(loader))
    model.train()
    for epoch in range(epochs):
        for batch in loader:
            loss = F.cross_entropy(model(batch.images), batch.labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if on_epoch is not None:
            on_epoch(epoch, loss.item())
    return model.eval()


def train_teacher(folder: str | Path, work: str | Path, *, epochs: int = 80, log=print) -> Path:
    """Train the teacher on the train split (written under `work`) and save it to `folder` with save_for_hf."""
    from timm.models import save_for_hf

    from lowrank_cli.data.images import find_images, make_loader, make_transform
    from lowrank_cli.tour.digits import write_digits

    data = write_digits(work)["data"]
    model = build_teacher()
    loader, _ = make_loader(find_images(data, split="train"), make_transform(model, training=False), 64,
                            shuffle=True, seed=0)
    train_classifier(model, loader, epochs, on_epoch=lambda e, loss: log(f"epoch {e + 1}/{epochs}: loss {loss:.3f}"))
    save_for_hf(model, str(folder), safe_serialization=True)
    return Path(folder)


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--epochs", type=int, default=80)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lrc-teacher-") as work:
        print(f"wrote {train_teacher(args.folder, work, epochs=args.epochs)}")


if __name__ == "__main__":
    main()
