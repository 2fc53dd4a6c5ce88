"""Held-out evaluation during training: what is measured, on which data, and which state is kept.

Labelled images are scored by top-1 accuracy; unlabelled images and texts by the distillation loss on data the
student never trains on, and a text encoder also by the cosine between the student's and the teacher's pooled
outputs. `KeepBest` remembers the weights of the best score (kept in the training state too, so a resumed run
keeps the same best), and puts them back at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


class HeldOut:
    """Scores the student on held-out data: `evaluate_images` (labelled images) or `batches` (any kind)."""

    def __init__(self, samples: Any, *, labelled_images: bool, text: bool, loader: Any = None,
                 evaluate_images: Any = None):
        self.samples, self.labelled_images, self.text = samples, labelled_images, text
        self.loader, self.evaluate_images = loader, evaluate_images
        self.score = (Score("val_top1", True) if labelled_images else
                      Score("val_cosine", True) if text else Score("val_loss", False))

    def __call__(self, student: nn.Module, teacher: nn.Module, distiller: Any, device: torch.device,
                 phase: str = "eval") -> dict[str, float]:
        if self.labelled_images:
            result = self.evaluate_images(student, self.samples, phase)
            return {"val_top1": result["top1"], "val_top5": result["top5"]}
        return distillation_scores(student, teacher, distiller, self.loader, device, text=self.text)


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
                cos = F.cosine_similarity(pooled_output(s_out, mask, s_last).float(),
                                          pooled_output(t_out, mask, t_last).float(), dim=-1)
                terms["cosine"] = cos.mean()
            n = len(inputs)
            for name, value in terms.items():
                sums[f"val_{name}"] = sums.get(f"val_{name}", 0.0) + float(value) * n
            count += n
    finally:
        student.train(was_training)
    return {k: v / count for k, v in sums.items()} if count else {}


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
            self.weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    def record(self) -> dict[str, Any]:
        return {"step": self.step, "value": self.value, "metric": self.score.name}

    def restore(self, model: nn.Module) -> None:
        if self.weights:
            with torch.no_grad():
                model.load_state_dict(self.weights, strict=True)


def restore_best(trainer: Any, log) -> dict[str, Any]:
    """Put the best weights back into `trainer.model` (keep best); returns what was kept (which, step, score)."""
    best, total = trainer.best, trainer.total
    kept: dict[str, Any] = {"which": "last", "step": total}
    if best is not None and best.step is not None:
        kept = {"which": "best", **best.record()}
        if best.step != total:
            best.restore(trainer.model)
            log(f"Keeping the state of step {best.step} ({best.score.name} {best.value:.4g}), the best held-out "
                f"score; the last step {total} scored less")
    return kept


class HeldOutPhase:
    """Held-out evaluation wired into one recovery: scores before, during (every `eval_every` steps) and after
    training, and the state kept (`keep`: best or last)."""

    def __init__(self, held: HeldOut, *, keep: str, eval_every: int, source: str, log, device: torch.device):
        self.held, self.keep, self.eval_every, self.source, self.log = held, keep, eval_every, source, log
        self.device = device
        self.before: dict[str, float] | None = None
        self.after: dict[str, float] | None = None

    def attach(self, trainer: Any, state: Any, saved_tensors: dict[str, torch.Tensor]) -> None:
        """Evaluate in the loop; remember the best state (a resumed run continues with the saved best)."""
        trainer.eval_every = self.eval_every
        trainer.evaluate = lambda step: self.held(trainer.model, trainer.distiller.teacher, trainer.distiller,
                                                  self.device)
        if self.keep == "best":
            best = {k[len("best."):]: v for k, v in saved_tensors.items() if k.startswith("best.")}
            trainer.best = KeepBest(self.held.score, state.extra.get("best"), best)

    def measure_before(self, trainer: Any, state: Any) -> None:
        """The student's held-out scores before training (a resumed run reuses the first run's)."""
        if self.held.labelled_images:
            return  # labelled images: the accuracy before is measured with the teacher's (recovery.py)
        self.before = state.extra.get("held_out_before") or self.held(
            trainer.model, trainer.distiller.teacher, trainer.distiller, self.device)
        state.extra["held_out_before"] = self.before

    def restore_best(self, trainer: Any) -> dict[str, Any]:
        return restore_best(trainer, self.log)

    def finish(self, trainer: Any, kept: dict[str, Any]) -> dict[str, Any]:
        """Score the state that is written (after any conversion of its layers) and say what was kept."""
        if not self.held.labelled_images:
            self.after = self.held(trainer.model, trainer.distiller.teacher, trainer.distiller, self.device)
        return {"held_out": {"data": self.source, "samples": len(self.held.samples), "metric": self.held.score.name,
                             "every": self.eval_every, "before": self.before, "after": self.after},
                "kept": kept}
