"""DCP writes the index of a sharded checkpoint (`.metadata`) with pickle and reads it back with plain
`pickle.load`. Before lrc lets it, the index is unpickled here with an allow-list of what such an index holds
(DCP's metadata classes, torch.Size, dtypes, layouts, memory formats, paths): a file that names anything else is
refused and nothing of it runs. The stream that passed is the one DCP then reads, so DCP's unpickling can build
only what passed."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch

from lowrank_cli.errors import InputError

_TORCH_VALUES = (torch.dtype, torch.layout, torch.memory_format)
_PLAIN = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
          ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
          ("pathlib", "PureWindowsPath"), ("builtins", "set"), ("builtins", "frozenset")}


class _Refused(pickle.UnpicklingError):
    """A global the index may not name (its name is the message)."""


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _PLAIN:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_VALUES):
            return getattr(torch, name)
        if module.startswith("torch.distributed.checkpoint.") and "." not in name:
            found = super().find_class(module, name)
            if isinstance(found, type):  # a metadata class, never a function of those modules
                return found
        raise _Refused(f"{module}.{name}")


def check_index(folder: Path) -> None:
    """Refuse (InputError) a DCP checkpoint whose `.metadata` would import or call anything an index does not
    hold; a missing index is left to DCP's own message."""
    index = Path(folder) / ".metadata"
    if not index.is_file():
        return
    try:
        _IndexUnpickler(io.BytesIO(index.read_bytes())).load()
    except _Refused as e:
        raise InputError(f"training state '{folder}': its DCP index names {e}, which no index lrc writes holds; "
                         "it was not read: resume only states your own runs wrote, or start again without "
                         "`resume=True`") from None
    except Exception as e:  # noqa: BLE001 - truncated or not a pickle: say it is damaged
        raise InputError(f"training state '{folder}' has a damaged DCP index ({type(e).__name__}): start again "
                         "without `resume=True`") from None
