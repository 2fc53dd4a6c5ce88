"""The model of one task of a multi-task checkpoint (checkpoint.tasks): the backbone with that task's head put in,
and in `experts` mode that task's adapters applied and merged (no adapter module is left, no overhead).

    loaded = read_checkpoint("multi.safetensors")
    model = model_for_task(loaded, "parity")     # what lowrank_cli.load("multi.safetensors", task="parity") gives

It lives above checkpoint/ because it needs the adapter methods; reading the file's records and tensors is
checkpoint.tasks'.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_cli.adapters.base import AdapterConfig
from lowrank_cli.adapters.files import head_tensors
from lowrank_cli.adapters.methods import method_for
from lowrank_cli.checkpoint.format import attach_info, info_of, move_record, record_finetune
from lowrank_cli.checkpoint.tasks import read_task_tensors, task_entry
from lowrank_cli.errors import InputError, UsageError
from lowrank_cli.models.heads import replace_head


def model_for_task(loaded: Any, task: str | None = None) -> nn.Module:
    """The model of one task of a multi-task checkpoint, in eval mode: `loaded` (a LoadedModel from
    `read_checkpoint`, changed in place) with that task's head, and in `experts` mode its adapters merged.

    `task` None: the first task. A checkpoint that is not multi-task gives its model as it is (with `task` None)
    or a UsageError. The model's record names the task (`task_name`, its classes or score), so class checks and
    `lrc eval` see the task's classes. Returns `loaded.model`.
    """
    info = loaded.checkpoint
    if getattr(info, "multitask", None) is None:
        if task is None:
            return loaded.model
        where = getattr(info, "path", None) or loaded.source.get("id") or "the model"
        raise UsageError(f"'{where}' holds one task (it is not a multi-task checkpoint): leave `task` out")
    entry = task_entry(info, task)
    if info_of(loaded.model) is not info:  # model_for_task gives the model a record of its own
        done = (getattr(info_of(loaded.model), "finetune", None) or {}).get("task_name", "?")
        if done == entry["name"]:
            return loaded.model.eval()  # asked again for the task it holds
        raise UsageError(f"this LoadedModel already holds the model of task '{done}': read the checkpoint again "
                         "(read_checkpoint) for another task")
    multitask, first = info.multitask, entry is info.multitask["tasks"][0]
    parts = {"head"} if not first else set()  # the first task's head is the model's own
    parts |= {"adapters"} if multitask["mode"] == "experts" else set()
    tensors = read_task_tensors(info.path, entry["name"], parts, device=next(loaded.model.parameters()).device)
    if not first:
        base = loaded.model
        head = replace_head(loaded, int(entry["head"]["outputs"]), classes=entry.get("classes"),
                            regression=entry["task"] == "regression")
        if loaded.model is not base:
            move_record(base, loaded.model, head.renamed)
        _put(loaded.model, tensors["head"], _head_keys(loaded.model, head.modules), f"the head of task "
             f"'{entry['name']}'", info.path)
    if multitask["mode"] == "experts":
        _merge_adapters(loaded.model, entry, tensors["adapters"], info.path)
    # The model is now one task's: its record keeps the file's, without the other tasks (a save writes one model).
    attach_info(loaded.model, dataclasses.replace(info_of(loaded.model) or info, multitask=None))
    record = {**(info.finetune or {}), "method": multitask.get("method"), "multitask": multitask["mode"],
              "task_name": entry["name"], "task": entry["task"], "classes": entry.get("classes"),
              "pairs": bool(entry.get("pairs")), "metric": entry.get("metric"), "head": entry["head"],
              "adapters": entry.get("adapters"), "scores": entry.get("scores"), "data": entry.get("data"),
              "merged": True}
    record_finetune(loaded.model, record, spec=loaded.spec, source=loaded.source)
    return loaded.model.eval()


def _head_keys(model: nn.Module, head: list[str]) -> set[str]:
    return set(head_tensors(model, head))


def _put(model: nn.Module, tensors: dict[str, torch.Tensor], expected: set[str], what: str, path: Path) -> None:
    """Load `tensors` into `model`; they must be exactly the `expected` names, in the model's shapes."""
    if set(tensors) != expected:
        extra, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
        raise InputError(f"{what} in '{path}' does not fit the model: {len(missing)} missing tensor(s) "
                         f"({', '.join(missing[:2])}), {len(extra)} unexpected ({', '.join(extra[:2])}): the file is "
                         "damaged or from another lrc; write it again")
    state = model.state_dict()
    wrong = next((k for k, v in tensors.items() if tuple(v.shape) != tuple(state[k].shape)), None)
    if wrong is not None:
        raise InputError(f"{what} in '{path}': '{wrong}' is {tuple(tensors[wrong].shape)} in the file, "
                         f"{tuple(state[wrong].shape)} in the model: the file is damaged; write it again")
    with torch.no_grad():
        model.load_state_dict(tensors, strict=False)


def _merge_adapters(model: nn.Module, entry: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Apply the task's adapters (experts mode) with the file's tensors, and merge them into plain layers."""
    method = method_for(AdapterConfig.from_record(entry["adapters"]))
    method.apply(model)
    _put(model, tensors, set(method.adapter_tensors(model)), f"the adapters of task '{entry['name']}'", path)
    method.merge(model)
