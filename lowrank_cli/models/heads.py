"""A new head sized to a task, as the model's family gives one: timm's `reset_classifier`, or a transformers task
class built around the model's encoder (sequence classification for text, image classification for vision), with
the task's class names in its config. The LoadedModel's spec is updated so that the saved checkpoint rebuilds the
model with its new head.

    head = replace_head(loaded, outputs=2, classes=["even", "odd"])
    head.modules   # ["head"]: what trains in full whatever the method
"""

from __future__ import annotations

from lowrank_cli.errors import UsageError
from lowrank_cli.models.families import Head, family_of, in_head
from lowrank_cli.models.families.timm_vision import head_modules
from lowrank_cli.models.loaded import LoadedModel

__all__ = ["Head", "head_modules", "in_head", "replace_head"]


def replace_head(loaded: LoadedModel, outputs: int, *, classes: list[str] | None = None,
                 regression: bool = False) -> Head:
    """Give `loaded.model` a new, freshly initialised head with `outputs` outputs (in place for timm; a new task
    model around the same encoder modules for transformers, in `loaded.model`), and update `loaded.spec`."""
    if outputs < 1:
        raise UsageError(f"a head needs at least one output, got {outputs}")
    return family_of(loaded.model).replace_head(loaded, outputs, classes, regression)

