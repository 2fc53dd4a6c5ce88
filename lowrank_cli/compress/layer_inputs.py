"""Where sequential calibration holds the hidden states entering the current decoder layer (compress.sequential):
in memory on the calibration device when they fit its memory budget, else on disk, in one file-backed tensor of
the full (windows, seq_len, hidden) shape in a temporary folder (beside the output for `factorize_file`).

    budget: 25 % of the memory available where they would be held (MemAvailable of /proc/meminfo for the CPU,
            the free memory of a CUDA device); unknown (no /proc/meminfo): in memory
    needed: windows x seq_len x hidden x element size, known from the first batch that reaches the first layer
    `calib_spill`: None by the budget, True always on disk, False always in memory

On disk the file's room is reserved up front (os.posix_fallocate, or zeros written where os has none), so a
disk that cannot hold it fails before any layer runs, with one error naming the folder and the size; each batch
is a view of the one tensor, and a layer's outputs are copied into the views in place (the next layer's inputs).
The folder is removed on the way out, whatever ends the run (success, an error, Ctrl-C).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from lowrank_cli.atomic import process_alive
from lowrank_cli.errors import OutputError

SHARE = 0.25  # of the available memory: the default budget
PREFIX = ".lrc-calib-"  # the temporary folder's name: .lrc-calib-<pid>-XXXXXXXX (a killed run's is removed by the next)
FILE = "hidden-states.bin"


def available_memory(device: torch.device) -> int | None:
    """Bytes of memory available on `device` (the CPU: MemAvailable of /proc/meminfo); None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def memory_budget(device: torch.device) -> int | None:
    """The default budget of the held hidden states: SHARE of the memory available on `device` (None: unknown)."""
    available = available_memory(device)
    return None if available is None else int(available * SHARE)


class HeldStates:
    """A context manager that decides, once the first batch's shape is known (`place`), where the hidden states
    are held, and on disk owns the temporary folder (removed on exit). `budget`: bytes (None: `memory_budget`)."""

    def __init__(self, device: torch.device, *, spill: bool | None = None, budget: int | None = None,
                 folder: str | os.PathLike | None = None) -> None:
        self.device, self.spill, self.budget, self.parent = device, spill, budget, folder
        self.folder: Path | None = None
        self.reason = ""

    def __enter__(self) -> HeldStates:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    @property
    def held(self) -> str:
        return "memory" if self.folder is None else "disk"

    def place(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """Where all the held hidden states go, `shape` (windows, seq_len, hidden): None in memory, else the one
        file-backed tensor (on the CPU) to hold them."""
        numel = math.prod(shape)
        needed = numel * dtype.itemsize
        if self.spill is False:
            return None
        if self.spill is None:
            default = self.budget is None
            budget = memory_budget(self.device) if default else self.budget
            if budget is None or needed <= budget:
                return None
            share = f", {SHARE:.0%} of the available memory of {self.device}" if default else ""
            self.reason = f"over the memory budget of {budget / 2**20:.1f} MiB{share}"
        else:
            self.reason = "`calib_spill=True`"
        return self._file_tensor(numel, needed, dtype).view(shape)

    def _file_tensor(self, numel: int, needed: int, dtype: torch.dtype) -> torch.Tensor:
        """A tensor of `numel` elements backed by a file whose room is reserved first."""
        parent = Path(self.parent) if self.parent is not None else Path(tempfile.gettempdir())
        _remove_stale(parent)
        try:
            self.folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=parent))
            path = self.folder / FILE
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                _reserve(fd, needed)
            finally:
                os.close(fd)
            try:
                return torch.from_file(str(path), shared=True, size=numel, dtype=dtype)
            except RuntimeError as e:  # torch's mmap failure (no address space, a file system without mmap)
                raise OSError(errno.EIO, f"it cannot be mapped into memory ({e})") from e
        except OSError as e:
            if self.folder is not None:
                with contextlib.suppress(OSError):
                    shutil.rmtree(self.folder)
                self.folder = None
            raise _cannot_hold(parent, needed, e) from e

    def describe(self, nbytes: int, dtype: torch.dtype) -> str:
        """Where the hidden states are, for the log."""
        kind = str(dtype).removeprefix("torch.")
        if self.folder is None:
            return f"held in memory on {self.device}: {nbytes / 2**20:.1f} MiB ({kind}, one layer at a time)"
        return (f"spilled to disk in {self.folder}: {nbytes / 2**20:.1f} MiB ({kind}, one layer at a time; "
                f"{self.reason})")


def _remove_stale(parent: Path) -> None:
    """The folders that runs killed outright (SIGKILL, the OOM killer: no clean-up of theirs ran) left in `parent`:
    removed, as atomic.py does with a killed write's temporary file; a live process's folder is left alone."""
    with contextlib.suppress(OSError):
        for old in parent.glob(f"{PREFIX}*"):
            pid = old.name[len(PREFIX):].split("-")[0]
            if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)) and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)


def _reserve(fd: int, size: int) -> None:
    """The file's `size` bytes reserved on disk: posix_fallocate where the system has it (Linux), else zeros
    written (macOS and Windows have no os.posix_fallocate; a sparse file would fail only when the layers write
    into its pages, past any error message)."""
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, size)
        return
    zeros = bytes(min(size, 1 << 24))
    left = size
    while left > 0:
        left -= os.write(fd, zeros[:left] if left < len(zeros) else zeros)


def _cannot_hold(folder: Path, needed: int, error: OSError) -> OutputError:
    full = error.errno in (errno.ENOSPC, errno.EDQUOT)
    cause = "the disk is full" if full else "it cannot be written"
    return OutputError(f"sequential calibration holds the hidden states entering each decoder layer on disk "
                       f"({needed / 2**20:.1f} MiB) in '{folder}', and {cause} ({error.strerror or error}): free "
                       "that much space there, point `calib_spill_dir` to another disk, or hold them in memory "
                       "(`calib_spill=False`)")
