"""Walking a data folder: hidden entries skipped, links to folders followed, but no folder read twice.

ImageNet copies are often trees of symlinks, so links are followed. A link back to a folder that contains it
(`ln -s .. train/a/up`) would make os.walk read the tree again and again (each file under a new path, and class b's
files under class a); a second link to a folder already read would count its files twice. Each folder is read once,
by its real path: such a link is skipped with a warning. A loop adds no file that the walk does not find anyway,
so skipping it loses nothing, as GNU find does ("File system loop detected").
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def visible(name: str) -> bool:
    # .ipynb_checkpoints, .DS_Store, ._foo.jpg (macOS resource forks) are never data.
    return not name.startswith(".")


def walk_files(folder: str | os.PathLike[str], keep: Callable[[str], bool]) -> list[Path]:
    """The visible files under `folder` whose name `keep` accepts, at any depth, sorted; links to folders are
    followed, each folder (by its real path) once."""
    return sorted(iter_files(folder, keep))


def iter_files(folder: str | os.PathLike[str], keep: Callable[[str], bool], *, warn: bool = True) -> Iterator[Path]:
    """`walk_files` lazily, in walk order (a caller that stops at the first match reads no more); `warn=False`
    skips the links without a word (a quick look before the real walk, which warns)."""
    seen = {os.path.realpath(folder)}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        kept, here = [], os.path.realpath(dirpath)
        for name in sorted(d for d in dirnames if visible(d)):
            path = os.path.join(dirpath, name)
            real = os.path.realpath(path)
            loop = here == real or here.startswith(real.rstrip(os.sep) + os.sep)  # this folder or one above it
            if loop or real in seen:
                if warn:
                    _skipped(path, real, loop)
                continue
            seen.add(real)
            kept.append(name)
        dirnames[:] = kept
        yield from (Path(dirpath, f) for f in filenames if visible(f) and keep(f))


def _skipped(path: str, real: str, loop: bool) -> None:
    if loop:
        log.warning("'%s' links back to '%s', a folder that contains it: skipped (a symlink loop; its files are read "
                    "once, from where they are)", path, real)
    else:
        log.warning("'%s' leads to '%s', a folder already read: skipped (each folder is read once)", path, real)
