"""One head per task on one backbone, for a run that trains the tasks together (mode shared).

    heads = TaskHeads.build(loaded, [("sst", classes, False), ("sts", None, True)], seed=0)
    heads.use("sts")           # the next forward runs the sts head
    heads.install("sst")       # plain modules again: the model as it is saved (the first task's head)

Each head module of the model (timm's `head`; transformers' `classifier`, and a pooler the source lacked) is
replaced by a TaskSwitch holding that module once per task. Every task's head is then a submodule of the model
while it trains, so the optimizer, the training state and DDP see them all (DDP with find_unused_parameters,
since a step's batch uses one head), and switching is setting a name, not moving modules under DDP.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowrank_cli.data.sampling import derive_seed, seeded
from lowrank_cli.models.heads import Head, replace_head


class SwitchState:
    """The task whose head runs; shared by the switches of one model."""

    def __init__(self, current: str):
        self.current = current


class TaskSwitch(nn.Module):
    def __init__(self, heads: dict[str, nn.Module], state: SwitchState):
        super().__init__()
        self.heads = nn.ModuleDict(heads)
        self.state = state

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.heads[self.state.current](*args, **kwargs)


@dataclass
class TaskHeads:
    model: nn.Module
    head: Head  # the module names of a head, and the first task's outputs
    modules: dict[str, dict[str, nn.Module]]  # task -> head module name -> that task's module
    outputs: dict[str, int]
    classes: dict[str, list[str] | None]
    labels: dict[str, dict[str, Any]]  # transformers: each task's id2label, label2id, problem_type
    state: SwitchState

    @classmethod
    def build(cls, loaded: Any, tasks: list[tuple[str, list[str] | None, bool]], *, seed: int) -> TaskHeads:
        """A new head per task (name, classes or None, regression) on `loaded` (a LoadedModel, changed in place:
        it becomes the model with the first task's head, as `finetune` would make it)."""
        from lowrank_cli.checkpoint.format import move_record

        pristine = loaded.twin()
        modules, outputs, labels, head = {}, {}, {}, None
        for i, (name, classes, regression) in enumerate(tasks):
            target = loaded if i == 0 else pristine.twin()
            old = target.model
            with seeded(derive_seed(seed, "head", name)):
                made = replace_head(target, 1 if regression else len(classes), classes=classes, regression=regression)
            if i == 0:
                head = made
                if target.model is not old:
                    move_record(old, target.model, made.renamed)
            modules[name] = {m: target.model.get_submodule(m) for m in head.modules}
            outputs[name] = made.outputs
            config = getattr(target.model, "config", None)
            if config is not None and hasattr(config, "id2label"):
                labels[name] = {k: copy.deepcopy(getattr(config, k)) for k in ("id2label", "label2id", "problem_type")}
        state = SwitchState(tasks[0][0])
        for m in head.modules:
            _set(loaded.model, m, TaskSwitch({t: modules[t][m] for t in modules}, state))
        return cls(loaded.model, head, modules, outputs, {name: classes for name, classes, _ in tasks}, labels, state)

    def use(self, task: str) -> None:
        """Run `task`'s head from the next forward on; the model says its classes are that task's (what
        evaluation checks the data against)."""
        from lowrank_cli.checkpoint.format import info_of

        self.state.current = task
        if isinstance(getattr(self.model, "num_classes", None), int):
            self.model.num_classes = self.outputs[task]
        config = getattr(self.model, "config", None)
        if config is not None and task in self.labels:  # transformers: num_labels follows id2label
            for key, value in self.labels[task].items():
                setattr(config, key, copy.deepcopy(value))
        info = info_of(self.model)
        if info is not None and info.finetune is not None:
            info.finetune = {**info.finetune, "classes": self.classes[task]}

    def install(self, task: str) -> None:
        """Put `task`'s head modules in place as plain modules (no switch)."""
        for m in self.head.modules:
            _set(self.model, m, self.modules[task][m])

    def tensors(self, task: str) -> dict[str, torch.Tensor]:
        """`task`'s head tensors under the names they have when its head is installed."""
        found = {}
        for m in self.head.modules:
            found.update({f"{m}.{k}": v.detach().clone() for k, v in self.modules[task][m].state_dict().items()})
        return found



def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)
