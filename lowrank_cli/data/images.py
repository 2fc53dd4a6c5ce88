"""Images on disk -> batches for `lrc recover`, `lrc eval` and data-aware factorization.

Four pieces, each usable on its own:

* `find_images(root, split)` finds the images and their labels (`ImageSet`), see its docstring for the
  layouts it accepts;
* `make_transform(model_or_config, training)` builds the model's preprocessing through `timm.data`;
* `ImageDataset` + `collate` decode with PIL and turn unreadable files into a count instead of a crash;
* `EpochSampler` gives each rank its share of an epoch, reproducibly and resumable mid-epoch.

`make_loader` puts them together into a `DataLoader` that yields `Batch(images, labels, skipped)`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from lowrank_cli.data.files import visible, walk_files
from lowrank_cli.data.pillow_limits import tell_too_large
from lowrank_cli.data.sampling import EpochSampler, derive_seed, epoch_loader, ignore_sigint_in_worker, seeded
from lowrank_cli.errors import InputError, UsageError

log = logging.getLogger(__name__)

# What torchvision's ImageFolder accepts, plus .gif (PIL reads it; timm's reader has no fixed list).
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp", ".gif",
)
TRAIN_SPLITS = ("train",)
VAL_SPLITS = ("val", "validation")
def _how_to_point(parameter: str) -> str:
    return f"point `{parameter}` at an ImageFolder (DIR/train/<class>/...) or a folder of images"


# ---------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class ImageSet:
    """The images of one split: `samples` are (path, label) in sorted order; label is -1 when unlabelled."""

    root: Path
    samples: list[tuple[Path, int]]
    classes: list[str] = field(default_factory=list)
    layout: str = "flat"  # "imagefolder" (root/train/<class>), "classes" (root/<class>) or "flat"
    split: str | None = None

    @property
    def labelled(self) -> bool:
        return bool(self.classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)


def is_image_file(path: str | os.PathLike[str]) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if visible(p.name) and p.is_dir())


def _images_in(folder: Path, recursive: bool) -> list[Path]:
    if not recursive:
        return sorted(p for p in folder.iterdir() if visible(p.name) and is_image_file(p) and p.is_file())
    return walk_files(folder, is_image_file)  # links followed, no folder twice (a symlink loop is skipped)


def _split_dir(root: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        if (root / name).is_dir():
            return root / name
    return None


def _class_tree(folder: Path, classes: list[str] | None = None) -> tuple[list[str], list[tuple[Path, int]]]:
    """torchvision ImageFolder rules: every visible sub-folder is a class (sorted), its images at any depth."""
    found = [d.name for d in _subdirs(folder)]
    if classes is None:
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise InputError(
                f"'{folder}' has classes that the train split lacks ({', '.join(unknown[:5])}"
                f"{', ...' if len(unknown) > 5 else ''}): give train/ and val/ the same class folders"
            )
    index = {name: i for i, name in enumerate(classes)}
    homes = {Path(os.path.realpath(folder / name)): index[name] for name in found}
    samples, taken = [], set()
    for name in found:
        for path in _images_in(folder / name, recursive=True):
            real = Path(os.path.realpath(path))
            home = next((homes[p] for p in real.parents if p in homes), None)
            if home is not None and real in taken:  # a link to an image that its own class folder holds
                continue
            taken.add(real)
            # The label of the class folder the file really sits in (reached through a link from another class, it
            # keeps its own); a file outside every class folder (a tree of links to a store) takes the folder's.
            samples.append((path, index[name] if home is None else home))
    return classes, samples


def find_images(
    root: str | os.PathLike[str],
    split: str | None = None,
    *,
    required: bool = True,
    labelled: bool | None = None,
    parameter: str = "data",
) -> ImageSet | None:
    """Find the images under `root` and their labels.

    Layouts, tried in this order:

    1. ImageFolder dataset root: `root/train/<class>/...` and/or `root/val/<class>/...` (`validation/` is
       also accepted). `split` picks one; None means train. The val split uses the train split's class
       list, so that a label means the same class in both. Loose images next to the class folders of a
       split are ignored (as torchvision does); a split with loose images only is read as unlabelled.
    2. Class tree: `root/<class>/...` with no images directly in root (e.g. `--data imagenet/train`).
       Every visible sub-folder is a class, sorted by name as torchvision's ImageFolder does, and its
       images are taken at any depth.
    3. Flat: images directly in root. Unlabelled (label -1); images in sub-folders are taken as well,
       since folders next to loose images are not a class structure.

    `split="train"` on a class tree or a flat folder means the folder itself; `split="val"` there means
    there is no val split. A missing split returns None, or raises `InputError` when `required`.
    `labelled=False` reads any layout as unlabelled images (sub-folders that are not classes);
    `labelled=True` insists on labels. Hidden files and folders (starting with '.') are skipped and
    symlinks are followed, each folder once (data.files: a link loop is skipped with a warning); an image's label is
    the class folder it really sits in, and an image reached twice counts once. The order is sorted and so the same
    on every machine and rank.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise InputError(f"data folder '{root}' does not exist: {_how_to_point(parameter)}")
    if not root.is_dir():
        raise InputError(f"`{parameter}` '{root}' is not a folder: {_how_to_point(parameter)}")
    if split is not None and split not in TRAIN_SPLITS + VAL_SPLITS:
        raise UsageError(f"unknown data split '{split}': use 'train' or 'val'")
    want_val = split in VAL_SPLITS

    train_dir, val_dir = _split_dir(root, TRAIN_SPLITS), _split_dir(root, VAL_SPLITS)
    picked = _pick_folder(root, train_dir, val_dir, want_val=want_val, required=required, parameter=parameter)
    if picked is None:
        return None
    folder, layout, split_name = picked

    loose = _images_in(folder, recursive=False)
    # Loose images next to sub-folders mean the sub-folders are not classes, except in a split folder,
    # where (as in torchvision) the class folders win and loose files are ignored.
    if labelled is not False and not (layout is None and loose):
        classes = None
        if folder is val_dir and train_dir is not None:
            classes = [d.name for d in _subdirs(train_dir)]
        classes, samples = _class_tree(folder, classes)
        if samples:
            if loose:
                log.warning("%d images directly in '%s' are ignored: an ImageFolder split keeps images in"
                            " <class>/ sub-folders", len(loose), folder)
            return ImageSet(root=folder, samples=samples, classes=classes, layout=layout or "classes",
                            split=split_name)
    samples = [(p, -1) for p in _images_in(folder, recursive=True)]
    if not samples:
        shown = ", ".join(IMAGE_EXTENSIONS[:3])
        raise InputError(f"data folder '{folder}' has no images ({shown}, ...): {_how_to_point(parameter)}")
    if labelled:
        raise InputError(f"data folder '{folder}' has images but no class folders: labels need"
                         f" '{folder}/<class>/image.jpg' (an ImageFolder)")
    return ImageSet(root=folder, samples=samples, classes=[], layout="flat", split=split_name)


def _pick_folder(root: Path, train_dir: Path | None, val_dir: Path | None, *, want_val: bool, required: bool,
                 parameter: str) -> tuple[Path, str | None, str | None] | None:
    """(folder, layout, split name) of the split asked for; None (or InputError when `required`) if it is missing."""
    if train_dir or val_dir:
        folder = val_dir if want_val else train_dir
        if folder is None:
            if required:
                name = "val" if want_val else "train"
                raise InputError(f"data folder '{root}' has no {name}/ split: add '{root / name}/<class>/...'"
                                 f" or point `{parameter}` at a folder with one")
            return None
        return folder, "imagefolder", folder.name
    if want_val:
        if required:
            raise InputError(f"data folder '{root}' has no val/ split: add '{root / 'val'}/<class>/...'"
                             f" next to '{root / 'train'}/', or point the validation data at its own folder")
        return None
    return root, None, None


# ------------------------------------------------------------------------------------------ transforms


def val_split(data: str | os.PathLike, *, required: bool = True, class_tree: bool = True) -> ImageSet | None:
    """The labelled images to evaluate on: DIR/val/<class>/..., or DIR itself when it is a class tree.

    A dataset root with a train/ split but no val/ split is not evaluated on its training images: that is an
    error (or None when not `required`). A flat folder has no labels: also an error / None. `class_tree=False`
    accepts a val/ split only (recovery trains on a class tree, so it cannot also be the validation data).
    """
    root = Path(data).expanduser()
    val = find_images(root, "val", required=False)
    if val is None:
        train = find_images(root, "train", required=required)
        if train is None:
            return None
        if train.layout == "imagefolder" or (train.layout == "classes" and not class_tree):
            if required:
                raise InputError(
                    f"data folder '{root}' has a train/ split but no val/ split to measure accuracy on: add "
                    f"'{root / 'val'}/<class>/...' or point `data` at a labelled folder"
                )
            return None
        val = train  # DIR itself: a class tree (e.g. --data imagenet/val), or a flat folder (no labels)
    if not val.labelled:
        if required:
            raise InputError(
                f"data folder '{val.root}' has images but no class folders, so no labels to measure accuracy "
                f"with: use '{val.root}/<class>/image.jpg'"
            )
        return None
    return val


def make_transform(model_or_config: torch.nn.Module | Mapping[str, Any], training: bool) -> Callable[..., Any]:
    """The model's preprocessing, built by `timm.data.create_transform` from `data_config`.

    Evaluation: resize + center crop as the model was published (crop_pct). Training: random resized
    crop and horizontal flip only. Distillation matches the frozen teacher on the same input, so
    regularising augmentations (auto-augment, random erasing, colour jitter, mixup) only slow recovery.
    """
    from lowrank_cli.data.augment import train_transform

    return train_transform(model_or_config, "strong" if training else "none")


# ---------------------------------------------------------------------------------------- dataset


class Batch(NamedTuple):
    """images: float (N, C, H, W); labels: long (N,), -1 when unlabelled; skipped: unreadable files dropped.

    N is 0 when every file of the batch was unreadable; images is then an empty tensor.
    """

    images: torch.Tensor
    labels: torch.Tensor
    skipped: int

    def parts(self) -> tuple[torch.Tensor, torch.Tensor, None]:
        """(model input, labels, attention mask): what a training step needs of any kind of batch."""
        return self.images, self.labels, None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(self.images.to(device, non_blocking=non_blocking),
                     self.labels.to(device, non_blocking=non_blocking), self.skipped)


class ImageDataset(Dataset):
    """Decodes `image_set`'s files with PIL (to `mode`) and applies `transform`.

    An unreadable, corrupt or truncated file gives None (logged with its path) instead of an exception,
    so one bad file in a million does not end a run; `collate` counts them. Errors of the transform
    itself are not caught: they are bugs, not bad data.
    """

    def __init__(self, image_set: ImageSet, transform: Callable[[Image.Image], Any], mode: str = "RGB"):
        self.samples = image_set.samples
        self.transform = transform
        self.mode = mode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        path, label = self.samples[index]
        try:
            with Image.open(path) as im:
                img = im.convert(self.mode)  # convert() loads fully, so truncation surfaces here
        except Image.DecompressionBombError as exc:  # not corrupt: too large to decode safely
            tell_too_large(path, exc)
            return None
        except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, ...
            log.debug("skipping unreadable image '%s': %s", path, exc)  # counted; the run says how many
            return None
        return self.transform(img), label


def collate(items: Sequence[tuple[torch.Tensor, int] | None]) -> Batch:
    """Stacks the readable samples; the count of dropped ones travels in the batch, across workers."""
    good = [item for item in items if item is not None]
    skipped = len(items) - len(good)
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), skipped)
    images = torch.stack([img for img, _ in good])
    labels = torch.tensor([label for _, label in good], dtype=torch.long)
    return Batch(images, labels, skipped)


# ---------------------------------------------------------------------------------------- sampler


# ----------------------------------------------------------------------------------------- loader


def make_loader(image_set: ImageSet, transform: Callable[[Image.Image], Any], batch_size: int, *,
                shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                drop_last: bool | None = None, mode: str = "RGB") -> tuple[DataLoader, EpochSampler]:
    """A DataLoader of `Batch` over `image_set`, and its sampler (call `set_epoch` / `set_start_batch`).

    drop_last defaults to `shuffle` (training trims to whole batches, evaluation sees every image; with
    world_size > 1 evaluation pads, so a few images count twice). `mode` is `image_mode(model)`.
    """
    return epoch_loader(ImageDataset(image_set, transform, mode), collate, batch_size=batch_size, shuffle=shuffle,
                        seed=seed, rank=rank, world_size=world_size,
                        drop_last=shuffle if drop_last is None else drop_last, num_workers=num_workers,
                        what=f"data folder '{image_set.root}'", unit="images")


class SeededImages(Dataset):
    """ImageDataset whose augmentation for image `index` in epoch `epoch` is seeded by (seed, epoch, index).

    The key is (epoch, index), so the random crop and flip of an image do not depend on which worker loads
    it or on how many batches came before: a resumed run sees the very same tensors.
    """

    def __init__(self, dataset: ImageDataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        with seeded(derive_seed(self.seed, "image", epoch, index)):
            return self.dataset[index]


class EpochKeys(Sampler):
    """(epoch, index) keys for SeededImages, from an EpochSampler (which keeps the order and the resume point)."""

    def __init__(self, sampler: EpochSampler):
        self.sampler = sampler

    def __iter__(self):
        epoch = self.sampler.epoch
        return ((epoch, i) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def train_loader(image_set: ImageSet, transform, mode: str, batch_size: int, *, seed: int, rank: int,
                 world_size: int, num_workers: int, pin_memory: bool = False) -> tuple[DataLoader, EpochSampler]:
    """Shuffled training batches (whole global batches only), seeded per image; see SeededImages."""
    if batch_size < 1:
        raise UsageError(f"`batch_size` must be at least 1, got {batch_size}")
    if num_workers < 0:
        raise UsageError(f"`num_workers` must be 0 or more, got {num_workers}")
    sampler = EpochSampler(len(image_set), batch_size, shuffle=True, seed=seed, rank=rank, world_size=world_size,
                           drop_last=True)
    if sampler.batches_per_epoch == 0:
        raise InputError(f"data folder '{image_set.root}' has {len(image_set)} images, fewer than one batch of "
                         f"{batch_size} x {world_size} process(es): lower `batch_size` or add images")
    loader = DataLoader(
        SeededImages(ImageDataset(image_set, transform, mode), seed),
        batch_size=batch_size, sampler=EpochKeys(sampler), collate_fn=collate, num_workers=num_workers,
        pin_memory=pin_memory, persistent_workers=num_workers > 0,
        worker_init_fn=ignore_sigint_in_worker if num_workers > 0 else None,
    )
    return loader, sampler
