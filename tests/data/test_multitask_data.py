"""The multi-task benchmark's offline data (benchmarks/multitask_data.py): three text tasks over the standard
library's docstrings that read back as lrc reads labelled texts, with no dev text seen in training, and two image
tasks over the very same digit files."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from collections import Counter
from pathlib import Path

import pytest

from lowrank_cli.data.images import find_images
from lowrank_cli.data.labelled_texts import read_labelled_texts

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "multitask_data.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("multitask_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def text_tasks(bench, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    return folder, bench.write_text_tasks(folder, seed=0)


def _texts(path: Path) -> set[str]:
    rows = [json.loads(line) for line in path.open()]
    return {r["text"] for r in rows} | {r["text_pair"] for r in rows if "text_pair" in r}


def test_module_task_has_every_module_in_both_splits_and_no_shared_text(bench, text_tasks):
    folder, counts = text_tasks
    train = read_labelled_texts(folder / "module" / "train.jsonl")
    dev = read_labelled_texts(folder / "module" / "dev.jsonl", like=train)
    assert train.classes == sorted(bench.MODULES) and not train.pairs
    assert Counter(r[2] for r in dev.records).keys() == set(range(len(bench.MODULES)))
    assert (len(train), len(dev)) == (counts["module"]["train"], counts["module"]["dev"])
    assert 0.17 < len(dev) / (len(train) + len(dev)) < 0.23 and len(train) > 400
    assert not {r[0] for r in train.records} & {r[0] for r in dev.records}
    words = [len(r[0].split()) for r in train.records]
    assert min(words) >= 5 and max(words) <= 60


def test_pair_tasks_are_balanced_graded_and_drawn_within_a_split(bench, text_tasks):
    folder, counts = text_tasks
    same = read_labelled_texts(folder / "same" / "train.jsonl")
    assert same.pairs and same.classes == ["different", "same"]
    assert abs(Counter(r[2] for r in same.records).most_common()[-1][1] - len(same) / 2) <= 1
    similar = read_labelled_texts(folder / "similar" / "train.jsonl", target="score")
    grades = Counter(r[2] for r in similar.records)
    assert similar.regression and set(grades) == {0.0, 1.0, 3.0, 5.0}
    assert max(grades.values()) - min(grades.values()) <= 1 and len(similar) == counts["similar"]["train"]
    docs = {d.text: d for d in bench.stdlib_docstrings(seed=0)}
    for text, pair, score in random.Random(0).sample(similar.records, 50):
        assert bench.grade(docs[text], docs[pair]) == score
        assert (docs[text].module == docs[pair].module) == (score >= 3)
    for task in ("module", "same", "similar"):
        assert not _texts(folder / task / "dev.jsonl") & _texts(folder / "module" / "train.jsonl")
    dev = read_labelled_texts(folder / "similar" / "dev.jsonl", target="score")
    assert {r[2] for r in dev.records} == {0.0, 1.0, 3.0, 5.0}


def test_two_image_tasks_label_the_same_files_differently(bench, tmp_path):
    from digits import digits_split_counts

    roots = bench.write_digit_label_sets(tmp_path, image_size=8, max_per_class=6)
    for split in ("train", "val"):
        digits, parity = find_images(roots["digits"], split), find_images(roots["parity"], split)
        assert digits.classes == [str(d) for d in range(10)] and parity.classes == ["even", "odd"]
        digit_of = {p.name: int(digits.classes[label]) for p, label in digits.samples}
        parity_of = {p.name: parity.classes[label] for p, label in parity.samples}
        assert digit_of.keys() == parity_of.keys() and len(digit_of) == len(digits.samples)
        assert all(parity_of[name] == ("even" if d % 2 == 0 else "odd") for name, d in digit_of.items())
        assert len(digit_of) == digits_split_counts(max_per_class=6)[split]
    image = next((roots["digits"] / "train" / "3").iterdir())
    assert (roots["parity"] / "train" / "odd" / image.name).read_bytes() == image.read_bytes()
