"""Held-out evaluation during training: how held-out data is scored, and the best state so far.

A scorer measures the model on held-out data and names the metric that decides which state is best, with its
direction (`score`): labelled images by top-1 accuracy (`AccuracyScorer`); unlabelled images and texts by the
distillation loss on data the student never trains on, a text encoder by the cosine between the student's and the
teacher's pooled outputs (`DistillationScorer`); a fine-tuned task by its accuracy or Spearman correlation
(`TaskScorer`); several tasks by their overall (`TasksScorer`). A new kind of run (say, held-out perplexity,
lower is better) adds a scorer. `KeepBest` remembers the weights of the best score (training.callbacks.HeldOutEval
runs a scorer in the loop).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_cli.devices import autocast_for


@dataclass
class Score:
    name: str  # the metric that decides which state is best ("val_top1", "val_cosine", "val_loss")
    higher_is_better: bool

    def better(self, value: float, than: float | None) -> bool:
        return than is None or (value > than if self.higher_is_better else value < than)


class Scorer(Protocol):
    score: Score  # the metric that picks the best state, and whether higher is better

    def __call__(self, phase: str) -> dict[str, Any]:
        """The held-out metrics of the model now (`phase`: what the progress bar calls the evaluation)."""


@dataclass
class Evaluator:
    """Accuracy on labelled images as a run measures it: its batch size, loader workers, processes (each rank
    scores its share) and progress bar."""

    batch_size: int
    workers: int
    ctx: Any
    progress: Callable[..., None]

    def __call__(self, model: nn.Module, images: Any, phase: str, transform_from: nn.Module) -> dict[str, Any]:
        from lowrank_cli.evaluation.accuracy import evaluate

        return evaluate(model, images, batch_size=self.batch_size, device=self.ctx.device, num_workers=self.workers,
                        transform_from=transform_from, dist=self.ctx,
                        progress=lambda done, total: self.progress(phase, done, total, ""))


@dataclass
class AccuracyScorer:
    """Top-1 and top-5 accuracy of `model` on labelled held-out images (preprocessed as `transform_from` says)."""

    model: nn.Module
    images: Any
    evaluate: Evaluator
    transform_from: nn.Module
    score = Score("val_top1", True)

    def __call__(self, phase: str = "eval") -> dict[str, float]:
        result = self.evaluate(self.model, self.images, phase, self.transform_from)
        return {"val_top1": result["top1"], "val_top5": result["top5"]}


class DistillationScorer:
    """The distillation terms of the step's student against its teacher on held-out batches (`text`: and the
    cosine of their pooled outputs, which then decides the best state; otherwise the loss, lower is better)."""

    def __init__(self, step: Any, loader: Any, device: torch.device, *, text: bool):
        self.step, self.loader, self.device, self.text = step, loader, device, text
        self.score = Score("val_cosine", True) if text else Score("val_loss", False)

    def __call__(self, phase: str = "eval") -> dict[str, float]:
        return distillation_scores(self.step.student, self.step.teacher, self.step, self.loader, self.device,
                                   text=self.text)


class PerplexityScorer:
    """A causal LM on held-out token windows: its perplexity (next-token, every position of each window after the
    first; lower is better, decides the best state) and the distillation terms against its teacher, if any."""

    score = Score("val_perplexity", False)

    def __init__(self, step: Any, loader: Any, device: torch.device, windows: torch.Tensor, batch_size: int):
        self.step, self.loader, self.device = step, loader, device
        self.windows, self.batch_size = windows, batch_size

    def __call__(self, phase: str = "eval") -> dict[str, float]:
        terms = {} if self.step.teacher is None else distillation_scores(
            self.step.student, self.step.teacher, self.step, self.loader, self.device, text=False)
        return {**terms, "val_perplexity": windows_perplexity(self.step.student, self.windows, self.device,
                                                              self.batch_size)}


@torch.no_grad()
def windows_perplexity(model: nn.Module, windows: torch.Tensor, device: torch.device, batch_size: int) -> float:
    """exp(mean next-token NLL) of `model` over token windows (N, L): each window predicts its tokens 2..L. The
    model runs without a KV cache, in eval mode, and is put back in its mode."""
    import math

    from lowrank_cli.evaluation.perplexity import window_nll
    from lowrank_cli.models.families import family_of

    was_training = model.training
    model.eval()
    nll, tokens = 0.0, 0
    try:
        with family_of(model).plain_outputs(model), autocast_for(device):
            for start in range(0, len(windows), batch_size):
                batch = windows[start:start + batch_size].to(device)
                part_nll, part_tokens = window_nll(model, batch[:, :-1], batch[:, 1:], [batch.shape[1] - 1] * len(batch))
                nll, tokens = nll + part_nll, tokens + part_tokens
    finally:
        model.train(was_training)
    return math.exp(nll / max(tokens, 1))


class TaskScorer:
    """A fine-tuned text task on held-out batches: accuracy (classes) or Pearson / Spearman (a score)."""

    def __init__(self, model: nn.Module, loader: Any, device: torch.device, *, regression: bool):
        self.model, self.loader, self.device, self.regression = model, loader, device, regression
        self.score = Score("val_spearman" if regression else "val_accuracy", True)

    def __call__(self, phase: str = "eval") -> dict[str, float]:
        from lowrank_cli.evaluation.task_scores import score_loader

        result = score_loader(self.model, self.loader, self.device, self.regression)
        return {f"val_{k}": v for k, v in result.items() if k != "samples"}


class TasksScorer:
    """Every task of a shared run with its own head (`heads.use`); their overall decides the best state."""

    score = Score("val_overall", True)

    def __init__(self, scorers: dict[str, Scorer], heads: Any):
        self.scorers, self.heads = scorers, heads

    def per_task(self, phase: str) -> dict[str, dict[str, float]]:
        found, current = {}, self.heads.state.current
        for name, scorer in self.scorers.items():
            self.heads.use(name)
            found[name] = scorer(f"{phase} {name}")
        self.heads.use(current)
        return found

    def __call__(self, phase: str = "eval") -> dict[str, float]:
        from lowrank_cli.evaluation.task_scores import overall_score

        per = self.per_task(phase)
        return {**{f"{k}_{name}": v for name, s in per.items() for k, v in s.items()},
                "val_overall": overall_score(per)}


@torch.no_grad()
def distillation_scores(student: nn.Module, teacher: nn.Module, distiller: Any, loader: Any, device: torch.device,
                        *, text: bool) -> dict[str, float]:
    """The distillation terms (no labels, no weight regulariser) averaged over the held-out batches, and for a
    text model the mean cosine between pooled outputs. The student is put back in its mode."""
    from lowrank_cli.training.losses import pooled_output

    was_training = student.training
    student.eval()
    sums: dict[str, float] = {}
    count = 0
    try:
        for batch in loader:
            inputs, _, mask = batch.parts()
            if len(inputs) == 0:
                continue
            inputs = inputs.to(device)
            mask = mask.to(device) if mask is not None else None
            kwargs = {"attention_mask": mask} if mask is not None else {}
            with autocast_for(device):
                t_out = teacher(inputs, **kwargs)
                t_blocks = distiller.teacher_blocks.take() if distiller.blocks else []
                s_out = student(inputs, **kwargs)
                s_blocks = distiller.student_blocks.take() if distiller.blocks else []
            terms = distiller.loss.held_out(student_out=s_out, teacher_out=t_out, student_blocks=s_blocks,
                                            teacher_blocks=t_blocks, mask=mask)
            if text:
                s_last, t_last = (s_blocks[-1], t_blocks[-1]) if s_blocks else (None, None)
                pooled = getattr(distiller.loss, "pooled", None) or pooled_output
                cos = F.cosine_similarity(pooled(s_out, mask, s_last).float(), pooled(t_out, mask, t_last).float(),
                                          dim=-1)
                terms["cosine"] = cos.mean()
            n = len(inputs)
            for name, value in terms.items():
                sums[f"val_{name}"] = sums.get(f"val_{name}", 0.0) + float(value) * n
            count += n
    finally:
        student.train(was_training)
    return {k: v / count for k, v in sums.items()} if count else {}


def _kept(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of a weight to keep: on the CPU, or, for a sharded one (a DTensor, FSDP), this process's shard where
    it is (a whole copy on the CPU is what sharding avoids)."""
    tensor = tensor.detach()
    return tensor.clone() if hasattr(tensor, "full_tensor") else tensor.to("cpu", copy=True)


class KeepBest:
    """The weights at the best held-out score so far, on the CPU."""

    def __init__(self, score: Score, saved: dict[str, Any] | None = None,
                 tensors: dict[str, torch.Tensor] | None = None):
        self.score = score
        self.step: int | None = (saved or {}).get("step")
        self.value: float | None = (saved or {}).get("value")
        self.weights = tensors or {}

    def observe(self, step: int, metrics: dict[str, float], model: nn.Module) -> None:
        value = metrics.get(self.score.name)
        if value is not None and self.score.better(value, self.value):
            self.step, self.value = step, value
            self.weights = {k: _kept(v) for k, v in model.state_dict().items()}

    def record(self) -> dict[str, Any]:
        return {"step": self.step, "value": self.value, "metric": self.score.name}

    def restore(self, model: nn.Module) -> None:
        if self.weights:
            with torch.no_grad():
                model.load_state_dict(self.weights, strict=True)
