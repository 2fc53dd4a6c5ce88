"""Labelled text for fine-tuning: a .jsonl or .csv file of `text` (and optional `text_pair`) with a `label`
(classes: all strings or all whole numbers) or a `score` (a number to regress on, e.g. STS).

    texts = read_labelled_texts("sst.jsonl")                 # LabelledTexts: records, classes (None: scores)
    val = read_labelled_texts("dev.jsonl", like=texts)       # the training file's classes, or an error
    loader, sampler = labelled_text_loader(texts, tokenizer, batch_size=32, max_length=128, shuffle=True)

.jsonl: one JSON object per line. .csv: a header row naming the columns; every cell is text, so a label column
whose cells are all whole numbers holds numbered classes. Blank lines are skipped; a line that is not a JSON
object with a non-empty string `text` is counted and skipped (as texts.find_texts does); a record without a label
or score, labels of mixed types, a record with both a label and a score, or a score that is not a number are
errors that name the line.

`target` says what to learn when the file alone does not (a `--task` suffix, data.tasks): "score" regresses on each
record's `score`, else its `label` read as a number (STS-B files keep the similarity in `label`); "label" takes
classes from `label`. Either one settles a record that has both.

    sts = read_labelled_texts("stsb.jsonl", target="score")
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

from lowrank_cli.data.sampling import EpochSampler, epoch_loader
from lowrank_cli.errors import InputError, UsageError

LABELLED_TEXT_EXTENSIONS = (".jsonl", ".csv")
_FORMAT = ('write one {"text": ..., "label": ...} (or "score") object per line (.jsonl), or a .csv whose header '
           'names the columns text[, text_pair] and label or score')
_WHOLE = re.compile(r"-?\d+")
Record = tuple[str, "str | None", Any]  # text, text_pair, label (class index) or score


@dataclass
class LabelledTexts:
    """`records` are (text, text_pair or None, class index or score); `classes` None means scores."""

    root: Path
    records: list[Record]
    classes: list[str] | None
    files: list[Path] = field(default_factory=list)
    skipped: int = 0

    @property
    def regression(self) -> bool:
        return self.classes is None

    @property
    def labelled(self) -> bool:
        return True

    @property
    def pairs(self) -> bool:
        return bool(self.records) and self.records[0][1] is not None

    def __len__(self) -> int:
        return len(self.records)


def is_labelled_text_file(path: str | Path) -> bool:
    return str(path).lower().endswith(LABELLED_TEXT_EXTENSIONS)


def _rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """(line number, the record as a mapping, or None when the line is not one) for every non-blank line."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            if path.suffix.lower() == ".csv":
                reader = csv.DictReader(f)
                if not reader.fieldnames or "text" not in reader.fieldnames:
                    raise InputError(f"'{path}' has no 'text' column in its header row ({reader.fieldnames}): "
                                     f"{_FORMAT}")
                for row in reader:
                    if any((v or "").strip() for v in row.values() if isinstance(v, str)):
                        yield reader.line_num, {k: v for k, v in row.items() if v not in (None, "")}
                return
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except ValueError:
                        record = None
                    yield number, record if isinstance(record, dict) else None
    except UnicodeDecodeError as e:
        raise InputError(f"'{path}' is not valid UTF-8 ({e.reason}): save it as UTF-8") from None
    except OSError as e:
        raise InputError(f"cannot read '{path}' ({e.strerror or e}): check the path and its permissions") from None


def _kind(value: Any, csv_cell: bool) -> str:
    """'int' or 'str' for a class label, anything else for what it is."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, str):
        return "int" if csv_cell and _WHOLE.fullmatch(value.strip()) else "str"
    return type(value).__name__


def _score(value: Any, where: str, column: str = "score", asked: bool = False) -> float:
    try:
        score = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        score = math.nan
    if not math.isfinite(score):
        if asked:
            raise InputError(f"{where}: '{column}' {json.dumps(value)} is not a finite number, and the task was "
                             "asked as :score (a number to regress on): fix the value, or drop :score")
        raise InputError(f"{where}: 'score' {json.dumps(value)} is not a finite number: fix the record")
    return score


def _collect(path: Path, target: str | None) -> tuple[list[tuple[int, str, str | None, str, Any]], int]:
    """(line, text, pair, 'label' or 'score', value) per usable record, and the count of skipped lines. With a
    `target`, every record is of that kind and a score is already a float."""
    found, skipped = [], 0
    for number, row in _rows(path):
        text = row.get("text") if row is not None else None
        if not (isinstance(text, str) and text.strip()):
            skipped += 1
            continue
        where = f"'{path}' line {number}"
        pair = row.get("text_pair")
        if pair is not None and not isinstance(pair, str):
            raise InputError(f"{where}: 'text_pair' is not a string: fix the record")
        has = [k for k in ("label", "score") if row.get(k) is not None]
        if target is not None and has:
            found.append((number, text, pair, target, _target_value(row, has, target, where, path, found)))
            continue
        if len(has) != 1:
            what = "both a 'label' and a 'score'" if has else "no 'label' (a class) or 'score' (a number)"
            raise InputError(f"{where} has {what}: give every record one of them; {_FORMAT}")
        found.append((number, text, pair, has[0], row[has[0]]))
    return found, skipped


def _target_value(row: dict[str, Any], has: list[str], target: str, where: str, path: Path, found: list) -> Any:
    """The value a record gives the task asked as :label or :score."""
    if target == "score":
        column = "score" if "score" in has else "label"
        return _score(row[column], where, column, asked=True)
    if "label" not in has:
        if not any(kind == "label" for _, _, _, kind, _ in found):
            raise InputError(f"task asked for classes (:label) but '{path}' holds scores ({where} has only a "
                             "'score'): ask for :score, or give the records a 'label'")
        raise InputError(f"{where} has a 'score' but no 'label', and the task was asked as :label (classes): give "
                         "it a 'label'")
    return row["label"]


def read_labelled_texts(path: str | Path, *, like: LabelledTexts | None = None, classes: list[str] | None = None,
                        target: str | None = None) -> LabelledTexts:
    """Read a .jsonl / .csv file of labelled texts. `like` (the training set) or `classes` (a model's class names)
    fixes the classes a label may name, so that an index means the same class everywhere. `target` "label" or
    "score" says what to learn (None: what the file holds)."""
    if target not in (None, "label", "score"):
        raise UsageError(f"`target` {target!r} is not one of 'label', 'score': give one of them, or None")
    root = Path(path).expanduser()
    if not root.exists():
        raise InputError(f"labelled text file '{root}' does not exist: check the path")
    if not root.is_file() or not is_labelled_text_file(root):
        raise InputError(f"'{root}' is not a .jsonl or .csv file of labelled texts: {_FORMAT}")
    found, skipped = _collect(root, target)
    if not found:
        raise InputError(f"'{root}' has no usable record ({skipped} line(s) without a non-empty string 'text'): "
                         f"{_FORMAT}")
    kinds = {k for _, _, _, k, _ in found}
    if len(kinds) > 1:
        first = {k: n for n, _, _, k, _ in reversed(found)}
        raise InputError(f"'{root}' mixes 'label' (line {first['label']}) and 'score' (line {first['score']}) "
                         "records: one file is one task, classes or scores")
    pairs = {p is not None for _, _, p, _, _ in found}
    if len(pairs) > 1:
        raise InputError(f"'{root}': some records have a 'text_pair' and some do not: give every record one, or none")
    if kinds == {"score"}:
        if (like is not None and not like.regression) or classes:
            raise InputError(f"'{root}' holds scores, but the task has classes: give the same kind of labels")
        records = [(t, p, _score(v, f"'{root}' line {n}")) for n, t, p, _, v in found]
        return LabelledTexts(root, records, None, [root], skipped)
    if like is not None and like.regression:
        raise InputError(f"'{root}' holds class labels, but the task regresses a 'score': give scores")
    names = _class_names(root, found, like.classes if like is not None else classes)
    index = {name: i for i, name in enumerate(names)}
    records = [(t, p, index[str(v).strip()]) for _, t, p, _, v in found]
    return LabelledTexts(root, records, names, [root], skipped)


def _class_names(root: Path, found: list, known: list[str] | None) -> list[str]:
    """The class names, sorted (whole numbers by value); labels of mixed type or unknown to `known` are refused."""
    csv_file = root.suffix.lower() == ".csv"
    seen: dict[str, tuple[int, Any]] = {}
    for number, _, _, _, value in found:
        kind = _kind(value, csv_file)
        if kind not in ("int", "str"):
            raise InputError(f"'{root}' line {number}: 'label' {json.dumps(value)} is a {kind}, not a class name (a "
                             "string or a whole number); a number to regress on is a 'score' (or ask the task as "
                             ":score)")
        seen.setdefault(kind, (number, value))
    if len(seen) > 1:
        (n1, v1), (n2, v2) = seen["int"], seen["str"]
        raise InputError(f"'{root}' has labels of mixed type: line {n1} has the number {json.dumps(v1)}, line {n2} "
                         f"the string {json.dumps(v2)}: write every label the same way")
    labels = {str(v).strip() for _, _, _, _, v in found}
    if known is not None:
        unknown = sorted(labels - set(known))
        if unknown:
            raise InputError(f"'{root}' has label(s) {', '.join(unknown[:5])} that the task's classes "
                             f"({', '.join(known[:8])}{', ...' if len(known) > 8 else ''}) lack: give the same classes")
        return list(known)
    if len(labels) < 2:
        raise InputError(f"'{root}' has a single class ({next(iter(labels))}): a classifier needs at least two")
    return sorted(labels, key=int) if "int" in seen else sorted(labels)


# ---------------------------------------------------------------------------------------------- batches


class LabelledTextBatch(NamedTuple):
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor  # long class indices, or float scores
    skipped: int = 0

    def parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(token ids, labels, attention mask): what a training step needs of any kind of batch."""
        return self.input_ids, self.labels, self.attention_mask


class _Records(Dataset):
    def __init__(self, texts: LabelledTexts):
        self.records = texts.records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Record:
        return self.records[index]


class LabelledCollate:
    """Tokenizes (text[, text_pair]) records, padded to the longest and cut at `max_length` (pairs: the longer
    side first), with their labels. token_type_ids are left out as for plain texts (texts.TextCollate)."""

    def __init__(self, tokenizer: Any, max_length: int, regression: bool):
        if max_length < 1:
            raise UsageError(f"`max_length` must be at least 1, got {max_length}")
        self.tokenizer, self.max_length, self.regression = tokenizer, max_length, regression

    def __call__(self, records: Sequence[Record]) -> LabelledTextBatch:
        texts = [r[0] for r in records]
        pairs = [r[1] for r in records] if records and records[0][1] is not None else None
        enc = self.tokenizer(texts, pairs, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        labels = torch.tensor([r[2] for r in records], dtype=torch.float32 if self.regression else torch.long)
        return LabelledTextBatch(enc["input_ids"].long(), enc["attention_mask"].long(), labels, 0)


def labelled_text_loader(texts: LabelledTexts, tokenizer: Any, *, batch_size: int, max_length: int, shuffle: bool,
                         seed: int = 0, rank: int = 0, world_size: int = 1,
                         drop_last: bool = True) -> tuple[DataLoader, EpochSampler]:
    """Batches of `LabelledTextBatch` in the resumable, per-rank order of an EpochSampler (sampling.epoch_loader)."""
    return epoch_loader(_Records(texts), LabelledCollate(tokenizer, max_length, texts.regression),
                        batch_size=batch_size, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size,
                        drop_last=drop_last, num_workers=0, what=f"labelled text file '{texts.root}'", unit="texts")
