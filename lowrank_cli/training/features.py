"""Block outputs for feature distillation: forward hooks that keep what each transformer block returns."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def first_tensor(output: object) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"a block returned {type(output).__name__}, not a tensor: its output cannot be distilled")


class BlockOutputs:
    """Forward hooks that keep the output of each named block during a forward pass.

        with BlockOutputs(model, names) as feats:
            model(x)
            outputs = feats.take()   # list, in `names` order; cleared for the next pass
    """

    def __init__(self, model: nn.Module, names: Sequence[str]):
        self.names = list(names)
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = []
        for name in self.names:
            module = model.get_submodule(name)
            self._handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            self.outputs[name] = first_tensor(output)
        return hook

    def take(self) -> list[torch.Tensor]:
        missing = [n for n in self.names if n not in self.outputs]
        if missing:
            raise RuntimeError(f"blocks {missing[:3]} did not run in the forward pass: they cannot be distilled")
        outputs = [self.outputs[n] for n in self.names]
        self.outputs.clear()
        return outputs

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.outputs.clear()

    def __enter__(self) -> BlockOutputs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
