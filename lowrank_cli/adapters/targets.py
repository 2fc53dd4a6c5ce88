"""Which linears an adapter goes on: every linear inside the transformer blocks by default (the factors of a
low-rank layer included), or those whose names a regular expression matches in full. A pattern that names a
LowRankLinear stands for its two factors; the head is never a target (it trains in full)."""

from __future__ import annotations

from torch import nn

from lowrank_cli.errors import UsageError
from lowrank_cli.layers.lowrank_linear import LowRankLinear
from lowrank_cli.models.structure import block_linear_names, compile_patterns


def _outside(name: str, head: list[str]) -> bool:
    return not any(name == h or name.startswith(h + ".") for h in head)


def adapter_targets(model: nn.Module, patterns: list[str] | None = None, head: list[str] | None = None) -> list[str]:
    """Names of the nn.Linear modules to adapt, in model order.

    `patterns` (the `targets` parameter): regexes matched in full against the names of the model's nn.Linear and
    LowRankLinear modules; a LowRankLinear contributes `first` and `second`. Every pattern must match something
    outside `head`, so a typo never silently adapts nothing.
    """
    head = head or []
    modules = dict(model.named_modules())
    candidates = [n for n, m in modules.items()
                  if n and isinstance(m, (nn.Linear, LowRankLinear)) and _outside(n, head)]
    if not patterns:
        chosen = [n for n in block_linear_names(model) if _outside(n, head)]
        if not chosen:
            raise UsageError("the model has no linear layers inside repeated transformer blocks to put adapters on: "
                             "name them with `targets` (regular expressions over module names)")
        return chosen
    compiled = compile_patterns(patterns, "targets")
    for pattern in compiled:
        if not any(pattern.fullmatch(n) for n in candidates):
            example = next((n.removesuffix(".first") for n in block_linear_names(model) if _outside(n, head)),
                           candidates[0] if candidates else "(none)")
            raise UsageError(f"`targets` '{pattern.pattern}' matches no linear layer of the model outside the head "
                             f"(patterns match whole module names, e.g. '{example}'): fix the pattern; "
                             "'lrc report MODEL --per-layer' lists the names")
    chosen: list[str] = []
    for name in candidates:
        if not any(p.fullmatch(name) for p in compiled):
            continue
        if isinstance(modules[name], LowRankLinear):
            chosen += [f"{name}.first", f"{name}.second"]
        else:
            chosen.append(name)
    return list(dict.fromkeys(chosen))  # a factor named both directly and through its layer counts once


def norm_names(model: nn.Module, head: list[str] | None = None) -> list[str]:
    """The LayerNorms with a weight and a bias (the ones a scale and shift can merge into), outside `head`."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.LayerNorm) and m.weight is not None and m.bias is not None
            and len(m.normalized_shape) == 1 and _outside(n, head or [])]
