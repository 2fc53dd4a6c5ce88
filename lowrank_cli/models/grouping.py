"""Shared-input grouping swapped into a model at load time (`layers.grouped_lowrank`); the state dict and the
file format do not change.

    group_lowrank(model)     # the low-rank layers of each group the model's family declares
                             # (shared_input_groups: BERT q/k/v, Llama q/k/v and gate/up) run as one GEMM + seconds
    ungroup_lowrank(model)   # back to plain LowRankLinear layers

Where it is on by default (`resolve_group`, GROUPED_BY_DEFAULT): every device. The rule, not a timing at load time
(which would make loading slow and its result depend on the machine's load): the group reads its input once and
launches one GEMM where it launched one per member, for the same multiply-adds, which is never more work; on CUDA
the launches saved are what the issue measured (q/k/v in one launch: 0.059 vs 0.126 ms on an H200).
`benchmarks/cpu_speed.py` and `benchmarks/gpu_speed.py` time both ways; `group=False` turns it off.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from lowrank_cli.layers.grouped_lowrank import GroupedLowRankLinear, SharedInputGroup
from lowrank_cli.layers.lowrank_linear import LowRankLinear
from lowrank_cli.models.families import family_of
from lowrank_cli.models.structure import swap_in

log = logging.getLogger("lowrank_cli.grouping")

GROUPED_BY_DEFAULT = True

NO_GROUPS_NOTE = ("`group=True`, but {what}: it runs ungrouped (grouping needs low-rank layers that read one input, "
                  "as BERT's query/key/value or Llama's q/k/v and gate/up)")


@dataclass
class GroupSummary:
    groups: int = 0
    layers: int = 0

    def describe(self) -> str:
        if not self.groups:
            return "no shared-input group"
        return f"{self.layers} low-rank layers in {self.groups} shared-input groups (one GEMM each for the firsts)"


def resolve_group(group: bool | None) -> bool:
    """Whether to group: `None` (default) as GROUPED_BY_DEFAULT says, else as asked."""
    return GROUPED_BY_DEFAULT if group is None else bool(group)


def group_lowrank(model: nn.Module) -> GroupSummary:
    """Group, in place, the low-rank layers of every shared-input group the model's family declares (members
    that are not low-rank, or of another input width, device or dtype, stay as they are; a group needs two)."""
    ungroup_lowrank(model)
    summary = GroupSummary()
    for names in family_of(model).shared_input_groups(model):
        layers = [(n, model.get_submodule(n)) for n in names]
        lowrank = [(n, m) for n, m in layers if type(m) is LowRankLinear]
        kinds = {(m.in_features, m.first.weight.device, m.first.weight.dtype) for _, m in lowrank}
        if len(lowrank) < 2 or len(kinds) != 1:
            continue
        members = []
        for name, layer in lowrank:
            member = GroupedLowRankLinear(layer)
            swap_in(model, name, member)
            members.append(member)
        SharedInputGroup(members)
        summary.groups += 1
        summary.layers += len(members)
    log.debug("grouping: %s", summary.describe())
    return summary


def ungroup_lowrank(model: nn.Module) -> int:
    """Undo `group_lowrank`: plain LowRankLinear layers again (the same weights); returns how many."""
    undone = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, GroupedLowRankLinear):
            if module.group is not None:
                module.group.dissolve()
            swap_in(model, name, module.ungrouped())
            undone += 1
    return undone


def is_grouped(model: nn.Module) -> bool:
    return any(isinstance(m, GroupedLowRankLinear) and m.group is not None for m in model.modules())


def apply_group(model: nn.Module, group: bool | None, note=None) -> GroupSummary:
    """`load`'s `group`: the groups swapped in where asked (or by default); `note(msg)` hears that `group=True`
    found none (a note, not an error: the model runs as it is)."""
    if not resolve_group(group):
        ungroup_lowrank(model)
        return GroupSummary()
    summary = group_lowrank(model)
    if group and not summary.groups:
        has_lowrank = any(isinstance(m, LowRankLinear) for m in model.modules())
        what = "its family declares no low-rank layers that read one input" if has_lowrank else \
            "the model has no low-rank layers"
        (note or log.warning)(NO_GROUPS_NOTE.format(what=what))
    return summary
