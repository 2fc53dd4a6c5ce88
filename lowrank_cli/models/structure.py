"""Where a model's parts are: its linears, its transformer blocks (as its family finds them), the targets of a
pattern; swapping a module in."""

from __future__ import annotations

import copy
import itertools
import re

import torch
from torch import nn

from lowrank_cli.errors import UsageError
from lowrank_cli.models.blocks import linear_names
from lowrank_cli.models.families import family_of
from lowrank_cli.models.inputs import default_input_size, forward_failed, input_spec

__all__ = ["block_linear_names", "block_names", "compile_patterns", "innermost_blocks", "linear_names",
           "select_targets", "swap_in", "uncalled_linears"]


def block_names(model: nn.Module) -> list[str]:
    """Names of the model's repeated blocks, outermost first, in model order, as its family finds them (the
    generic rule: models.blocks.repeated_blocks)."""
    return family_of(model).block_names(model)


def block_linear_names(model: nn.Module) -> list[str]:
    """Linears inside the model's repeated blocks: the transformer blocks, in PELA's sense (what its family
    factorizes by default).

    A block is an element of an nn.ModuleList / nn.Sequential that holds at least two container modules of the
    same class (timm `blocks.N`, Swin `layers.N.blocks.M`, BERT `encoder.layer.N`). Heads, patch embeddings,
    poolers and an MLP written as a Sequential of bare Linears are not blocks, so they stay dense.
    """
    return family_of(model).target_linears(model)


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
    size = tuple(input_size or default_input_size(model))
    spec = input_spec(model)  # the model's, for its twin too
    # A twin on the meta device runs the same modules on shapes only: no arithmetic, no memory. A model that
    # cannot run on meta (data-dependent control flow) is checked with a real batch-1 forward instead.
    try:
        twin = copy.deepcopy(model, {id(t): torch.empty_like(t, device="meta")
                                     for t in itertools.chain(model.parameters(), model.buffers())})
        return _uncalled(twin, names, spec.example(size, dtype=next(model.parameters()).dtype, device="meta",
                                                   zeros=True))
    except Exception:
        pass
    if any(p.device.type == "meta" for p in model.parameters()):
        model = _hollow(model)
    try:
        return _uncalled(model, names, spec.example(size, dtype=next(model.parameters()).dtype,
                                                    device=next(model.parameters()).device, zeros=True))
    except Exception as e:
        raise forward_failed(e, model, size, ", so lrc cannot check which linears the model calls") from None


def _hollow(model: nn.Module) -> nn.Module:
    """A skeleton's twin (streaming factorize: no weights in memory) that runs: each module's own weights are zeros
    while it runs (real, contiguous: the fast kernels) and a stride-0 view of one number otherwise (no memory)."""
    def view(p: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(torch.zeros((), dtype=p.dtype).expand(p.shape), requires_grad=False)

    def fill(module: nn.Module, args: tuple) -> None:
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = nn.Parameter(torch.zeros(p.shape, dtype=p.dtype), requires_grad=False)

    def empty(module: nn.Module, args: tuple, output: object) -> None:
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = view(p)

    twin = copy.deepcopy(model, {id(p): view(p) for p in model.parameters()})
    for module in twin.modules():
        if any(True for _ in module.parameters(recurse=False)):
            module.register_forward_pre_hook(fill)
            module.register_forward_hook(empty)
    return twin


def _uncalled(model: nn.Module, names: list[str], batch: torch.Tensor) -> list[str]:
    called: set[str] = set()
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: called.add(n)) for n in names]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), family_of(model).plain_outputs(model):
            model(batch)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return [n for n in names if n not in called]
