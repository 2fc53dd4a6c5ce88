"""Multi-task checkpoints built by hand, as the multi-task training would write them, with the model of each task
built apart (the reference a loaded task must equal): a tiny ViT with a digits head (10 classes) and a parity head
(2 classes), in `shared` mode or in `experts` mode with each task's own peft LoRA adapters (random, non-zero);
and a tiny BERT with a classification head and a regression head."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from helpers import make_tiny_vit

import lowrank_cli
from lowrank_cli.adapters.base import AdapterConfig
from lowrank_cli.adapters.files import head_tensors
from lowrank_cli.adapters.methods import method_for
from lowrank_cli.adapters.targets import adapter_targets
from lowrank_cli.checkpoint.format import move_record, record_finetune, record_source
from lowrank_cli.checkpoint.tasks import write_multitask
from lowrank_cli.models.heads import replace_head
from lowrank_cli.models.loaded import LoadedModel

VIT = {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 10}
DIGITS = [str(d) for d in range(10)]
PARITY = ["even", "odd"]


def randomize(params, seed: int, scale: float = 0.3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(scale * torch.randn(p.shape, generator=generator))


def entry(name: str, classes: list[str] | None, head: list[str], *, data: str = "", adapters=None,
          pairs: bool = False, metric: str = "top1", score: float = 0.5, trainable: int = 0) -> dict:
    return {"name": name, "data": data, "task": "classification" if classes else "regression", "classes": classes,
            "pairs": pairs, "metric": metric, "head": {"modules": head, "outputs": len(classes) if classes else 1},
            "adapters": adapters, "scores": {f"val_{metric}": score}, "trainable_parameters": trainable}


def write_vit_tasks(path: str | Path, *, mode: str = "shared", factorize: bool = True) -> dict[str, torch.nn.Module]:
    """Write the two-task ViT checkpoint at `path`; return {task: its model built by hand (merged, eval)}."""
    backbone = make_tiny_vit(**VIT)
    if factorize:
        lowrank_cli.factorize(backbone, kappa=2, device="cpu")
    randomize(backbone.head.parameters(), 1)
    config = None
    if mode == "experts":
        config = AdapterConfig("lora", 4, 4.0, 0.0, tuple(adapter_targets(backbone, head=["head"])))
    models, tensors, entries = {}, {}, []
    for i, (name, classes) in enumerate((("digits", DIGITS), ("parity", PARITY))):
        model = copy.deepcopy(backbone)
        if i:
            model.reset_classifier(len(classes))
            randomize(model.head.parameters(), 2)
        adapters = {}
        if config is not None:
            method = method_for(config)
            method.apply(model)
            randomize([p for _, p in method.adapter_parameters(model)], 10 + i, scale=0.1)
            adapters = method.adapter_tensors(model)
        tensors[name] = {k: v.clone() for k, v in {**head_tensors(model, ["head"]), **adapters}.items()}
        if config is not None:
            method.merge(model)
        models[name] = model.eval()
        entries.append(entry(name, classes, ["head"], data=f"/data/{name}", score=0.9 - 0.2 * i,
                             adapters=config.record() if config else None,
                             trainable=sum(t.numel() for t in tensors[name].values())))
    record = {"mode": mode, "method": "lora" if config else "full", "tasks": entries,
              "overall": {"before": 0.5, "after": 0.8}, "schedule": "round-robin"}
    write_multitask(path, backbone, record, tensors)
    return models


def write_bert_tasks(path: str | Path, bert_folder: Path) -> dict[str, torch.nn.Module]:
    """A factorized tiny BERT with a `length` head (long / short) and an `sts` regression head over text pairs."""
    loaded = lowrank_cli.load_model(str(bert_folder))
    lowrank_cli.factorize(loaded.model, kappa=2, device="cpu")
    record_source(loaded.model, loaded.source)
    copies = [loaded, LoadedModel(copy.deepcopy(loaded.model), copy.deepcopy(loaded.spec), dict(loaded.source))]
    models, tensors, entries = {}, {}, []
    for i, (one, name, classes) in enumerate(zip(copies, ("length", "sts"), (["long", "short"], None))):
        old = one.model
        head = replace_head(one, len(classes) if classes else 1, classes=classes, regression=classes is None)
        move_record(old, one.model, head.renamed)
        record_finetune(one.model, {"task": "classification" if classes else "regression", "classes": classes},
                        spec=one.spec, source=one.source)
        randomize([p for n, p in one.model.named_parameters() if n.startswith("classifier")], 20 + i)
        models[name] = one.model.eval()
        tensors[name] = {k: v.clone() for k, v in head_tensors(one.model, head.modules).items()}
        entries.append(entry(name, classes, head.modules, pairs=classes is None,
                             metric="accuracy" if classes else "spearman", score=0.7))
    write_multitask(path, models["length"], {"mode": "shared", "method": "full", "tasks": entries, "overall": {}},
                    tensors)
    return models
