"""Factorize: replace each planned nn.Linear by the truncated SVD of its weight (a LowRankLinear), in place.

`factorize` runs the method's steps in order, each its own function: the plan (rank rule, or a plan given),
the linears the model never calls kept dense, calibration (data-aware truncation), a rank budget, a speed plan,
the SVD swap of every planned layer, and the record the model carries for `lowrank_cli.save`. Loading a MODEL
source and writing the checkpoint is `compress.factorize_source`'s.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowrank_cli.checkpoint.format import CheckpointInfo, attach_info, info_of
from lowrank_cli.compress.budget import budget_plan
from lowrank_cli.compress.calibration import InputStats, calibrate, data_aware_factor_fn
from lowrank_cli.compress.plan import LayerStatus, Plan, make_plan
from lowrank_cli.compress.speed_plan import parse_rank_multiple, run_dtype, speed_plan
from lowrank_cli.compress.svd import SVD_METHODS, Factors, linalg_threads, truncated_svd
from lowrank_cli.devices import resolve_device, resolve_dtype
from lowrank_cli.errors import InputError, UsageError
from lowrank_cli.evaluation.counting import count_params
from lowrank_cli.layers.lowrank_linear import LowRankLinear
from lowrank_cli.models.build import spec_of
from lowrank_cli.models.fusion import resolve_fused
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
    kappa: float | None = None,
    rank_multiple: int | str = 8,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    rank_pattern: list[str] | None = None,
    plan: Plan | None = None,
    svd: str | None = None,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = None,
    input_size: tuple[int, ...] | None = None,
    check_calls: bool = True,
    factor_fn: FactorFn | None = None,
    calib: str | None = None,
    calib_samples: int = 256,
    tokenizer: Any = None,
    budget: float | None = None,
    target_macs: int | None = None,
    plan_kind: str = "pela",
    plan_batch_size: int | None = None,
    plan_dtype: str | torch.dtype | None = None,
    plan_fused: bool | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    calib_progress: Callable[[int, int], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> FactorizeResult:
    """`lowrank_cli.factorize(model, kappa=2)`: swap the planned linears of `model` for low-rank ones, in place.

    The plan comes from `plan`, or from kappa / rank_multiple / include / exclude / rank_pattern (see
    `lowrank_cli.compress.plan`). Linears the model never calls as modules stay dense, with a warning.
    `factor_fn(name, weight, rank)` can replace the plain SVD (data-aware truncation); it returns an object shaped
    like `svd.Factors`. `calib` (an image folder; for a text model a .txt / .jsonl file or folder, tokenised by
    `tokenizer`, a tokenizer or the folder / Hub repo that has one) makes the truncation data-aware: it minimises
    each layer's output error on `calib_samples` of its images or texts. `budget` (fraction of the target layers'
    parameters to keep) or `target_macs` (MACs of the whole model) allocate ranks per layer instead of one kappa.
    `rank_multiple="auto"` picks the multiple the device likes; `plan_kind="speed"` times every layer shape dense vs
    factorized on the device (batch `plan_batch_size`, precision `plan_dtype`: default the stored dtype, else bf16
    on CUDA; `plan_fused`: with the fused CUDA kernel, see `speed_plan`'s `fused`) and
    keeps dense the layers whose factorized form is not faster. Returns the model (also
    `result.model`) with per-layer errors and kept energies; the model carries its record
    (`checkpoint.format.info_of`) for `lowrank_cli.save`.
    """
    kappa, svd = _check_options(kappa=kappa, svd=svd, budget=budget, target_macs=target_macs, calib=calib,
                                rank_pattern=rank_pattern, plan_kind=plan_kind, plan_batch_size=plan_batch_size,
                                plan_fused=plan_fused)
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=3))  # 3: the line of factorize that ran the step
    start = time.perf_counter()
    dev, out_dtype = resolve_device(device), resolve_dtype(dtype)
    runs_in = run_dtype(plan_dtype, out_dtype, dev, next(model.parameters()).dtype)
    if plan_kind == "speed":
        resolve_fused(plan_fused, dev, parameter="plan_fused")  # `plan_fused=True` without CUDA: before the SVDs
    multiple = rank_multiple if plan is not None else parse_rank_multiple(rank_multiple, dev, runs_in)
    plan = plan or make_plan(model, kappa=kappa, rank_multiple=multiple, include=include, exclude=exclude,
                             rank_pattern=rank_pattern)
    if check_calls:
        plan = _keep_uncalled_dense(model, plan, input_size, warn)
    extra: dict[str, Any] = {}
    stats = None
    if calib is not None:
        stats, extra["calibration"] = _calibration_step(model, plan, calib, calib_samples, dev, tokenizer,
                                                        calib_progress)
        factor_fn = factor_fn or data_aware_factor_fn(stats)
    if budget is not None or target_macs is not None:
        plan, extra["budget"] = budget_plan(model, plan, keep_fraction=budget, target_macs=target_macs,
                                            rank_multiple=multiple, stats=stats, input_size=input_size)
    timings = None
    if plan_kind == "speed":
        plan, timings, extra["speed_plan"] = _speed_step(model, plan, dev, runs_in, input_size, plan_batch_size,
                                                         plan_fused)
    result = FactorizeResult(model, plan, params_before=count_params(model).total, dense=plan.dense, extra=extra)
    spectra = _swap_planned(model, plan, result.layers, factor_fn=factor_fn, svd=svd, device=dev, dtype=out_dtype,
                            progress=progress)
    result.params_after = count_params(model).total
    result.seconds = time.perf_counter() - start
    _record(model, result, spectra, timings, kappa=None if "budget" in extra else kappa, rank_multiple=multiple,
            asked_multiple=rank_multiple, plan_kind=plan_kind, svd="data-aware" if stats is not None else svd,
            dtype=out_dtype)
    return result


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


def _calibration_step(model: nn.Module, plan: Plan, calib: str, samples: int, device: torch.device, tokenizer: Any,
                      progress: Callable[[int, int], None] | None) -> tuple[dict[str, InputStats], dict[str, Any]]:
    """Input statistics of the layers the plan factorizes, or that a rank budget may (those whose rank rule
    saves nothing), on `samples` of `calib`; and the summary for the record."""
    started = time.perf_counter()
    names = plan.named(LayerStatus.FACTORIZED) + plan.named(LayerStatus.DENSE_NO_SAVING)
    stats = calibrate(model, names, calib, samples=samples, device=device, tokenizer=tokenizer,
                      progress=(lambda n: progress(n, samples)) if progress else None)
    first = next(iter(stats.values()), None)
    return stats, {"data": str(calib), "samples": first.samples if first else 0, "tokens": first.tokens if first else 0,
                   "seconds": round(time.perf_counter() - started, 2)}


DEFAULT_KAPPA = 2.0


def _check_options(*, kappa, svd, budget, target_macs, calib, rank_pattern, plan_kind,
                   plan_batch_size, plan_fused=None) -> tuple[float, str]:
    """Refuse values and combinations that cannot work (never drop one silently); return kappa and svd with
    their defaults filled in."""
    budgets = [name for name, value in (("budget", budget), ("target_macs", target_macs)) if value is not None]
    conflicts = [
        (budgets and kappa is not None, f"`{budgets[0] if budgets else ''}` allocates the ranks per layer and `kappa` "
         "gives every layer one ratio: give one of them"),
        (len(budgets) == 2, "`budget` and `target_macs` both set the size: give one of them"),
        (budgets and rank_pattern, f"`{budgets[0] if budgets else ''}` allocates every rank, `rank_pattern` fixes "
         "some: give one of them"),
        (svd is not None and calib is not None, "`svd` picks the method of the plain SVD; with `calib` the "
         "truncation is data-aware: drop `svd`"),
        (svd is not None and svd not in SVD_METHODS, f"`svd` '{svd}' is not one of {', '.join(SVD_METHODS)}"),
        (plan_kind not in ("pela", "speed"), f"`plan_kind` '{plan_kind}' is not one of pela, speed"),
        (plan_fused is not None and plan_kind != "speed", "`plan_fused` says how `plan_kind=speed` times the layers: "
         "add `plan_kind=speed`, or drop it"),
        (plan_batch_size is not None and plan_batch_size < 1,
         f"`plan_batch_size` must be at least 1, got {plan_batch_size}"),
    ]
    for wrong, message in conflicts:
        if wrong:
            raise UsageError(message)
    return (DEFAULT_KAPPA if kappa is None else kappa), (svd or "exact")


def _swap_planned(model: nn.Module, plan: Plan, results: list[LayerResult], *, factor_fn: FactorFn | None, svd: str,
                  device: torch.device, dtype: torch.dtype | None,
                  progress: Callable[[str, int, int], None] | None) -> dict[str, list[float]]:
    """Swap every planned linear for its LowRankLinear (stored in `dtype`, default the weight's), appending each
    layer's result to `results`; returns the singular values of each."""
    spectra: dict[str, list[float]] = {}
    for done, (name, rank) in enumerate(plan.ranks.items(), 1):
        linear = model.get_submodule(name)
        weight = linear.weight
        with linalg_threads(weight.shape, device):
            factors = factor_fn(name, weight, rank) if factor_fn else truncated_svd(weight, rank, method=svd,
                                                                                    device=device)
        swap_in(model, name, _lowrank_of(linear, factors, rank, name, dtype or weight.dtype))
        spectra[name] = factors.singular_values.tolist()
        results.append(LayerResult(name, linear.in_features, linear.out_features, rank,
                                   factors.kept_energy, factors.rel_error, factors.method))
        if progress:
            progress(name, done, len(plan.ranks))
    if dtype is not None:
        model.to(dtype)
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
            kappa: float | None, rank_multiple: int | str, asked_multiple: int | str, plan_kind: str, svd: str,
            dtype: torch.dtype | None) -> None:
    """Attach the factorized model's record (`checkpoint.format.info_of`): what `lowrank_cli.save` writes."""
    info = info_of(model)
    spec = info.spec if info is not None else _describe(model)
    attach_info(model, CheckpointInfo(
        spec=spec,
        ranks={r.name: r.rank for r in result.layers},
        plan=timings,
        provenance={"kappa": kappa, "rank_multiple": rank_multiple,
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
