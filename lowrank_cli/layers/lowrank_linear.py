"""The low-rank layer: y = second(first(x)), the truncated SVD of a dense nn.Linear.

Two plain `nn.Linear` children, so optimizers, torch.compile, fvcore and peft see ordinary linears, and the
state-dict keys (`<name>.first.weight`, `<name>.second.weight`, `<name>.second.bias`) say what they hold.
"""

from __future__ import annotations

import torch
from torch import nn


class LowRankLinear(nn.Module):
    """Replacement for `nn.Linear(in_features, out_features)` with rank `rank`.

    first:  in_features -> rank, no bias   (sqrt(S_r) V_r^T)
    second: rank -> out_features, bias     (U_r sqrt(S_r), the original bias)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 0 < rank <= min(in_features, out_features):
            raise ValueError(f"rank must be in [1, {min(in_features, out_features)}], got {rank}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.first = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    @property
    def weight_product(self) -> torch.Tensor:
        """The dense weight this layer stands for (out_features x in_features)."""
        return self.second.weight @ self.first.weight

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.second.bias is not None}"
        )


def take_pending(group, index: int, x) -> "torch.Tensor | None":
    """A group that computed all its members' outputs for input `x` keeps them in `group.pending` (the input, one
    output per member); member `index` called with that same tensor takes its own (None otherwise). The pending
    set is dropped once every member took its output."""
    pending = group.pending
    if pending is None or pending[0] is not x or pending[1][index] is None:
        return None
    out, pending[1][index] = pending[1][index], None
    if all(o is None for o in pending[1]):
        group.pending = None
    return out
