"""Orthogonal adaptation (Po et al., CVPR 2024, "Orthogonal Adaptation for Modular Customization of Diffusion
Models", arXiv 2312.02432): tasks fine-tuned apart whose updates add up without interfering.

Each task's update of a linear is LoRA-shaped, ΔW_t = scale · B_t A_t, with B_t (d_out x rank) FIXED: the columns
[block·rank, (block+1)·rank) of one orthogonal matrix Q per layer, shared by every task. The tasks' updates then
live in orthogonal output subspaces (B_s^T B_t = 0), so their sum, the `concat` rule of training.merging, leaves
each one intact: B_t^T Σ_s ΔW_s = scale · A_t. Only A_t (rank x d_in) trains. The paper fixes the input-side factor
(Δθ = A B^T); the fixed basis sits on the output side here, which gives the same orthogonality and makes each
task's share of a merged weight readable as B_t^T ΔW.

Q is the same in every process: the QR of a Gaussian drawn from a generator seeded by the layer's name
(zlib.crc32), not from the global RNG. Only its first blocks·rank columns are computed (the QR of the Gaussian's
first blocks·rank columns gives the full Q's first columns), so a large layer costs O(d_out (blocks·rank)^2).
A starts at zero, so the model is the base at step 0, and trains at once, since B is not zero.

B is a non-persistent buffer: it follows from the layer's name and the config's `rank`, `block` and `blocks`, so
state dicts and adapter files hold A alone. On a LowRankLinear the targets are `first` and `second` (adapters.
targets), each adapted in its own output space, and merging keeps the layer's rank.
"""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_cli.adapters.base import Method
from lowrank_cli.errors import UsageError
from lowrank_cli.models.structure import swap_in


def orthogonal_basis(name: str, out_features: int, columns: int) -> torch.Tensor:
    """The first `columns` columns of the layer `name`'s orthogonal out_features x out_features Q, float64 on the
    CPU; the same for every task and process."""
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    # One draw per column: a single draw's values depend on its total size (torch refills the tail of a draw that
    # is not a multiple of 16), so only column by column do the leading columns not depend on how many follow.
    gaussian = torch.stack([torch.randn(out_features, generator=generator, dtype=torch.float64)
                            for _ in range(columns)], dim=1)
    q, r = torch.linalg.qr(gaussian)
    # Signs fixed by R's diagonal: QR is unique up to column signs, and LAPACK builds may pick them differently.
    return q * torch.sign(torch.diagonal(r))


class OrthogonalLinear(nn.Module):
    """nn.Linear `base_layer` plus scale · B A: B (`basis`, fixed) d_out x rank, A (`coefficients`) rank x d_in."""

    def __init__(self, base_layer: nn.Linear, basis: torch.Tensor, scale: float, dropout: float = 0.0):
        super().__init__()
        w = base_layer.weight
        self.base_layer = base_layer
        self.register_buffer("basis", basis.to(device=w.device, dtype=w.dtype), persistent=False)
        self.coefficients = nn.Parameter(torch.zeros(basis.shape[1], w.shape[1], device=w.device, dtype=w.dtype))
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.scale * F.linear(F.linear(self.dropout(x), self.coefficients), self.basis)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        weight = self.base_layer.weight
        weight.add_((self.scale * self.basis @ self.coefficients).to(weight.dtype))
        return self.base_layer

    def extra_repr(self) -> str:
        return f"rank={self.basis.shape[1]}, scale={self.scale:g}"


class Orthogonal(Method):
    """Multi-task mode, not a `method` of its own: task `block` of `blocks` adapts `targets` in its own block."""

    name = "orthogonal"
    adds_modules = True

    def _check(self, layers: dict[str, nn.Module]) -> None:
        c = self.config
        if c.rank is None or c.rank < 1:
            raise UsageError(f"`adapter_rank` must be at least 1, got {c.rank}")
        if c.blocks is None or c.blocks < 1 or c.block is None or not 0 <= c.block < c.blocks:
            raise UsageError(f"orthogonal adaptation needs this task's `block` in [0, `blocks`) and `blocks` >= 1 (the "
                             f"number of tasks), got block {c.block} of {c.blocks}: number the tasks from 0")
        for name, layer in layers.items():
            if not isinstance(layer, nn.Linear):
                raise TypeError(f"orthogonal adaptation adapts nn.Linear modules; '{name}' is a {type(layer).__name__}")
        if layers:
            smallest = min(layers, key=lambda n: layers[n].out_features)
            out = layers[smallest].out_features
            if c.blocks * c.rank > out:
                raise UsageError(f"`adapter_rank` x tasks ({c.rank} x {c.blocks} = {c.rank * c.blocks}) must be at "
                                 f"most the output features of the smallest target ({out}, '{smallest}'): lower "
                                 f"`adapter_rank` to {out // c.blocks} or less")

    def apply(self, model: nn.Module) -> None:
        c = self.config
        layers = {name: model.get_submodule(name) for name in c.targets}
        self._check(layers)
        scale = (c.alpha if c.alpha is not None else c.rank) / c.rank
        for name, layer in layers.items():
            q = orthogonal_basis(name, layer.out_features, c.blocks * c.rank)
            basis = q[:, c.block * c.rank:(c.block + 1) * c.rank]
            swap_in(model, name, OrthogonalLinear(layer, basis, scale, c.dropout))

    def is_adapter(self, module: nn.Module) -> bool:
        return isinstance(module, OrthogonalLinear)

    def merged(self, module: nn.Module) -> nn.Module:
        return module.merged()
