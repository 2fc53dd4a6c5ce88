"""Top-1 / top-5 accuracy of a classifier on a labelled image folder (`lrc eval`, and before/after `lrc recover`).

Preprocessing is the model's own evaluation transform (timm.data, from its pretrained_cfg). Unreadable images
are skipped and counted; they are left out of the accuracy. Under torchrun each rank evaluates its share of
the images (no image twice) and the counts are summed, so the result is the same for any number of ranks.
On CUDA the forward runs under bf16 autocast, as recovery does; on the CPU in float32.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lowrank_cli.data.images import ImageDataset, ImageSet, collate, make_transform, val_split
from lowrank_cli.data.pillow_limits import read_problem
from lowrank_cli.devices import autocast_for
from lowrank_cli.errors import InputError, UsageError
from lowrank_cli.models.inputs import image_mode, output_tensor

TOP_K = (1, 5)


def num_classes(model: nn.Module) -> int | None:
    """The number of outputs of the model's image classifier, as its family reads it (None when the model says
    nothing or has no head)."""
    from lowrank_cli.models.families import family_of

    return family_of(model).num_classes(model)


def check_classes(model: nn.Module, image_set: ImageSet, what: str = "the model") -> str | None:
    """Why accuracy on `image_set` would be meaningless for `model`, or None when it is fine."""
    n = num_classes(model)
    if n is None:
        return f"{what} has no classifier head (num_classes 0)"
    if image_set.num_classes != n:
        return (f"the data has {image_set.num_classes} classes ({image_set.root}), {what} outputs {n}: labels would "
                "not match the outputs")
    from lowrank_cli.checkpoint.format import info_of

    info = info_of(model)
    recorded = (info.finetune or {}).get("classes") if info is not None else None
    if recorded and list(recorded) != list(image_set.classes):
        return (f"the class folders of {image_set.root} ({_some(image_set.classes)}) are not the classes {what} was "
                f"fine-tuned on ({_some(recorded)}, in this order): labels would not match the outputs")
    return None


def _some(names: list[str]) -> str:
    return ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: str | os.PathLike | ImageSet,
    *,
    batch_size: int = 128,
    device: str | torch.device | None = None,
    num_workers: int = 4,
    transform_from: nn.Module | dict | None = None,
    dist=None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Top-1 and top-5 accuracy (fractions) of `model` on the labelled images of `data`.

    data: a folder (see `val_split`) or an ImageSet with labels. device: default the model's. transform_from:
    the model or pretrained_cfg whose evaluation transform to use (default: `model`). dist: a
    `distributed.DistContext` to share the work between ranks. progress(done, total) counts batches.
    Returns {"top1", "top5", "images", "skipped", "precision"}; "top5" is top-min(5, classes).
    """
    from lowrank_cli import distributed
    from lowrank_cli.models.families import TEXT, modality_of

    if modality_of(unwrap(model)) == TEXT:
        raise UsageError("lrc eval measures top-1 / top-5 on labelled images; this is a text model: compare its "
                         "outputs with the teacher's through lrc recover's distillation losses instead")
    image_set = data if isinstance(data, ImageSet) else val_split(data)
    if not image_set.labelled:
        raise InputError(f"'{image_set.root}' has no labels: accuracy needs an ImageFolder (<class>/image.jpg)")
    if batch_size < 1:
        raise UsageError(f"`batch_size` must be at least 1, got {batch_size}")
    plain = unwrap(model)
    problem = check_classes(plain, image_set)
    if problem:
        raise InputError(f"cannot measure accuracy: {problem}")
    ctx = dist or distributed.DistContext()
    param = next(plain.parameters())
    dev = torch.device(device) if device is not None else param.device
    source = transform_from if transform_from is not None else plain
    transform = make_transform(source, training=False)
    indices = list(range(len(image_set)))[ctx.rank::ctx.world_size]
    loader = torch.utils.data.DataLoader(
        ImageDataset(image_set, transform, image_mode(source)), batch_size=batch_size, sampler=indices,
        collate_fn=collate, num_workers=num_workers, pin_memory=dev.type == "cuda",
    )
    ks = tuple(min(k, num_classes(plain)) for k in TOP_K)
    counts = _count_hits(plain, loader, dev, ks, progress)
    if ctx.enabled:
        reduce_on = ctx.device if ctx.device.type == "cuda" else torch.device("cpu")
        counts = distributed.all_reduce_sum(ctx, counts.to(reduce_on)).cpu()
    images, skipped = int(counts[-2]), int(counts[-1])
    if images == 0:
        cause, fix = read_problem(image_set.samples[0][0])
        raise InputError(f"none of the {len(image_set)} images in '{image_set.root}' could be read ({cause}): {fix or 'check the files'}")
    return {
        "top1": float(counts[0]) / images,
        "top5": float(counts[1]) / images,
        "images": images,
        "skipped": skipped,
        "precision": "bf16" if dev.type == "cuda" else "fp32",
    }


def _count_hits(plain: nn.Module, loader, dev: torch.device, ks: tuple[int, ...],
                progress: Callable[[int, int], None] | None) -> torch.Tensor:
    """[correct@k for k in ks..., images, skipped] over `loader`, in eval mode (the mode is restored after)."""
    counts = torch.zeros(len(ks) + 2, dtype=torch.float64)
    was_training = plain.training
    plain.eval()
    try:
        total = len(loader)
        for done, batch in enumerate(loader, 1):
            counts[-1] += batch.skipped
            if len(batch.images):
                with autocast_for(dev):
                    logits = plain(batch.images.to(dev, non_blocking=True))
                logits = output_tensor(logits)  # timm: a tensor (or a tuple of heads); transformers: .logits
                top = logits.float().topk(max(ks), dim=-1).indices.cpu()
                hits = top == batch.labels[:, None]
                for i, k in enumerate(ks):
                    counts[i] += hits[:, :k].any(dim=1).sum().item()
                counts[-2] += len(batch.images)
            if progress is not None:
                progress(done, total)
    finally:
        plain.train(was_training)
    return counts
