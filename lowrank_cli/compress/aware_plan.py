"""Data-aware factorization and rank budgets, on top of the plain plan.

- `calibrate`: second moments of each target linear's inputs on a few hundred images (the model's own
  eval transforms), streamed through forward hooks.
- `data_aware_factor_fn`: truncation in the whitened space, so the kept rank minimises the output error on
  those inputs (lowrank_cli.compress.whitened_svd); the factors are stored exactly like plain ones.
- `budget_plan`: ranks allocated across layers under a parameter fraction or a MAC target
  (lowrank_cli.compress.budget), on whitened spectra when calibration data is given.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from lowrank_cli.compress.budget import LayerSpectrum, allocate_ranks, budget_cost
from lowrank_cli.compress.calibration import InputStats, collect_second_moments
from lowrank_cli.compress.plan import LayerPlan, Plan
from lowrank_cli.compress.svd import Factors, compute_dtype
from lowrank_cli.compress.whitened_svd import data_aware_factors, whitened_spectrum
from lowrank_cli.errors import InputError, UsageError


def calibrate(
    model: nn.Module,
    names: list[str],
    data: str | Path,
    *,
    samples: int = 256,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    tokenizer: object = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, InputStats]:
    """Input second moments of the named linears over `samples` images of `data` (ImageFolder or flat), or for
    a text model over its first `samples` texts (.txt / .jsonl, tokenised by `tokenizer`; padding left out)."""
    from lowrank_cli.models.transformers_models import is_text_model

    if samples < 1:
        raise UsageError(f"--calib-samples must be at least 1, got {samples}")
    with _on(model, torch.device(device)):  # the forward passes run where the SVDs do (--device), then back
        if is_text_model(model):
            return _calibrate_text(model, names, data, samples=samples, batch_size=batch_size, device=device,
                                   tokenizer=tokenizer, progress=progress)
        return _calibrate_images(model, names, data, samples=samples, batch_size=batch_size, device=device,
                                 progress=progress)


@contextlib.contextmanager
def _on(model: nn.Module, device: torch.device) -> Iterator[None]:
    param = next(model.parameters(), None)
    home = param.device if param is not None else device
    if home == device:
        yield
        return
    model.to(device)
    try:
        yield
    finally:
        model.to(home)


def _calibrate_images(model, names, data, *, samples, batch_size, device, progress):
    from lowrank_cli.data.images import find_images, make_loader, make_transform
    from lowrank_cli.models.inputs import image_mode

    try:
        images = find_images(data)
    except InputError as e:  # the data loader speaks of --data, the option here is --calib
        raise InputError(str(e).replace("--data", "--calib")) from None
    batch_size = max(1, min(batch_size, samples, len(images)))
    # shuffle: a class-sorted folder would otherwise calibrate on the first classes only
    loader, _ = make_loader(images, make_transform(model, training=False), batch_size, shuffle=True, seed=0,
                            drop_last=False, mode=image_mode(model))
    return collect_second_moments(model, names, loader, device=device, max_samples=samples, progress=progress)


def _calibrate_text(model, names, data, *, samples, batch_size, device, tokenizer, progress):
    from lowrank_cli.data.texts import TextCollate, find_texts, load_tokenizer
    from lowrank_cli.models.inputs import default_max_length

    if tokenizer is None:
        raise UsageError("calibrating a text model needs its tokenizer: factorize from the folder or Hub repo that "
                         "has the tokenizer files")
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    try:
        texts = find_texts(data, limit=samples)
    except InputError as e:
        raise InputError(str(e).replace("--data", "--calib")) from None
    collate = TextCollate(tokenizer, default_max_length(model, tokenizer))
    batch_size = max(1, min(batch_size, samples))
    # The first `samples` texts in file order: a text file has no classes to balance, and the choice is repeatable.
    batches = (collate(texts.texts[i:i + batch_size]) for i in range(0, len(texts), batch_size))
    return collect_second_moments(model, names, batches, device=device, max_samples=samples, progress=progress)


def data_aware_factor_fn(stats: dict[str, InputStats]) -> Callable[[str, torch.Tensor, int], Factors]:
    def factor(name: str, weight: torch.Tensor, rank: int) -> Factors:
        first, second, info = data_aware_factors(weight, stats[name].second_moment, rank)
        dtype = compute_dtype(weight.dtype)
        return Factors(first.to(dtype), second.to(dtype), info["singular_values"], float(info["kept_energy"]),
                       float(info["output_rel_error"]), f"whitened/{info['method']}")

    return factor


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
    rank rule (e.g. linears the model does not call). Returns the plan and a JSON-ready summary.
    """
    if (keep_fraction is None) == (target_macs is None):
        raise UsageError("give one of --budget (fraction of parameters to keep) or --target-macs")
    if keep_fraction is not None and not 0 < keep_fraction < 1:
        raise UsageError(f"--budget must be in (0, 1) (the fraction of the target layers' parameters to keep), got {keep_fraction}")
    candidates = [p for p in plan.layers if p.rank is not None or "would not reduce" in p.why]
    fixed = [p for p in plan.layers if p not in candidates]
    names = [p.name for p in candidates]
    cost_per_param = dict.fromkeys(names, 1.0)
    target_cost = None
    summary: dict = {"keep_fraction": keep_fraction, "target_macs": target_macs}
    if target_macs is not None:
        from lowrank_cli.models.inputs import default_input_size

        size = tuple(input_size or default_input_size(model))
        cost_per_param, total = tokens_per_layer(model, names, size)
        layer_macs = sum(cost_per_param[p.name] * p.dense_params for p in candidates)
        target_cost = target_macs - (total - layer_macs)  # what is left for the factorizable layers
        if target_cost <= 0:
            raise UsageError(
                f"--target-macs {target_macs:,} is unreachable: the layers that stay dense alone take "
                f"{total - layer_macs:,.0f} MACs; raise the target"
            )
        summary["dense_macs"] = total
    spectra = {}
    for p in candidates:
        weight = model.get_submodule(p.name).weight
        if stats is not None:
            sv = whitened_spectrum(weight, stats[p.name].second_moment)
        else:
            sv = torch.linalg.svdvals(weight.detach().to(compute_dtype(weight.dtype))).float().cpu()
        spectra[p.name] = LayerSpectrum(p.d_in, p.d_out, sv, cost_per_param[p.name])
    try:
        ranks = allocate_ranks(spectra, keep_fraction=keep_fraction, target_cost=target_cost, rank_multiple=rank_multiple)
    except UsageError as e:
        raise UsageError(f"{e} (for --budget / --target-macs)") from None
    why = "budget" + (" on whitened spectra" if stats is not None else "")
    layers = {p.name: p for p in fixed}
    for p in candidates:
        r = ranks[p.name]
        layers[p.name] = LayerPlan(p.name, p.d_in, p.d_out, r, why if r else f"dense: {why} keeps it whole")
    summary["cost"] = budget_cost(spectra, ranks)
    return Plan([layers[p.name] for p in plan.layers]), summary
