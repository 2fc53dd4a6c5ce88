"""Shared-input grouping in plain PyTorch: low-rank layers that read the very same tensor (BERT's query, key and
value; Llama's q/k/v and gate/up) run their first factors as one GEMM over the concatenated `first` weights, then
their second factors as one batched GEMM (equal shapes, on CUDA) or one GEMM each.

    group = SharedInputGroup([q, k, v])     # q, k, v: GroupedLowRankLinear, each where its LowRankLinear was

The wiring: each member stays at its own call site (the parent's `self.query(x)` is unchanged). The first member
called computes the whole group and keeps the others' outputs, tied to that very input tensor; a sibling called
with the same tensor takes its output, one called with another tensor (cross-attention's keys and values read the
encoder's states) computes its own. A forward pre-hook on the parent would have to know which argument of the
parent's forward each member reads; the identity of the tensor each member is really called with is exact
whatever the parent does.

No weight is stored twice and the state dict does not change: the members' `first.weight` (and, for equal
shapes, `second.weight` / `second.bias`) are views into the group's packed tensors, so `load_state_dict` (an
in-place copy) updates the packed tensors too. A member whose weights no longer live in the packed tensor (the
model was moved with `.to()`, which gives parameters new storage) repacks the group on its next call. With
gradients wanted the members run one by one (the packed tensors are not leaves): training sees plain layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

from lowrank_cli.layers.lowrank_linear import LowRankLinear, take_pending


class GroupedLowRankLinear(LowRankLinear):
    """A LowRankLinear (same children, same state dict) computed together with the other members of its group."""

    def __init__(self, layer: LowRankLinear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.rank = layer.in_features, layer.out_features, layer.rank
        self.first = layer.first
        self.second = layer.second
        self.group: SharedInputGroup | None = None
        self.group_index = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group is None:
            return self.second(self.first(x))
        return self.group.output(self, x)

    def plain(self) -> bool:
        """Both children are hook-free nn.Linear (an adapter that wraps one, or a hook on one: they run as such)."""
        return all(type(m) is nn.Linear and not (m._forward_hooks or m._forward_pre_hooks)
                   for m in (self.first, self.second))

    def ungrouped(self) -> LowRankLinear:
        """A plain LowRankLinear with this layer's children (the weights are not copied)."""
        plain = LowRankLinear.__new__(LowRankLinear)
        nn.Module.__init__(plain)
        plain.in_features, plain.out_features, plain.rank = self.in_features, self.out_features, self.rank
        plain.first, plain.second = self.first, self.second
        return plain

    def extra_repr(self) -> str:
        size = f", group of {len(self.group.members)}" if self.group is not None else ""
        return super().extra_repr() + size


class SharedInputGroup:
    """Grouped low-rank layers that read one input (2 or more, equal `in_features`, one device and dtype).

    `batched`: the second factors have equal shapes (rank, out_features, bias), so that one batched GEMM can run
    them; it does on CUDA, where it saves launches (on the CPU one GEMM each reads the same bytes without the
    copy that batching the first GEMM's output needs).
    """

    def __init__(self, members: Sequence[GroupedLowRankLinear]) -> None:
        if len(members) < 2 or len({m.in_features for m in members}) != 1:
            raise ValueError("a group holds 2 or more low-rank layers with the same in_features")
        self.members = list(members)
        self.ranks = [m.rank for m in members]
        self.batched = len({(m.rank, m.out_features, m.second.bias is not None) for m in members}) == 1
        self.pending: tuple[torch.Tensor, list[torch.Tensor | None]] | None = None
        self.first_weight = self.second_weight = self.second_bias = None
        self._pointers: list[int] = []
        for i, m in enumerate(self.members):
            m.group, m.group_index = self, i
        self.pack()

    # ---- the packed weights

    def _weights(self) -> list[torch.Tensor]:
        weights = [m.first.weight for m in self.members]
        if self.batched:
            weights += [m.second.weight for m in self.members]
            weights += [m.second.bias for m in self.members if m.second.bias is not None]
        return weights

    @torch.no_grad()
    def pack(self) -> None:
        """The members' weights copied into the packed tensors, and made views of them."""
        with torch.inference_mode(False):
            firsts = [m.first.weight for m in self.members]
            self.first_weight = torch.cat([w.detach() for w in firsts])
            for w, view in zip(firsts, self.first_weight.split(self.ranks)):
                w.data = view
            if self.batched:
                seconds = [m.second.weight for m in self.members]
                self.second_weight = torch.stack([w.detach() for w in seconds])
                for w, view in zip(seconds, self.second_weight.unbind(0)):
                    w.data = view
                biases = [m.second.bias for m in self.members if m.second.bias is not None]
                self.second_bias = torch.stack([b.detach() for b in biases]).unsqueeze(1) if biases else None
                for b, view in zip(biases, self.second_bias.unbind(0) if biases else ()):
                    b.data = view.squeeze(0)
        self._pointers = [w.data_ptr() for w in self._weights()]
        for t in (self.first_weight, self.second_weight, self.second_bias):
            if t is not None:
                # Not module parameters: without this, CUDA graphs (torch.compile mode reduce-overhead) would copy
                # them into the graph's static inputs on every replay, reading every weight twice.
                torch._dynamo.mark_static_address(t, guard=False)

    def packed(self) -> bool:
        """The members' weights still live in the packed tensors (no `.to()` gave them new storage since)."""
        return [w.data_ptr() for w in self._weights()] == self._pointers

    def usable(self) -> bool:
        """The packed path computes what the members would: plain children, no gradient wanted."""
        if not all(m.plain() for m in self.members):
            return False
        return not (torch.is_grad_enabled() and any(w.requires_grad for w in self._weights()))

    # ---- the forward

    def output(self, member: GroupedLowRankLinear, x: torch.Tensor) -> torch.Tensor:
        index = member.group_index
        out = take_pending(self, index, x)
        if out is not None:
            return out
        if not self.usable():
            return member.second(member.first(x))
        if not torch.compiler.is_compiling() and not self.packed():
            self.pack()
        if x.device != self.first_weight.device:  # a replica on another device (nn.DataParallel) runs as a layer
            return member.second(member.first(x))
        outs: list[torch.Tensor | None] = list(self.run(x))
        mine = outs[index]
        outs[index] = None
        self.pending = (x, outs)
        return mine

    def run(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every member's output for input `x`: one GEMM for the first factors, then the second factors (one
        batched GEMM where `batched` and on CUDA, else one GEMM each)."""
        h = F.linear(x, self.first_weight)
        return self.seconds_batched(h) if self.batched and x.is_cuda else self.seconds_each(h)

    def seconds_batched(self, h: torch.Tensor) -> list[torch.Tensor]:
        """The second factors as one batched GEMM on `h`, the first GEMM's output (equal shapes only)."""
        lead, groups, rank = h.shape[:-1], len(self.members), self.ranks[0]
        hb = h.reshape(-1, groups, rank).transpose(0, 1)
        weight = self.second_weight.transpose(1, 2)
        y = torch.bmm(hb, weight) if self.second_bias is None else torch.baddbmm(self.second_bias, hb, weight)
        return [y[i].view(*lead, -1) for i in range(groups)]

    def seconds_each(self, h: torch.Tensor) -> list[torch.Tensor]:
        """The second factors one GEMM each, on their slices of `h`."""
        return [F.linear(part, m.second.weight, m.second.bias)
                for part, m in zip(h.split(self.ranks, dim=-1), self.members)]

    def dissolve(self) -> None:
        for m in self.members:
            m.group = None
        self.pending = None
