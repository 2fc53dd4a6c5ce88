"""The fine-tuning loss: cross-entropy on the classes (or the MSE of a regression score), plus `gamma` x logit
distillation from an optional fine-tuned teacher (KL at `temperature` for classes, the MSE of the scores for a
regression). It answers the Distiller (training/step.py) as RecoveryLoss does: `active` terms, `use_labels`,
`weights` (no feature or pooled-output distillation, so the Distiller keeps no block outputs)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowrank_cli.training.losses import LossWeights, classification, logit_distillation, logits_of


class TaskLoss:
    use_labels = True

    def __init__(self, *, regression: bool, gamma: float = 0.0, temperature: float = 1.0,
                 label_smoothing: float = 0.0):
        self.weights = LossWeights(alpha=0.0, gamma=gamma, temperature=temperature, label_smoothing=label_smoothing)
        self.weights.check()
        self.regression = regression

    @property
    def active(self) -> list[str]:
        return ["loss", "mse" if self.regression else "ce"] + (["kd"] if self.weights.gamma > 0 else [])

    def __call__(self, *, student_out: object, teacher_out: object, student_blocks=(), teacher_blocks=(),
                 labels: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = logits_of(student_out)
        if self.regression:
            terms = {"mse": F.mse_loss(logits.float().reshape(len(labels)), labels.float())}
        else:
            terms = {"ce": classification(logits, labels, self.weights.label_smoothing)}
        total = next(iter(terms.values()))
        if self.weights.gamma > 0:
            teacher = logits_of(teacher_out)
            terms["kd"] = (F.mse_loss(logits.float(), teacher.detach().float()) if self.regression else
                           logit_distillation(logits, teacher, self.weights.temperature))
            total = total + self.weights.gamma * terms["kd"]
        return {"loss": total, **terms}


class MultiTaskLoss:
    """Each task's TaskLoss on its own batches (the task whose head runs, `state.current`): the total and one
    term per task (`loss_NAME`, zero on the other tasks' batches), so the metrics show each task's loss."""

    use_labels = True

    def __init__(self, losses: dict[str, TaskLoss], state):
        self.losses, self.state = losses, state
        self.weights = next(iter(losses.values())).weights  # the Distiller reads alpha and delta: both 0 here

    @property
    def active(self) -> list[str]:
        return ["loss", *(f"loss_{name}" for name in self.losses)]

    def __call__(self, **kwargs) -> dict[str, torch.Tensor]:
        task = self.state.current
        total = self.losses[task](**kwargs)["loss"]
        zero = total.detach() * 0
        return {"loss": total, **{f"loss_{name}": (total if name == task else zero) for name in self.losses}}
