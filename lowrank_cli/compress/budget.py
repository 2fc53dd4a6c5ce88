"""Rank allocation under a global budget: spend parameters (or MACs) where they keep the most energy.

Objective. Each layer's kept energy is normalised to its own total (sum of its kept sigma^2 over all its
sigma^2, 1 when dense), and the sum over layers is maximised, i.e. the sum of relative squared errors is
minimised. Normalising stops layers with a large weight norm from taking the whole budget: an error that is
1% of a layer's output matters about as much in any layer, whatever its scale. With whitened spectra
(data-aware SVD) the terms are relative output errors on the calibration inputs.

Choices per layer: dense (None: full cost, energy 1) or a rank r = k*rank_multiple with
r*(d_in + d_out) < d_in*d_out; a rank that saves nothing is never chosen since dense is then better.

Allocation. Every layer starts at rank `rank_multiple` (or dense when no rank saves), then a greedy with a
lazy max-heap repeatedly takes the move with the best gain per unit cost among all layers. A layer's move
goes from its current choice to the later choice (larger rank, or dense) with the best gain/cost, among those
that fit the remaining budget. As singular values are non-increasing, the steps between ranks have
non-increasing gains (concave), so the best move is normally the next rank_multiple; the jump to dense is the
exception (it keeps the whole tail for the cost of about one step), and comparing the slope to every later
choice treats it as a move on the layer's concave hull: taken when it beats the other layers' next steps, and
replaced by smaller steps once it no longer fits. This is exact for the fractional problem and near-optimal
for the integer one; a 1-exchange repair pass (step one layer down, refill greedily, keep it if the energy
rises) then spends what a coarse step left over. Moves that keep no energy are not taken, so the result may
cost less than the budget.

Budget: keep_fraction in (0, 1) of the dense cost of these layers (the dense parameters when cost_per_param
is 1), or an absolute target_cost = sum of cost_per_param * params. A budget below every layer at rank
rank_multiple is a UsageError; a budget at or above the dense cost keeps every layer dense (nothing is lost).

`budget_plan` applies this to a model's plan: the layers' spectra (whitened ones when calibration statistics
are given), their cost per parameter (1, or the tokens each sees for a MAC target: `tokens_per_layer`), and
the plan with the allocated ranks.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lowrank_cli.compress.calibration import InputStats
from lowrank_cli.compress.plan import LayerPlan, LayerStatus, Plan, pela_rank, saves_params
from lowrank_cli.compress.svd import compute_dtype
from lowrank_cli.compress.whitened_svd import whitened_spectrum
from lowrank_cli.errors import UsageError


@dataclass(frozen=True)
class LayerSpectrum:
    d_in: int
    d_out: int
    singular_values: torch.Tensor | Sequence[float]  # descending; whitened ones under calibration
    cost_per_param: float = 1.0  # 1 for a parameter budget; e.g. tokens seen for a MAC budget

    def __post_init__(self) -> None:
        if self.d_in < 1 or self.d_out < 1 or not self.cost_per_param > 0:
            raise UsageError(
                f"a layer needs positive sizes and cost per parameter, got d_in={self.d_in}, d_out={self.d_out}, "
                f"cost_per_param={self.cost_per_param}: leave out layers that never run"
            )

    @property
    def dense_params(self) -> int:
        return self.d_in * self.d_out


def _params(layer: LayerSpectrum, rank: int | None) -> int:
    return layer.dense_params if rank is None else rank * (layer.d_in + layer.d_out)


def _energy_curve(layer: LayerSpectrum) -> list[float]:
    """curve[r] = kept share of the energy at rank r (0 <= r <= min(d_in, d_out))."""
    s = torch.as_tensor(layer.singular_values, dtype=torch.float64).flatten()
    e = s.square().sort(descending=True).values  # concave energy curve, whatever order was given
    total = float(e.sum())
    n = min(layer.d_in, layer.d_out)
    if total <= 0:  # a zero weight loses nothing at any rank
        return [1.0] * (n + 1)
    cum = [0.0, *(torch.cumsum(e, 0) / total).tolist()]
    return (cum + [1.0] * (n + 1))[: n + 1]


def budget_cost(layers: Mapping[str, LayerSpectrum], ranks: Mapping[str, int | None]) -> float:
    """sum of cost_per_param * params over the layers (None or missing: dense)."""
    return sum(layer.cost_per_param * _params(layer, ranks.get(n)) for n, layer in layers.items())


def kept_energy(layers: Mapping[str, LayerSpectrum], ranks: Mapping[str, int | None]) -> float:
    """The objective: sum over layers of the normalised kept energy (a dense layer counts 1)."""
    total = 0.0
    for n, layer in layers.items():
        r = ranks.get(n)
        total += 1.0 if r is None else _energy_curve(layer)[min(r, layer.d_in, layer.d_out)]
    return total


def uniform_ranks(
    layers: Mapping[str, LayerSpectrum], kappa: float, rank_multiple: int = 8
) -> dict[str, int | None]:
    """PELA's per-layer rule r = floor(d_in*d_out / (kappa*(d_in+d_out))), rounded down to the multiple;
    None where that rank would not save parameters."""
    if not kappa > 1:
        raise UsageError(f"`kappa` must be > 1 (the compression ratio), got {kappa}")
    out: dict[str, int | None] = {}
    for n, layer in layers.items():
        r = pela_rank(layer.d_in, layer.d_out, kappa, rank_multiple)
        out[n] = r if saves_params(layer.d_in, layer.d_out, r) else None
    return out


Choices = tuple[list[int | None], list[float], list[float]]  # ranks (None: dense), costs, kept energies
Options = dict[str, Choices]


def _choices(layer: LayerSpectrum, m: int) -> Choices:
    """The layer's choices in increasing cost (ranks, then dense), with their costs and kept energies."""
    curve = _energy_curve(layer)
    ranks: list[int | None] = []
    r = m
    while saves_params(layer.d_in, layer.d_out, r):
        ranks.append(r)
        r += m
    ranks.append(None)
    costs = [layer.cost_per_param * _params(layer, r) for r in ranks]
    energies = [1.0 if r is None else curve[r] for r in ranks]
    return ranks, costs, energies


def allocate_ranks(
    layers: Mapping[str, LayerSpectrum],
    *,
    keep_fraction: float | None = None,
    target_cost: float | None = None,
    rank_multiple: int = 8,
) -> dict[str, int | None]:
    """Ranks (None: dense) that maximise the total normalised kept energy within the budget; see the module
    docstring for the rule. Check the result with budget_cost and kept_energy."""
    if (keep_fraction is None) == (target_cost is None):
        raise UsageError("give exactly one budget: a keep fraction or a target cost")
    if rank_multiple < 1:
        raise UsageError(f"rank multiple must be at least 1, got {rank_multiple}")
    dense = sum(layer.cost_per_param * layer.dense_params for layer in layers.values())
    if keep_fraction is not None:
        if not 0 < keep_fraction < 1:
            raise UsageError(f"keep fraction must be in (0, 1), got {keep_fraction}: e.g. 0.5 keeps half")
        target = keep_fraction * dense
    else:
        target = float(target_cost)
        if not target > 0:
            raise UsageError(f"target cost must be positive, got {target_cost}")
    if target >= dense:
        return {n: None for n in layers}

    options = {n: _choices(layer, rank_multiple) for n, layer in layers.items()}
    at = dict.fromkeys(layers, 0)  # index of each layer's current choice
    minimum = sum(costs[0] for _, costs, _ in options.values())
    if minimum > target * (1 + 1e-12):
        raise UsageError(
            f"target unreachable: the budget {target:.6g} is below the minimum {minimum:.6g} "
            f"(every layer at rank {rank_multiple}); raise the budget or lower the rank multiple"
        )
    slack = 1e-12 * dense  # float rounding in the cost sums
    at = _repair(options, at, _fill(options, at, target - minimum + slack))
    return {n: options[n][0][at[n]] for n in layers}


def _repair(options: dict, at: dict[str, int], left: float) -> dict[str, int]:
    """Integer effects: a greedy step can leave budget that no next step fits. Repair by local search, keeping
    a change only if the total energy rises: (a) step one layer down and refill greedily without it;
    (b) move one layer up (next rank or dense), step others down (least loss per freed cost first) until
    the budget holds again, then refill."""
    def total(state: dict[str, int]) -> float:
        return sum(options[n][2][i] for n, i in state.items())

    energy, improved = total(at), True
    while improved:
        improved = False
        for a in options:
            costs = options[a][1]
            trials = []
            if at[a] > 0:
                trial = dict(at)
                trial[a] -= 1
                trials.append((trial, left + costs[at[a]] - costs[at[a] - 1], a))
            for j in sorted({min(at[a] + 1, len(costs) - 1), len(costs) - 1} - {at[a]}):
                trial = dict(at)
                trial[a] = j
                trials.append((trial, _drop(options, trial, left - (costs[j] - costs[at[a]]), a), None))
            for trial, trial_left, frozen in trials:
                if trial_left < 0:
                    continue
                trial_left = _fill(options, trial, trial_left, frozen=frozen)
                if total(trial) > energy + 1e-12:
                    at, left, energy, improved = trial, trial_left, total(trial), True
                    break
    return at


def _fill(options: Options, at: dict[str, int], left: float, frozen: str | None = None) -> float:
    """Greedy with a lazy max-heap: take the affordable move with the best gain per unit cost until none is
    left. Updates `at` in place and returns the budget left."""

    def best_move(name: str) -> tuple[float, int] | None:
        # The rank steps are concave, so the next rank beats every later rank; only dense can beat it.
        _, costs, energies = options[name]
        i = at[name]
        best = None
        for j in sorted({min(i + 1, len(costs) - 1), len(costs) - 1} - {i}):
            cost, gain = costs[j] - costs[i], energies[j] - energies[i]
            if cost <= left and gain > 0 and (best is None or gain / cost > best[0]):
                best = (gain / cost, j)
        return best

    heap = []
    for n in options:
        move = best_move(n) if n != frozen else None
        if move is not None:
            heap.append((-move[0], n, move[1]))
    heapq.heapify(heap)
    while heap:
        _, n, j = heapq.heappop(heap)
        costs = options[n][1]
        if costs[j] - costs[at[n]] <= left:
            left -= costs[j] - costs[at[n]]
            at[n] = j
        # Else stale (the budget shrank since it was computed): the best affordable move can only be worse.
        move = best_move(n)
        if move is not None:
            heapq.heappush(heap, (-move[0], n, move[1]))
    return left


def _drop(options: Options, at: dict[str, int], left: float, frozen: str) -> float:
    """Step layers other than `frozen` down, least energy lost per cost freed first, until `left` >= 0.
    Updates `at` in place and returns the budget left (still < 0 when that is impossible)."""

    def down(name: str) -> tuple[float, str] | None:
        _, costs, energies = options[name]
        i = at[name]
        if i == 0 or name == frozen:
            return None
        return (energies[i] - energies[i - 1]) / (costs[i] - costs[i - 1]), name

    heap = [m for m in map(down, options) if m is not None]
    heapq.heapify(heap)
    while left < 0 and heap:
        _, n = heapq.heappop(heap)
        costs = options[n][1]
        left += costs[at[n]] - costs[at[n] - 1]
        at[n] -= 1
        move = down(n)
        if move is not None:
            heapq.heappush(heap, move)
    return left


# ------------------------------------------------------------------------------------------------ on a model


def tokens_per_layer(model: nn.Module, names: list[str], input_size: tuple[int, ...]) -> tuple[dict[str, float], int]:
    """How many rows each linear sees per image (MACs / (d_in * d_out), from fvcore), and the model's MACs."""
    from lowrank_cli.evaluation.counting import count_macs

    macs = count_macs(model, input_size)
    tokens = {}
    for name in names:
        layer = model.get_submodule(name)
        tokens[name] = macs.by_module.get(name, 0) / (layer.in_features * layer.out_features)
    return tokens, macs.total


def budget_plan(
    model: nn.Module,
    plan: Plan,
    *,
    keep_fraction: float | None = None,
    target_macs: int | None = None,
    rank_multiple: int = 8,
    stats: dict[str, InputStats] | None = None,
    input_size: tuple[int, ...] | None = None,
) -> tuple[Plan, dict]:
    """Per-layer ranks keeping the most (whitened) spectral energy within the budget.

    Candidates are the plan's target layers, except those it must keep dense for a reason other than the
    rank rule (e.g. linears the model does not call). Returns the plan and a JSON-ready summary. Errors name
    `factorize`'s parameters (`keep_fraction` is its `budget`).
    """
    if (keep_fraction is None) == (target_macs is None):
        raise UsageError("give one of `budget` (fraction of parameters to keep) or `target_macs`")
    if keep_fraction is not None and not 0 < keep_fraction < 1:
        raise UsageError(f"`budget` must be in (0, 1) (the fraction of the target layers' parameters to keep), "
                         f"got {keep_fraction}")
    candidates = [p for p in plan.layers if p.status in (LayerStatus.FACTORIZED, LayerStatus.DENSE_NO_SAVING)]
    cost_per_param: dict[str, float] = dict.fromkeys((p.name for p in candidates), 1.0)
    target_cost = None
    summary: dict = {"keep_fraction": keep_fraction, "target_macs": target_macs}
    if target_macs is not None:
        cost_per_param, target_cost, summary["dense_macs"] = _macs_budget(model, candidates, target_macs, input_size)
    spectra = _spectra(model, candidates, cost_per_param, stats)
    try:
        ranks = allocate_ranks(spectra, keep_fraction=keep_fraction, target_cost=target_cost,
                               rank_multiple=rank_multiple)
    except UsageError as e:
        raise UsageError(f"{e} (for `budget` / `target_macs`)") from None
    why = "budget" + (" on whitened spectra" if stats is not None else "")
    allocated = {}
    for p in candidates:
        r = ranks[p.name]
        allocated[p.name] = (LayerPlan(p.name, p.d_in, p.d_out, r, why, LayerStatus.FACTORIZED) if r else
                             LayerPlan(p.name, p.d_in, p.d_out, None, f"dense: {why} keeps it whole",
                                       LayerStatus.DENSE_BUDGET))
    summary["cost"] = budget_cost(spectra, ranks)
    return Plan([allocated.get(p.name, p) for p in plan.layers]), summary


def _macs_budget(model: nn.Module, candidates: list[LayerPlan], target_macs: int,
                 input_size: tuple[int, ...] | None) -> tuple[dict[str, float], float, int]:
    """Cost per parameter (tokens seen) of each candidate, the MACs left to them under `target_macs`, and the
    dense model's MACs."""
    from lowrank_cli.models.inputs import default_input_size

    size = tuple(input_size or default_input_size(model))
    cost_per_param, total = tokens_per_layer(model, [p.name for p in candidates], size)
    layer_macs = sum(cost_per_param[p.name] * p.dense_params for p in candidates)
    target_cost = target_macs - (total - layer_macs)  # what is left for the factorizable layers
    if target_cost <= 0:
        raise UsageError(
            f"`target_macs` {target_macs:,} is unreachable: the layers that stay dense alone take "
            f"{total - layer_macs:,.0f} MACs; raise the target"
        )
    return cost_per_param, target_cost, total


def _spectra(model: nn.Module, candidates: list[LayerPlan], cost_per_param: dict[str, float],
             stats: dict[str, InputStats] | None) -> dict[str, LayerSpectrum]:
    """Each candidate's singular values: of its weight, or whitened by its calibration inputs."""
    spectra = {}
    for p in candidates:
        weight = model.get_submodule(p.name).weight
        if stats is not None:
            sv = whitened_spectrum(weight, stats[p.name].second_moment)
        else:
            sv = torch.linalg.svdvals(weight.detach().to(compute_dtype(weight.dtype))).float().cpu()
        spectra[p.name] = LayerSpectrum(p.d_in, p.d_out, sv, cost_per_param[p.name])
    return spectra
