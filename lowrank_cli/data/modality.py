"""One object per kind of input (images, texts): how training data of that kind is found, sized, loaded and
described, so that recovery asks its modality instead of branching on `if text` in every phase.

    modality = modality_for(data)                     # from the data on disk: texts or images
    train, val = modality.find(data, evaluate=True)   # val: labelled images to measure accuracy on, or None
    modality.check_model(teacher, data)               # images for an image model, texts for a text model
    size = modality.input_size(teacher)               # (C, H, W), or (max_length,) once the tokenizer is known
    loader, sampler = modality.loader(train, ...)     # resumable, seeded batches
    inputs, labels, mask = batch.parts()              # every batch kind answers the same way
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_cli.data.sampling import derive_seed
from lowrank_cli.errors import InputError, UsageError


class ImageData:
    name = "images"
    unit = "img"  # what the progress bar counts per second
    sample_name = "images"  # what the metrics lines count: images_per_s, images
    augments = True  # random crops and flips can apply

    def find(self, data: Path, *, evaluate: bool, val_data: Path | None = None, val_fraction: float | None = None,
             seed: int = 0) -> tuple[Any, Any, str]:
        """(training images, held-out images or None, where the held-out images come from)."""
        from lowrank_cli.data.images import find_images, val_split

        train = find_images(data, "train")
        if not evaluate:
            return train, None, ""
        if val_data is not None:
            val = val_split(val_data) if train.labelled else find_images(val_data, labelled=False,
                                                                        parameter="val_data")
            if train.labelled and val.classes != train.classes:
                raise InputError(f"the validation data '{val.root}' has the classes {_some(val.classes)} and the "
                                 f"training data '{train.root}' {_some(train.classes)}: give both the same class "
                                 "folders")
            return train, val, f"{val.root}"
        if val_fraction is None:
            val = val_split(data, required=False, class_tree=False)
            if val is None:  # a val/ split of unlabelled images still holds data out: scored by distillation
                val = find_images(data, "val", required=False, labelled=False)
            if val is not None:
                return train, val, f"{val.root}"
        return carve(train, "samples", val_fraction, seed)

    def prepare(self, teacher: Any, *, tokenizer: Any, max_length: int | None) -> None:
        if tokenizer is not None or max_length is not None:
            raise UsageError("`tokenizer` and `max_length` are for text data; the data here is images")

    def unreadable(self, train_set: Any) -> str:
        """Why the first training image cannot be read, in words (for the error that none could be)."""
        from lowrank_cli.data.pillow_limits import read_problem

        cause, fix = read_problem(train_set.samples[0][0])
        return f"{cause}; {fix}" if fix else cause

    def input_size(self, teacher: nn.Module) -> tuple[int, ...]:
        from lowrank_cli.models.inputs import data_config

        return tuple(data_config(teacher)["input_size"])

    def labelled(self, train_set: Any) -> bool:
        return train_set.labelled

    def loader(self, train_set: Any, teacher: nn.Module, *, batch_size: int, seed: int, rank: int, world_size: int,
               num_workers: int, pin_memory: bool, augment: str):
        from lowrank_cli.data.augment import train_transform
        from lowrank_cli.data.images import train_loader
        from lowrank_cli.models.inputs import image_mode

        return train_loader(train_set, train_transform(teacher, augment), image_mode(teacher), batch_size,
                            seed=seed, rank=rank, world_size=world_size, num_workers=num_workers,
                            pin_memory=pin_memory)

    def held_out_loader(self, held_out: Any, teacher: nn.Module, *, batch_size: int, num_workers: int):
        """Every held-out image once, in order, with the evaluation preprocessing."""
        from lowrank_cli.data.images import make_loader, make_transform
        from lowrank_cli.models.inputs import image_mode

        loader, _ = make_loader(held_out, make_transform(teacher, training=False), batch_size, shuffle=False,
                                drop_last=False, num_workers=num_workers, mode=image_mode(teacher))
        return loader

    def augmentation(self, asked: str, train_set: Any, input_size: tuple[int, ...], passes: float) -> tuple[str, str]:
        """The augmentation level to train with, and why (`auto` decides from the images and the run)."""
        from lowrank_cli.data.augment import choose

        if asked != "auto":
            return asked, "asked for"
        return choose(train_set, input_size, passes)

    def describe(self, train_set: Any, val_set: Any, why_no_accuracy: str) -> str:
        classes = f" ({train_set.num_classes} classes)" if train_set.labelled else " (no labels)"
        if val_set is not None:
            return f"Data: {len(train_set)} training images{classes}, {len(val_set)} validation images"
        return f"Data: {len(train_set)} training images{classes}; accuracy not measured ({why_no_accuracy})"

    def settings(self, delta: float) -> dict[str, Any]:
        return {}


class TextData:
    name = "texts"
    unit = "texts"
    sample_name = "texts"  # texts_per_s, texts in the metrics lines
    augments = False

    def __init__(self) -> None:
        self.tokenizer: Any = None
        self.tokenizer_source: Any = None
        self.max_length: int | None = None

    def find(self, data: Path, *, evaluate: bool, val_data: Path | None = None, val_fraction: float | None = None,
             seed: int = 0) -> tuple[Any, Any, str]:
        """(training texts, held-out texts or None, where the held-out texts come from)."""
        from lowrank_cli.data.texts import find_texts

        train = find_texts(data)
        if not evaluate:
            return train, None, ""
        if val_data is not None:
            return train, find_texts(val_data), str(val_data)
        return carve(train, "texts", val_fraction, seed)

    def prepare(self, teacher: Any, *, tokenizer: Any, max_length: int | None) -> None:
        """Find the tokenizer (default: the teacher's) and the text length the model's positions allow."""
        from lowrank_cli.models.inputs import default_max_length, position_limit

        self.tokenizer_source, self.tokenizer = teacher_tokenizer(teacher, tokenizer)
        longest = position_limit(teacher.model)
        if max_length is not None and longest is not None and max_length > longest:
            raise UsageError(f"`max_length` {max_length} is above the {longest} tokens the model's positions "
                             "allow: lower it")
        self.max_length = max_length or default_max_length(teacher.model, self.tokenizer)

    def input_size(self, teacher: nn.Module) -> tuple[int, ...]:
        return (self.max_length,)

    def labelled(self, train_set: Any) -> bool:
        return False

    def held_out_loader(self, held_out: Any, teacher: nn.Module, *, batch_size: int, num_workers: int):
        from lowrank_cli.data.texts import text_loader

        loader, _ = text_loader(held_out, self.tokenizer, batch_size=batch_size, max_length=self.max_length,
                                shuffle=False, drop_last=False)
        return loader

    def augmentation(self, asked: str, train_set: Any, input_size: tuple[int, ...], passes: float) -> tuple[str, str]:
        return "none", "text is not augmented"

    def loader(self, train_set: Any, teacher: nn.Module, *, batch_size: int, seed: int, rank: int, world_size: int,
               num_workers: int, pin_memory: bool, augment: str):
        from lowrank_cli.data.texts import text_loader

        # Tokenising in the training process: fast tokenizers are Rust and the texts are in memory, and a
        # worker would need its own Ctrl-C handling.
        return text_loader(train_set, self.tokenizer, batch_size=batch_size, max_length=self.max_length,
                           shuffle=True, seed=seed, rank=rank, world_size=world_size, drop_last=True)

    def describe(self, train_set: Any, val_set: Any, why_no_accuracy: str) -> str:
        skipped = f", {train_set.skipped} unusable record(s) skipped" if train_set.skipped else ""
        return (f"Data: {len(train_set)} training texts from {len(train_set.files)} file(s){skipped}, at most "
                f"{self.max_length} tokens each; distillation only (no accuracy on text)")

    def settings(self, delta: float) -> dict[str, Any]:
        source = self.tokenizer_source
        return {"data_kind": "text", "max_length": self.max_length, "delta": delta,
                "tokenizer": str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__}


# A held-out share is carved from the training data by default when there is this much of it (and no val split).
AUTO_VAL_FRACTION, AUTO_VAL_FROM = 0.1, 200


def carve(train: Any, field: str, fraction: float | None, seed: int) -> tuple[Any, Any, str]:
    """Split `fraction` of a training set (its list `field`) off as held-out data, the same way for a seed.
    `fraction` None: AUTO_VAL_FRACTION when the set has at least AUTO_VAL_FROM samples, else no held-out data."""
    items = getattr(train, field)
    if fraction is None:
        if len(items) < AUTO_VAL_FROM:
            return train, None, ""
        fraction = AUTO_VAL_FRACTION
    count = max(1, round(fraction * len(items)))
    if count >= len(items):
        raise UsageError(f"`val_fraction` {fraction:g} of {len(items)} training samples would leave none to train on: "
                         "add data, or lower it")
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(derive_seed(seed, "val") % 2**63))
    held = set(order[:count].tolist())
    kept = [x for i, x in enumerate(items) if i not in held]
    val = [x for i, x in enumerate(items) if i in held]
    why = f"{count} of the {len(items)} training samples ({fraction:g}), set aside with seed {seed}"
    return dataclasses.replace(train, **{field: kept}), dataclasses.replace(train, **{field: val}), why


def _some(names: list[str]) -> str:
    return "[" + ", ".join(names[:8]) + (", ..." if len(names) > 8 else "") + "]"


def modality_for(data: Path) -> ImageData | TextData:
    """Texts (a .txt / .jsonl file or a folder of them) or images, from what is on disk."""
    from lowrank_cli.data.texts import TEXT_EXTENSIONS, looks_like_text_data

    if looks_like_text_data(data):
        return TextData()
    if data.is_file():
        raise InputError(f"`data` '{data}' is a file lrc does not read as data: texts go in a "
                         f"{' or '.join(TEXT_EXTENSIONS)} file (or a folder of them), images in a folder")
    return ImageData()


def check_model(modality: ImageData | TextData, teacher: nn.Module, teacher_name: str, data: Path,
                role: str = "the teacher") -> None:
    """Texts need a text model and images an image model: say which data the model needs."""
    from lowrank_cli.models.families import TEXT, modality_of

    text_model = modality_of(teacher) == TEXT
    if (modality.name == "texts") != text_model:
        raise UsageError(f"`data` '{data}' holds {modality.name} but {role} {teacher_name} is "
                         f"{'a text' if text_model else 'an image'} model: give it "
                         f"{'a .txt / .jsonl file or folder' if text_model else 'an image folder'}")


def teacher_tokenizer(teacher: Any, tokenizer: Any) -> tuple[Any, Any]:
    """(where the tokenizer comes from, the tokenizer): `tokenizer` (a folder, repo or tokenizer object), else the
    teacher's own (a transformers folder or Hub repo)."""
    from lowrank_cli.data.texts import load_tokenizer

    if tokenizer is None:
        from lowrank_cli.models.hub import tokenizer_folder
        from lowrank_cli.models.loaded import name_of

        if teacher.files is None:
            raise UsageError(f"no tokenizer for the text data: the teacher {name_of(teacher)} is not a "
                             "transformers folder or Hub repo; pass `tokenizer` DIR_OR_REPO")
        tokenizer = tokenizer_folder(teacher)
    return tokenizer, load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
