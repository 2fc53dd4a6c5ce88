"""Text on disk -> token batches for recovering and calibrating Hugging Face text models (BERT-style).

A text encoder is recovered the way an image model is: the factorized student matches the frozen teacher's
hidden states on the same input, so unlabelled text is all that is needed, and the token ids only have to
come from the model's own tokenizer. Five pieces, each usable on its own:

* `find_texts(path)` reads the texts (`TextSet`) of a `.txt` file (one per line), a `.jsonl` file (one
  `{"text": ...}` object per line) or a folder of such files; unusable records are counted, not fatal;
* `load_tokenizer(source)` loads the model's tokenizer (transformers is an optional extra) and makes sure
  it can pad;
* `TextDataset` + `TextCollate` tokenize per batch, padded to the batch's longest text (not to
  `max_length`: short texts would otherwise spend most of the compute on padding);
* `text_loader` puts them together with `image_data.EpochSampler`, so that the order depends only on
  (seed, epoch), ranks get disjoint shares, and a resumed run sees exactly the remaining batches;
* `default_max_length(model, tokenizer)` is the longest input the model's position embeddings allow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

from lowrank_cli.data.files import iter_files, walk_files
from lowrank_cli.data.images import IMAGE_EXTENSIONS
from lowrank_cli.data.sampling import EpochSampler, epoch_loader
from lowrank_cli.errors import InputError, UsageError
from lowrank_cli.models.transformers_models import quiet, require

log = logging.getLogger(__name__)

TEXT_EXTENSIONS: tuple[str, ...] = (".txt", ".jsonl")
PAIR_KEY = "text_pair"  # the second text of a .jsonl record of sentence pairs
# Files that carry a vocabulary. tokenizer_config.json / special_tokens_map.json alone do not: from a folder
# with only config.json, transformers 5 builds a BERT tokenizer that knows nothing but its 5 special tokens.
VOCAB_FILES: tuple[str, ...] = (
    "tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model",
)  # fmt: skip
_FORMAT_HINT = 'write one text per line (.txt) or one {"text": "..."} object per line (.jsonl)'


# ---------------------------------------------------------------------------------------------- reading


@dataclass
class TextSet:
    """The texts found, in reading order.

    `files` are the files actually read (a `limit` may stop before the last ones); `skipped` counts the
    unusable records: lines of a .jsonl that are not JSON objects, or have no non-empty string "text".
    Blank lines are not records and are not counted.
    """

    root: Path
    texts: list[str]
    files: list[Path]
    skipped: int = 0
    pairs: int = 0  # records of sentence pairs ({"text", "text_pair"}): both texts are in `texts`, in order
    unpaired: int = 0  # in a file of pairs, the records without a "text_pair" (their text alone is in `texts`)

    def __len__(self) -> int:
        return len(self.texts)


def is_text_file(path: str | os.PathLike[str]) -> bool:
    return str(path).lower().endswith(TEXT_EXTENSIONS)


def looks_like_text_data(path: str | os.PathLike[str]) -> bool:
    """Whether `--data` is text: a .txt / .jsonl file, or a folder with such files and no images (recovery
    reads the data before loading any model, so the kind is told from the files)."""
    path = Path(path).expanduser()
    if path.is_file() or not path.exists():  # a missing corpus.txt is reported as missing text, not images
        return is_text_file(path)
    has_text = False
    for f in iter_files(path, lambda name: True, warn=False):
        if f.name.lower().endswith(IMAGE_EXTENSIONS):
            return False
        has_text = has_text or is_text_file(f)
    return has_text


def _text_files_in(folder: Path) -> list[Path]:
    return walk_files(folder, is_text_file)


def _records(path: Path) -> Iterator[tuple[int, str | None, str | bool]]:
    """(line number, text or None when unusable, its pair) for every non-blank line of one file, read lazily: the
    pair is a .jsonl record's "text_pair" string (sentence pairs), True when the record has the key but no text in
    it, False when it has no such key."""
    jsonl = path.suffix.lower() == ".jsonl"
    try:
        # Bytes, decoded line by line, so that a decoding error names its line.
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                if number == 1:
                    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark (Windows editors) is not text
                try:
                    line = raw.decode("utf-8").rstrip()
                except UnicodeDecodeError as exc:
                    raise InputError(f"text file '{path}' is not valid UTF-8 ({exc.reason} on line {number}):"
                                     " save it as UTF-8") from None
                if not line.strip():
                    continue
                if not jsonl:
                    yield number, line, False
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    yield number, None, False
                    continue
                text = record.get("text") if isinstance(record, dict) else None
                pair = record.get(PAIR_KEY, False) if isinstance(record, dict) else False
                pair = pair if isinstance(pair, str) and pair.strip() else pair is not False
                yield number, text if isinstance(text, str) and text.strip() else None, pair
    except OSError as exc:
        raise InputError(f"cannot read text file '{path}' ({exc.strerror or exc}): check its permissions") from None


def find_texts(path: str | os.PathLike[str], *, limit: int | None = None) -> TextSet:
    """Read the texts of `path`: a .txt file, a .jsonl file, or a folder of them (recursively, sorted by path,
    hidden files and folders skipped). `limit` keeps the first `limit` texts and stops reading there."""
    if limit is not None and limit < 1:
        raise UsageError(f"the number of texts to read must be at least 1, got {limit}")
    root = Path(path).expanduser()
    if root.is_dir():
        files = _text_files_in(root)
        if not files:
            raise InputError(f"text folder '{root}' has no .txt or .jsonl files: {_FORMAT_HINT}")
    elif root.is_file():
        if not is_text_file(root):
            raise InputError(f"text file '{root}' has suffix '{root.suffix}', expected .txt or .jsonl: {_FORMAT_HINT}")
        files = [root]
    else:
        raise InputError(f"text data '{root}' does not exist: check the path")

    texts: list[str] = []
    read: list[Path] = []
    skipped, pairs, unpaired = 0, 0, 0
    for file in files:
        if limit is not None and len(texts) >= limit:
            break
        read.append(file)
        bad: list[int] = []
        with contextlib.closing(_records(file)) as records:  # closes the file when the limit stops early
            for number, text, pair in records:
                if text is None:
                    bad.append(number)
                    continue
                texts.append(text)
                if isinstance(pair, str):  # a sentence pair: both texts are read
                    texts.append(pair)
                    pairs += 1
                else:
                    unpaired += 1
                if limit is not None and len(texts) >= limit:
                    break
        if bad:
            log.warning("skipping %d line(s) of '%s' that are not JSON objects with a string \"text\" field"
                        " (first: line %d)", len(bad), file, bad[0])
            skipped += len(bad)
    if not texts:
        if skipped:
            raise InputError(f"text data '{root}' has no usable text: all {skipped} line(s) were skipped as invalid"
                             f' JSON or without a non-empty string "text" field; {_FORMAT_HINT}')
        raise InputError(f"text data '{root}' has no text, only blank lines: {_FORMAT_HINT}")
    if pairs and unpaired:
        log.warning("%d of %d records of '%s' have no \"%s\" (sentence pairs): their \"text\" alone is used; add "
                    "the pair or remove those lines", unpaired, pairs + unpaired, root, PAIR_KEY)
    return TextSet(root=root, texts=texts, files=read, skipped=skipped, pairs=pairs,
                   unpaired=unpaired if pairs else 0)


# -------------------------------------------------------------------------------------------- tokenizer


def _no_tokenizer(source: str, why: str) -> InputError:
    shown = ", ".join(VOCAB_FILES[:2])
    return InputError(f"'{source}' has no tokenizer files ({shown} ...) that could be loaded ({why}): pass"
                      " `tokenizer` DIR_OR_REPO with the model's tokenizer (a folder, or a Hub repo that is cached"
                      " when offline)")


def load_tokenizer(source: str | os.PathLike[str], revision: str | None = None) -> Any:
    """The tokenizer of `source` (a local folder or a Hub repo id) through `AutoTokenizer`, never running remote
    code. A tokenizer without a pad token pads with its eos (else unk) token; no token is added, so the
    vocabulary still fits the model's embedding matrix."""
    transformers = require()
    name = str(source)
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise InputError(f"tokenizer '{name}' is a file: pass `tokenizer` the folder that holds its"
                             f" {' / '.join(VOCAB_FILES[:2])}")
        if not any((local / f).is_file() for f in VOCAB_FILES):
            raise _no_tokenizer(name, "none in the folder")
        name = str(local)
    try:
        with quiet():
            tokenizer = transformers.AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise _no_tokenizer(name, (str(exc).strip().splitlines() or [type(exc).__name__])[0]) from None
    # The same silent fallback as above for a Hub repo: a tokenizer built from its config alone.
    if not set(tokenizer.get_vocab()) - set(tokenizer.all_special_tokens):
        raise _no_tokenizer(name, "its vocabulary holds only special tokens")
    if tokenizer.pad_token is None:
        fill = tokenizer.eos_token or tokenizer.unk_token
        if fill is None:
            raise InputError(f"tokenizer '{name}' has no pad, eos or unk token to pad batches with: use a tokenizer"
                             " that defines a pad token")
        size = len(tokenizer)
        tokenizer.pad_token = fill
        assert len(tokenizer) == size, "setting an existing token as pad token must not grow the vocabulary"
    return tokenizer


# ---------------------------------------------------------------------------------------------- batches


class TextBatch(NamedTuple):
    """input_ids and attention_mask: long (N, T), T the longest text of the batch (at most max_length);
    skipped: texts dropped from this batch (always 0 today, kept for symmetry with `image_data.Batch`)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    skipped: int = 0

    def parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(token ids, labels: none, all 0, attention mask): what a training step needs of any kind of batch."""
        return self.input_ids, torch.zeros(len(self.input_ids), dtype=torch.long), self.attention_mask

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TextBatch:
        return TextBatch(self.input_ids.to(device, non_blocking=non_blocking),
                         self.attention_mask.to(device, non_blocking=non_blocking), self.skipped)


class TextDataset(Dataset):
    """The texts of a `TextSet`, one string per index; tokenizing happens per batch in `TextCollate`."""

    def __init__(self, text_set: TextSet):
        self.texts = text_set.texts

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> str:
        return self.texts[index]


class TextCollate:
    """Tokenizes a list of texts into a `TextBatch`, padded to the longest and truncated to `max_length`.

    A class, not a closure, so that DataLoader workers can unpickle it. token_type_ids are dropped: a single
    segment is all zeros, which is what BERT-style models assume when they are not given.
    """

    def __init__(self, tokenizer: Any, max_length: int):
        if max_length < 1:
            raise UsageError(f"`max_length` must be at least 1, got {max_length}")
        if tokenizer.pad_token is None:
            raise InputError("the tokenizer has no pad token: load it with lowrank_cli.data.texts.load_tokenizer,"
                             " which sets one")
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, texts: Sequence[str]) -> TextBatch:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return TextBatch(enc["input_ids"].long(), enc["attention_mask"].long(), 0)


# ----------------------------------------------------------------------------------------------- loader


def text_loader(text_set: TextSet, tokenizer: Any, *, batch_size: int, max_length: int, shuffle: bool,
                seed: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = True,
                num_workers: int = 0) -> tuple[DataLoader, EpochSampler]:
    """A DataLoader of `TextBatch` over `text_set`, and its sampler (call `set_epoch` / `set_start_batch`).

    drop_last=True trims each epoch to whole global batches (batch_size x world_size), as training needs;
    with drop_last=False every text is seen and only the last batch may be short.
    """
    collate = TextCollate(tokenizer, max_length)
    if num_workers > 0:
        # Rust tokenizers that already ran threads in this process would otherwise warn in every forked
        # worker and turn their parallelism off anyway; the workers are the parallelism here.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return epoch_loader(TextDataset(text_set), collate, batch_size=batch_size, shuffle=shuffle, seed=seed, rank=rank,
                        world_size=world_size, drop_last=drop_last, num_workers=num_workers,
                        what=f"text data '{text_set.root}'", unit="texts")


# ------------------------------------------------------------------------------------------- max length


