"""The options that say how to read a MODEL and where to run it, defined once for every command and API call.

`SourceOptions` groups those `lrc report`, `lrc bench`, `lrc eval` and `lrc factorize` share; the training options
(training/options.py) and the factorize configs take the same Opt (LIBRARY.field(), ...). Torch-free: `lrc
--help` builds its options from these.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Any

from lowrank_cli.errors import UsageError
from lowrank_cli.option_fields import Opt

SOURCE_PANEL = "Model source"  # the --help panel of the options that say how to read a MODEL


def model_args_of(items: Any) -> Any:
    """--model-arg KEY=VALUE (repeated) -> {key: value}; a dict (the API's form) is kept."""
    if items is None or isinstance(items, dict):
        return items
    from lowrank_cli.models.pretrained import parse_model_args

    return parse_model_args(items)


MAX_INPUT_VALUES = 2 ** 26  # values in one example (3 x 4096 x 4096 fits): past it, the first forward runs out of memory


def input_size_of(text: Any) -> tuple[int, ...] | None:
    """--input-size C,H,W (or CxHxW) -> (C, H, W); a tuple or list (the API's form) is kept. A size past
    MAX_INPUT_VALUES is refused here, before anything is allocated."""
    if text is None:
        return None
    if not isinstance(text, str):
        return _bounded(tuple(text), ",".join(str(v) for v in text))
    try:
        size = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        size = ()
    if len(size) != 3 or min(size) < 1:
        raise UsageError(f"`input_size` '{text}' is not C,H,W (e.g. 3,224,224)")
    return _bounded(size, text)


def _bounded(size: tuple[int, ...], text: str) -> tuple[int, ...]:
    values = math.prod(size)
    if values > MAX_INPUT_VALUES:
        raise UsageError(f"`input_size` '{text}' makes {values:,} values per example, more than lrc accepts "
                         f"({MAX_INPUT_VALUES:,}): give the size the model reads, e.g. 3,224,224")
    return size


DEVICE = Opt("auto", help="Where to run (auto: cuda when available).", metavar="auto|cpu|cuda[:N]")
LIBRARY = Opt("auto", help="How to read a folder or Hub repo: auto (from its config.json), timm or transformers.",
              panel=SOURCE_PANEL)
ARCH = Opt(None, help="timm architecture of a bare weights file, or the transformers class to build (BertModel).",
           metavar="NAME", panel=SOURCE_PANEL, cli_type=str)
MODEL_ARGS = Opt(None, help="Constructor argument for --arch (repeatable), e.g. num_classes=10.", flag="--model-arg",
                 metavar="KEY=VALUE", panel=SOURCE_PANEL, cli_type=list[str], parse=model_args_of)
REVISION = Opt(None, help="Hub revision (branch, tag or commit) for hf-hub: sources.", metavar="REV",
               panel=SOURCE_PANEL, cli_type=str)
INPUT_SIZE = Opt(None, help="Input size of an image model (default: the model's pretrained_cfg).", metavar="C,H,W",
                 panel=SOURCE_PANEL, cli_type=str, parse=input_size_of)
SEQ_LEN = Opt(None, help="Tokens per sequence for text models (default 128, at most the model's positions).", low=1,
              panel=SOURCE_PANEL, cli_type=int)


@dataclass
class SourceOptions:
    """How to read a MODEL source, the input size it runs at, and the device it runs on."""

    input_size: tuple[int, ...] | None = INPUT_SIZE.field()
    seq_len: int | None = SEQ_LEN.field()
    library: str = LIBRARY.field()
    arch: str | None = ARCH.field()
    model_args: dict[str, Any] | None = MODEL_ARGS.field()
    revision: str | None = REVISION.field()
    device: str = DEVICE.field()
