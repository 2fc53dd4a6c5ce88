"""Plain vs data-aware vs budgeted factorization at two sizes, measured in one run (issue 6's evidence).

    python benchmarks/data_aware_quality.py [--epochs 15] [--calib-samples 256]

A small ViT is trained here on scikit-learn's handwritten digits (1,797 real 8x8 scans, upscaled to 32x32;
no download), so the weights are trained ones, not random. For two sizes (kappa 3 and 6, and the same
parameter count for the budgets) it reports params, MACs, the mean relative error of the block outputs against
the dense model on held-out images, and top-1 accuracy on the held-out split.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import lowrank_cli  # noqa: E402
from lowrank_cli.evaluation.counting import count_macs  # noqa: E402
from lowrank_cli.data.images import find_images, make_loader, make_transform  # noqa: E402
from lowrank_cli.models.structure import block_names  # noqa: E402


@torch.no_grad()
def evaluate(model, images, labels, dense_blocks):
    outs = []
    hooks = [model.get_submodule(b).register_forward_hook(lambda m, i, o: outs.append(o)) for b in block_names(model)]
    logits = model(images)
    for h in hooks:
        h.remove()
    err = sum(((o - d).norm() / d.norm()).item() for o, d in zip(outs, dense_blocks)) / len(outs)
    return err, (logits.argmax(1) == labels).float().mean().item(), outs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--calib-samples", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    from digits import train_classifier, write_digits_imagefolder
    import timm

    data = write_digits_imagefolder(Path(tempfile.mkdtemp(prefix="lrc-digits-")), image_size=32)
    dense = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=4, num_classes=10,
                              embed_dim=128, depth=6, num_heads=4).eval()
    train_set, val_set = find_images(data, split="train"), find_images(data, split="val")
    train_loader, _ = make_loader(train_set, make_transform(dense, training=False), 64, shuffle=True, seed=0)
    started = time.perf_counter()
    train_classifier(dense, train_loader, args.epochs)
    val_loader, _ = make_loader(val_set, make_transform(dense, training=False), len(val_set), shuffle=False)
    val = next(iter(val_loader))
    _, dense_acc, dense_blocks = evaluate(dense, val.images, val.labels, [torch.ones(1)] * 6)
    dense_params = sum(p.numel() for p in dense.parameters())
    dense_macs = count_macs(dense, (3, 32, 32)).total
    print(f"dense ViT (embed 128, depth 6) trained {args.epochs} epochs on {len(train_set)} digits in "
          f"{time.perf_counter() - started:.0f} s; held-out top-1 {dense_acc:.3f} on {len(val_set)} images; "
          f"{dense_params / 1e6:.3f}M params, {dense_macs / 1e6:.1f}M MACs")

    calib = str(data / "train")
    rows = []
    for kappa in (3, 6):
        plain = copy.deepcopy(dense)
        r = lowrank_cli.factorize(plain, kappa=kappa, rank_multiple=8)
        target = sum(p.d_in * p.d_out for p in r.plan.layers)
        kept = (sum(x.rank * (x.d_in + x.d_out) for x in r.layers)
                + sum(p.dense_params for p in r.plan.layers if p.rank is None)) / target
        variants = {
            f"plain SVD, kappa {kappa}": dict(kappa=kappa),
            f"data-aware, kappa {kappa}": dict(kappa=kappa, calib=calib, calib_samples=args.calib_samples),
            f"budget {kept:.3f}, plain": dict(budget=kept),
            f"budget {kept:.3f}, data-aware": dict(budget=kept, calib=calib, calib_samples=args.calib_samples),
        }
        for name, options in variants.items():
            model = copy.deepcopy(dense)
            t = time.perf_counter()
            lowrank_cli.factorize(model, rank_multiple=8, **options)
            seconds = time.perf_counter() - t
            err, acc, _ = evaluate(model, val.images, val.labels, dense_blocks)
            rows.append((name, sum(p.numel() for p in model.parameters()), count_macs(model, (3, 32, 32)).total,
                         err, acc, seconds))
    print(f"\n{'variant':32} {'params':>9} {'MACs':>9} {'block err':>10} {'top-1':>7} {'dense':>7} {'time s':>7}")
    for name, params, macs, err, acc, seconds in rows:
        print(f"{name:32} {params / 1e6:8.3f}M {macs / 1e6:8.1f}M {err:10.4f} {acc:7.3f} {dense_acc:7.3f} {seconds:7.1f}")


if __name__ == "__main__":
    main()
