"""Safetensors sets, read without holding them: one file, or shards named by an index (`*.safetensors.index.json`,
as transformers' save_pretrained and lrc's sharded output write them).

Every header is read and checked before any tensor is: an index that names a missing shard, a shard shorter than
its header says (truncated mid-tensor), a tensor held by two shards, or offsets that overlap are InputErrors that
name the file. Tensors are then read one at a time (`read`: straight from the file into the tensor's own memory)
or mapped (`mapped`: the file's pages, copy-on-write, read when first touched: no second copy).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowrank_cli.errors import InputError

INDEX_SUFFIX = ".index.json"
MAX_HEADER = 100 * 2**20  # what safetensors itself accepts

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
CODES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class Entry:
    """Where one tensor lies: its file, dtype code, shape and absolute byte range."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def index_of(path: str | Path) -> Path | None:
    """The index of a sharded set that `path` names: the index itself, or `X.safetensors` whose
    `X.safetensors.index.json` exists (and X does not)."""
    path = Path(path)
    if path.name.endswith(INDEX_SUFFIX):
        return path
    sibling = path.with_name(path.name + INDEX_SUFFIX)
    return sibling if not path.exists() and sibling.is_file() else None


def read_header(file: Path) -> tuple[dict[str, str], dict[str, Entry]]:
    """(metadata, {name: Entry}) of one safetensors file, checked against the file's size."""
    if not file.is_file():
        raise InputError(f"'{file}' does not exist: check the path")
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if size - 8 < n <= MAX_HEADER:
            raise InputError(f"'{file}' is truncated: it ends at byte {size:,}, inside its {n:,}-byte header: copy or "
                             "download the file again")
        if not 0 < n <= min(MAX_HEADER, size - 8):
            raise InputError(f"'{file}' is not a safetensors file (no header): it is truncated or corrupt; write it "
                             "again")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError(f"'{file}' has an unreadable safetensors header: it is corrupt; write it again") from None
    meta = header.pop("__metadata__", None) or {}
    entries, end = {}, 0
    try:
        for name, h in header.items():
            begin, stop = (int(v) for v in h["data_offsets"])
            shape = tuple(int(d) for d in h["shape"])
            width = DTYPES[h["dtype"]].itemsize if h["dtype"] in DTYPES else 1
            if stop - begin != math.prod(shape) * width or begin < 0:
                raise ValueError(name)
            entries[name] = Entry(file, h["dtype"], shape, 8 + n + begin, 8 + n + stop)
            end = max(end, stop)
    except (KeyError, TypeError, ValueError):
        raise InputError(f"'{file}' has a corrupt safetensors header (tensor offsets or shapes do not add up): write "
                         "it again") from None
    if 8 + n + end > size:
        cut = next(k for k, e in sorted(entries.items(), key=lambda kv: kv[1].start) if e.end > size)
        raise InputError(f"'{file}' is truncated: it ends at byte {size:,}, inside tensor '{cut}' (the header needs "
                         f"{8 + n + end:,} bytes): copy or download the file again")
    return meta, entries


@dataclass
class TensorSet:
    """The tensors of a safetensors file or of a sharded set, by name, with the set's metadata (the index's
    `metadata` for shards, every value a string)."""

    path: Path
    entries: dict[str, Entry] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    @classmethod
    def open(cls, path: str | Path) -> TensorSet:
        path = Path(path)
        index = index_of(path)
        if index is None:
            meta, entries = read_header(path)
            return cls(path, entries, meta, [path])
        return cls._sharded(index)

    @classmethod
    def _sharded(cls, index: Path) -> TensorSet:
        doc = _read_index(index)
        weight_map: dict[str, str] = doc["weight_map"]
        files = list(dict.fromkeys(weight_map.values()))
        entries: dict[str, Entry] = {}
        for name in files:
            shard = index.parent / name
            if not shard.is_file():
                raise InputError(f"'{index}' names the shard '{name}', which does not exist in {index.parent}: copy "
                                 "or download the missing shard")
            for key, entry in read_header(shard)[1].items():
                if key in entries:
                    raise InputError(f"tensor '{key}' is held by two shards ('{entries[key].file.name}' and '{name}'): "
                                     f"the set in {index.parent} is inconsistent; write it again")
                entries[key] = entry
        for key, name in weight_map.items():
            if key not in entries or entries[key].file.name != name:
                where = f"'{entries[key].file.name}'" if key in entries else "no shard"
                raise InputError(f"'{index}' puts tensor '{key}' in '{name}', but {where} holds it: the index does not "
                                 "match its shards; write the set again")
        extra = sorted(set(entries) - set(weight_map))
        if extra:
            raise InputError(f"shard '{entries[extra[0]].file.name}' holds '{extra[0]}', which '{index}' does not "
                             "name: the index does not match its shards; write the set again")
        meta = {k: v for k, v in (doc.get("metadata") or {}).items() if isinstance(v, str)}
        return cls(index, entries, meta, [index.parent / n for n in files])

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: e.shape for k, e in self.entries.items()}

    @property
    def nbytes(self) -> int:
        return sum(e.end - e.start for e in self.entries.values())

    def dtype(self, name: str) -> torch.dtype:
        code = self.entries[name].dtype
        if code not in DTYPES:
            raise InputError(f"tensor '{name}' of '{self.entries[name].file}' is stored as {code}, which lrc does "
                             "not read")
        return DTYPES[code]

    def read(self, name: str) -> torch.Tensor:
        """The tensor, read from its file into memory of its own (one copy: the file's bytes)."""
        e = self.entries[name]
        out = torch.empty(e.shape, dtype=self.dtype(name))
        if e.end > e.start:
            with open(e.file, "rb", buffering=0) as f:
                f.seek(e.start)
                view = memoryview(out.view(-1).view(torch.uint8).numpy())
                got = f.readinto(view)
            if got != e.end - e.start:
                raise InputError(f"'{e.file}' ended inside tensor '{name}': it is truncated; copy it again")
        return out

    def mapped(self, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """The tensors as views of the files mapped copy-on-write: nothing is read until a page is touched."""
        maps: dict[Path, Any] = {}
        out = {}
        for name in self.entries if names is None else names:
            e = self.entries[name]
            if e.file not in maps:
                with open(e.file, "rb") as f:
                    maps[e.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            dtype = self.dtype(name)
            if e.end == e.start or e.start % max(dtype.itemsize, 1):  # empty, or misaligned for a view: read it
                out[name] = self.read(name)
                continue
            flat = torch.frombuffer(maps[e.file], dtype=torch.uint8, count=e.end - e.start, offset=e.start)
            out[name] = flat.view(dtype).reshape(e.shape)
        return out


def _read_index(index: Path) -> dict[str, Any]:
    if not index.is_file():
        raise InputError(f"'{index}' does not exist: check the path")
    try:
        doc = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"'{index}' is not a readable shard index ({str(e)[:120]}): write it again") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InputError(f"'{index}' has no `weight_map` of tensor names to shard files: write it again")
    if any(os.sep in v or v.startswith(".") for v in weight_map.values()):
        raise InputError(f"'{index}' names a shard outside its folder: the index is corrupt; write it again")
    return doc
