"""Text as one token stream, cut into windows: what a causal LM is calibrated on and scored on (perplexity).

    ids = token_stream("wiki.test.txt", tokenizer, vocab_size=model.config.vocab_size)   # 1-D long tensor
    windows = sample_windows(ids, count=256, length=128, seed=0)    # (256, 128): calibration
    for inputs, targets, scored in scoring_windows(ids, length=128, stride=128): ...     # perplexity

A .txt file is read whole (its blank lines are text too), as the WikiText-2 protocol tokenizes the raw test
file; a .jsonl file's "text" fields and the files of a folder are joined by a blank line. The tokenizer adds its
own special tokens once, at the start (Llama's bos), as `tokenizer(text)` does. Windows are contiguous token runs:
no padding, so no attention mask.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lowrank_cli.data.texts import find_texts, is_text_file
from lowrank_cli.errors import InputError, UsageError
from lowrank_cli.models.transformers_models import quiet

JOIN = "\n\n"  # between the records of a .jsonl file and between the files of a folder


def corpus_text(path: str | os.PathLike[str]) -> str:
    """The text of `path` as one string: a .txt file as it is, a .jsonl file's texts (or a folder's files, sorted)
    joined by a blank line. Errors are `find_texts`'s (missing, not UTF-8, no text)."""
    root = Path(path).expanduser()
    if root.is_file() and is_text_file(root) and root.suffix.lower() == ".txt":
        try:
            return root.read_bytes().decode("utf-8-sig")  # an empty file is 0 tokens: the window check says so
        except UnicodeDecodeError as e:
            raise InputError(f"text file '{root}' is not valid UTF-8 ({e.reason} at byte {e.start}): save it as "
                             "UTF-8") from None
        except OSError as e:
            raise InputError(f"cannot read text file '{root}' ({e.strerror or e}): check its permissions") from None
    if root.is_dir():
        files = find_texts(root).files
        return JOIN.join(corpus_text(f) for f in files)
    return JOIN.join(find_texts(root).texts)


def token_stream(path: str | os.PathLike[str], tokenizer: Any, *, vocab_size: int | None = None) -> torch.Tensor:
    """The token ids of `corpus_text(path)` (1-D, long). Ids at or above the model's `vocab_size` are refused: the
    tokenizer is not the model's."""
    text = corpus_text(path)
    with quiet():  # "sequence longer than the model's maximum": windows cut it, the warning is noise
        ids = tokenizer(text, return_attention_mask=False)["input_ids"]
    stream = torch.tensor(ids, dtype=torch.long)
    check_ids(stream, vocab_size, f"the tokens of '{path}'")
    return stream


def check_ids(ids: torch.Tensor, vocab_size: int | None, what: str) -> None:
    """Token ids the model's embedding cannot look up are an input error naming both sizes."""
    if vocab_size is None or ids.numel() == 0:
        return
    top = int(ids.max())
    if top >= vocab_size:
        raise InputError(f"{what} reach id {top}, but the model's vocabulary has {vocab_size} entries (ids 0.."
                         f"{vocab_size - 1}): the tokenizer is not the model's; pass the model's own `tokenizer`")


def check_length(ids: torch.Tensor, length: int, what: str) -> None:
    if ids.numel() < length + 1:
        raise InputError(f"{what} has {ids.numel()} tokens; a window of `seq_len` {length} needs at least "
                         f"seq-len + 1 = {length + 1} tokens (its inputs and the next token of each): give more text, "
                         "or a smaller `seq_len`")


def sample_windows(ids: torch.Tensor, *, count: int, length: int, seed: int = 0,
                   what: str = "the text") -> torch.Tensor:
    """`count` windows of `length` tokens (count, length), starting at offsets drawn uniformly from a generator
    seeded with `seed` (SVD-LLM's calibration sampling): the same windows for the same text and seed."""
    if count < 1:
        raise UsageError(f"`calib_samples` must be at least 1, got {count}")
    if ids.numel() < length:
        raise InputError(f"{what} has {ids.numel()} tokens, fewer than one window of `seq_len` {length}: give more "
                         "text, or a smaller `seq_len`")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length + 1, (count,), generator=generator)
    return torch.stack([ids[s:s + length] for s in starts.tolist()])


def scoring_windows(ids: torch.Tensor, *, length: int, stride: int | None = None,
                    what: str = "the text") -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """The windows a perplexity is computed over: (inputs: `length` tokens, targets: the same shifted by one, how
    many of the last targets are scored). Window k starts at k * `stride` (default `length`: disjoint windows, the
    WikiText-2 protocol); with a smaller stride the first window scores all its targets and each later one only the
    `stride` new ones, the earlier tokens being context. A tail shorter than a stride is left out."""
    stride = length if stride is None else stride
    if not 1 <= stride <= length:
        raise UsageError(f"`stride` must be between 1 and `seq_len` ({length}), got {stride}")
    check_length(ids, length, what)
    start = 0
    while start + length + 1 <= ids.numel():
        window = ids[start:start + length + 1]
        yield window[:-1], window[1:], length if start == 0 else stride
        start += stride


def window_count(tokens: int, length: int, stride: int | None = None) -> int:
    """How many windows `scoring_windows` gives for a stream of `tokens` tokens."""
    stride = length if stride is None else stride
    return 0 if tokens < length + 1 else (tokens - length - 1) // stride + 1
