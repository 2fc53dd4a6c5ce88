"""RLRR (Dong et al., CVPR 2024, "Low-Rank Rescaled Vision Transformer Fine-Tuning: A Residual Design Approach"):
the pretrained weight rescaled element-wise by a rank-one residual, W' = W + (s_left s_right^T) * W, with a
trainable shift of the bias, and SSF-style scale and shift on the LayerNorm outputs.

On a low-rank layer it applies per factor (first' = first + (u s_in^T) * first, second' = second + (s_out v^T) *
second), so the merged layer keeps its rank. Every piece merges exactly into the layer it wraps: a linear's
weight and bias, a LayerNorm's weight and bias.

Initialisation: the identity. The official code draws both scale vectors at random, so the model changes before
the first step; here s_left starts at 0 and s_right at 1: the residual is 0 (the model is the pretrained one at
step 0) and s_left gets a gradient at once ((dL/dW' * W) s_right), which then gives s_right one. Scale 1 and
shift 0 on the norms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_cli.adapters.base import Method
from lowrank_cli.models.structure import swap_in


class RlrrLinear(nn.Module):
    """nn.Linear `base_layer` with W' = W + (scale_left scale_right^T) * W and b' = b + shift."""

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        w = base_layer.weight
        self.base_layer = base_layer
        self.scale_left = nn.Parameter(torch.zeros(w.shape[0], device=w.device, dtype=w.dtype))
        self.scale_right = nn.Parameter(torch.ones(w.shape[1], device=w.device, dtype=w.dtype))
        bias = base_layer.bias
        self.shift = nn.Parameter(torch.zeros_like(bias)) if bias is not None else None

    def weight(self) -> torch.Tensor:
        w = self.base_layer.weight
        return w + torch.outer(self.scale_left, self.scale_right) * w

    def bias(self) -> torch.Tensor | None:
        b = self.base_layer.bias
        return None if b is None else b + self.shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias())

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        weight, bias = self.weight(), self.bias()
        self.base_layer.weight.copy_(weight)
        if bias is not None:
            self.base_layer.bias.copy_(bias)
        return self.base_layer


class ScaleShiftNorm(nn.Module):
    """SSF on a LayerNorm's output: y = LN(x) * scale + shift, merged as weight * scale, bias * scale + shift."""

    def __init__(self, base_layer: nn.LayerNorm):
        super().__init__()
        w = base_layer.weight
        self.base_layer = base_layer
        self.scale = nn.Parameter(torch.ones_like(w))
        self.shift = nn.Parameter(torch.zeros_like(w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) * self.scale + self.shift

    @torch.no_grad()
    def merged(self) -> nn.LayerNorm:
        norm = self.base_layer
        bias = norm.bias * self.scale + self.shift
        norm.weight.mul_(self.scale)
        norm.bias.copy_(bias)
        return norm


class Rlrr(Method):
    name = "rlrr"
    adds_modules = True

    def apply(self, model: nn.Module) -> None:
        for name in self.config.targets:
            layer = model.get_submodule(name)
            if not isinstance(layer, nn.Linear):
                raise TypeError(f"RLRR adapts nn.Linear modules; '{name}' is a {type(layer).__name__}")
            swap_in(model, name, RlrrLinear(layer))
        for name in self.config.norms:
            swap_in(model, name, ScaleShiftNorm(model.get_submodule(name)))

    def is_adapter(self, module: nn.Module) -> bool:
        return isinstance(module, (RlrrLinear, ScaleShiftNorm))

    def merged(self, module: nn.Module) -> nn.Module:
        return module.merged()
