"""A model skeleton: the architecture with its parameters on the meta device and its buffers real (computed ones,
such as rotary frequencies, are what the constructor makes), so that a model larger than the machine can be
materialised one block at a time from its weight files (compress.streaming)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """While it is open, every parameter a module registers is moved to the meta device at once: a constructor
    allocates each weight uninitialised (torch.empty: no page is touched) and keeps none of them, while the buffers
    it computes stay real. The same trick as accelerate's init_empty_weights(include_buffers=False)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            kind = type(param)
            module._parameters[name] = kind(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def materialise(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Give `module` (part of a skeleton) the tensors of its state dict, by their local names (assigned: no copy)."""
    module.load_state_dict(tensors, strict=False, assign=True)


def release(module: nn.Module) -> None:
    """Send `module`'s parameters and persistent buffers back to the meta device: their memory is freed."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and param.device.type != "meta":
                sub._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        for name, buf in list(sub._buffers.items()):
            if buf is not None and name not in sub._non_persistent_buffers_set and buf.device.type != "meta":
                sub._buffers[name] = buf.to("meta")
