"""Offline data for the multi-task fine-tuning evidence (issue 16): three text tasks over the Python standard
library's own docstrings, and two image tasks over the very same digit scans. Nothing is downloaded.

    python benchmarks/multitask_data.py OUT_DIR        # writes everything below, prints counts per task and split

Texts: the first paragraph of the docstring of every public function, class, method and property of MODULES (at
least 5 words, at most 60 kept, whitespace made single spaces; a text found in two modules is dropped, a repeat in
one module kept once; at most 100 a module, drawn with the seed). Each module's texts are split ~80/20 into train
and dev, so every class of the module task is in both, and the pair tasks pair texts within one split only, so no
dev text is ever seen in training; a pair task has as many pairs as its split has texts (--pairs-per-text).
OUT_DIR/<task>/{train,dev}.jsonl:

- module:  {"text", "label": module}: which module a docstring comes from (7 classes).
- same:    {"text", "text_pair", "label": "same" | "different"}: are two docstrings of one module (half and half)?
- similar: {"text", "text_pair", "score"}: graded similarity, a quarter of the pairs at each grade:
           5 one family (the same class: its own and its members' docstrings; or module functions sharing the name
             prefix before the first '_', as os.sched_*), 3 the same module otherwise,
           1 related modules (one of GROUPS), 0 unrelated modules.

Images: OUT_DIR/digits/ (10 classes) and OUT_DIR/parity/ (even, odd): two ImageFolders over the same files of
scikit-learn's handwritten digits (tests/digits.py), with one train/val split; parity's files are hard links to
the digits' (copies where the file system has none).

    --task module=OUT/module/train.jsonl --task same=OUT/same/train.jsonl --task sim=OUT/similar/train.jsonl:score
    --task digits=OUT/digits --task parity=OUT/parity
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import random
import re
import shutil
import sys
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

# The modules of Python 3.11 with at least 60 distinct docstrings of 5 words or more, tkinter (not in every build)
# and typing (most of whose names are other modules' classes) left out.
MODULES = ("os", "pathlib", "asyncio", "inspect", "logging", "unittest", "decimal")
# Related modules (grade 1 of `similar`): what a program touches outside itself (files, processes, sockets), the
# tools that look at a program (its objects, its tests, its log), and numbers.
GROUPS = {"files and processes": ("os", "pathlib", "asyncio"), "development": ("inspect", "logging", "unittest"),
          "numbers": ("decimal",)}
GRADES = (5, 3, 1, 0)
MIN_WORDS, MAX_WORDS = 5, 60


@dataclass(frozen=True)
class Doc:
    module: str
    name: str  # "getcwd", "Path", "Path.glob"
    family: str  # "class:Path", "prefix:sched", or "name:getcwd" (a family of one)
    text: str


def _first_paragraph(doc: object) -> str | None:
    if not isinstance(doc, str):
        return None
    words = re.split(r"\n\s*\n", inspect.cleandoc(doc).strip(), maxsplit=1)[0].split()
    return " ".join(words[:MAX_WORDS]) if len(words) >= MIN_WORDS else None


def _defined_in(obj: object, module: str) -> bool:
    """Whether `obj` is the module's own, not a name it re-exports (os's own functions live in posix or nt)."""
    owner = getattr(obj, "__module__", None) or ""
    return owner.lstrip("_").split(".")[0] == module or (module == "os" and owner in ("posix", "nt"))


def _family(name: str) -> str:
    prefix = name.split("_")[0]
    return f"prefix:{prefix}" if "_" in name.strip("_") and prefix else f"name:{name}"


def module_docs(module: str) -> list[Doc]:
    """The public, documented functions, classes and class members of `module`, sorted by name."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated names (typing.io) warn on access
        mod = importlib.import_module(module)
        names = getattr(mod, "__all__", None) or list(vars(mod))
        found = []
        for name in sorted(set(names)):
            obj = getattr(mod, name, None)
            if name.startswith("_") or not (inspect.isroutine(obj) or inspect.isclass(obj)) \
                    or not _defined_in(obj, module):
                continue
            family = f"class:{name}" if inspect.isclass(obj) else _family(name)
            found.append(Doc(module, name, family, _first_paragraph(obj.__doc__)))
            if inspect.isclass(obj):
                for member, value in sorted(vars(obj).items()):
                    value = getattr(value, "__func__", value)  # classmethod, staticmethod
                    if not member.startswith("_") and (isinstance(value, property) or inspect.isroutine(value)):
                        found.append(Doc(module, f"{name}.{member}", family, _first_paragraph(value.__doc__)))
    return [d for d in found if d.text is not None]


def stdlib_docstrings(modules: tuple[str, ...] = MODULES, *, max_per_module: int | None = 100,
                      seed: int = 0) -> list[Doc]:
    """Every module's docstrings (`module_docs`), a text in two modules dropped, a repeat kept once; at most
    `max_per_module` a module (a seeded draw), so that no module dominates the module task."""
    per_module = {}
    for m in modules:
        first: dict[str, Doc] = {}
        for d in module_docs(m):
            first.setdefault(d.text, d)
        per_module[m] = list(first.values())
    owners = defaultdict(set)
    for m, docs in per_module.items():
        for d in docs:
            owners[d.text].add(m)
    rng = random.Random(seed)
    chosen = []
    for m, docs in per_module.items():
        docs = [d for d in docs if len(owners[d.text]) == 1]
        if max_per_module is not None and len(docs) > max_per_module:
            docs = sorted(rng.sample(docs, max_per_module), key=lambda d: d.name)
        chosen += docs
    return chosen


def split_docs(docs: list[Doc], *, dev_fraction: float = 0.2, seed: int = 0) -> tuple[list[Doc], list[Doc]]:
    """(train, dev): `dev_fraction` of each module's texts (at least one) to dev, the same way for a seed."""
    rng = random.Random(seed)
    train, dev = [], []
    for module in dict.fromkeys(d.module for d in docs):
        mine = [d for d in docs if d.module == module]
        rng.shuffle(mine)
        held = max(1, round(dev_fraction * len(mine)))
        dev += mine[:held]
        train += mine[held:]
    return train, dev


def module_records(docs: list[Doc]) -> list[dict]:
    return [{"text": d.text, "label": d.module} for d in docs]


def _group(module: str) -> str:
    return next(name for name, members in GROUPS.items() if module in members)


def grade(a: Doc, b: Doc) -> int:
    """How alike two docstrings are: 5 one family, 3 one module, 1 related modules, 0 otherwise."""
    if a.module == b.module:
        return 5 if a.family == b.family else 3
    return 1 if _group(a.module) == _group(b.module) else 0


def _near(d: Doc, level: str) -> object:
    return {"family": (d.module, d.family), "module": d.module, "group": _group(d.module)}[level]


def _draw(docs: list[Doc], n: int, kinds: tuple, kind, rng: random.Random) -> list[tuple[Doc, Doc, object]]:
    """n distinct unordered pairs (a, b, kind(a, b)), an even share of each kind (fewer where a split has too few),
    shuffled. The first text is drawn uniformly, the second from the texts that could be of the kind wanted."""
    levels = {5: "family", "same": "module", 3: "module", 1: "group"}  # where b of that kind is; else anywhere
    buckets: dict[str, dict[object, list[Doc]]] = {level: defaultdict(list) for level in ("family", "module", "group")}
    for d in docs:
        for level, bucket in buckets.items():
            bucket[_near(d, level)].append(d)
    pairs, seen = [], set()
    for i, k in enumerate(kinds):
        wanted, got, tries = n // len(kinds) + (i < n % len(kinds)), 0, 0
        while got < wanted and tries < 100 * wanted:
            tries += 1
            a = rng.choice(docs)
            b = rng.choice(buckets[levels[k]][_near(a, levels[k])] if k in levels else docs)
            key = frozenset((a.text, b.text))
            if a.text != b.text and kind(a, b) == k and key not in seen:
                seen.add(key)
                pairs.append((a, b, k))
                got += 1
    rng.shuffle(pairs)
    return pairs


def same_module(a: Doc, b: Doc) -> str:
    return "same" if a.module == b.module else "different"


def same_records(docs: list[Doc], n: int, rng: random.Random) -> list[dict]:
    return [{"text": a.text, "text_pair": b.text, "label": k}
            for a, b, k in _draw(docs, n, ("same", "different"), same_module, rng)]


def similar_records(docs: list[Doc], n: int, rng: random.Random) -> list[dict]:
    return [{"text": a.text, "text_pair": b.text, "score": k} for a, b, k in _draw(docs, n, GRADES, grade, rng)]


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def write_text_tasks(folder: str | Path, *, seed: int = 0, dev_fraction: float = 0.2, max_per_module: int | None = 100,
                     pairs_per_text: float = 1.0) -> dict[str, dict[str, int]]:
    """folder/{module,same,similar}/{train,dev}.jsonl; returns the records per task and split. Each pair task has
    `pairs_per_text` times as many pairs as its split has texts."""
    folder = Path(folder)
    train, dev = split_docs(stdlib_docstrings(max_per_module=max_per_module, seed=seed), dev_fraction=dev_fraction,
                            seed=seed)
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    for split, docs in (("train", train), ("dev", dev)):
        rng = random.Random(f"{seed}:{split}")
        n = round(pairs_per_text * len(docs))
        for task, records in (("module", module_records(docs)), ("same", same_records(docs, n, rng)),
                              ("similar", similar_records(docs, n, rng))):
            _write_jsonl(folder / task / f"{split}.jsonl", records)
            counts[task][split] = len(records)
    return dict(counts)


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # no hard links across devices or on some file systems
        shutil.copyfile(source, target)


def write_digit_label_sets(folder: str | Path, image_size: int = 32, max_per_class: int | None = None
                           ) -> dict[str, Path]:
    """folder/digits (classes 0-9) and folder/parity (even, odd): ImageFolders of the same image files with the same
    train/val split; returns {"digits": path, "parity": path}."""
    from digits import write_digits_imagefolder

    import shutil

    folder = Path(folder)
    for old in (folder / "digits", folder / "parity"):  # written again from scratch: a second run links afresh
        shutil.rmtree(old, ignore_errors=True)
    digits = write_digits_imagefolder(folder / "digits", image_size=image_size, max_per_class=max_per_class)
    parity = folder / "parity"
    for image in sorted(digits.glob("*/*/*.png")):
        split, digit = image.parent.parent.name, int(image.parent.name)
        target = parity / split / ("even" if digit % 2 == 0 else "odd") / image.name
        target.parent.mkdir(parents=True, exist_ok=True)
        _link(image, target)
    return {"digits": digits, "parity": parity}


def _image_counts(root: Path) -> dict[str, int]:
    return {split: len(list((root / split).glob("*/*.png"))) for split in ("train", "val")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write the tasks into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--pairs-per-text", type=float, default=1.0, help="pairs of a pair task per text of its split")
    args = parser.parse_args(argv)
    counts = write_text_tasks(args.out, seed=args.seed, pairs_per_text=args.pairs_per_text)
    images = write_digit_label_sets(args.out, image_size=args.image_size)
    print(f"{'task':10s} {'train':>6s} {'dev/val':>8s}  file")
    for task, splits in counts.items():
        print(f"{task:10s} {splits['train']:6d} {splits['dev']:8d}  {args.out / task}/{{train,dev}}.jsonl")
    for task, root in images.items():
        n = _image_counts(root)
        print(f"{task:10s} {n['train']:6d} {n['val']:8d}  {root}/{{train,val}}/<class>/")


if __name__ == "__main__":
    main()
