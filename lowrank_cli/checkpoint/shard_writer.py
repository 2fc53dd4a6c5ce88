"""Writing a safetensors set tensor by tensor, in any order, without holding it: the layout (every tensor's name,
dtype and shape) is known first, so each tensor has its byte range before any is written and goes straight there.

Above `max_shard_size` the set is split into shards `STEM-00001-of-0000N.safetensors` with an index
`STEM.safetensors.index.json` (transformers' layout; the index's `metadata` holds lrc's record). Every file is
written under a temporary name and renamed only when all of them are whole; the index comes last, so no index
names a shard that is not complete. Any failure (a full disk included) removes every temporary file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lowrank_cli.atomic import TMP_INFIX, cannot_write, check_output, fsync_dir, write_text
from lowrank_cli.checkpoint.shards import CODES, INDEX_SUFFIX


def _write_at(fd: int, data: memoryview, offset: int) -> None:
    """os.pwrite until every byte is down (tests replace it to fill the disk)."""
    while len(data):
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done


def _bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().view(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


@dataclass
class _File:
    path: Path
    tmp: Path
    names: list[str]
    data_start: int = 0
    fd: int = -1


COMPACT_BYTES = 64 * 1024  # empty header room a one-file set may keep (over 1 % of its data, it is rewritten)


class SetWriter:
    """`with SetWriter(path, layout, max_size) as w: w.write(name, t) ...; w.finish(metadata)`. `reserve`: bytes
    kept for the metadata of a one-file set, whose record is known only at the end (a larger one is rewritten)."""

    def __init__(self, path: str | Path, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]], max_size: int,
                 *, reserve: int = 1 << 20):
        self.path, self.layout = Path(path), layout
        self.offsets: dict[str, tuple[_File, int, int]] = {}
        self.written: set[str] = set()
        self.files = self._split(max_size)
        self.sharded = len(self.files) > 1
        total = sum(math.prod(shape) * dtype.itemsize for dtype, shape in layout.values())
        check_output(self.path, force=True, needed_bytes=total)  # a disk that cannot hold the set: before any write
        for f in self.files:
            check_output(f.path, force=True)
            f.tmp = f.path.with_name(f".{f.path.name}{TMP_INFIX}{os.getpid()}")
        self._open(reserve)

    def _split(self, max_size: int) -> list[_File]:
        groups: list[list[str]] = [[]]
        size = 0
        for name, (dtype, shape) in self.layout.items():
            n = math.prod(shape) * dtype.itemsize
            if groups[-1] and size + n > max_size:
                groups.append([])
                size = 0
            groups[-1].append(name)
            size += n
        if len(groups) == 1:
            return [_File(self.path, self.path, groups[0])]
        stem = self.path.name.removesuffix(".safetensors")
        return [_File(self.path.with_name(f"{stem}-{i:05d}-of-{len(groups):05d}.safetensors"), self.path, g)
                for i, g in enumerate(groups, 1)]

    def _header(self, f: _File, metadata: dict[str, str] | None) -> bytes:
        header: dict = {"__metadata__": metadata} if metadata else {}
        for name in f.names:
            _, begin, end = self.offsets[name]
            dtype, shape = self.layout[name]
            header[name] = {"dtype": CODES[dtype], "shape": list(shape),
                            "data_offsets": [begin - f.data_start, end - f.data_start]}
        return json.dumps(header, separators=(",", ":")).encode()

    def _open(self, reserve: int) -> None:
        try:
            for f in self.files:
                position = 0
                for name in f.names:
                    dtype, shape = self.layout[name]
                    n = math.prod(shape) * dtype.itemsize
                    self.offsets[name] = (f, position, position + n)
                    position += n
                meta = {"format": "pt"} if self.sharded else None
                probe = len(self._header(f, meta)) + (0 if self.sharded else reserve)
                f.data_start = 8 + probe + (-probe) % 8
                for name in f.names:  # absolute offsets
                    _, begin, end = self.offsets[name]
                    self.offsets[name] = (f, begin + f.data_start, end + f.data_start)
                f.fd = os.open(f.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                if self.sharded:
                    self._put_header(f, meta)
        except OSError as e:
            self.abort()
            raise cannot_write(self.path, e) from e

    def _put_header(self, f: _File, metadata: dict[str, str] | None) -> bool:
        """Write the header padded to the data start; False when it does not fit there."""
        header = self._header(f, metadata)
        room = f.data_start - 8
        if len(header) > room:
            return False
        _write_at(f.fd, memoryview(len(header + b" " * (room - len(header))).to_bytes(8, "little")
                                   + header + b" " * (room - len(header))), 0)
        return True

    def write(self, name: str, tensor: torch.Tensor) -> None:
        f, begin, _ = self.offsets[name]
        dtype, shape = self.layout[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise RuntimeError(f"{name}: {tensor.dtype} {tuple(tensor.shape)}, planned {dtype} {shape}")
        try:
            _write_at(f.fd, _bytes(tensor), begin)
        except OSError as e:
            self.abort()
            raise cannot_write(f.path, e) from e
        self.written.add(name)

    def finish(self, metadata: dict[str, str]) -> list[Path]:
        """Every tensor written: the headers (one file) or the index (shards) with `metadata`, then the renames."""
        missing = [n for n in self.layout if n not in self.written]
        if missing:
            self.abort()
            raise RuntimeError(f"{len(missing)} tensor(s) of the set were never written: {missing[:3]}")
        try:
            if not self.sharded:
                self._put_record(self.files[0], metadata)
            for f in self.files:
                os.fsync(f.fd)
                os.close(f.fd)
                f.fd = -1
            index = self.path.with_name(self.path.name + INDEX_SUFFIX)
            with contextlib.suppress(FileNotFoundError):  # a set written here before: its index goes first
                os.unlink(index if not self.sharded else self.path)
            if self.sharded:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(index)
            for f in self.files:
                os.replace(f.tmp, f.path)
            fsync_dir(self.path.parent)
        except OSError as e:
            self.abort()
            raise cannot_write(self.path, e) from e
        if self.sharded:
            total = sum(end - begin for _, begin, end in self.offsets.values())
            write_text(index, json.dumps({"metadata": {"total_size": total, **metadata},
                                          "weight_map": {n: f.path.name for f in self.files for n in f.names}},
                                         indent=2))
            return [*(f.path for f in self.files), index]
        return [self.path]

    def _put_record(self, f: _File, metadata: dict[str, str]) -> None:
        """A one-file set's header with its record, in the room kept for it; rewritten when the record outgrew
        the room, or left most of it empty (a small model's file would otherwise carry the padding: 300 kB of
        spaces beside 70 kB of weights)."""
        empty = f.data_start - 8 - len(self._header(f, metadata))
        data = sum(end - begin for _, begin, end in self.offsets.values())
        if empty < 0 or empty > max(COMPACT_BYTES, data // 100) or not self._put_header(f, metadata):
            self._rewrite(f, metadata)

    def _rewrite(self, f: _File, metadata: dict[str, str]) -> None:
        """The file again with a header of the right size (the record outgrew its room, or left much of it empty)."""
        header = self._header(f, metadata)
        room = len(header) + (-(len(header) + 8)) % 8
        old_start, f.data_start = f.data_start, 8 + room
        shift = f.data_start - old_start
        self.offsets = {n: (g, b + shift, e + shift) if g is f else (g, b, e) for n, (g, b, e) in self.offsets.items()}
        old = f.tmp.with_name(f.tmp.name + ".old")
        os.replace(f.tmp, old)
        try:
            with open(old, "rb") as src, open(f.tmp, "wb") as dst:
                dst.write(b"\0" * f.data_start)
                src.seek(old_start)
                while chunk := src.read(64 * 2**20):
                    dst.write(chunk)
            os.close(f.fd)
            f.fd = os.open(f.tmp, os.O_RDWR)
            self._put_header(f, metadata)
        finally:
            with contextlib.suppress(OSError):
                old.unlink()

    def abort(self) -> None:
        """Close and remove every temporary file (nothing of this set is left)."""
        for f in self.files:
            if f.fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(f.fd)
                f.fd = -1
            with contextlib.suppress(OSError):
                if f.tmp != f.path:
                    f.tmp.unlink()

    def __enter__(self) -> SetWriter:  # noqa: PYI034
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None:
            self.abort()
