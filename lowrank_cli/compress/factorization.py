"""Factorize: replace each planned nn.Linear by the truncated SVD of its weight (a LowRankLinear), in place.

`factorize` runs the method's steps in order, each its own function: the plan (rank rule, or a plan given),
the linears the model never calls kept dense, calibration (data-aware truncation), a rank budget, a speed plan,
the SVD swap of every planned layer, and the record the model carries for `lowrank_cli.save`. Loading a MODEL
source and writing the checkpoint is `compress.factorize_source`'s.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowrank_cli.checkpoint.format import CheckpointInfo, attach_info, info_of
from lowrank_cli.compress.budget import budget_plan
from lowrank_cli.compress.calibration import InputStats, calibrate, calibration_windows, data_aware_factor_fn
from lowrank_cli.compress.factorize_options import Calibration, FactorizeOptions, Ranking, Targets, Truncation
from lowrank_cli.compress.plan import LayerStatus, Plan, check_left, check_planned, make_plan
from lowrank_cli.compress.sequential import sequential_calibration, stack_of
from lowrank_cli.compress.speed_plan import parse_rank_multiple, run_dtype, speed_plan
from lowrank_cli.compress.svd import Factors, linalg_threads, truncated_svd
from lowrank_cli.devices import resolve_device, resolve_dtype
from lowrank_cli.errors import InputError, UsageError
from lowrank_cli.evaluation.counting import count_params
from lowrank_cli.layers.lowrank_linear import LowRankLinear
from lowrank_cli.models.build import spec_of
from lowrank_cli.models.families import family_of
from lowrank_cli.models.fusion import resolve_fused
from lowrank_cli.models.inputs import default_input_size
from lowrank_cli.models.spec import ModelSpec
from lowrank_cli.models.structure import swap_in, uncalled_linears

FactorFn = Callable[[str, torch.Tensor, int], Any]  # (name, weight, rank) -> an object shaped like svd.Factors


@dataclass
class LayerResult:
    name: str
    d_in: int
    d_out: int
    rank: int
    kept_energy: float
    rel_error: float
    method: str


@dataclass
class FactorizeResult:
    model: nn.Module
    plan: Plan
    layers: list[LayerResult] = field(default_factory=list)
    dense: dict[str, str] = field(default_factory=dict)  # target linears left dense, and why
    params_before: int = 0
    params_after: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # calibration and budget details

    @property
    def max_rel_error(self) -> float:
        return max((r.rel_error for r in self.layers), default=0.0)

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary (the `--json` output of `lrc factorize`)."""
        groups: dict[str, list[int]] = {}
        for r in self.layers:
            groups.setdefault(r.name.rsplit(".", 1)[-1], []).append(r.rank)
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "compression": self.params_before / max(self.params_after, 1),
            "factorized": len(self.layers),
            "ranks_by_group": {g: sorted(set(v)) for g, v in groups.items()},
            "max_rel_error": self.max_rel_error,
            "left_dense": self.dense,
            "seconds": round(self.seconds, 3),
            "layers": [vars(r) for r in self.layers],
            **self.extra,
        }


def factorize(
    model: nn.Module,
    *,
    targets: Targets | None = None,
    ranking: Ranking | None = None,
    truncation: Truncation | None = None,
    calibration: Calibration | None = None,
    plan: Plan | None = None,
    input_size: tuple[int, ...] | None = None,
    check_calls: bool = True,
    factor_fn: FactorFn | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    calib_progress: Callable[[int, int], None] | None = None,
    warn: Callable[[str], None] | None = None,
    log: Callable[[str], None] | None = None,
    **keywords: Any,
) -> FactorizeResult:
    """`lowrank_cli.factorize(model, kappa=2)`: swap the planned linears of `model` for low-rank ones, in place.

    What to factorize, how to rank and truncate, and the calibration data are compress.factorize_options's
    `targets`, `ranking`, `truncation` and `calibration`, or their fields as keywords (`kappa=2` is
    `ranking=Ranking(kappa=2)`; `ratio=0.4` removes 40 % of the target layers' parameters, kappa 1 / (1 - 0.4)).
    `plan` replaces the rank rule (compress.plan); a plan that factorizes nothing is an error that says why;
    linears the model never calls as modules stay dense, with a warning; `factor_fn(name, weight, rank)`
    (returning an object shaped like `svd.Factors`) replaces the plain SVD; every step runs at `input_size`
    (default: the model's; a causal LM calibrates on windows of that many tokens). `calib_mode` sequential (a
    causal LM's default) calibrates each decoder layer on what the compressed layers before it give
    (compress.sequential); `log(msg)` hears what it holds. Returns the model (also `result.model`) with per-layer
    errors; the model carries its record for `lowrank_cli.save`.
    """
    opts = FactorizeOptions.of(targets, ranking, truncation, calibration, **keywords)
    opts.check()
    r, t = opts.ranking, opts.truncation
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=3))  # 3: the line of factorize that ran the step
    start = time.perf_counter()
    setup = plan_step(model, opts, plan, input_size, check_calls, warn, calib_progress)
    plan, run, size, multiple, dev = setup.plan, setup.run, setup.size, setup.multiple, setup.device
    extra: dict[str, Any] = {}
    stats = None
    if run is not None and run.mode == "parallel":
        stats, extra["calibration"] = calibration_step(model, plan, run)
        factor_fn = factor_fn or data_aware_factor_fn(stats)
    if r.budgets:
        plan, extra["budget"] = budget_plan(model, plan, keep_fraction=r.budget, target_macs=r.target_macs,
                                            rank_multiple=multiple, stats=stats, input_size=size)
    timings = None
    if r.plan_kind == "speed":
        plan, timings, extra["speed_plan"] = _speed_step(model, plan, dev, setup.runs_in, size, r.plan_batch_size,
                                                         r.plan_fused)
    note = check_left(plan)
    if note:
        warn(note)
    result = FactorizeResult(model, plan, params_before=count_params(model).total, dense=plan.dense, extra=extra)
    swap = Swap(factor_fn=factor_fn, svd=t.method, device=dev, dtype=setup.out_dtype, progress=progress)
    if run is not None and run.mode == "sequential":
        spectra, extra["calibration"] = sequential_step(model, plan, result, run, swap, log)
    else:
        spectra = swap_planned(model, plan, result.layers, swap)
    result.params_after = count_params(model).total
    result.seconds = time.perf_counter() - start
    record(model, result, spectra, timings, opts, setup)
    return result


@dataclass
class Setup:
    """What one factorize call works out before any SVD: the plan, the calibration run, the input size, the rank
    multiple, where the SVDs run, the storage dtype and the dtype the plan times in."""

    plan: Plan
    run: _Calib | None
    size: tuple[int, ...] | None
    multiple: int | str
    device: torch.device
    out_dtype: torch.dtype | None
    runs_in: torch.dtype


def plan_step(model: nn.Module, opts: FactorizeOptions, plan: Plan | None, input_size: tuple[int, ...] | None,
              check_calls: bool, warn: Callable[[str], None],
              calib_progress: Callable[[int, int], None] | None) -> Setup:
    """The steps before the SVDs that need shapes only (a model on the meta device will do): the plan (rank rule
    or given), checked; the calibration settings; the linears the model never calls, kept dense."""
    r, t, cal = opts.ranking, opts.truncation, opts.calibration
    family_of(model).prepare(model)  # GPT-2's Conv1D as nn.Linear, no KV cache: also for a model made elsewhere
    dev, out_dtype = resolve_device(t.device), resolve_dtype(t.dtype)
    runs_in = run_dtype(r.plan_dtype, out_dtype, dev, next(model.parameters()).dtype)
    if r.plan_kind == "speed":
        resolve_fused(r.plan_fused, dev, parameter="plan_fused")  # `plan_fused=True` without CUDA: before the SVDs
    multiple = r.rank_multiple if plan is not None else parse_rank_multiple(r.rank_multiple, dev, runs_in)
    plan = plan or make_plan(model, kappa=r.per_layer_kappa, rank_multiple=multiple, include=opts.targets.include,
                             exclude=opts.targets.exclude, rank_pattern=opts.targets.rank_pattern)
    check_planned(model, plan, kappa=r.per_layer_kappa, rank_multiple=multiple if isinstance(multiple, int) else 1,
                  exclude=opts.targets.exclude)
    size = _input_size(model, input_size, check_calls or bool(r.budgets) or r.plan_kind == "speed"
                       or cal.calib is not None)
    run = _calibration(model, cal, size, dev, calib_progress, budgeted=bool(r.budgets))
    if check_calls:
        plan = _keep_uncalled_dense(model, plan, size, warn)
    return Setup(plan, run, size, multiple, dev, out_dtype, runs_in)


def record(model: nn.Module, result: FactorizeResult, spectra: dict[str, list[float]], timings: dict | None,
           opts: FactorizeOptions, setup: Setup) -> None:
    """Attach the run's record to the model (what `lowrank_cli.save` writes)."""
    r = opts.ranking
    _record(model, result, spectra, timings, kappa=None if "budget" in result.extra else r.per_layer_kappa,
            ratio=r.ratio, rank_multiple=setup.multiple, asked_multiple=r.rank_multiple, plan_kind=r.plan_kind,
            svd="data-aware" if setup.run is not None else opts.truncation.method, dtype=setup.out_dtype)


def _input_size(model: nn.Module, input_size: tuple[int, ...] | None, needed: bool) -> tuple[int, ...] | None:
    """The input size every step of one factorize call works at, worked out once (None when no step needs it)."""
    if input_size is not None:
        return tuple(input_size)
    return default_input_size(model) if needed else None


def _speed_step(model: nn.Module, plan: Plan, dev: torch.device, runs_in: torch.dtype,
                input_size: tuple[int, ...] | None, batch_size: int | None,
                fused: bool | None) -> tuple[Plan, dict[str, Any], dict[str, Any]]:
    """The speed plan (default batch 256 on CUDA, 16 on the CPU): the plan, its timings, and their summary."""
    plan, timings = speed_plan(model, plan, device=dev, dtype=runs_in, input_size=input_size, fused=fused,
                               batch_size=batch_size if batch_size is not None else (256 if dev.type == "cuda" else 16))
    return plan, timings, {k: v for k, v in timings.items() if k != "layers"}


def _keep_uncalled_dense(model: nn.Module, plan: Plan, input_size: tuple[int, ...] | None,
                         warn: Callable[[str], None]) -> Plan:
    """The plan with the linears the model never calls as modules (F.linear on their weight) kept dense."""
    uncalled = uncalled_linears(model, list(plan.ranks), input_size)
    if not uncalled:
        return plan
    warn(
        f"{len(uncalled)} linear(s) are not called as modules by the model (it uses their weight directly, "
        f"e.g. F.linear): left dense: {', '.join(uncalled[:4])}{', ...' if len(uncalled) > 4 else ''}"
    )
    return plan.without({n: "dense: not called as a module (F.linear on its weight)" for n in uncalled},
                        LayerStatus.DENSE_UNCALLED)


@dataclass
class _Calib:
    """One call's calibration settings, checked before any work."""

    data: str
    mode: str  # "parallel" | "sequential"
    samples: int
    tokenizer: Any
    seq_len: int | None
    device: torch.device
    progress: Callable[[int, int], None] | None
    spill: bool | None = None  # where sequential calibration holds its hidden states (compress.layer_inputs)
    spill_dir: str | None = None


def calib_mode_of(model: nn.Module, cal: Calibration, *, budgeted: bool) -> str:
    """`calib_mode`, defaulting to the model family's (parallel when a rank budget needs every layer's statistics
    at once)."""
    mode = cal.calib_mode or family_of(model).calib_mode
    return "parallel" if mode == "sequential" and cal.calib_mode is None and budgeted else mode


def _calibration(model: nn.Module, cal: Calibration, input_size: tuple[int, ...] | None, device: torch.device,
                 progress: Callable[[int, int], None] | None, *, budgeted: bool) -> _Calib | None:
    """The calibration settings of this call, `calib_mode` defaulting to the model family's (parallel when a rank
    budget needs every layer's statistics at once); sequential on a model without a stack of decoder layers is
    refused here, before any pass over the data."""
    if cal.calib is None:
        return None
    mode = calib_mode_of(model, cal, budgeted=budgeted)
    if mode == "sequential":
        stack_of(model)
    elif cal.calib_spill is not None or cal.calib_spill_dir is not None:
        who = "a rank budget" if budgeted else f"{type(model).__name__} (its family's default)"
        raise UsageError(f"`calib_spill` and `calib_spill_dir` say where sequential calibration holds its hidden "
                         f"states, and {who} calibrates every layer in one pass (`calib_mode` parallel), which holds "
                         "none: drop them")
    seq_len = input_size[0] if input_size is not None and len(input_size) == 1 else None
    return _Calib(str(cal.calib), mode, cal.calib_samples, cal.tokenizer, seq_len, device, progress,
                  cal.calib_spill, None if cal.calib_spill_dir is None else str(cal.calib_spill_dir))


def calibration_step(model: nn.Module, plan: Plan, cal: _Calib) -> tuple[dict[str, InputStats], dict[str, Any]]:
    """Input statistics of the layers the plan factorizes, or that a rank budget may (those whose rank rule
    saves nothing), on `samples` of the data, in one pass; and the summary for the record."""
    started, samples, progress = time.perf_counter(), cal.samples, cal.progress
    names = plan.named(LayerStatus.FACTORIZED) + plan.named(LayerStatus.DENSE_NO_SAVING)
    stats = calibrate(model, names, cal.data, samples=samples, device=cal.device, tokenizer=cal.tokenizer,
                      seq_len=cal.seq_len, progress=(lambda n: progress(n, samples)) if progress else None)
    first = next(iter(stats.values()), None)
    return stats, {"data": cal.data, "mode": "parallel", "samples": first.samples if first else 0,
                   "tokens": first.tokens if first else 0, "seconds": round(time.perf_counter() - started, 2)}


def sequential_step(model: nn.Module, plan: Plan, result: FactorizeResult, cal: _Calib, swap: Swap,
                    log: Callable[[str], None] | None,
                    layer_scope: Any = None) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Calibrate and factorize the decoder layers one at a time (compress.sequential; `layer_scope(i, layer)`, a
    context manager around each layer's turn, see there); the spectra and the summary for the record."""
    windows = calibration_windows(model, cal.data, samples=cal.samples, seq_len=cal.seq_len, tokenizer=cal.tokenizer)
    spectra: dict[str, list[float]] = {}
    planned = {p.name: p for p in plan.layers}

    def factorize_layer(names: list[str], stats: dict[str, InputStats]) -> None:
        layer_swap = dataclasses.replace(swap, factor_fn=swap.factor_fn or data_aware_factor_fn(stats), dtype=None,
                                         offset=len(result.layers), total=len(plan.ranks))
        spectra.update(swap_planned(model, Plan([planned[n] for n in names]), result.layers, layer_swap))

    summary = sequential_calibration(model, plan.named(LayerStatus.FACTORIZED), windows, factorize_layer,
                                     device=cal.device, progress=cal.progress, log=log, layer_scope=layer_scope,
                                     spill=cal.spill, spill_dir=cal.spill_dir)
    if swap.dtype is not None and swap.cast_model:  # stored in `dtype` at the end: every layer ran in the model's own dtype until then
        model.to(swap.dtype)
    return spectra, {"data": cal.data, **summary}


@dataclass
class Swap:
    """How planned linears become low-rank layers: the factors (`factor_fn`, else the plain SVD `svd` on `device`),
    the storage dtype (None: each weight's), progress over `total` layers of which `offset` are done."""

    factor_fn: FactorFn | None
    svd: str
    device: torch.device
    dtype: torch.dtype | None
    progress: Callable[[str, int, int], None] | None
    offset: int = 0
    total: int | None = None
    cast_model: bool = True  # False: the caller casts each layer's tensors itself (streaming writes them out)


def swap_planned(model: nn.Module, plan: Plan, results: list[LayerResult], swap: Swap) -> dict[str, list[float]]:
    """Swap every planned linear for its LowRankLinear (stored in `swap.dtype`, default the weight's), appending
    each layer's result to `results`; returns the singular values of each."""
    spectra: dict[str, list[float]] = {}
    total = swap.total or len(plan.ranks)
    for done, (name, rank) in enumerate(plan.ranks.items(), swap.offset + 1):
        linear = model.get_submodule(name)
        weight = linear.weight
        with linalg_threads(weight.shape, swap.device):
            factors = (swap.factor_fn(name, weight, rank) if swap.factor_fn else
                       truncated_svd(weight, rank, method=swap.svd, device=swap.device))
        swap_in(model, name, _lowrank_of(linear, factors, rank, name, swap.dtype or weight.dtype))
        spectra[name] = factors.singular_values.tolist()
        results.append(LayerResult(name, linear.in_features, linear.out_features, rank,
                                   factors.kept_energy, factors.rel_error, factors.method))
        if swap.progress:
            swap.progress(name, done, total)
    if swap.dtype is not None and swap.cast_model:
        model.to(swap.dtype)
    return spectra


def _lowrank_of(linear: nn.Linear, factors: Factors, rank: int, name: str, dtype: torch.dtype) -> LowRankLinear:
    """The LowRankLinear holding `factors` (and the bias) of `linear`, in its training mode."""
    if not (torch.isfinite(factors.first).all() and torch.isfinite(factors.second).all()):
        raise InputError(f"the SVD of {name} is not finite: the weights hold NaN or Inf; check the source model")
    layer = LowRankLinear(linear.in_features, linear.out_features, rank, bias=linear.bias is not None,
                          device=linear.weight.device, dtype=dtype)
    with torch.no_grad():
        layer.first.weight.copy_(factors.first)
        layer.second.weight.copy_(factors.second)
        if linear.bias is not None:
            layer.second.bias.copy_(linear.bias)
    layer.train(linear.training)
    return layer


def _record(model: nn.Module, result: FactorizeResult, spectra: dict[str, list[float]], timings: dict | None, *,
            kappa: float | None, ratio: float | None, rank_multiple: int | str, asked_multiple: int | str,
            plan_kind: str, svd: str, dtype: torch.dtype | None) -> None:
    """Attach the factorized model's record (`checkpoint.format.info_of`): what `lowrank_cli.save` writes."""
    info = info_of(model)
    spec = info.spec if info is not None else _describe(model)
    attach_info(model, CheckpointInfo(
        spec=spec,
        ranks={r.name: r.rank for r in result.layers},
        plan=timings,
        provenance={"kappa": kappa, **({"ratio": ratio} if ratio is not None else {}), "rank_multiple": rank_multiple,
                    **({"rank_multiple_asked": asked_multiple} if asked_multiple != rank_multiple else {}),
                    "plan": plan_kind,
                    "svd": svd,
                    "dtype": str(dtype or next(model.parameters()).dtype).removeprefix("torch."), **result.extra},
        layers={r.name: {k: v for k, v in vars(r).items() if k != "name"} for r in result.layers},
        dense=result.dense,
        spectra=spectra,
    ))


def _describe(model: nn.Module) -> ModelSpec:
    """How to rebuild the model; a model lrc cannot rebuild is still factorized (saving it is what fails)."""
    try:
        return spec_of(model)
    except UsageError:
        return ModelSpec(type(model).__name__, library="unknown")
