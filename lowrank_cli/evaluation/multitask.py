"""Every task of a multi-task checkpoint scored on its own labelled data, and the overall score (`lrc eval MODEL
--task NAME=PATH ...`).

    result = evaluate_tasks("multi.safetensors", ["digits=digits/", "sts=stsb_dev.jsonl:score"])
    result["tasks"]["digits"]["top1"], result["tasks"]["sts"]["spearman"], result["overall"]

Each task is scored by its own model: the checkpoint read again, with that task's head and (in `experts` mode) its
adapters merged (`adapters.task_models.model_for_task`). Labelled texts (.jsonl / .csv) go through
`task_scores.evaluate_texts` (accuracy, or Pearson / Spearman of a score), images (an ImageFolder or class tree)
through `accuracy.evaluate` (top-1, top-5). The overall is `task_scores.overall_score`: the mean over tasks of
the accuracy (top-1), or (r + 1) / 2 of the Spearman correlation.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lowrank_cli.data.tasks import TaskSpec, parse_tasks
from lowrank_cli.errors import UsageError


def evaluate_tasks(model: str | os.PathLike, tasks: list[str | TaskSpec], *, revision: str | None = None,
                   tokenizer: str | None = None, max_length: int | None = None, batch_size: int = 64,
                   device: str | torch.device | None = None, num_workers: int = 0, fused: bool | None = False,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Score each task of the multi-task checkpoint `model` (file, lrc folder or `hf-hub:` repo) on its data.

    `tasks`: `NAME=PATH[:label|:score]` strings or TaskSpecs (data.tasks), each naming a task of the checkpoint.
    `tokenizer`: for text tasks (default: the one the checkpoint names). `fused`: the fused low-rank kernel.
    Returns {"tasks": {name: scores (with "data")}, "overall": the overall score}.
    """
    from lowrank_cli.adapters.loading import load_model
    from lowrank_cli.checkpoint.tasks import task_entry
    from lowrank_cli.devices import resolve_device
    from lowrank_cli.evaluation.task_scores import overall_score
    from lowrank_cli.models.fusion import resolve_fused

    log = log or (lambda msg: None)
    specs = parse_tasks(list(tasks), parameter="tasks")
    if not specs:
        raise UsageError("`tasks` is empty: name at least one task of the checkpoint (NAME=PATH)")
    if batch_size < 1:
        raise UsageError(f"`batch_size` must be at least 1, got {batch_size}")
    dev = resolve_device(device)
    fuse = resolve_fused(fused, dev)  # `fused=True` where the kernel cannot run fails before any loading
    loaded = load_model(str(model), revision=revision, log=log, first_task=False)
    info = loaded.checkpoint
    if getattr(info, "multitask", None) is None:
        raise UsageError(f"'{model}' holds one task (it is not a multi-task checkpoint): `tasks` picks the tasks of a "
                         "multi-task checkpoint; evaluate this model on its labelled data alone (`data`)")
    for spec in specs:  # every name and target checked before any scoring
        _check_target(spec, task_entry(info, spec.name))
    results: dict[str, dict[str, Any]] = {}
    for i, spec in enumerate(specs):
        if i:
            loaded = load_model(str(model), revision=revision, first_task=False)  # a fresh backbone: the last one took a task's head
        task_model = _task_model(loaded, spec.name, dev, fuse)
        log(f"Task '{spec.name}': {spec.path}")
        results[spec.name] = {**_score(task_model, loaded, spec, tokenizer, max_length, batch_size, dev, num_workers),
                              "data": str(spec.path)}
    return {"tasks": results, "overall": overall_score(results)}


def _check_target(spec: TaskSpec, entry: dict[str, Any]) -> None:
    """`:label` for a regression task, or `:score` for a classification, cannot be scored."""
    kind = entry["task"]
    wanted = {"label": "classification", "score": "regression"}.get(spec.target or "")
    if wanted is not None and wanted != kind:
        what = f"classes ({', '.join(entry.get('classes') or [])})" if kind == "classification" else "a score"
        raise UsageError(f"`tasks` '{spec}': task '{spec.name}' of the checkpoint predicts {what}, not a "
                         f"{'score' if spec.target == 'score' else 'class label'}: leave out :{spec.target}")


def _task_model(loaded: Any, name: str, device: torch.device, fuse: bool) -> nn.Module:
    from lowrank_cli.adapters.task_models import model_for_task
    from lowrank_cli.models.fusion import fuse_lowrank

    model = model_for_task(loaded, name).to(device).float()
    if fuse:
        fuse_lowrank(model)
    return model


def _score(model: nn.Module, loaded: Any, spec: TaskSpec, tokenizer: str | None, max_length: int | None,
           batch_size: int, device: torch.device, num_workers: int) -> dict[str, Any]:
    from lowrank_cli.data.labelled_texts import is_labelled_text_file
    from lowrank_cli.evaluation.accuracy import evaluate, val_split
    from lowrank_cli.models.families import TEXT, modality_of

    if is_labelled_text_file(spec.path):
        if modality_of(model) != TEXT:
            raise UsageError(f"`tasks` '{spec}': '{spec.path}' holds labelled texts; task '{spec.name}' is of a model "
                             "that reads images: give an ImageFolder (<class>/image.png)")
        return _score_texts(model, loaded, spec, tokenizer, max_length, batch_size, device)
    if spec.target == "score":
        raise UsageError(f"`tasks` '{spec}': images are scored by class; :score is for labelled texts")
    return evaluate(model, val_split(spec.path), batch_size=batch_size, device=device, num_workers=num_workers)


def _score_texts(model: nn.Module, loaded: Any, spec: TaskSpec, tokenizer: str | None, max_length: int | None,
                 batch_size: int, device: torch.device) -> dict[str, Any]:
    from lowrank_cli.data.task_data import recorded_tokenizer
    from lowrank_cli.data.texts import load_tokenizer
    from lowrank_cli.evaluation.task_scores import evaluate_texts

    source = tokenizer or loaded.files or recorded_tokenizer(loaded.checkpoint)
    if source is None:
        raise UsageError(f"task '{spec.name}' reads texts and the checkpoint names no tokenizer: give `tokenizer`")
    return evaluate_texts(model, spec.path, load_tokenizer(source), max_length=max_length, batch_size=batch_size,
                          device=device)
