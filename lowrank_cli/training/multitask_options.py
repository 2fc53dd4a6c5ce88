"""The options of a multi-task fine-tuning: those of `finetune`, and how the tasks share the backbone.

    mode          shared      one set of adapters (or every weight) for all tasks, one head per task; `schedule`
                              orders the tasks' batches (sequential | interleaved | proportional)
                  experts     one set of adapters per task over the untouched backbone; `load(..., task=NAME)`
                              merges that task's (zero overhead)
                  merge       one set of adapters per task, trained apart, then merged into one backbone by
                              `merge_rule` (average | weighted | concat | svd, `merge_rank` for svd) with
                              `task_weights`
                  orthogonal  LoRA whose B is task t's column block of one fixed random orthogonal matrix (only A
                              trains), so the tasks' updates live in orthogonal output subspaces; summed exactly
                              (in weight space: each task's head still sees the other tasks' updates)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lowrank_cli.errors import UsageError
from lowrank_cli.option_fields import check_values, option
from lowrank_cli.training.options import FinetuneOptions

MULTITASK_PANEL = "Multi-task"
MODES = ("shared", "experts", "merge", "orthogonal")
# The vocabularies of data.multitask_loader and training.merging (those import torch; tests/cli/test_help.py pins them)
SCHEDULES = ("sequential", "interleaved", "proportional")
MERGE_RULES = ("average", "weighted", "concat", "svd")
DEFAULT_MODE = "experts"  # no interference between tasks and no cost at inference when the task is known
DEFAULT_SCHEDULE = "proportional"  # every sample once an epoch, as single-task fine-tuning sees its data
DEFAULT_MERGE_RULE = "concat"  # each task's whole update, as trained: the exact sum (see training.merging)
# Which methods each mode takes: experts and merge combine adapters (or heads alone, experts); orthogonal is LoRA.
MODE_METHODS = {"shared": ("head", "full", "lora", "dora", "rlrr"), "experts": ("head", "lora", "dora", "rlrr"),
                "merge": ("full", "lora", "dora", "rlrr"), "orthogonal": ("lora",)}


@dataclass
class MultitaskOptions(FinetuneOptions):
    """FinetuneOptions plus `mode` (MODES), `schedule` (shared), `merge_rule` / `merge_rank` (merge) and
    `task_weights` ({task name: weight > 0}: merge's weighted, concat and svd rules). `val_data` and `teacher` are
    per task, so they are not options here: each task holds out a share of its data (`val_fraction`, or an
    ImageFolder's val/ split)."""

    mode: str = option(
        DEFAULT_MODE, choices=MODES, flag="--multitask", panel=MULTITASK_PANEL,
        help="How the tasks share the backbone: shared (one set of adapters, a head per task), experts (one set per "
        "task, merged at load(task=)), merge (per-task adapters merged into one backbone), orthogonal (LoRA on "
        "disjoint orthogonal blocks, their updates summed).")
    schedule: str | None = option(
        None, choices=SCHEDULES, panel=MULTITASK_PANEL,
        help=f"--multitask shared: the order of the tasks' batches (default {DEFAULT_SCHEDULE}: each task's share of "
        "the data).")
    merge_rule: str | None = option(
        None, choices=MERGE_RULES, flag="--merge", panel=MULTITASK_PANEL,
        help=f"--multitask merge: how the tasks' updates combine (default {DEFAULT_MERGE_RULE}: their exact sum; svd "
        "re-truncates it to --merge-rank).")
    merge_rank: int | None = option(None, low=1, panel=MULTITASK_PANEL, help="--merge svd: the rank of the merged "
                                    "update.")
    task_weights: dict[str, float] | None = option(
        None, cli_type=list[str], parse=lambda items: parse_task_weights(items), flag="--task-weight",
        metavar="NAME=W", panel=MULTITASK_PANEL,
        help="--merge weighted / concat / svd: a task's weight, > 0 (repeatable; weighted defaults to the tasks' "
        "training samples).")

    def check(self) -> None:
        check_values(self)
        if self.method not in MODE_METHODS[self.mode]:
            raise UsageError(f"`method` {self.method} does not go with `mode` {self.mode}, which takes "
                             f"{', '.join(MODE_METHODS[self.mode])}: {self._method_hint()}")
        checks = [
            (self.schedule is None or self.mode == "shared",
             f"`schedule` orders the tasks' batches of `mode` shared; `mode` {self.mode} trains each task on its own: "
             "leave it out"),
            (self.merge_rule is None or self.mode == "merge",
             f"`merge_rule` says how `mode` merge combines the tasks' adapters (this run is {self.mode}): leave it "
             "out"),
            (self.merge_rank is None or self.rule == "svd",
             "`merge_rank` is the rank of `merge_rule` svd: give that rule, or leave it out"),
            (self.rule != "svd" or (self.merge_rank is not None and self.merge_rank >= 1),
             f"`merge_rule` svd re-truncates the merged update: give `merge_rank` N >= 1 (got {self.merge_rank})"),
            (self.task_weights is None or (self.mode == "merge" and self.rule in ("weighted", "concat", "svd")),
             "`task_weights` weigh the tasks' updates when `mode` merge merges them (rules weighted, concat, svd): "
             "leave them out"),
            (not self.task_weights or all(isinstance(w, (int, float)) and w > 0 and math.isfinite(w)
                                          for w in self.task_weights.values()),
             f"`task_weights` must be numbers > 0, got {self.task_weights}"),
            (self.val_data is None, "`val_data` is one held-out set, and a multi-task run has one per task: each task "
             "holds out a share of its data (`val_fraction`) or its ImageFolder's val/ split"),
            (self.teacher is None, "`teacher` is a model fine-tuned on one task; a multi-task run has several: leave "
             "it out"),
            (self.merge, "a multi-task run writes one checkpoint with every task's head (and, `mode` experts, its "
             "adapters): leave out `merge=False`"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        super().check()

    def _method_hint(self) -> str:
        if self.mode == "orthogonal":
            return "orthogonal adaptation is a LoRA construction; leave out `method` (lora is the default)"
        if self.method == "full":
            return "one full copy per task is no adapter: use `mode` shared or merge, or lora, dora or rlrr"
        return "use `mode` shared"

    @property
    def rule(self) -> str | None:
        """The merge rule this run uses (None unless `mode` is merge or orthogonal, which merges exactly)."""
        if self.mode == "merge":
            return self.merge_rule or DEFAULT_MERGE_RULE
        return "concat" if self.mode == "orthogonal" else None

    def check_task_names(self, names: list[str]) -> None:
        """`task_weights`, when given, weigh every task of the run and nothing else."""
        if not self.task_weights:
            return
        unknown = sorted(set(self.task_weights) - set(names))
        if unknown:
            raise UsageError(f"`task_weights` names {', '.join(unknown)}, not a task of this run ({', '.join(names)})")
        missing = [n for n in names if n not in self.task_weights]
        if missing:
            default = " (weighted then weighs them by their training samples)" if self.rule == "weighted" else ""
            raise UsageError(f"`task_weights` gives no weight for {', '.join(missing)}: weigh every task, or none"
                             + default)

    def settings(self) -> dict[str, Any]:
        """What the checkpoint records of how the tasks share the backbone."""
        return {"mode": self.mode, "schedule": (self.schedule or DEFAULT_SCHEDULE) if self.mode == "shared" else None,
                "merge_rule": self.rule, "merge_rank": self.merge_rank, "task_weights": self.task_weights}


def parse_task_weights(items: list[str] | dict[str, float] | None) -> dict[str, float] | None:
    """`task_weights` as the command line writes them, NAME=W once per task -> {name: weight}; a dict is kept."""
    if not items or isinstance(items, dict):
        return items or None
    weights: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if name in weights:
            raise UsageError(f"`task_weights` gives task '{name}' two weights: give each task one")
        try:
            weights[name] = float(value)
        except ValueError:
            weights[name] = float("nan")
        if not sep or not name or not weights[name] > 0 or weights[name] == float("inf"):
            raise UsageError(f"`task_weights` '{item}' is not NAME=W with a weight W > 0")
    return weights
