"""Where held-out data comes from: a val/ split (labelled or not), or a seeded share of the training data."""

from __future__ import annotations

import pytest
from digits import write_flat_images

from lowrank_cli.data.images import find_images
from lowrank_cli.data.modality import ImageData, carve
from lowrank_cli.errors import UsageError


def test_an_unlabelled_val_split_is_the_held_out_data(tmp_path):
    write_flat_images(tmp_path / "train", 5)
    write_flat_images(tmp_path / "val", 3, seed=1)
    train, val, source = ImageData().find(tmp_path, evaluate=True)
    assert (len(train), len(val), source) == (5, 3, str(tmp_path / "val"))


def test_carving_is_seeded_and_never_empties_the_training_set(tmp_path):
    images = find_images(write_flat_images(tmp_path / "flat", 10))
    a, held_a, _ = carve(images, "samples", 0.3, seed=0)
    b, held_b, _ = carve(images, "samples", 0.3, seed=0)
    c, held_c, _ = carve(images, "samples", 0.3, seed=1)
    assert held_a.samples == held_b.samples != held_c.samples and len(held_a) == 3 and len(a) == 7
    assert set(a.samples) | set(held_a.samples) == set(images.samples)
    assert carve(images, "samples", None, seed=0)[1] is None  # fewer than 200 samples: nothing held out by default
    one = find_images(write_flat_images(tmp_path / "one", 1))
    with pytest.raises(UsageError, match="val_fraction 0.5 of 1 training samples would leave none"):
        carve(one, "samples", 0.5, seed=0)
