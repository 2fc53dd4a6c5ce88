"""The augmentation `auto` picks: none for images about the model's input size, light for short runs on large
images, timm's recipe for long ones; and what each level does to an image."""

from __future__ import annotations

import pytest
import torch
from digits import write_flat_images
from PIL import Image

from lowrank_cli.data.augment import choose, parse_level, train_transform
from lowrank_cli.data.images import find_images
from lowrank_cli.errors import UsageError

CFG = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0, "interpolation": "bilinear"}


def test_auto_choice_follows_image_size_and_run_length(digits_folder, tmp_path):
    small = find_images(digits_folder(32, 4), "train")
    large = find_images(write_flat_images(tmp_path / "large", 12, image_size=96))
    assert choose(small, (3, 32, 32), passes=50)[0] == "none"
    assert choose(large, (3, 32, 32), passes=2)[0] == "light"
    level, why = choose(large, (3, 32, 32), passes=40)
    assert level == "strong" and "96 px" in why
    assert choose(large, (3, 96, 96), passes=40)[0] == "none"  # the same photos for a model that takes 96 px


def test_levels_do_what_they_say(tmp_path):
    image = Image.fromarray((torch.rand(96, 96, 3) * 255).to(torch.uint8).numpy())
    torch.manual_seed(0)
    none = [train_transform(CFG, "none")(image) for _ in range(2)]
    assert torch.equal(none[0], none[1])  # deterministic: resize + centre crop
    for level in ("light", "strong"):
        torch.manual_seed(0)
        outs = [train_transform(CFG, level)(image) for _ in range(4)]
        assert outs[0].shape == (3, 32, 32) and any(not torch.equal(outs[0], o) for o in outs[1:])


def test_parse_level():
    assert parse_level(True) == "strong" and parse_level(False) == "none" and parse_level("auto") == "auto"
    with pytest.raises(UsageError, match="augment 'heavy' is not one of auto, none, light, strong"):
        parse_level("heavy")
