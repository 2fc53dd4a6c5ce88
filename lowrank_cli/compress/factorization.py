"""Factorize: replace each planned nn.Linear by the truncated SVD of its weight (a LowRankLinear), in place."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowrank_cli.checkpoint.format import CheckpointInfo, attach_info, info_of, record_source
from lowrank_cli.compress.plan import Plan, make_plan
from lowrank_cli.compress.svd import SVD_METHODS, truncated_svd
from lowrank_cli.devices import resolve_device, resolve_dtype
from lowrank_cli.errors import InputError, UsageError
from lowrank_cli.evaluation.counting import count_params
from lowrank_cli.layers.lowrank_linear import LowRankLinear
from lowrank_cli.models.build import spec_of
from lowrank_cli.models.spec import ModelSpec
from lowrank_cli.models.structure import swap_in, uncalled_linears


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
    kappa: float = 2.0,
    rank_multiple: int | str = 8,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    rank_pattern: list[str] | None = None,
    plan: Plan | None = None,
    svd: str = "exact",
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = None,
    input_size: tuple[int, ...] | None = None,
    check_calls: bool = True,
    factor_fn: Callable[[str, torch.Tensor, int], Any] | None = None,
    calib: str | None = None,
    calib_samples: int = 256,
    tokenizer: Any = None,
    budget: float | None = None,
    target_macs: int | None = None,
    plan_kind: str = "pela",
    plan_batch_size: int | None = None,
    plan_dtype: str | torch.dtype | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    calib_progress: Callable[[int, int], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> FactorizeResult:
    """`lowrank_cli.factorize(model, kappa=2)`: swap the planned linears of `model` for low-rank ones, in place.

    The plan comes from `plan`, or from kappa / rank_multiple / include / exclude / rank_pattern (see
    `lowrank_cli.compress.plan`). Linears the model never calls as modules stay dense, with a warning. `factor_fn(name,
    weight, rank)` can replace the plain SVD (data-aware truncation); it returns an object shaped like
    `svd.Factors`. `calib` (an image folder; for a text model a .txt / .jsonl file or folder, tokenised
    by `tokenizer`, a tokenizer or the folder / Hub repo that has one) makes the truncation data-aware: it
    minimises each layer's output error on `calib_samples` of its images or texts. `budget` (fraction of the target layers' parameters to keep) or
    `target_macs` (MACs of the whole model) allocate ranks per layer instead of one kappa. `rank_multiple="auto"`
    picks the multiple the device likes; `plan_kind="speed"` times every layer shape dense vs factorized on the
    device (batch `plan_batch_size`, precision `plan_dtype`: default the stored dtype, else bf16 on CUDA) and
    keeps dense the layers whose factorized form is not faster. Returns the model (also `result.model`) with per-layer errors and kept energies; the model
    carries its record (`checkpoint.format.info_of`) for `lowrank_cli.save`.
    """
    if svd not in SVD_METHODS:
        raise UsageError(f"--svd '{svd}' is not one of {', '.join(SVD_METHODS)}")
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=2))
    start = time.perf_counter()
    dev = resolve_device(device)
    out_dtype = resolve_dtype(dtype)
    if plan_kind not in ("pela", "speed"):
        raise UsageError(f"--plan '{plan_kind}' is not one of pela, speed")
    asked_multiple = rank_multiple
    from lowrank_cli.compress.speed_plan import parse_rank_multiple, run_dtype

    runs_in = run_dtype(plan_dtype, out_dtype, dev, next(model.parameters()).dtype)
    if plan is None:
        rank_multiple = parse_rank_multiple(rank_multiple, dev, runs_in)
    plan = plan or make_plan(
        model, kappa=kappa, rank_multiple=rank_multiple, include=include, exclude=exclude, rank_pattern=rank_pattern
    )
    if check_calls:
        uncalled = uncalled_linears(model, list(plan.ranks), input_size)
        if uncalled:
            warn(
                f"{len(uncalled)} linear(s) are not called as modules by the model (it uses their weight directly, "
                f"e.g. F.linear): left dense: {', '.join(uncalled[:4])}{', ...' if len(uncalled) > 4 else ''}"
            )
            plan = plan.without({n: "dense: not called as a module (F.linear on its weight)" for n in uncalled})
    extra: dict[str, Any] = {}
    stats = None
    if calib is not None:
        from lowrank_cli.compress.aware_plan import calibrate, data_aware_factor_fn

        started = time.perf_counter()
        stats = calibrate(model, list(plan.ranks) + [n for n, why in plan.dense.items() if "would not reduce" in why],
                          calib, samples=calib_samples, device=dev, tokenizer=tokenizer,
                          progress=(lambda n: calib_progress(n, calib_samples)) if calib_progress else None)
        first = next(iter(stats.values()), None)
        extra["calibration"] = {"data": str(calib), "samples": first.samples if first else 0,
                                "tokens": first.tokens if first else 0,
                                "seconds": round(time.perf_counter() - started, 2)}
        factor_fn = factor_fn or data_aware_factor_fn(stats)
    if budget is not None or target_macs is not None:
        from lowrank_cli.compress.aware_plan import budget_plan

        plan, extra["budget"] = budget_plan(model, plan, keep_fraction=budget, target_macs=target_macs,
                                            rank_multiple=rank_multiple, stats=stats, input_size=input_size)
    timings = None
    if plan_kind == "speed":
        from lowrank_cli.compress.speed_plan import speed_plan

        batch = plan_batch_size or (256 if dev.type == "cuda" else 16)
        plan, timings = speed_plan(model, plan, device=dev, dtype=runs_in, batch_size=batch, input_size=input_size)
    result = FactorizeResult(model, plan, params_before=count_params(model).total)
    spectra: dict[str, list[float]] = {}
    for done, (name, rank) in enumerate(plan.ranks.items(), 1):
        linear = model.get_submodule(name)
        weight = linear.weight
        factors = factor_fn(name, weight, rank) if factor_fn else truncated_svd(weight, rank, method=svd, device=dev)
        target = out_dtype or weight.dtype
        if not (torch.isfinite(factors.first).all() and torch.isfinite(factors.second).all()):
            raise InputError(f"the SVD of {name} is not finite: the weights hold NaN or Inf; check the source model")
        layer = LowRankLinear(linear.in_features, linear.out_features, rank, bias=linear.bias is not None,
                              device=weight.device, dtype=target)
        with torch.no_grad():
            layer.first.weight.copy_(factors.first)
            layer.second.weight.copy_(factors.second)
            if linear.bias is not None:
                layer.second.bias.copy_(linear.bias)
        layer.train(linear.training)
        swap_in(model, name, layer)
        spectra[name] = factors.singular_values.tolist()
        result.layers.append(LayerResult(name, linear.in_features, linear.out_features, rank,
                                         factors.kept_energy, factors.rel_error, factors.method))
        if progress:
            progress(name, done, len(plan.ranks))
    if out_dtype is not None:
        model.to(out_dtype)
    result.dense = plan.dense
    result.extra = extra
    if timings is not None:
        result.extra["speed_plan"] = {k: v for k, v in timings.items() if k != "layers"}
    result.params_after = count_params(model).total
    result.seconds = time.perf_counter() - start
    info = info_of(model)
    spec = info.spec if info is not None else _describe(model)
    attach_info(model, CheckpointInfo(
        spec=spec,
        ranks={r.name: r.rank for r in result.layers},
        plan=timings,
        provenance={"kappa": None if "budget" in extra else kappa, "rank_multiple": rank_multiple,
                    **({"rank_multiple_asked": asked_multiple} if asked_multiple != rank_multiple else {}),
                    "plan": plan_kind,
                    "svd": "data-aware" if stats is not None else svd,
                    "dtype": str(out_dtype or next(model.parameters()).dtype).removeprefix("torch."), **extra},
        layers={r.name: {k: v for k, v in vars(r).items() if k != "name"} for r in result.layers},
        dense=result.dense,
        spectra=spectra,
    ))
    return result


def _describe(model: nn.Module) -> ModelSpec:
    """How to rebuild the model; a model lrc cannot rebuild is still factorized (saving it is what fails)."""
    try:
        return spec_of(model)
    except UsageError:
        return ModelSpec(type(model).__name__, library="unknown")


def factorize_file(
    source: str,
    output: str,
    *,
    arch: str | None = None,
    model_args: dict[str, Any] | None = None,
    revision: str | None = None,
    force: bool = False,
    library: str | None = None,
    seq_len: int | None = None,
    save_tokenizer: str | None = None,
    log: Callable[[str], None] | None = None,
    **options: Any,
) -> FactorizeResult:
    """What `lrc factorize` does: load any MODEL source, factorize it, save the lrc checkpoint atomically.

    The output is checked first, so a doomed run fails before the SVDs rather than after them. Text models run
    their checks at `seq_len` tokens; `save_tokenizer` copies a transformers source's tokenizer files there.
    """
    from lowrank_cli.atomic import check_output
    from lowrank_cli.checkpoint.io import save
    from lowrank_cli.models.sources import load_model

    check_output(output, force=force)
    if options.get("svd", "exact") not in SVD_METHODS:
        raise UsageError(f"--svd '{options['svd']}' is not one of {', '.join(SVD_METHODS)}")
    resolve_dtype(options.get("dtype"))
    if options.get("plan_dtype") is not None:
        resolve_dtype(options["plan_dtype"], parameter="plan_dtype")  # refused before the loading
    resolve_device(options.get("device", "auto"))
    from lowrank_cli.models.inputs import check_input_size, default_input_size
    from lowrank_cli.models.transformers_models import is_text_model

    loaded = load_model(source, arch=arch, model_args=model_args, revision=revision, library=library, log=log)
    if loaded.checkpoint is not None:
        raise UsageError(f"'{source}' is already an lrc checkpoint: factorize its dense source model instead")
    text = is_text_model(loaded.model)
    check_input_size(loaded.model, options.get("input_size"))
    if text or seq_len is not None:  # an image model with --seq-len is refused here
        options["input_size"] = default_input_size(loaded.model, seq_len)
    calib_needs_tokenizer = text and options.get("calib") is not None and options.get("tokenizer") is None
    tokenizer_dir = None
    if save_tokenizer or calib_needs_tokenizer:
        from lowrank_cli.models.hub import tokenizer_folder

        tokenizer_dir = tokenizer_folder(loaded)  # once, before the SVDs: a source without one fails at once
    if calib_needs_tokenizer:
        options["tokenizer"] = tokenizer_dir
    result = factorize(loaded.model, **options)
    record_source(result.model, loaded.source)
    save(result.model, output, force=force)
    if save_tokenizer:
        from lowrank_cli.models.transformers_models import copy_tokenizer

        result.extra["tokenizer"] = {"folder": save_tokenizer, "files": copy_tokenizer(tokenizer_dir, save_tokenizer)}
    return result
