"""Atomic file writing: a temporary file in the same folder, flushed, fsynced and renamed over the target.

An interrupted write (crash, kill, Ctrl-C, full disk) leaves the old file or none, never half a file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from lowrank_cli.errors import OutputError


def check_output(path: str | os.PathLike, force: bool = False) -> Path:
    """Refuse early (before any expensive work) an output that exists or whose folder is missing."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"output '{path}' is a folder: give a file name, e.g. {path / 'model.safetensors'}")
    if path.exists() and not force:
        raise OutputError(f"output '{path}' exists: pass `force=True` to overwrite it, or choose another name")
    if not path.parent.is_dir():
        raise OutputError(f"the folder of output '{path}' does not exist: create '{path.parent}' first")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path`, on any failure it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        raise OutputError(f"cannot write '{path}' ({e.strerror or e}): check the disk space and permissions") from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the folder entry is on disk too (POSIX).
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
