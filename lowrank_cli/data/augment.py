"""Training augmentation that fits the data: how much to crop and flip, chosen from the images and the run.

    none    the evaluation preprocessing (resize + centre crop): for images about the model's input size or
            smaller (digits, icons, centred objects), where a random crop cuts the content away
    light   horizontal flip and a mild scale jitter (crops keep 80-100 % of the image): short recoveries
    strong  timm's training recipe (random resized crops down to 8 % of the image, flips): long runs on large
            photos, where the student sees each image many times
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from typing import Any

import torch

LEVELS = ("auto", "none", "light", "strong")
SMALL_IMAGES = 1.25  # images whose shorter side is at most this times the model's input side count as small
STRONG_PASSES = 10  # passes over the training images from which the full recipe pays
SAMPLED = 64  # image headers read to judge the sizes


def parse_level(augment: str | bool) -> str:
    """`augment` as one of LEVELS (True is the full recipe and False none, as before `auto` existed)."""
    from lowrank_cli.errors import UsageError

    if augment is True:
        return "strong"
    if augment is False:
        return "none"
    if augment not in LEVELS:
        raise UsageError(f"`augment` '{augment}' is not one of {', '.join(LEVELS)}")
    return augment


def typical_side(image_set: Any, sample: int = SAMPLED) -> int | None:
    """The median shorter side of (a spread sample of) the images, from their headers alone."""
    from PIL import Image

    paths = [p for p, _ in image_set.samples]
    step = max(1, len(paths) // sample)
    sides = []
    for path in paths[::step][:sample]:
        try:
            with Image.open(path) as im:
                sides.append(min(im.size))
        except Exception:  # unreadable files are the loader's to count
            continue
    return int(statistics.median(sides)) if sides else None


def choose(image_set: Any, input_size: tuple[int, ...], passes: float) -> tuple[str, str]:
    """(level, why) for `auto`: from the images' size against the model's input and the passes of the run."""
    model_side = min(input_size[-2:])
    side = typical_side(image_set)
    if side is None:
        return "light", "the image sizes could not be read"
    if side <= SMALL_IMAGES * model_side:
        return "none", (f"the images ({side} px on the shorter side) are about the model's input ({model_side} px) "
                        "or smaller: random crops would cut their content")
    if passes < STRONG_PASSES:
        return "light", (f"a short run ({passes:.1g} passes over the images): flips and mild scale jitter; the "
                         f"full recipe pays from {STRONG_PASSES} passes")
    return "strong", f"large images ({side} px) and a long run ({passes:.0f} passes): timm's training recipe"


def train_transform(model_or_config: torch.nn.Module | Mapping[str, Any], level: str) -> Callable[..., Any]:
    """The training preprocessing of `level` (see the module docstring), built by timm.data. Distillation matches
    the frozen teacher on the same input, so colour jitter, auto-augment and random erasing stay off."""
    import timm.data

    from lowrank_cli.models.inputs import data_config

    cfg = data_config(model_or_config)
    if level == "none":
        return timm.data.create_transform(**cfg, is_training=False)
    extra = dict(hflip=0.5, vflip=0.0, color_jitter=None, auto_augment=None, re_prob=0.0)
    if level == "light":
        extra["scale"] = (0.8, 1.0)
    return timm.data.create_transform(**cfg, is_training=True, **extra)
