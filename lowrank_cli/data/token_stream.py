"""Training data of a causal LM: its text as one token stream, cut into windows of `seq_len` tokens (the modality
of a model family whose `text_data` is "stream", data.modality's third kind next to images and texts).

    stream = StreamData(data, val_data=None, val_fraction=None, seq_len=None)
    stream.prepare(teacher, tokenizer=None, max_length=None)   # the teacher's tokenizer; the windows are cut
    stream.train, stream.val                                    # WindowSet: (windows, seq_len) token ids

Recovery and fine-tuning read the data before any model loads, as texts (data.modality.TextData: a wrong path
fails early); once the teacher is known to read a stream, the run switches to this modality (`as_stream`). The
windows are disjoint runs of `seq_len` tokens from the start of the stream (a tail shorter than a window is left
out); the held-out windows are `val_data`'s, or the last `val_fraction` of the stream's windows (default:
AUTO_VAL_FRACTION of them when there are at least AUTO_VAL_WINDOWS): a contiguous tail, so no held-out token is
also a training token. No padding: every token is real, so no attention mask.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.data import Dataset

from lowrank_cli.data.modality import teacher_tokenizer
from lowrank_cli.data.token_windows import token_stream
from lowrank_cli.errors import InputError, UsageError

AUTO_VAL_FRACTION, AUTO_VAL_WINDOWS = 0.1, 20
DEFAULT_SEQ_LEN = 128


@dataclass
class WindowSet:
    """Windows of token ids (count, seq_len) cut from `root`'s text; `tokens`: the stream's length."""

    root: Path
    windows: torch.Tensor
    tokens: int

    def __len__(self) -> int:
        return int(self.windows.shape[0])


class WindowBatch(NamedTuple):
    """input_ids: long (N, seq_len), every token real (no attention mask); skipped: always 0."""

    input_ids: torch.Tensor
    skipped: int = 0

    def parts(self) -> tuple[torch.Tensor, torch.Tensor, None]:
        """(token ids, labels: the same ids, whose next tokens a next-token loss predicts, no attention mask): what
        a training step needs of any batch (a recovery uses no labels)."""
        return self.input_ids, self.input_ids, None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> WindowBatch:
        return WindowBatch(self.input_ids.to(device, non_blocking=non_blocking), self.skipped)


class WindowDataset(Dataset):
    """The windows of a WindowSet by index (collated by `collate_windows`)."""

    def __init__(self, windows: torch.Tensor):
        self.windows = windows

    def __len__(self) -> int:
        return int(self.windows.shape[0])

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.windows[index]


def collate_windows(items: list[torch.Tensor]) -> WindowBatch:
    return WindowBatch(torch.stack(items), 0)


def cut(ids: torch.Tensor, seq_len: int, root: Path) -> WindowSet:
    count = ids.numel() // seq_len
    return WindowSet(root, ids[:count * seq_len].view(count, seq_len).clone(), ids.numel())


class StreamData:
    name = "tokens"
    unit = "windows"  # what the progress bar counts per second
    sample_name = "windows"  # windows_per_s, windows in the metrics lines (token windows of seq_len)
    augments = False

    def __init__(self, data: Path, *, val_data: Path | None, val_fraction: float | None, seq_len: int | None,
                 evaluate: bool = True):
        self.data, self.val_data, self.val_fraction = Path(data), val_data, val_fraction
        self.asked_seq_len, self.evaluate = seq_len, evaluate
        self.seq_len: int = seq_len or DEFAULT_SEQ_LEN
        self.tokenizer: Any = None
        self.tokenizer_source: Any = None
        self.train: WindowSet | None = None
        self.val: WindowSet | None = None
        self.val_from = ""

    def prepare(self, teacher: Any, *, tokenizer: Any, max_length: int | None) -> None:
        """The tokenizer (default: the teacher's), the window length (`seq_len`, at most the model's positions)
        and the windows of the training and held-out text."""
        from lowrank_cli.models.inputs import position_limit

        if self.train is not None:
            return  # prepared already (a fine-tuning reads its windows before the adapters go on)
        if max_length is not None:
            raise UsageError("`max_length` is for texts read one by one; a causal LM reads its text as one token "
                             "stream in windows of `seq_len` tokens: use `seq_len`")
        if tokenizer is None and teacher.files is None:
            from lowrank_cli.data.task_data import recorded_tokenizer

            tokenizer = recorded_tokenizer(teacher.checkpoint)
        self.tokenizer_source, self.tokenizer = teacher_tokenizer(teacher, tokenizer)
        longest = position_limit(teacher.model)
        if longest is not None and self.seq_len > longest:
            if self.asked_seq_len is not None:
                raise UsageError(f"`seq_len` {self.seq_len} is above the {longest} tokens the model's positions "
                                 "allow: lower it")
            self.seq_len = longest
        self.cut_windows(getattr(teacher.model.config, "vocab_size", None))

    def cut_windows(self, vocab_size: int | None) -> None:
        ids = token_stream(self.data, self.tokenizer, vocab_size=vocab_size)
        train = cut(ids, self.seq_len, self.data)
        if len(train) == 0:
            raise InputError(f"text data '{self.data}' has {ids.numel()} tokens, fewer than one window of `seq_len` "
                             f"{self.seq_len}: give more text, or a smaller `seq_len`")
        self.train, self.val, self.val_from = train, None, ""
        if not self.evaluate:
            return
        if self.val_data is not None:
            val_ids = token_stream(self.val_data, self.tokenizer, vocab_size=vocab_size)
            self.val = cut(val_ids, self.seq_len, Path(self.val_data))
            if len(self.val) == 0:
                raise InputError(f"the validation text '{self.val_data}' has {val_ids.numel()} tokens, fewer than "
                                 f"one window of `seq_len` {self.seq_len}: give more text")
            self.val_from = str(self.val_data)
            return
        self.carve_tail(train)

    def carve_tail(self, train: WindowSet) -> None:
        """The last `val_fraction` of the windows held out (by default 10 % from AUTO_VAL_WINDOWS windows on)."""
        fraction = self.val_fraction
        if fraction is None:
            if len(train) < AUTO_VAL_WINDOWS:
                return
            fraction = AUTO_VAL_FRACTION
        count = max(1, round(fraction * len(train)))
        if count >= len(train):
            raise UsageError(f"`val_fraction` {fraction:g} of {len(train)} windows of {self.seq_len} tokens would "
                             "leave none to train on: add text, or lower it")
        kept, held = train.windows[:-count], train.windows[-count:]
        self.train = WindowSet(train.root, kept.clone(), train.tokens)
        self.val = WindowSet(train.root, held.clone(), train.tokens)
        self.val_from = f"the last {count} of the {len(train)} windows ({fraction:g} of the text)"

    def input_size(self, teacher: nn.Module) -> tuple[int, ...]:
        return (self.seq_len,)

    def labelled(self, train_set: Any) -> bool:
        return False

    def loader(self, train_set: WindowSet, teacher: nn.Module, *, batch_size: int, seed: int, rank: int,
               world_size: int, num_workers: int, pin_memory: bool, augment: str):
        from lowrank_cli.data.sampling import epoch_loader

        return epoch_loader(WindowDataset(train_set.windows), collate_windows, batch_size=batch_size, shuffle=True,
                            seed=seed, rank=rank, world_size=world_size, drop_last=True, num_workers=0,
                            what=f"text data '{train_set.root}' (windows of {self.seq_len} tokens)", unit="windows")

    def held_out_loader(self, held_out: WindowSet, teacher: nn.Module, *, batch_size: int, num_workers: int):
        from lowrank_cli.data.sampling import epoch_loader

        loader, _ = epoch_loader(WindowDataset(held_out.windows), collate_windows, batch_size=batch_size,
                                 shuffle=False, seed=0, rank=0, world_size=1, drop_last=False, num_workers=0,
                                 what=f"the held-out text '{held_out.root}'", unit="windows")
        return loader

    def augmentation(self, asked: str, train_set: Any, input_size: tuple[int, ...], passes: float) -> tuple[str, str]:
        return "none", "text is not augmented"

    def describe(self, train_set: WindowSet, val_set: WindowSet | None, why_no_accuracy: str) -> str:
        held = f", {len(val_set)} held out" if val_set is not None else "; no held-out text"
        return (f"Data: {train_set.tokens} tokens of '{train_set.root}' as {len(train_set)} training windows of "
                f"{self.seq_len} tokens{held}")

    def settings(self, delta: float) -> dict[str, Any]:
        source = self.tokenizer_source
        return {"data_kind": "token stream", "seq_len": self.seq_len, "train_tokens": self.train_tokens,
                "tokenizer": str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__}

    @property
    def train_tokens(self) -> int:
        return 0 if self.train is None else len(self.train) * self.seq_len


def as_stream(d: Any, data: Path, teacher: Any, opts: Any, *, evaluate: bool = True) -> bool:
    """Switch the run data `d` (read as texts) to a token stream when the teacher's family reads text so; True
    when it did. Images for a causal LM stay images: data.modality.check_model says what the model needs."""
    from lowrank_cli.models.families import family_of

    if d.modality.name != "texts" or family_of(teacher.model).text_data != "stream":
        return False
    stream = StreamData(data, val_data=None if opts.val_data is None else Path(opts.val_data),
                        val_fraction=opts.val_fraction, seq_len=opts.seq_len, evaluate=evaluate)
    stream.prepare(teacher, tokenizer=opts.tokenizer, max_length=opts.max_length)
    d.modality, d.train, d.val, d.val_from = stream, stream.train, stream.val, stream.val_from
    return True


