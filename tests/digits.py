"""Real image data for tests without a download: scikit-learn's handwritten digits written as PNG files.

`load_digits` ships 1,797 8x8 grey scans (values 0..16) of the digits 0-9 inside the sklearn wheel.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from lowrank_cli.tour.teacher import train_classifier  # noqa: F401 - tests and benchmarks take it from here


def write_digits_imagefolder(root: str | Path, *, image_size: int = 32, val_fraction: float = 0.25,
                             seed: int = 0, max_per_class: int | None = None) -> Path:
    """Write root/train/<digit>/NNNN.png and root/val/<digit>/NNNN.png (RGB, image_size square); return root.

    The split is per class and depends only on `seed`: a class of n images (after `max_per_class`)
    puts round(n * val_fraction) of them in val. NNNN is the index in `load_digits`.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = Path(root)
    rng = np.random.default_rng(seed)
    for digit in range(10):
        indices = np.flatnonzero(digits.target == digit)
        indices = indices[rng.permutation(len(indices))][:max_per_class]
        n_val = round(len(indices) * val_fraction)
        for split, chosen in (("val", indices[:n_val]), ("train", indices[n_val:])):
            folder = root / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                grey = (digits.images[i] * (255 / 16)).round().astype(np.uint8)
                img = Image.fromarray(grey).resize((image_size, image_size), Image.Resampling.BILINEAR)
                img.convert("RGB").save(folder / f"{i:04d}.png")
    return root


def digits_split_counts(*, val_fraction: float = 0.25, max_per_class: int | None = None) -> dict[str, int]:
    """The number of images `write_digits_imagefolder` puts in each split (for asserting on)."""
    from sklearn.datasets import load_digits

    per_class = np.bincount(load_digits().target, minlength=10)
    if max_per_class is not None:
        per_class = np.minimum(per_class, max_per_class)
    n_val = sum(round(int(n) * val_fraction) for n in per_class)
    return {"train": int(per_class.sum()) - n_val, "val": n_val}


def write_flat_images(root: str | Path, n: int, *, image_size: int = 32, seed: int = 0) -> Path:
    """Write n random RGB PNGs directly in root (an unlabelled folder); return root."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = rng.integers(0, 256, size=(image_size, image_size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"img_{i:04d}.png")
    return root


def write_corrupt_image(path: str | Path, kind: str = "truncated") -> Path:
    """Write a .png PIL cannot decode: "truncated" (a real PNG cut in half) or "garbage" (not a PNG)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "garbage":
        data = b"this is not an image\x00" * 10
    elif kind == "truncated":
        # Noise does not compress, so half the file ends in the middle of the pixel data.
        pixels = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        data = buf.getvalue()[: len(buf.getvalue()) // 2]
    else:
        raise ValueError(f"unknown kind {kind!r}: use 'truncated' or 'garbage'")
    path.write_bytes(data)
    return path


def write_huge_image(path: str | Path, width: int = 20000, height: int = 20000) -> Path:
    """Write a .png whose header says width x height (400 Mpx by default, past Pillow's decompression-bomb limit)
    with a few bytes of pixel data: Pillow refuses it when it opens it, without decoding anything."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def relabel_imagefolder(source: str | Path, root: str | Path, label_of) -> Path:
    """Copy an ImageFolder (train/ and val/) into `root` with each class folder renamed by `label_of(name)`, so that
    several old classes can become one new class (digits -> parity: a new task for the same images); return root."""
    import shutil

    source, root = Path(source), Path(root)
    for split in ("train", "val"):
        for folder in sorted((source / split).iterdir()):
            target = root / split / label_of(folder.name)
            target.mkdir(parents=True, exist_ok=True)
            for image in sorted(folder.iterdir()):
                shutil.copyfile(image, target / f"{folder.name}_{image.name}")
    return root
