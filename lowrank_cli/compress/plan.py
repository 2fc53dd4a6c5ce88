"""Factorization plan: which linears become low-rank, and at what rank.

Pure: it reads module names and weight shapes, never tensor values, so it is cheap, testable on its own and
the same for every later step (SVD, data-aware truncation, rank budgets, speed plans).
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass, field

from torch import nn

from lowrank_cli.errors import InputError, UsageError
from lowrank_cli.models.families import family_of
from lowrank_cli.models.structure import compile_patterns, select_targets


class LayerStatus(enum.Enum):
    """What the plan does with a target linear; `LayerPlan.why` says it in words (the text checkpoints keep)."""

    FACTORIZED = "factorized"
    DENSE_NO_SAVING = "dense: no saving"  # its rank would not reduce parameters (a rank budget may still pick it)
    DENSE_UNCALLED = "dense: not called"  # the model uses its weight directly (F.linear), so a swap would not run
    DENSE_SLOWER = "dense: slower"  # the speed plan timed its factorized form no faster
    DENSE_BUDGET = "dense: budget"  # the rank budget keeps it whole
    DENSE_OTHER = "dense"  # kept dense for the reason given (a plan made by hand, Plan.without)


@dataclass(frozen=True)
class LayerPlan:
    name: str
    d_in: int
    d_out: int
    rank: int | None  # None: stays dense
    why: str  # how the rank was chosen, or why the layer stays dense
    status: LayerStatus | None = None  # default: FACTORIZED with a rank, DENSE_OTHER without

    def __post_init__(self) -> None:
        if self.status is None:
            object.__setattr__(self, "status", LayerStatus.DENSE_OTHER if self.rank is None else LayerStatus.FACTORIZED)
        if (self.status is LayerStatus.FACTORIZED) != (self.rank is not None):
            raise ValueError(f"layer {self.name}: status {self.status.name} does not fit rank {self.rank}")

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

    def named(self, *statuses: LayerStatus) -> list[str]:
        """The names of the layers with one of `statuses`, in plan order."""
        return [p.name for p in self.layers if p.status in statuses]

    def without(self, names: dict[str, str], status: LayerStatus = LayerStatus.DENSE_OTHER) -> Plan:
        """The same plan with `names` kept dense, each for the given reason, with `status`."""
        return Plan([
            LayerPlan(p.name, p.d_in, p.d_out, None, names[p.name], status) if p.name in names else p
            for p in self.layers
        ])


def pela_rank(d_in: int, d_out: int, kappa: float, multiple: int = 1) -> int:
    """PELA's rank rule (section 3.5), rounded down to a multiple of `multiple`.

    r = floor(d_in*d_out / (kappa*(d_in+d_out))) makes the low-rank pair kappa times smaller than the dense
    weight; rounding down keeps the ratio at least kappa and the GEMMs on the tensor-core path. A kappa from a
    `ratio` (1 / (1 - R)) is rarely exact in binary: the floor forgives the last bits (1e-9), so that R = 0.4 on
    a 20x20 layer gives the rank 6 it means, not 5.
    """
    r = math.floor(d_in * d_out / (kappa * (d_in + d_out)) + 1e-9)
    return (r // multiple) * multiple


def saves_params(d_in: int, d_out: int, rank: int) -> bool:
    return 0 < rank and rank * (d_in + d_out) < d_in * d_out


def check_planned(model: nn.Module, plan: Plan, *, kappa: float, rank_multiple: int,
                  exclude: list[str] | None = None) -> None:
    """A plan that factorizes nothing is an error that names the real why (a dense copy is not a result): no
    target layer exists (InputError, naming what the model's family looks for), `exclude` took them all, or every
    rank is too small or too large to save parameters (UsageError, naming what to change)."""
    if plan.ranks:
        return
    if not plan.layers:
        if exclude:
            raise UsageError("`exclude` leaves none of the target layers to factorize: narrow the pattern")
        family = family_of(model)
        raise InputError(f"{type(model).__name__} ({family.name}) has no layer to factorize: found no "
                         f"{family.targets_rule}; name the linears to factorize with `include` ('lrc report MODEL "
                         "--per-layer' lists them)")
    if all(p.status is LayerStatus.DENSE_NO_SAVING for p in plan.layers):
        big = max(plan.layers, key=lambda p: p.dense_params)
        rule = pela_rank(big.d_in, big.d_out, kappa)
        if rule < rank_multiple:
            raise UsageError(f"every target layer's rank is too small to save parameters: at `kappa` {kappa:g} the "
                             f"largest, {big.name} ({big.d_out}x{big.d_in}), gets rank {rule}, which `rank_multiple` "
                             f"{rank_multiple} rounds down to 0: lower `rank_multiple` (e.g. 1), or `kappa` (a "
                             "smaller `ratio`)")
        raise UsageError(f"every target layer's rank is too large to save parameters (e.g. {big.name}, "
                         f"{big.d_out}x{big.d_in}: {big.why.removeprefix('dense: ')}): give smaller ranks, or a "
                         "larger `kappa` / `ratio`")


def check_left(plan: Plan) -> str | None:
    """After the steps that keep layers dense. None when something is left to factorize; a plan whose every
    target is uncalled has nothing lrc can factorize (InputError); one that a measurement kept dense (the speed plan
    timed no layer faster, a rank budget at or above the dense cost) is a result, said in the returned warning."""
    if plan.ranks:
        return None
    statuses = {p.status for p in plan.layers}
    if statuses == {LayerStatus.DENSE_UNCALLED}:
        raise InputError("nothing to factorize: none of the target layers is called as a module (the model uses "
                         "their weights directly, e.g. F.linear), so a low-rank layer would never run")
    if LayerStatus.DENSE_SLOWER in statuses:
        return "no layer was factorized: `plan_kind=speed` timed none faster factorized; the output is the dense model"
    return "no layer was factorized: the rank budget keeps every target layer dense; the output is the dense model"


def parse_rank_patterns(items: list[str] | None) -> list[tuple[re.Pattern, int]]:
    parsed = []
    for item in items or []:
        pattern, sep, value = item.rpartition("=")
        if not sep or not pattern:
            raise UsageError(f"`rank_pattern` '{item}' is not REGEX=RANK: write e.g. 'blocks\\.0\\..*=64'")
        try:
            rank = int(value)
        except ValueError:
            raise UsageError(f"`rank_pattern` '{item}': rank '{value}' is not a whole number") from None
        if rank < 1:
            raise UsageError(f"`rank_pattern` '{item}': the rank must be at least 1")
        parsed.append((compile_patterns([pattern], "rank_pattern")[0], rank))
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
    """Rank of every target linear: an explicit `rank_pattern` REGEX=RANK (first match wins) or PELA's rule."""
    if not isinstance(kappa, (int, float)) or not math.isfinite(kappa) or kappa <= 1:
        raise UsageError(f"`kappa` must be a number > 1 (the compression ratio of each layer), got {kappa}")
    if rank_multiple < 1:
        raise UsageError(f"`rank_multiple` must be >= 1, got {rank_multiple}")
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
            rank, why = explicit[1], f"--rank-pattern {explicit[0].pattern}"  # the plan's reason text, kept as it was
            if rank > min(d_in, d_out):
                raise UsageError(
                    f"`rank_pattern` gives {name} rank {rank}, above its full rank {min(d_in, d_out)} "
                    f"({d_out}x{d_in}): lower it"
                )
        else:
            rank, why = pela_rank(d_in, d_out, kappa, rank_multiple), f"kappa {kappa:g}, multiple {rank_multiple}"
        if not saves_params(d_in, d_out, rank):
            layers.append(LayerPlan(name, d_in, d_out, None, f"dense: rank {rank} would not reduce parameters",
                                    LayerStatus.DENSE_NO_SAVING))
        else:
            layers.append(LayerPlan(name, d_in, d_out, rank, why))
    if unused:
        raise UsageError(
            f"`rank_pattern` '{sorted(unused)[0]}' matches no target layer: fix the pattern (targets look like "
            f"'{targets[0] if targets else '?'}')"
        )
    return Plan(layers)
