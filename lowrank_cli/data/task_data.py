"""Labelled data for fine-tuning, one object per kind (as data.modality is for recovery): an ImageFolder (its
class folders are the classes) or a .jsonl / .csv file of labelled texts (data.labelled_texts).

    modality = task_modality_for(data)         # ImageData (images) or LabelledTextData (texts)
    train, val, val_from = modality.find(data, evaluate=True)
    task_of(train)                             # (class names, or None for a regression score)

One task of several (`--task NAME=PATH[:label|:score]`, data.tasks), its errors named by the task:

    modality, train, val, val_from = task_sets(spec, evaluate=True, seed=0, val_fraction=None)
    check_same_modality(specs, modalities)     # one model reads every task: all texts or all images
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from lowrank_cli.data.modality import ImageData, TextData, carve
from lowrank_cli.data.tasks import TaskSpec
from lowrank_cli.errors import InputError, UsageError


class LabelledTextData(TextData):
    """Texts with a class label or a score: read, split, tokenized in batches with their labels."""

    def find(self, data: Path, *, evaluate: bool, val_data: Path | None = None, val_fraction: float | None = None,
             seed: int = 0, target: str | None = None) -> tuple[Any, Any, str]:
        """`target` "label" or "score": what to learn from the files (labelled_texts.read_labelled_texts)."""
        from lowrank_cli.data.labelled_texts import read_labelled_texts

        train = read_labelled_texts(data, target=target)
        if not evaluate:
            return train, None, ""
        if val_data is not None:
            return train, read_labelled_texts(val_data, like=train, target=target), str(val_data)
        return carve(train, "records", val_fraction, seed)

    def prepare(self, teacher: Any, *, tokenizer: Any, max_length: int | None) -> None:
        """The model's tokenizer: `tokenizer`, else the source's (a transformers folder or Hub repo), else the one
        the checkpoint's record names (the folder or repo it was factorized or fine-tuned from)."""
        if tokenizer is None and teacher.files is None:
            tokenizer = recorded_tokenizer(teacher.checkpoint)
            if tokenizer is None:
                raise UsageError("no tokenizer for the text data: the model is an lrc checkpoint that names no "
                                 "transformers folder or Hub repo to take it from; pass `tokenizer` DIR_OR_REPO")
        super().prepare(teacher, tokenizer=tokenizer, max_length=max_length)

    def labelled(self, train_set: Any) -> bool:
        return True

    def loader(self, train_set: Any, teacher: nn.Module, *, batch_size: int, seed: int, rank: int, world_size: int,
               num_workers: int, pin_memory: bool, augment: str):
        from lowrank_cli.data.labelled_texts import labelled_text_loader

        return labelled_text_loader(train_set, self.tokenizer, batch_size=batch_size, max_length=self.max_length,
                                    shuffle=True, seed=seed, rank=rank, world_size=world_size, drop_last=True)

    def held_out_loader(self, held_out: Any, teacher: nn.Module, *, batch_size: int, num_workers: int):
        from lowrank_cli.data.labelled_texts import labelled_text_loader

        loader, _ = labelled_text_loader(held_out, self.tokenizer, batch_size=batch_size, max_length=self.max_length,
                                         shuffle=False, drop_last=False)
        return loader

    def describe(self, train_set: Any, val_set: Any, why_no_accuracy: str) -> str:
        task = "scores" if train_set.regression else f"{len(train_set.classes)} classes"
        pairs = " pairs" if train_set.pairs else ""
        skipped = f", {train_set.skipped} unusable line(s) skipped" if train_set.skipped else ""
        held = f", {len(val_set)} held out" if val_set is not None else f"; nothing held out ({why_no_accuracy})"
        return (f"Data: {len(train_set)} training text{pairs or 's'} ({task}){skipped}, at most {self.max_length} "
                f"tokens each{held}")

    def settings(self, delta: float) -> dict[str, Any]:
        settings = super().settings(delta)
        settings.pop("delta", None)
        return settings


def recorded_tokenizer(info: Any, depth: int = 4) -> str | None:
    """The tokenizer a checkpoint's record points to: that of an earlier fine-tuning, else the transformers folder
    or Hub repo its weights came from, else that of the lrc checkpoint it was made from (a fine-tuned dense file
    factorized later; `depth` links at most). None when it names none."""
    if info is None or depth <= 0:
        return None
    if info.finetune and info.finetune.get("tokenizer"):
        return str(info.finetune["tokenizer"])
    source = (info.provenance or {}).get("source") or {}
    if source.get("kind") == "local-dir" and Path(str(source.get("id", ""))).is_dir():
        return str(source["id"])
    if source.get("kind") == "hf-hub" and source.get("id"):
        return str(source["id"])
    if source.get("kind") == "lrc" and Path(str(source.get("id", ""))).is_file():
        from lowrank_cli.checkpoint.format import read_info

        try:
            return recorded_tokenizer(read_info(source["id"])[0], depth - 1)
        except Exception:  # noqa: BLE001 - a source file that changed or went bad names no tokenizer
            return None
    return None


def task_modality_for(data: Path) -> ImageData | LabelledTextData:
    """Labelled texts (a .jsonl / .csv file) or labelled images (an ImageFolder or class tree)."""
    from lowrank_cli.data.labelled_texts import is_labelled_text_file
    from lowrank_cli.data.texts import looks_like_text_data

    if is_labelled_text_file(data):
        return LabelledTextData()
    if data.is_file() or looks_like_text_data(data):
        raise InputError(f"`data` '{data}' is not labelled data for fine-tuning: texts go in one .jsonl file "
                         '({"text": ..., "label": ...} or "score" per line) or a .csv with those columns, images '
                         "in an ImageFolder (train/<class>/..., optional val/<class>/...)")
    return ImageData()


def task_of(train_set: Any) -> tuple[list[str] | None, bool]:
    """(class names or None, regression) of a training set; images must have class folders."""
    if getattr(train_set, "regression", False):
        return None, True
    if not train_set.classes:
        raise InputError(f"the images in '{train_set.root}' have no class folders, so no labels to fine-tune on: use "
                         "an ImageFolder (train/<class>/image.jpg, optional val/<class>/...)")
    if len(train_set.classes) < 2:
        raise InputError(f"'{train_set.root}' has a single class ({train_set.classes[0]}): a classifier needs at "
                         "least two")
    return list(train_set.classes), False


def task_sets(spec: TaskSpec, *, evaluate: bool, seed: int, val_fraction: float | None,
              val_data: Path | None = None) -> tuple[ImageData | LabelledTextData, Any, Any, str]:
    """(modality, training set, held-out set or None, where the held-out set comes from) of one task, read as
    `finetune` reads its data and checked as `task_of` checks it; an error names the task."""
    try:
        modality = task_modality_for(spec.path)
        if isinstance(modality, LabelledTextData):
            found = modality.find(spec.path, evaluate=evaluate, val_data=val_data, val_fraction=val_fraction,
                                  seed=seed, target=spec.target)
        elif spec.target == "score":
            raise UsageError(f"'{spec.path}' is an image folder, whose images carry classes (their folders), not "
                             "scores: drop :score, or give a .jsonl / .csv file of scored texts")
        else:
            found = modality.find(spec.path, evaluate=evaluate, val_data=val_data, val_fraction=val_fraction,
                                  seed=seed)
        task_of(found[0])
    except (InputError, UsageError) as e:
        raise type(e)(f"task '{spec.name}': {e.args[0]}") from None
    return (modality, *found)


def check_same_modality(specs: Sequence[TaskSpec], modalities: Sequence[ImageData | TextData]) -> None:
    """One model reads every task, so the tasks are all texts or all images; else a UsageError naming two tasks
    of different kinds."""
    if not specs:
        raise UsageError("`tasks` is empty: give at least one task, NAME=PATH")
    first = specs[0], modalities[0]
    for spec, modality in zip(specs, modalities):
        if modality.name != first[1].name:
            raise UsageError(f"`tasks`: task '{first[0].name}' holds {first[1].name} and task '{spec.name}' "
                             f"{modality.name}, but one model reads every task: give every task texts or every task "
                             "images")
