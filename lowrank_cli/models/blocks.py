"""The generic rule for where a model's transformer blocks are (PELA's sense), which every family uses unless it
knows better (models.families.base.Family.block_names / target_linears)."""

from __future__ import annotations

from torch import nn


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def repeated_blocks(model: nn.Module) -> list[str]:
    """Names of the model's repeated blocks, outermost first, in model order.

    A block is an element of an nn.ModuleList / nn.Sequential that holds at least two container modules of the
    same class (timm `blocks.N`, Swin `layers.N.blocks.M`, BERT `encoder.layer.N`). Heads, patch embeddings,
    poolers and an MLP written as a Sequential of bare Linears are not blocks, so they stay dense.
    """
    names: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        children = [c for c in module.children() if any(True for _ in c.children())]
        classes = [type(c) for c in children]
        if any(classes.count(c) >= 2 for c in set(classes)):
            names += [f"{name}.{child}" if name else child for child, c in module.named_children()
                      if any(True for _ in c.children())]
    return names


def linears_in(model: nn.Module, blocks: list[str]) -> list[str]:
    """The nn.Linear modules inside the named blocks, in model order."""
    prefixes = [b + "." for b in blocks]
    return [n for n in linear_names(model) if any(n.startswith(p) for p in prefixes)]
