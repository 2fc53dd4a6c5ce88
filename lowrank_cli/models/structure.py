"""Where a model's parts are: its linears, its transformer blocks, the targets of a pattern; swapping a module in."""

from __future__ import annotations

import copy
import itertools
import re

import torch
from torch import nn

from lowrank_cli.errors import UsageError
from lowrank_cli.models.inputs import example_input


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def block_names(model: nn.Module) -> list[str]:
    """Names of the model's repeated blocks (see block_linear_names), outermost first, in model order."""
    names: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        children = [c for c in module.children() if any(True for _ in c.children())]
        classes = [type(c) for c in children]
        if any(classes.count(c) >= 2 for c in set(classes)):
            names += [f"{name}.{child}" if name else child for child, c in module.named_children() if any(True for _ in c.children())]
    return names


def block_linear_names(model: nn.Module) -> list[str]:
    """Linears inside the model's repeated blocks: the transformer blocks, in PELA's sense.

    A block is an element of an nn.ModuleList / nn.Sequential that holds at least two container modules of the
    same class (timm `blocks.N`, Swin `layers.N.blocks.M`, BERT `encoder.layer.N`). Heads, patch embeddings,
    poolers and an MLP written as a Sequential of bare Linears are not blocks, so they stay dense.
    """
    block_prefixes = [b + "." for b in block_names(model)]
    return [n for n in linear_names(model) if any(n.startswith(p) for p in block_prefixes)]


def compile_patterns(patterns: list[str], parameter: str) -> list[re.Pattern]:
    """The regular expressions of `patterns`; a bad one is refused naming the API `parameter` that gave it."""
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise UsageError(f"`{parameter}` '{p}' is not a valid regular expression ({e}): fix the pattern") from None
    return compiled


def select_targets(model: nn.Module, include: list[str] | None = None, exclude: list[str] | None = None) -> list[str]:
    """Names of the linears to factorize: `include` (regex full match) or the block linears, minus `exclude`.

    Exclude wins over include. Every pattern must match at least one linear, so a typo never silently
    compresses the wrong layers (or none).
    """
    linears = linear_names(model)
    inc = compile_patterns(include or [], "include")
    exc = compile_patterns(exclude or [], "exclude")
    for parameter, patterns in (("include", inc), ("exclude", exc)):
        for p in patterns:
            if not any(p.fullmatch(n) for n in linears):
                example = linears[0] if linears else "(the model has no nn.Linear)"
                raise UsageError(
                    f"`{parameter}` '{p.pattern}' matches no nn.Linear of the model (patterns match whole module "
                    f"names, e.g. '{example}'): fix the pattern; 'lrc report MODEL --per-layer' lists the names"
                )
    chosen = [n for n in linears if any(p.fullmatch(n) for p in inc)] if inc else block_linear_names(model)
    return [n for n in chosen if not any(p.fullmatch(n) for p in exc)]


def swap_in(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)


def innermost_blocks(model: nn.Module) -> list[str]:
    """The model's repeated transformer blocks, innermost ones only (Swin: `layers.N.blocks.M`, not `layers.N`)."""


    names = block_names(model)
    return [n for n in names if not any(other.startswith(n + ".") for other in names)]


def uncalled_linears(model: nn.Module, names: list[str], input_size: tuple[int, ...] | None) -> list[str]:
    """The named linears that a forward pass never calls as modules.

    Some timm models use `F.linear(x, self.qkv.weight)` (beit, eva, ...): a swapped-in LowRankLinear would then
    never run and the model would silently break. One batch-1 forward with hooks finds them.
    """
    if not names:
        return []
    from lowrank_cli.models.inputs import default_input_size

    size = tuple(input_size or default_input_size(model))
    # A twin on the meta device runs the same modules on shapes only: no arithmetic, no memory. A model that
    # cannot run on meta (data-dependent control flow) is checked with a real batch-1 forward instead.
    try:
        twin = copy.deepcopy(model, {id(t): torch.empty_like(t, device="meta")
                                     for t in itertools.chain(model.parameters(), model.buffers())})
        return _uncalled(twin, names, size, torch.device("meta"))
    except Exception:
        pass
    try:
        return _uncalled(model, names, size, next(model.parameters()).device)
    except Exception as e:
        from lowrank_cli.models.inputs import forward_failed

        raise forward_failed(e, model, size, ", so lrc cannot check which linears the model calls") from None


def _uncalled(model: nn.Module, names: list[str], size: tuple[int, ...], device: torch.device) -> list[str]:
    called: set[str] = set()
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: called.add(n)) for n in names]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input(model, size, dtype=next(model.parameters()).dtype, device=device, zeros=True))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return [n for n in names if n not in called]
