"""The multi-task checkpoint: one backbone, several tasks, each with its own head (and in `experts` mode its own
adapters), in one lrc checkpoint.

The file is an ordinary lrc checkpoint whose model is the shared backbone with the FIRST task's head in place, so
its spec rebuilds it and every tool that reads a checkpoint (report, bench, card) reads it as it is. Beside the
model's state dict it holds each task's own tensors, and `lrc.multitask` describes the tasks:

    tasks/<name>/head/<key>        every task's head (the first task's too), keyed as in the model's state dict
                                   with that task's head in place
    tasks/<name>/adapters/<key>    `experts` mode: that task's adapters, over the UNmerged backbone
    lrc.multitask                  {"schema": 1, "mode": "shared" | "experts" | "merge" | "orthogonal", "method",
                                    "tasks": [{"name", "data", "task", "classes", "pairs", "metric",
                                               "head": {"modules", "outputs"}, "adapters" (experts, else null),
                                               "scores", "trainable_parameters"}, ...],
                                    "overall": {...}, and the mode's own settings (schedule, merge rule, ...)}

    write_multitask("multi.safetensors", model, record, {"digits": {...}, "parity": {...}})
    model = lowrank_cli.load("multi.safetensors", task="parity")   # its head, its adapters merged: plain layers

The model for a task is the backbone with that task's head put in (`models.heads.replace_head`, then its tensors)
and, in `experts` mode, that task's adapters applied and merged: no adapter module is left, no overhead. That is
`adapters.task_models.model_for_task`, one package up: it needs the adapter methods.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_cli.checkpoint.format import (
    MULTITASK_SCHEMA,
    TASKS_PREFIX,
    CheckpointInfo,
    info_for_saving,
    multitask_problem,
    read_info,
)
from lowrank_cli.errors import InputError, UsageError
from lowrank_cli.models.heads import in_head

__all__ = ["read_task_tensors", "task_entry", "task_names", "write_multitask"]


# ------------------------------------------------------------------------------------------------ writing


def write_multitask(path: str | Path, model: nn.Module, record: dict[str, Any],
                    task_tensors: dict[str, dict[str, torch.Tensor]], *, dtype: torch.dtype | None = None,
                    force: bool = True) -> Path:
    """Write a multi-task checkpoint, atomically, in one file.

    `model`: the backbone with the first task's head in place (in `experts` mode the UNmerged backbone), with its
    lrc record. `record`: the `lrc.multitask` record (`schema` is filled in; tasks in order, the first one the
    model's). `task_tensors`: per task name, its own tensors by state-dict name: its head's
    (`adapters.files.head_tensors`) and, in `experts` mode, its adapters' (`Method.adapter_tensors`); a key inside
    the task's head modules is stored under `head/`, any other under `adapters/`. The model's record is not
    changed. `dtype` casts floating tensors on the way out.
    """
    from lowrank_cli.checkpoint.io import write_checkpoint

    record = {"schema": MULTITASK_SCHEMA, **record}
    problem = multitask_problem(record)
    if problem:
        raise UsageError(f"the multi-task `record` {problem}: fix it before writing")
    tasks = record["tasks"]
    names = [t["name"] for t in tasks]
    unknown = sorted(set(task_tensors) - set(names))
    if unknown:
        raise UsageError(f"`task_tensors` has tensors for '{unknown[0]}', which is not a task of the record (its tasks "
                         f"are {', '.join(names)}): give tensors for the record's tasks only")
    extra: dict[str, torch.Tensor] = {}
    for task in tasks:
        name, head = task["name"], task["head"]["modules"]
        tensors = task_tensors.get(name) or {}
        heads = {k: v for k, v in tensors.items() if in_head(k, head)}
        adapters = {k: v for k, v in tensors.items() if not in_head(k, head)}
        if not heads:
            raise UsageError(f"`task_tensors` has no tensor of the head of task '{name}' (modules "
                             f"{', '.join(head)}): give every task its head's tensors (adapters.files.head_tensors)")
        if adapters and record["mode"] != "experts":
            raise UsageError(f"`task_tensors` of task '{name}' has tensors outside its head ('{next(iter(adapters))}'):"
                             f" only `experts` mode keeps adapters per task; in {record['mode']} mode they are part "
                             "of the backbone")
        extra.update({f"{TASKS_PREFIX}{name}/head/{k}": v for k, v in heads.items()})
        extra.update({f"{TASKS_PREFIX}{name}/adapters/{k}": v for k, v in adapters.items()})
    info = dataclasses.replace(info_for_saving(model), multitask=record)
    return write_checkpoint(model, path, info, force=force, dtype=dtype, extra_tensors=extra)


# ------------------------------------------------------------------------------------------------ reading


def task_names(info_or_path: CheckpointInfo | str | Path) -> list[str]:
    """The tasks of a multi-task checkpoint, in order (the first is the one its model has); [] for a checkpoint
    that is not multi-task. A path may be a file, an lrc folder or an `hf-hub:` repo."""
    info = info_or_path
    if not isinstance(info, CheckpointInfo):
        from lowrank_cli.models.lrc_folder import checkpoint_path

        info, _ = read_info(checkpoint_path(info_or_path))
    return [t["name"] for t in (info.multitask or {}).get("tasks", [])]


def task_entry(info: CheckpointInfo, task: str | None) -> dict[str, Any]:
    """The `lrc.multitask` entry of `task` (None: the first); a name the checkpoint lacks is a UsageError that
    lists the ones it has."""
    where = info.path if info.path is not None else "the checkpoint"
    if info.multitask is None:
        raise UsageError(f"'{where}' holds one task (it is not a multi-task checkpoint): leave `task` out")
    tasks = info.multitask["tasks"]
    if task is None:
        return tasks[0]
    for entry in tasks:
        if entry["name"] == task:
            return entry
    raise UsageError(f"'{task}' is not a task of '{where}': its tasks are {', '.join(t['name'] for t in tasks)}")


def read_task_tensors(path: Path | None, name: str, parts: set[str], device: torch.device
                  ) -> dict[str, dict[str, torch.Tensor]]:
    """{"head": {key: tensor}, "adapters": {key: tensor}} of one task, only the `parts` asked for read from the
    file."""
    from safetensors import safe_open

    from lowrank_cli.atomic import utf8_path

    if path is None:
        raise UsageError("the model was not read from a multi-task checkpoint file (no path): read it with "
                         "`read_checkpoint`")
    found: dict[str, dict[str, torch.Tensor]] = {"head": {}, "adapters": {}}
    prefix = f"{TASKS_PREFIX}{name}/"
    with utf8_path(path) as file, safe_open(file, framework="pt", device=str(device)) as f:
        for key in f.keys():
            if key.startswith(prefix):
                part, _, rest = key[len(prefix):].partition("/")
                if part not in found or not rest:
                    raise InputError(f"'{path}' holds the tensor '{key}', which is neither a head's nor adapters' of "
                                     "a task: the file is damaged or from a newer lrc; write it again or upgrade lrc")
                if part in parts:
                    found[part][rest] = f.get_tensor(key)
    return found
