"""Scores of a fine-tuned model on labelled data: accuracy for classes, Pearson and Spearman correlations for a
regression score (STS-style), over batches of any kind (`batch.parts()`: inputs, labels, attention mask).

    evaluate_texts(model, "dev.jsonl", tokenizer)   # {"accuracy", "texts"} or {"pearson", "spearman", "texts"}
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from lowrank_cli.devices import autocast_for
from lowrank_cli.errors import InputError
from lowrank_cli.models.inputs import output_tensor


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denominator = (x.square().sum() * y.square().sum()).sqrt()
    return float((x * y).sum() / denominator) if denominator > 0 else 0.0


def ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks, ties sharing their average rank (as scipy.stats.rankdata)."""
    values, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    return ((ends - counts.double() + 1 + ends) / 2)[inverse]


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    return pearson(ranks(x), ranks(y))


def scores(predictions: torch.Tensor, labels: torch.Tensor, regression: bool) -> dict[str, float]:
    """Accuracy of logits (N, classes) against class indices, or the correlations of scores (N,)."""
    if regression:
        predicted = predictions.reshape(len(labels)).float()
        return {"pearson": pearson(predicted, labels), "spearman": spearman(predicted, labels)}
    return {"accuracy": float((predictions.argmax(-1) == labels).double().mean())}


@torch.no_grad()
def predict(model: nn.Module, loader: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(the model's outputs, the labels) over every batch of `loader`, on the CPU; the model's mode comes back."""
    was_training = model.training
    model.eval()
    outputs, labels = [], []
    try:
        for batch in loader:
            inputs, batch_labels, mask = batch.parts()
            if len(inputs) == 0:
                continue
            kwargs = {"attention_mask": mask.to(device)} if mask is not None else {}
            with autocast_for(device):
                out = output_tensor(model(inputs.to(device), **kwargs))
            outputs.append(out.float().cpu())
            labels.append(batch_labels)
    finally:
        model.train(was_training)
    if not outputs:
        raise InputError("no held-out sample could be read: check the held-out data")
    return torch.cat(outputs), torch.cat(labels)


def score_loader(model: nn.Module, loader: Any, device: torch.device, regression: bool) -> dict[str, float]:
    predictions, labels = predict(model, loader, device)
    return {**scores(predictions, labels, regression), "samples": len(labels)}


def model_classes(model: nn.Module) -> list[str] | None:
    """The class names a fine-tuned model records (its lrc record, else a transformers config's labels)."""
    from lowrank_cli.checkpoint.format import info_of

    info = info_of(model)
    if info is not None and info.finetune and info.finetune.get("classes"):
        return list(info.finetune["classes"])
    config = getattr(model, "config", None)
    id2label = getattr(config, "id2label", None) or {}
    return [str(id2label[i]) for i in sorted(id2label)] if id2label else None


def _holds_classes(data: str | os.PathLike) -> bool:
    from lowrank_cli.data.labelled_texts import read_labelled_texts

    try:
        return not read_labelled_texts(data).regression
    except InputError:
        return False


def evaluate_texts(model: nn.Module, data: str | os.PathLike, tokenizer: Any, *, max_length: int | None = None,
                   batch_size: int = 64, device: str | torch.device | None = None) -> dict[str, Any]:
    """Accuracy (classes) or Pearson / Spearman (a regression head) of a text classifier on a labelled .jsonl /
    .csv file, whose labels are read against the model's class names (a regression head reads each record's
    `score`, or its `label` as a number, as `:score` does)."""
    from lowrank_cli.data.labelled_texts import labelled_text_loader, read_labelled_texts
    from lowrank_cli.models.inputs import default_max_length

    config = model.config
    regression = getattr(config, "problem_type", None) == "regression" or config.num_labels == 1
    classes = None if regression else model_classes(model)
    if regression:
        try:  # a score, or a label that is a number (STS-B keeps the similarity there)
            texts = read_labelled_texts(data, target="score")
        except InputError:
            if not _holds_classes(data):
                raise
            raise InputError(f"'{data}' holds class labels; the model regresses a score: give scores (numbers in "
                             "'score' or 'label')") from None
    else:
        texts = read_labelled_texts(data, classes=classes)
        if texts.regression:
            raise InputError(f"'{texts.root}' holds scores; the model is a classifier: give class labels")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    loader, _ = labelled_text_loader(texts, tokenizer, batch_size=batch_size, shuffle=False, drop_last=False,
                                     max_length=max_length or default_max_length(model, tokenizer))
    result = score_loader(model, loader, dev, regression)
    texts_scored = result.pop("samples")
    return {**result, "texts": texts_scored, "precision": "bf16" if dev.type == "cuda" else "fp32"}


def task_score(scores: dict[str, float]) -> tuple[str, float]:
    """(metric, value in [0, 1]) of one task's scores, as the multi-task overall counts it: the accuracy (top-1 for
    images), or (r + 1) / 2 of the Pearson correlation (else Spearman) of a regression, as the seed paper scores
    STS. Keys may carry a `val_` prefix (the held-out scores of a run)."""
    plain = {k.removeprefix("val_"): v for k, v in scores.items()}
    for key in ("accuracy", "top1"):
        if key in plain:
            return key, float(plain[key])
    for key in ("pearson", "spearman"):
        if key in plain:
            return key, (float(plain[key]) + 1) / 2
    raise ValueError(f"no accuracy or correlation among the scores {sorted(scores)}")


def overall_score(per_task: dict[str, dict[str, float]]) -> float:
    """The multi-task overall score (the CS224N multi-task BERT paper's): the mean over tasks of `task_score`."""
    if not per_task:
        raise ValueError("no task to average")
    return sum(task_score(s)[1] for s in per_task.values()) / len(per_task)
