"""One task of a multi-task run whose tasks train apart (modes experts, merge, orthogonal): a single-task
fine-tuning (FinetuneRun, so resume, signals, DDP, compile, metrics and the best state work as in `finetune`) of
that task's data, read as its `--task` says, that writes the task's adapters and head (an adapter file) or, for
`method` full, the whole fine-tuned model. With `block` the adapters are orthogonal: LoRA whose B is column block
`block` of `blocks` of one fixed orthogonal matrix per layer (adapters.orthogonal)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from lowrank_cli.adapters.base import AdapterConfig
from lowrank_cli.data.task_data import task_of, task_sets
from lowrank_cli.data.tasks import TaskSpec
from lowrank_cli.models.heads import Head
from lowrank_cli.training.finetune_run import FinetuneRun, Task
from lowrank_cli.training.recovery_run import RunData

NO_HELD_OUT = "no held-out data: give `val_fraction`, or the ImageFolder a val/ split"


def read_task(spec: TaskSpec, opts: Any) -> tuple[RunData, Task]:
    """A task's training and held-out data (the same split every time for the same `seed` and `val_fraction`)."""
    modality, train, val, val_from = task_sets(spec, evaluate=opts.evaluate_accuracy, seed=opts.seed,
                                               val_fraction=opts.val_fraction)
    classes, regression = task_of(train)
    d = RunData(modality, train, val, use_labels=True, val_from=val_from, why_no_accuracy=NO_HELD_OUT)
    return d, Task(classes, regression, spec.path)


FINGERPRINTED = ("method", "adapter_rank", "adapter_alpha", "adapter_dropout", "targets", "seed", "steps", "epochs",
                 "lr", "batch_size", "grad_accum", "weight_decay", "warmup_steps", "warmup_fraction", "clip_grad",
                 "label_smoothing", "val_fraction", "augment", "max_length", "keep", "eval_every")


def fingerprint(spec: TaskSpec, opts: Any, block: int | None, blocks: int | None) -> dict[str, Any]:
    """What a task's training depends on: a task finished earlier in a run is reused only when it matches."""
    return {"task": spec.name, "data": str(spec.path.resolve()), "target": spec.target, "block": block,
            "blocks": blocks, **{k: getattr(opts, k) for k in FINGERPRINTED}}


class TaskRun(FinetuneRun):
    """FinetuneRun on one task of a multi-task run (see the module docstring)."""

    api = "finetune_tasks"

    def __init__(self, *args: Any, spec: TaskSpec, block: int | None = None, blocks: int | None = None,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.spec, self.block, self.blocks = spec, block, blocks
        self.phase = f"finetune {spec.name}"
        self.log = _prefixed(self.log, spec.name)

    def _task_data(self, data: Path) -> tuple[RunData, Task]:
        d, task = read_task(self.spec, self.opts)
        self.pairs = bool(getattr(d.train, "pairs", False))
        return d, task

    def _adapter_config(self, raw: nn.Module, head: Head) -> AdapterConfig:
        config = super()._adapter_config(raw, head)
        if self.block is None:
            return config
        return dataclasses.replace(config, method="orthogonal", block=self.block, blocks=self.blocks)

    def _settings_of(self, *args: Any) -> dict[str, Any]:
        settings = super()._settings_of(*args)
        settings.update(task_name=self.spec.name, target=self.spec.target, pairs=self.pairs,
                        fingerprint=fingerprint(self.spec, self.opts, self.block, self.blocks))
        return settings


    def _output(self, *args: Any) -> None:
        log, self.log = self.log, (lambda message: None)  # not "Wrote FILE": the work folder is lrc's own
        try:
            super()._output(*args)
        finally:
            self.log = log
        self.log("trained (kept in the run's work folder until every task is)")


def _prefixed(log: Any, name: str):
    return lambda message: log(f"{name}: {message}")
