"""Atomic file writing: a temporary file in the same folder, flushed, fsynced and renamed over the target.

An interrupted write (crash, kill, Ctrl-C, full disk) leaves the old file or none, never half a file. A write
killed outright (SIGKILL) leaves its temporary file behind; the next write to the same target removes it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lowrank_cli.errors import OutputError

TMP_INFIX = ".tmp-"  # .NAME.tmp-<pid>: lrc's own temporary files, recognised by the next write


def check_output(path: str | os.PathLike, force: bool = False, needed_bytes: int | None = None) -> Path:
    """Refuse early (before any expensive work) an output that exists, whose folder is missing or cannot be
    written, or that will not fit in the free space (`needed_bytes`, when the caller knows it)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"output '{path}' is a folder: give a file name, e.g. {path / 'model.safetensors'}")
    if path.exists() and not force:
        raise OutputError(f"output '{path}' exists: pass `force=True` to overwrite it, or choose another name")
    folder = path.parent
    if not folder.is_dir():
        raise OutputError(f"the folder of output '{path}' does not exist: create '{folder}' first")
    probe = folder / f".{path.name}{TMP_INFIX}{os.getpid()}-probe"
    try:  # os.access does not see read-only mounts or ACLs: try what the write will do
        probe.open("xb").close()
    except OSError as e:
        raise OutputError(f"cannot write in '{folder}' ({e.strerror or e}): choose a writable folder for the output") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    if needed_bytes:
        free = shutil.disk_usage(folder).free
        if free < needed_bytes:
            raise OutputError(f"'{folder}' has {free / 2**20:.0f} MiB free and the output needs about "
                              f"{needed_bytes / 2**20:.0f} MiB: free some space or choose another folder")
    return path


def _remove_stale(path: Path) -> None:
    """Temporary files of earlier writes to `path` whose process is gone (killed during the write)."""
    for tmp in path.parent.glob(f".{path.name}{TMP_INFIX}*"):
        pid = tmp.name[len(f".{path.name}{TMP_INFIX}"):].split("-")[0]
        if not pid.isdigit() or int(pid) == os.getpid() or process_alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            tmp.unlink()


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path`, on any failure it is removed.

    An OSError (full disk, read-only folder, no permission) becomes an OutputError (exit 4); removing the
    temporary file afterwards never hides the error that happened."""
    path = Path(path)
    _remove_stale(path)
    tmp = path.with_name(f".{path.name}{TMP_INFIX}{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        raise cannot_write(path, e) from e
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def cannot_write(path: Path, error: OSError) -> OutputError:
    hint = {errno.ENOSPC: "the disk is full: free some space or choose another folder",
            errno.EROFS: "the file system is read-only: choose a writable folder",
            errno.EACCES: "no permission: choose a folder you can write to"}.get(error.errno,
                                                                              "check the disk space and permissions")
    return OutputError(f"cannot write '{path}' ({error.strerror or error}): {hint}")


@contextlib.contextmanager
def utf8_path(path: str | os.PathLike) -> Iterator[str]:
    """`path` as a string safetensors can open: it takes UTF-8 paths only, so a file whose name is in another
    encoding (bytes from another locale, read back as surrogates) is opened through a symlink."""
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        with tempfile.TemporaryDirectory(prefix="lrc-") as folder:
            link = os.path.join(folder, "file" + Path(path).suffix)
            os.symlink(os.path.abspath(path), link)
            yield link
        return
    yield text


# multiprocessing puts the sockets of the loader workers at <tmp>/pymp-XXXXXXXX/listener-XXXXXXXX, and a Unix socket
# path has at most 107 bytes: a longer temporary folder makes a worker fail (and the loader wait for it forever).
MAX_TMPDIR = 64


@contextlib.contextmanager
def private_tmpdir() -> Iterator[str | None]:
    """A temporary folder of this run (a command, `lowrank_cli.demo()`), removed at its end, as the process's
    temporary folder: what Python's multiprocessing (`pymp-*` of the data-loader workers) and torch.compile's cache
    (`torchinductor_<user>`, created when timm imports torch._dynamo) would leave in $TMPDIR goes there.
    TORCHINDUCTOR_CACHE_DIR, when set, is kept (set it to reuse compiled kernels between runs). Children (loader
    workers, torchrun ranks) inherit it; the environment is as it was afterwards."""
    saved = {name: os.environ.get(name) for name in ("TMPDIR", "TORCHINDUCTOR_CACHE_DIR")}
    saved_tempdir = tempfile.tempdir
    try:
        folder = tempfile.mkdtemp(prefix="lrc-")
    except OSError:  # no writable temporary folder: the command says so where it needs one
        yield None
        return
    if len(folder) > MAX_TMPDIR:  # the workers' sockets would not fit there: leave $TMPDIR as it is
        os.rmdir(folder)
        yield None
        return
    os.environ["TMPDIR"] = tempfile.tempdir = folder
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(folder, "torchinductor"))
    try:
        yield folder
    finally:
        tempfile.tempdir = saved_tempdir
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(folder, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str]) -> None:
    """A safetensors file written through lrc's own temporary file: safetensors serialises to memory, lrc writes
    (safetensors' save_file keeps a temporary file of its own, which a kill would leave behind, and reports a full
    disk as its own error type)."""
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def fsync_dir(folder: Path) -> None:
    # The rename is durable only once the folder entry is on disk too (POSIX).
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


LOCK_SUFFIX = ".lock"  # .NAME.lock next to an output: held (flock) by the run that writes it
_HELD: dict[Path, int] = {}  # the outputs this process holds, with how often (a run inside a run: the same lock)


def lock_path(output: str | os.PathLike) -> Path:
    output = Path(output)
    return output.with_name(f".{output.name}{LOCK_SUFFIX}")


@contextlib.contextmanager
def output_lock(output: str | os.PathLike) -> Iterator[None]:
    """Hold `output` (and what lives next to it: its training state, its metrics) for this run alone: an exclusive
    flock on .NAME.lock, which holds the pid, removed at the end. A second run with the same output fails at once
    (OutputError, exit 4) naming the process that holds it. Ranks other than 0 of a torchrun take none (rank 0
    holds it for them); a folder that does not exist is left to check_output to refuse."""
    path = lock_path(output).absolute()
    if os.environ.get("RANK", "0") != "0" or not path.parent.is_dir():
        yield
        return
    if path in _HELD:  # this process holds it already (a run inside a run)
        _HELD[path] += 1
        try:
            yield
        finally:
            _HELD[path] -= 1
        return
    fd = _acquire(path, Path(output))
    _HELD[path] = 1
    try:
        yield
    finally:
        del _HELD[path]
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


def _acquire(path: Path, output: Path) -> int:
    import fcntl

    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # as check_output says it
            raise OutputError(f"cannot write in '{path.parent}' ({e.strerror or e}): choose a writable folder for "
                              "the output") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputError(f"output '{output}' is being written by another lrc run (pid {holder}; its lock is "
                              f"'{path}'): wait for it to end, or choose another `output`") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:  # the holder removed it between our open and our lock: take a fresh one
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


def locked_output(fn):
    """Decorate a function whose parameter `output` it writes: the call holds output_lock(output) throughout."""
    import functools
    import inspect

    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        output = signature.bind_partial(*args, **kwargs).arguments.get("output")
        if output is None:
            return fn(*args, **kwargs)
        with output_lock(output):
            return fn(*args, **kwargs)

    return call
