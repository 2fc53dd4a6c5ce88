"""What rebuilds a model without its source: library, architecture, constructor arguments, pretrained_cfg, and
the family (models.families) that reads it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# The library of files written before lrc recorded one (lrc.library): the first lrc read timm models only.
DEFAULT_LIBRARY = "timm"


@dataclass
class ModelSpec:
    architecture: str
    model_args: dict[str, Any] = field(default_factory=dict)
    pretrained_cfg: dict[str, Any] = field(default_factory=dict)
    library: str = DEFAULT_LIBRARY
    family: str | None = None  # models.families name; None (files without lrc.family): derived from the rest


def json_safe(value: Any) -> Any:
    """pretrained_cfg holds tuples and the odd callable; keep what JSON can carry."""
    return json.loads(json.dumps(value, default=lambda o: list(o) if isinstance(o, (tuple, set)) else None))
