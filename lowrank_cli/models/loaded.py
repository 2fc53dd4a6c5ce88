"""A loaded model: the nn.Module, how to rebuild it (ModelSpec), and where it came from."""

from __future__ import annotations

import copy
import dataclasses
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lowrank_cli.models.spec import ModelSpec


@dataclass
class LoadedModel:
    model: nn.Module
    spec: ModelSpec
    pending_source: dict[str, Any] = field(default_factory=dict)  # values may still be computing (Future)
    checkpoint: Any = None  # CheckpointInfo when the source is an lrc checkpoint
    files: str | None = None  # transformers: the folder or Hub repo with the tokenizer (`--save-tokenizer`, text data)
    revision: str | None = None

    @property
    def source(self) -> dict[str, Any]:
        """Provenance: kind, id, revision / sha256. The file hash is computed in the background while the
        caller works (0.3 s for a ViT-B) and waited for here, on first use."""
        for key, value in self.pending_source.items():
            if isinstance(value, Future):
                self.pending_source[key] = value.result()
        return self.pending_source

    @source.setter
    def source(self, value: dict[str, Any]) -> None:
        self.pending_source = value

    def twin(self) -> LoadedModel:
        """An independent copy: the model and its spec deep-copied (a head can be replaced in one and not the other),
        the rest shared."""
        return dataclasses.replace(self, model=copy.deepcopy(self.model), spec=copy.deepcopy(self.spec))


def name_of(loaded: LoadedModel) -> str:
    """The model's name in messages: its source's id, else its architecture."""
    source = loaded.source or {}
    return str(source.get("id") or loaded.spec.architecture)
