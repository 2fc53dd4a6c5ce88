"""A new head sized to a task: timm's `reset_classifier`, or a transformers task class built around the model's
encoder (sequence classification for text, image classification for vision), with the task's class names in its
config. The LoadedModel's spec is updated so that the saved checkpoint rebuilds the model with its new head.

    head = replace_head(loaded, outputs=2, classes=["even", "odd"])
    head.modules   # ["head"]: what trains in full whatever the method
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lowrank_cli.errors import UsageError
from lowrank_cli.models.loaded import LoadedModel
from lowrank_cli.models.transformers_models import is_text_model, is_transformers_model


@dataclass
class Head:
    modules: list[str]  # module names of the new head (they train in full, whatever the method)
    outputs: int  # classes, or 1 for a regression score
    renamed: dict[str, str] = field(default_factory=dict)  # old module name -> new (transformers task classes)

    def record(self) -> dict[str, Any]:
        return {"modules": self.modules, "outputs": self.outputs}


def replace_head(loaded: LoadedModel, outputs: int, *, classes: list[str] | None = None,
                 regression: bool = False) -> Head:
    """Give `loaded.model` a new, freshly initialised head with `outputs` outputs (in place for timm; a new task
    model around the same encoder modules for transformers, in `loaded.model`), and update `loaded.spec`."""
    if outputs < 1:
        raise UsageError(f"a head needs at least one output, got {outputs}")
    if is_transformers_model(loaded.model):
        return _transformers_head(loaded, outputs, classes, regression)
    return _timm_head(loaded, outputs)


def head_modules(model: nn.Module) -> list[str]:
    """The module names of a timm model's classifier (a distilled model has two heads)."""
    classifier = model.get_classifier()
    chosen = {id(m) for m in (classifier if isinstance(classifier, (tuple, list)) else [classifier])}
    return [n for n, m in model.named_modules() if id(m) in chosen and n]


def _timm_head(loaded: LoadedModel, outputs: int) -> Head:
    model = loaded.model
    if not hasattr(model, "reset_classifier"):
        raise UsageError(f"{type(model).__name__} has no reset_classifier(), so lrc cannot give it a new head: use a "
                         "timm or transformers model")
    param = next(model.parameters())
    model.reset_classifier(outputs)
    model.to(device=param.device, dtype=param.dtype)
    loaded.spec.model_args["num_classes"] = outputs
    loaded.spec.pretrained_cfg["num_classes"] = outputs
    return Head(head_modules(model), outputs)


def _task_class(old: nn.Module, config: Any) -> type:
    from lowrank_cli.models.transformers_models import require

    transformers = require()
    auto, task = ((transformers.AutoModelForSequenceClassification, "sequence classification") if is_text_model(old)
                  else (transformers.AutoModelForImageClassification, "image classification"))
    try:
        return auto._model_mapping[type(config)]
    except KeyError:
        raise UsageError(f"transformers has no {task} class for model_type '{config.model_type}', so lrc cannot give "
                         "this model a task head") from None


def _transformers_head(loaded: LoadedModel, outputs: int, classes: list[str] | None, regression: bool) -> Head:
    """The task class of the model's config (BertForSequenceClassification, ViTForImageClassification), its
    encoder modules taken over from the loaded model (low-rank layers included); the parts the loaded model lacks
    (the classifier, and a pooler when the source had none) are new and make up the head."""
    from lowrank_cli.models.transformers_models import quiet, transformers_spec

    old = loaded.model
    config = copy.deepcopy(old.config)
    config.num_labels = outputs
    config.problem_type = "regression" if regression else "single_label_classification"
    if classes:
        config.id2label = dict(enumerate(classes))
        config.label2id = {name: i for i, name in enumerate(classes)}
    cls = _task_class(old, config)
    config.architectures = [cls.__name__]
    with quiet():
        new = cls._from_config(config)
    old_base, new_base = old.base_model, getattr(new, new.base_model_prefix)
    taken = set()
    for name, child in old_base.named_children():
        if child is not None and getattr(new_base, name, None) is not None:
            setattr(new_base, name, child)
            taken.add(name)
    param = next(old.parameters())
    new.to(device=param.device, dtype=param.dtype).eval()
    prefix = new.base_model_prefix
    head = [n for n, c in new.named_children() if n != prefix and any(True for _ in c.parameters())]
    head += [f"{prefix}.{n}" for n, c in new_base.named_children()
             if n not in taken and c is not None and any(True for _ in c.parameters())]
    old_names = {id(m): n for n, m in old.named_modules()}
    renamed = {old_names[id(m)]: n for n, m in new.named_modules() if id(m) in old_names and old_names[id(m)] != n}
    if hasattr(old, "pretrained_cfg"):
        new.pretrained_cfg = old.pretrained_cfg
    loaded.model, loaded.spec = new, transformers_spec(new)
    return Head(head, outputs, renamed)
