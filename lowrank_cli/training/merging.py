"""One backbone from several tasks: combine the weight updates of per-task fine-tuned copies of one base.

Each task was fine-tuned from the same base with its own adapters (any method) and merged back into a model of the
base's shapes (`Method.merge`), so its whole effect is a dense update of some parameters, Δ_t = tuned_t - base.
The rules work on those updates alone, so they are the same for lora, dora, rlrr, orthogonal adapters and full
fine-tuning:

    deltas = {"sst": task_deltas(base, sst_model, exclude=["classifier"]),
              "sts": task_deltas(base, sts_model, exclude=["classifier"])}
    merged = merge_deltas(deltas, rule="svd", weights={"sst": 1.0, "sts": 0.5}, rank=16)
    apply_deltas(backbone, merged)   # a copy of the base: each parameter += its merged update
    summary = merge_summary(deltas, merged)

The rules (`MERGE_RULES`), with w_t a task's weight and T the number of tasks:

- `average`: Σ Δ_t / T, task arithmetic's plain mean: nothing to tune and no update grows, but each task's is
  diluted by T. It takes no weights: equal weights are what it means.
- `weighted`: Σ w_t Δ_t / Σ w_t, a mean that favours some tasks (the caller passes e.g. each task's share of the
  training samples). The weights are required: without them it is `average`.
- `concat`: Σ w_t Δ_t (w_t = 1 unless given), exactly the update of every task's adapters applied at once (for
  LoRA, the adapter whose B and A stack the tasks' B's and A's has this product, at rank Σ r_t). Nothing is
  diluted; where the tasks' updates overlap they interfere, which `merge_summary` measures.
- `svd`: the `concat` sum cut back to its best rank-`rank` approximation (truncated SVD), per parameter of two or
  more dimensions (read as its first dimension by the rest, as peft's conv LoRA sees a conv weight): an update the
  size of one adapter that keeps the directions the tasks share most. A parameter whose smaller side is at most
  `rank`, and any 1-D one (biases, norms), keeps the exact sum: it is no bigger than its truncation.

A task that did not change a parameter (other targets, another method) contributes a zero update to it; `average`
and `weighted` still count that task. Weights are finite and > 0, one per task. Error messages name the parameters
of the multi-task API that passes these on (`merge_rule`, `task_weights`, `merge_rank`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lowrank_cli.adapters.base import in_head
from lowrank_cli.compress.svd import linalg_threads, truncated_svd
from lowrank_cli.errors import InputError, TrainingError, UsageError

MERGE_RULES = ("average", "weighted", "concat", "svd")


def _differences(before: dict[str, nn.Parameter], after: dict[str, nn.Parameter]) -> str | None:
    """Why two models' parameters cannot be compared one to one (cause and fix), or None."""
    missing, extra = [n for n in before if n not in after], [n for n in after if n not in before]
    if missing or extra:
        example = f"'{(missing or extra)[0]}' is {'missing' if missing else 'unexpected'}"
        return (f"{len(missing)} parameter(s) missing and {len(extra)} unexpected ({example}): merge its adapters "
                "first (`Method.merge`), and compare it with the base it was fine-tuned from")
    for name, p in before.items():
        if p.shape != after[name].shape or p.dtype != after[name].dtype:
            return (f"'{name}' is {after[name].dtype} {tuple(after[name].shape)} in the fine-tuned model and "
                    f"{p.dtype} {tuple(p.shape)} in the base: compare it with the base it was fine-tuned from, "
                    "loaded in the same dtype")
    return None


def task_deltas(base: nn.Module, tuned: nn.Module, exclude: list[str] | None = None) -> dict[str, torch.Tensor]:
    """{parameter name: tuned - base} for every floating parameter that changed, float32 on the CPU.

    `tuned` is `base` fine-tuned with its adapters merged: the same parameter names, shapes and dtypes (a dtype
    change would make every parameter look updated). `exclude`: module prefixes left out, such as the task's head.
    """
    exclude = exclude or []
    before = {n: p for n, p in base.named_parameters() if not in_head(n, exclude)}
    after = {n: p for n, p in tuned.named_parameters() if not in_head(n, exclude)}
    problem = _differences(before, after)
    if problem:
        raise InputError(f"the fine-tuned model does not have the base's parameters: {problem}")
    deltas: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, p in before.items():
            if not p.is_floating_point():
                continue
            delta = after[name].detach().to("cpu", torch.float32) - p.detach().to("cpu", torch.float32)
            if delta.any():
                deltas[name] = delta
    return deltas


def _task_weights(tasks: list[str], rule: str, weights: dict[str, float] | None,
                  rank: int | None) -> dict[str, float]:
    """Each task's factor in the merged sum, after refusing settings that do not fit `rule`."""
    if rule not in MERGE_RULES:
        raise UsageError(f"`merge_rule` '{rule}' is not one of {', '.join(MERGE_RULES)}")
    if not tasks:
        raise UsageError("merging needs the updates of at least one task: fine-tune the tasks first")
    if rule == "svd" and (rank is None or rank < 1):
        raise UsageError(f"`merge_rule` svd keeps the top `merge_rank` directions of each merged weight, got "
                         f"{rank}: give a `merge_rank` of at least 1")
    if rule != "svd" and rank is not None:
        raise UsageError(f"`merge_rank` is for `merge_rule` svd; `merge_rule` {rule} keeps every direction: leave it "
                         "out, or use svd")
    if rule == "average":
        if weights is not None:
            raise UsageError("`task_weights` are for `merge_rule` weighted, concat or svd; average weighs every task "
                             "the same: leave them out, or use weighted")
        return {t: 1.0 / len(tasks) for t in tasks}
    if weights is None:
        if rule == "weighted":
            raise UsageError("`merge_rule` weighted needs `task_weights` (one number > 0 per task): give them, or use "
                             "average for equal weights")
        return {t: 1.0 for t in tasks}
    if set(weights) != set(tasks):
        raise UsageError(f"`task_weights` name the tasks {', '.join(sorted(weights))} and the updates are of "
                         f"{', '.join(tasks)}: give one weight per task")
    bad = [t for t in tasks if not (math.isfinite(weights[t]) and weights[t] > 0)]
    if bad:
        raise UsageError(f"`task_weights` must be finite numbers > 0, got {weights[bad[0]]} for task '{bad[0]}': "
                         "fix it, or leave the task out")
    total = sum(weights.values()) if rule == "weighted" else 1.0
    return {t: float(weights[t]) / total for t in tasks}


def best_rank(update: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-`rank` approximation of `update` (as a matrix of its first dimension by the rest); an update
    that is no bigger than that (1-D, or a side of at most `rank`) comes back as it is."""
    if update.ndim < 2 or min(update.shape[0], update[0].numel()) <= rank:
        return update
    matrix = update.reshape(update.shape[0], -1)
    with linalg_threads(matrix.shape, matrix.device):
        factors = truncated_svd(matrix, rank)
    return (factors.second @ factors.first).to(update.dtype).reshape(update.shape)


def merge_deltas(deltas: dict[str, dict[str, torch.Tensor]], rule: str, weights: dict[str, float] | None = None,
                 rank: int | None = None) -> dict[str, torch.Tensor]:
    """Combine the tasks' updates ({task: {parameter: Δ}}, as `task_deltas` gives them) by `rule` (module docstring);
    `weights` {task: w > 0} for weighted (required), concat and svd; `rank` for svd only. Parameters in the order
    the tasks first name them."""
    tasks = list(deltas)
    factors = _task_weights(tasks, rule, weights, rank)
    names = list(dict.fromkeys(n for updates in deltas.values() for n in updates))
    merged: dict[str, torch.Tensor] = {}
    for name in names:
        present = [(t, deltas[t][name]) for t in tasks if name in deltas[t]]
        shapes = {tuple(d.shape) for _, d in present}
        if len(shapes) > 1:
            raise InputError(f"the tasks' updates of '{name}' have different shapes ({', '.join(map(str, shapes))}): "
                             "every task must be fine-tuned from the same base")
        total = torch.zeros_like(present[0][1], dtype=torch.float32)
        for task, delta in present:
            total += factors[task] * delta.to(total.device, torch.float32)
        merged[name] = best_rank(total, rank) if rule == "svd" else total
    return merged


def apply_deltas(model: nn.Module, deltas: dict[str, torch.Tensor]) -> None:
    """Add each update to its parameter of `model` in place, in the parameter's dtype and on its device. Every name
    and shape is checked, and every update must be finite, before any parameter changes."""
    params = dict(model.named_parameters())
    for name, delta in deltas.items():
        if name not in params or params[name].shape != delta.shape:
            found = "no such parameter" if name not in params else f"shape {tuple(params[name].shape)}"
            raise InputError(f"the merged update of '{name}' {tuple(delta.shape)} does not fit the model ({found}): "
                             "apply it to the base the tasks were fine-tuned from")
        if not torch.isfinite(delta).all():
            raise TrainingError(f"the merged update of '{name}' is not finite (a task's fine-tuned weights are not): "
                                "fine-tune that task again with a lower `lr`")
    with torch.no_grad():
        for name, delta in deltas.items():
            p = params[name]
            wide = torch.promote_types(p.dtype, torch.float32)  # sum in float32 at least, round once
            p.copy_((p.to(wide) + delta.to(p.device, wide)).to(p.dtype))


def merge_summary(deltas: dict[str, dict[str, torch.Tensor]], merged: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A few numbers for a record: the parameters updated, the rank of the merged update of the largest weight
    matrix, and how much the tasks' own updates overlap.

    `interference` = ||Σ Δ_t||² / Σ ||Δ_t||² over all parameters (unweighted, whatever the rule): 1 when the
    updates are orthogonal (orthogonal adaptation's disjoint bases give exactly that), up to T when they all point
    the same way, below 1 when they cancel. `cosines`: the same overlap per pair of tasks, as a cosine.
    """
    tasks = list(deltas)
    names = list(dict.fromkeys(n for updates in deltas.values() for n in updates))
    gram = torch.zeros(len(tasks), len(tasks), dtype=torch.float64)
    for name in names:  # a task without this update adds nothing to any inner product
        present = torch.tensor([i for i, t in enumerate(tasks) if name in deltas[t]])
        flat = torch.stack([deltas[tasks[i]][name].reshape(-1).double() for i in present.tolist()])
        gram[present[:, None], present[None, :]] += flat @ flat.T
    own = gram.diagonal()
    summary: dict[str, Any] = {"tasks": tasks, "parameters": len(merged),
                     "interference": float(gram.sum() / own.sum()) if own.sum() > 0 else None,
                     "cosines": {f"{tasks[i]},{tasks[j]}": float(gram[i, j] / (own[i] * own[j]).sqrt())
                                 for i in range(len(tasks)) for j in range(i + 1, len(tasks)) if own[i] * own[j] > 0}}
    matrices = [n for n in merged if merged[n].ndim >= 2]
    if matrices:
        largest = max(matrices, key=lambda n: merged[n].numel())  # the first of the largest, in model order
        matrix = merged[largest].reshape(merged[largest].shape[0], -1)
        with linalg_threads(matrix.shape):
            found = int(torch.linalg.matrix_rank(matrix))
        summary["largest"] = {"name": largest, "shape": list(merged[largest].shape), "rank": found}
    return summary
