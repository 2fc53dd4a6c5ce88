"""The fading layer of progressive compression (PC-LoRA): y = lambda * residual x + scale * second(first(x)) + bias.

During a progressive recovery every target nn.Linear (weight W, bias b) becomes a ProgressiveLinear: a frozen
dense `residual` whose share of the output, `lam`, falls from 1 to 0 as training goes, next to the two trainable
factors of a LowRankLinear and a trainable bias that never fades. Once `lam` is 0 the layer is a low-rank layer,
and `to_lowrank()` gives the LowRankLinear that stands for it (`scale` folded into `second`), with no dense
tensor left.

- `residual` is a buffer: frozen, saved in the training state (so a resume does not depend on recomputing it),
  converted with the model to the training dtype, and never given optimizer state. It is the dense weights once.
- `lam` is a 0-dim buffer (not saved) that the schedule fills in place: torch.compile reads it as an input and
  does not recompile when it changes. `fading` turns the residual's matmul off once `lam` is 0 (one recompile).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_cli.layers.lowrank_linear import LowRankLinear


class ProgressiveLinear(nn.Module):
    """A linear layer in transit from dense to low-rank (out_features x in_features, rank `rank`).

    residual: out_features x in_features, frozen (buffer)   the dense part, multiplied by `lam`
    first:    in_features -> rank, no bias                   trainable
    second:   rank -> out_features, no bias                  trainable, times `scale` (LoRA's alpha / r)
    bias:     out_features, or None                          trainable, not multiplied by `lam`
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, scale: float = 1.0,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if not 0 < rank <= min(in_features, out_features):
            raise ValueError(f"rank must be in [1, {min(in_features, out_features)}], got {rank}")
        self.in_features, self.out_features, self.rank, self.scale = in_features, out_features, rank, float(scale)
        self.first = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.register_buffer("residual", torch.zeros(out_features, in_features, device=device, dtype=dtype))
        self.register_buffer("lam", torch.ones((), device=device, dtype=torch.float32), persistent=False)
        self.fading = True

    @classmethod
    def around(cls, dense: nn.Linear, first: torch.Tensor, second: torch.Tensor, *, residual: torch.Tensor,
               scale: float = 1.0) -> ProgressiveLinear:
        """The layer with these factors and `residual`, and the bias of `dense` (on its device, in its dtype).
        `residual` becomes the buffer itself, not a copy (it may be `dense.weight`: one dense matrix in memory)."""
        weight = dense.weight
        layer = cls(dense.in_features, dense.out_features, first.shape[0], bias=dense.bias is not None, scale=scale,
                    device="meta", dtype=weight.dtype).to_empty(device=weight.device)
        layer.residual = residual.detach().to(device=weight.device, dtype=weight.dtype)
        layer.lam = torch.ones((), device=weight.device, dtype=torch.float32)
        with torch.no_grad():
            layer.first.weight.copy_(first)
            layer.second.weight.copy_(second)
            if dense.bias is not None:
                layer.bias.copy_(dense.bias)
        layer.train(dense.training)
        return layer

    def set_lambda(self, value: float) -> None:
        """The dense part's share of the output; 0 turns its matmul off."""
        self.lam.fill_(value)
        self.fading = value != 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # second and the bias in one GEMM, as LowRankLinear computes them: at lambda 0 (scale 1) the two agree bit
        # for bit, so the checkpoint computes exactly what was trained.
        second = self.second.weight * self.scale if self.scale != 1.0 else self.second.weight
        y = F.linear(self.first(x), second, self.bias)
        if self.fading:
            y = y + self.lam * F.linear(x, self.residual)
        return y

    @property
    def weight_product(self) -> torch.Tensor:
        """The low-rank weight the layer ends as (out_features x in_features): scale * second @ first."""
        return self.scale * (self.second.weight @ self.first.weight)

    def to_lowrank(self) -> LowRankLinear:
        """The LowRankLinear this layer is once `lam` is 0: the factors with `scale` folded into `second`, the
        bias; the residual is dropped."""
        weight = self.first.weight
        layer = LowRankLinear(self.in_features, self.out_features, self.rank, bias=self.bias is not None,
                              device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.first.weight.copy_(self.first.weight)
            layer.second.weight.copy_(self.second.weight * self.scale if self.scale != 1.0 else self.second.weight)
            if self.bias is not None:
                layer.second.bias.copy_(self.bias)
        layer.train(self.training)
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}, scale={self.scale:g}, lam={float(self.lam):.4g}")
