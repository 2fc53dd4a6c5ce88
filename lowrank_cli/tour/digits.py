"""The demo's data: 1,797 handwritten digits (8x8 grey scans, values 0..16) shipped inside lrc as a 45 kB array.

They are the test set of the UCI "Optical Recognition of Handwritten Digits" data (Alpaydin and Kaynak, 1998;
CC BY 4.0), the same array scikit-learn ships as `load_digits` (see assets/README.md). The array is read with
`allow_pickle=False`: nothing in it can run code.

The split is a fixed rule, no random generator: within each digit, in the order of the array, image k goes to
test when k % 20 < 5 (25 %), to val when k % 20 is 5 or 6 (10 %), else to train (65 %). The shipped teacher was
trained on train alone; recovery trains on train and picks its best state on val; the demo's figures come from test,
which neither ever saw.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (1797, 8, 8) with values 0..16, labels uint8 (1797,))."""
    with resources.as_file(resources.files(__package__) / "assets" / "digits.npz") as path, \
            np.load(path, allow_pickle=False) as arrays:
        return arrays["images"], arrays["labels"]


def split_of(position: int) -> str:
    """The split of the `position`-th image of a digit (in the order of the array)."""
    slot = position % 20
    return "test" if slot < 5 else "val" if slot < 7 else "train"


def split_indices(labels: np.ndarray, every: int = 1) -> dict[str, list[int]]:
    """{split: indices into the array}; `every` > 1 keeps every n-th image of each split (a quick run)."""
    found: dict[str, list[int]] = {name: [] for name in SPLITS}
    for digit in range(10):
        for position, index in enumerate(np.flatnonzero(labels == digit)):
            found[split_of(position)].append(int(index))
    return {name: sorted(indices)[::every] for name, indices in found.items()}


def write_digits(root: str | Path, *, image_size: int = 8, every: int = 1, progress=None) -> dict[str, Path]:
    """Write the digits as PNG files (RGB, `image_size` square): `root/data/train/<digit>/NNNN.png` and
    `root/data/val/...` (an ImageFolder for recovery) and `root/test/<digit>/...` (a class tree for evaluation);
    NNNN is the index in the array. Returns {"data": ..., "test": ...}. `progress(done, total)` counts images."""
    from PIL import Image

    images, labels = load_digits()
    root = Path(root)
    folders = {"train": root / "data" / "train", "val": root / "data" / "val", "test": root / "test"}
    chosen = split_indices(labels, every)
    total, done = sum(map(len, chosen.values())), 0
    for split, indices in chosen.items():
        for index in indices:
            folder = folders[split] / str(int(labels[index]))
            folder.mkdir(parents=True, exist_ok=True)
            grey = (images[index].astype(np.float32) * (255 / 16)).round().astype(np.uint8)
            picture = Image.fromarray(grey)
            if image_size != grey.shape[0]:
                picture = picture.resize((image_size, image_size), Image.Resampling.BILINEAR)
            picture.convert("RGB").save(folder / f"{index:04d}.png")
            done += 1
            if progress is not None and (done % 100 == 0 or done == total):
                progress(done, total)
    return {"data": root / "data", "test": root / "test"}
