"""Images Pillow refuses to decode because they are too large (its guard against decompression bombs, about 179
Mpx): not corrupt files, so they are named as what they are, with what to do. The loader skips them (as it skips
unreadable files, so that one file does not end a run) with a warning for the first few; the errors that say no
image could be read ask `read_problem` why."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from PIL import Image

log = logging.getLogger(__name__)

_TOLD: set[Path] = set()  # the too-large images already warned about (in this process)
TOLD_AT_MOST = 3
TOO_LARGE_FIX = ("shrink the images (a model reads a few hundred pixels a side), or raise PIL.Image.MAX_IMAGE_PIXELS "
                 "from Python for files you trust")


def tell_too_large(path: Path, error: Exception) -> None:
    """A warning for each of the first few too-large images (the run counts them with the unreadable ones)."""
    if path in _TOLD or len(_TOLD) > TOLD_AT_MOST:
        return
    _TOLD.add(path)
    if len(_TOLD) > TOLD_AT_MOST:
        log.warning("more images are larger than Pillow's limit: skipped without a word")
        return
    log.warning("'%s' skipped: %s; %s", path, too_large(error), TOO_LARGE_FIX)


def too_large(error: Exception) -> str:
    """What Pillow's DecompressionBombError says, in words: the image's size and the limit."""
    numbers = [int(n) for n in re.findall(r"(\d+) pixels", str(error))]
    size = f"it has {numbers[0] / 1e6:,.0f} Mpx, more" if numbers else "it is larger"
    limit = f" of {numbers[1] / 1e6:,.0f} Mpx" if len(numbers) > 1 else ""
    return f"{size} than Pillow's limit{limit} (its guard against decompression bombs)"


def read_problem(path: str | os.PathLike[str]) -> tuple[str, str | None]:
    """Why PIL cannot read the image at `path`, and what to do (None: the caller's usual advice), for the error that
    says that no image could be read (the loader itself only counts them)."""
    try:
        with Image.open(path) as im:
            im.convert("RGB")
    except Image.DecompressionBombError as exc:
        return f"'{path}': {too_large(exc)}", TOO_LARGE_FIX
    except Image.UnidentifiedImageError:
        return f"'{path}' is not an image Pillow reads (not an image, or a format it lacks)", None
    except FileNotFoundError:
        return f"'{path}' is gone (removed or moved during the run)", None
    except PermissionError:
        return f"'{path}' cannot be opened (no permission to read it)", None
    except OSError as exc:
        kind = "truncated" if "truncated" in str(exc) else "corrupt"
        return f"'{path}' is {kind}: {str(exc)[:200]}", None
    except Exception as exc:
        return f"'{path}' could not be decoded ({type(exc).__name__}: {str(exc)[:200]})", None
    return f"'{path}' reads now (did it change?)", None
