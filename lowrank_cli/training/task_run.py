"""One task of a multi-task run whose tasks train apart (modes experts, merge, orthogonal): a single-task
fine-tuning (training.finetune_strategy, so resume, signals, DDP, compile, metrics and the best state work as in
`finetune`) of that task's data, read as its `--task` says, that writes the task's adapters and head (an adapter
file) or, for `method` full, the whole fine-tuned model. With `block` the adapters are orthogonal: LoRA whose B is
column block `block` of `blocks` of one fixed orthogonal matrix per layer (adapters.orthogonal)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from lowrank_cli.adapters.base import AdapterConfig
from lowrank_cli.data.task_data import task_of, task_sets
from lowrank_cli.data.tasks import TaskSpec
from lowrank_cli.training.strategy import RunData, Task

NO_HELD_OUT = "no held-out data: give `val_fraction`, or the ImageFolder a val/ split"


def read_task(spec: TaskSpec, opts: Any) -> tuple[RunData, Task]:
    """A task's training and held-out data (the same split every time for the same `seed` and `val_fraction`)."""
    modality, train, val, val_from = task_sets(spec, evaluate=opts.evaluate_accuracy, seed=opts.seed,
                                               val_fraction=opts.val_fraction)
    classes, regression = task_of(train)
    task = Task(classes, regression, spec.path)
    return RunData(modality, train, val, use_labels=True, val_from=val_from, why_no_accuracy=NO_HELD_OUT,
                   task=task), task


FINGERPRINTED = ("method", "adapter_rank", "adapter_alpha", "adapter_dropout", "targets", "seed", "steps", "epochs",
                 "lr", "batch_size", "grad_accum", "weight_decay", "warmup_steps", "warmup_fraction", "clip_grad",
                 "label_smoothing", "val_fraction", "augment", "max_length", "keep", "eval_every")


def fingerprint(spec: TaskSpec, opts: Any, block: int | None, blocks: int | None) -> dict[str, Any]:
    """What a task's training depends on: a task finished earlier in a run is reused only when it matches."""
    return {"task": spec.name, "data": str(spec.path.resolve()), "target": spec.target, "block": block,
            "blocks": blocks, **{k: getattr(opts, k) for k in FINGERPRINTED}}


class TaskOfRun:
    """The source of a FinetuneStrategy that trains one task of a multi-task run (see the module docstring)."""

    api = "finetune_tasks"  # what the resume hint calls

    def __init__(self, spec: TaskSpec, block: int | None = None, blocks: int | None = None):
        self.spec, self.block, self.blocks = spec, block, blocks
        self.phase = f"finetune {spec.name}"

    def read(self, opts: Any) -> RunData:
        return read_task(self.spec, opts)[0]

    def configure(self, config: AdapterConfig) -> AdapterConfig:
        if self.block is None:
            return config
        return dataclasses.replace(config, method="orthogonal", block=self.block, blocks=self.blocks)

    def settings(self, opts: Any, d: RunData) -> dict[str, Any]:
        return {"task_name": self.spec.name, "target": self.spec.target,
                "pairs": bool(getattr(d.train, "pairs", False)),
                "fingerprint": fingerprint(self.spec, opts, self.block, self.blocks)}

    def wrote(self, log: Any, output: Path, merged: bool) -> None:
        log("trained (kept in the run's work folder until every task is)")  # the work folder is lrc's own
