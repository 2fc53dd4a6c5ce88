"""What every fine-tuning method is: an object that puts its modules on a model (at the identity), says which
parameters train, and merges its modules back into plain layers of the same shapes.

An adapter module wraps the layer it adapts as `base_layer` (peft's convention, kept for lrc's own modules), so
that one walk finds the adapters of any method, their own tensors are the ones outside `base_layer`, and merging
is swapping the merged `base_layer` back in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lowrank_cli.models.heads import in_head
from lowrank_cli.models.structure import swap_in

METHODS = ("head", "full", "lora", "dora", "rlrr")


@dataclass(frozen=True)
class AdapterConfig:
    """A method and where it goes. `rank`, `alpha` and `dropout` are LoRA's, DoRA's and orthogonal adaptation's;
    `targets` are the adapted nn.Linear modules (adapters.targets); `norms` the LayerNorms that RLRR scales and
    shifts; `block` (this task's index) and `blocks` (the number of tasks) pick orthogonal adaptation's share of
    each layer's output space. Records without the newer fields load with their defaults."""

    method: str
    rank: int | None = None
    alpha: float | None = None
    dropout: float = 0.0
    targets: tuple[str, ...] = ()
    norms: tuple[str, ...] = ()
    block: int | None = None
    blocks: int | None = None

    def record(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> AdapterConfig:
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in record.items() if k in cls.__dataclass_fields__}
        return cls(**fields)


class Method:
    """`head`: only the new head trains; nothing is added, nothing to merge. Subclasses add modules."""

    name = "head"
    adds_modules = False  # whether `apply` puts modules on the model (and `merge` takes them off)

    def __init__(self, config: AdapterConfig):
        self.config = config

    def apply(self, model: nn.Module) -> None:
        """Put this method's modules on `model` (in place, same device and dtype), at the identity."""

    def is_adapter(self, module: nn.Module) -> bool:
        return False

    def merged(self, module: nn.Module) -> nn.Module:
        """The plain layer an adapter module merges into (its `base_layer`, changed in place)."""
        raise NotImplementedError

    def adapters(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The outermost adapter modules of `model`, by name."""
        found: list[tuple[str, nn.Module]] = []
        for name, module in model.named_modules():
            if self.is_adapter(module) and not any(name.startswith(n + ".") for n, _ in found):
                found.append((name, module))
        return found

    def adapter_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """The adapters' own parameters (everything of an adapter module outside its `base_layer`)."""
        params = []
        for prefix, module in self.adapters(model):
            params += [(f"{prefix}.{n}", p) for n, p in module.named_parameters()
                       if not (n == "base_layer" or n.startswith("base_layer."))]
        return params

    def trainable(self, model: nn.Module, head: list[str]) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of what trains, in model order; everything else is frozen by the caller."""
        chosen = {n for n, _ in self.adapter_parameters(model)}
        return [(n, p) for n, p in model.named_parameters() if n in chosen or in_head(n, head)]

    def merge(self, model: nn.Module) -> None:
        """Replace every adapter module by the plain layer it merges into."""
        for name, module in self.adapters(model):
            swap_in(model, name, self.merged(module))

    def adapter_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The adapters' tensors by state-dict name (what an adapter file holds besides the head)."""
        return {n: p.detach() for n, p in self.adapter_parameters(model)}


class Full(Method):
    """`full`: every parameter trains, the factors of low-rank layers included."""

    name = "full"

    def trainable(self, model: nn.Module, head: list[str]) -> list[tuple[str, nn.Parameter]]:
        return list(model.named_parameters())
