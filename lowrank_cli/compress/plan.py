"""Factorization plan: which linears become low-rank, and at what rank.

Pure: it reads module names and weight shapes, never tensor values, so it is cheap, testable on its own and
the same for every later step (SVD, data-aware truncation, rank budgets, speed plans).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from torch import nn

from lowrank_cli.errors import UsageError


@dataclass(frozen=True)
class LayerPlan:
    name: str
    d_in: int
    d_out: int
    rank: int | None  # None: stays dense
    why: str  # how the rank was chosen, or why the layer stays dense

    @property
    def dense_params(self) -> int:
        return self.d_in * self.d_out

    @property
    def lowrank_params(self) -> int:
        return self.dense_params if self.rank is None else self.rank * (self.d_in + self.d_out)


@dataclass
class Plan:
    layers: list[LayerPlan] = field(default_factory=list)

    @property
    def ranks(self) -> dict[str, int]:
        return {p.name: p.rank for p in self.layers if p.rank is not None}

    @property
    def dense(self) -> dict[str, str]:
        return {p.name: p.why for p in self.layers if p.rank is None}

    def without(self, names: dict[str, str]) -> "Plan":
        """The same plan with `names` kept dense, each for the given reason."""
        return Plan([
            LayerPlan(p.name, p.d_in, p.d_out, None, names[p.name]) if p.name in names else p for p in self.layers
        ])


def pela_rank(d_in: int, d_out: int, kappa: float, multiple: int = 1) -> int:
    """PELA's rank rule (section 3.5), rounded down to a multiple of `multiple`.

    r = floor(d_in*d_out / (kappa*(d_in+d_out))) makes the low-rank pair kappa times smaller than the dense
    weight; rounding down keeps the ratio at least kappa and the GEMMs on the tensor-core path.
    """
    r = math.floor(d_in * d_out / (kappa * (d_in + d_out)))
    return (r // multiple) * multiple


def saves_params(d_in: int, d_out: int, rank: int) -> bool:
    return 0 < rank and rank * (d_in + d_out) < d_in * d_out


def _compile(patterns: list[str], option: str) -> list[re.Pattern]:
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise UsageError(f"{option} '{p}' is not a valid regular expression ({e}): fix the pattern") from None
    return compiled


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


def select_targets(model: nn.Module, include: list[str] | None = None, exclude: list[str] | None = None) -> list[str]:
    """Names of the linears to factorize: `include` (regex full match) or the block linears, minus `exclude`.

    Exclude wins over include. Every pattern must match at least one linear, so a typo never silently
    compresses the wrong layers (or none).
    """
    linears = linear_names(model)
    inc = _compile(include or [], "--include")
    exc = _compile(exclude or [], "--exclude")
    for option, patterns in (("--include", inc), ("--exclude", exc)):
        for p in patterns:
            if not any(p.fullmatch(n) for n in linears):
                example = linears[0] if linears else "(the model has no nn.Linear)"
                raise UsageError(
                    f"{option} '{p.pattern}' matches no nn.Linear of the model (patterns match whole module "
                    f"names, e.g. '{example}'): fix the pattern; 'lrc report MODEL --per-layer' lists the names"
                )
    chosen = [n for n in linears if any(p.fullmatch(n) for p in inc)] if inc else block_linear_names(model)
    return [n for n in chosen if not any(p.fullmatch(n) for p in exc)]


def parse_rank_patterns(items: list[str] | None) -> list[tuple[re.Pattern, int]]:
    parsed = []
    for item in items or []:
        pattern, sep, value = item.rpartition("=")
        if not sep or not pattern:
            raise UsageError(f"--rank-pattern '{item}' is not REGEX=RANK: write e.g. 'blocks\\.0\\..*=64'")
        try:
            rank = int(value)
        except ValueError:
            raise UsageError(f"--rank-pattern '{item}': rank '{value}' is not a whole number") from None
        if rank < 1:
            raise UsageError(f"--rank-pattern '{item}': the rank must be at least 1")
        parsed.append((_compile([pattern], "--rank-pattern")[0], rank))
    return parsed


def make_plan(
    model: nn.Module,
    *,
    kappa: float = 2.0,
    rank_multiple: int = 8,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    rank_pattern: list[str] | None = None,
) -> Plan:
    """Rank of every target linear: an explicit `--rank-pattern` (first match wins) or PELA's rule."""
    if not isinstance(kappa, (int, float)) or not math.isfinite(kappa) or kappa <= 1:
        raise UsageError(f"kappa must be a number > 1 (the compression ratio of each layer), got {kappa}")
    if rank_multiple < 1:
        raise UsageError(f"--rank-multiple must be >= 1, got {rank_multiple}")
    targets = select_targets(model, include, exclude)
    patterns = parse_rank_patterns(rank_pattern)
    unused = {p.pattern for p, _ in patterns}
    layers = []
    for name in targets:
        linear = model.get_submodule(name)
        d_in, d_out = linear.in_features, linear.out_features
        explicit = next(((p, r) for p, r in patterns if p.fullmatch(name)), None)
        if explicit is not None:
            unused.discard(explicit[0].pattern)
            rank, why = explicit[1], f"--rank-pattern {explicit[0].pattern}"
            if rank > min(d_in, d_out):
                raise UsageError(
                    f"--rank-pattern gives {name} rank {rank}, above its full rank {min(d_in, d_out)} "
                    f"({d_out}x{d_in}): lower it"
                )
        else:
            rank, why = pela_rank(d_in, d_out, kappa, rank_multiple), f"kappa {kappa:g}, multiple {rank_multiple}"
        if not saves_params(d_in, d_out, rank):
            layers.append(LayerPlan(name, d_in, d_out, None, f"dense: rank {rank} would not reduce parameters"))
        else:
            layers.append(LayerPlan(name, d_in, d_out, rank, why))
    if unused:
        raise UsageError(
            f"--rank-pattern '{sorted(unused)[0]}' matches no target layer: fix the pattern (targets look like "
            f"'{targets[0] if targets else '?'}')"
        )
    return Plan(layers)
