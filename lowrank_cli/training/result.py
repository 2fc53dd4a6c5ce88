"""What a recovery returns: the recovered model, where it went, and what was measured on the way."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn


@dataclass
class RecoverResult:
    model: nn.Module  # the recovered student (plain nn.Module, on the training device, eval mode)
    output: Path
    steps: int
    resumed_from: int  # 0 for a fresh run
    images_seen: int  # over all ranks, all steps (also those before a resume)
    skipped: int  # unreadable training images met
    seconds: float  # training time, all attempts
    accuracy: dict[str, dict[str, Any] | None] = field(default_factory=dict)  # teacher, before, after
    losses: dict[str, dict[str, float]] = field(default_factory=dict)  # first / last logged value of each term
    history: list[dict[str, Any]] = field(default_factory=list)  # the metric lines logged by this call
    metrics: Path | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.images_seen / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary (the `--json` output of `lrc recover`)."""
        return {
            "output": str(self.output),
            "steps": self.steps,
            "resumed_from": self.resumed_from,
            "images_seen": self.images_seen,
            "skipped_images": self.skipped,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 1),
            "accuracy": self.accuracy,
            "losses": self.losses,
            "metrics": str(self.metrics) if self.metrics else None,
            "settings": self.settings,
        }


@dataclass
class FinetuneResult:
    model: nn.Module  # the fine-tuned model (adapters merged unless merge=False), eval mode
    output: Path  # the checkpoint, or the adapter file with merge=False
    steps: int
    resumed_from: int
    samples_seen: int
    seconds: float
    trainable: int  # parameters that trained
    parameters: int  # all parameters while training (adapters included)
    scores: dict[str, Any] = field(default_factory=dict)  # held-out scores before / after, and the state kept
    losses: dict[str, dict[str, float]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: Path | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def trainable_share(self) -> float:
        return self.trainable / self.parameters if self.parameters else 0.0

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary (the `--json` output of `lrc finetune`)."""
        return {
            "output": str(self.output), "steps": self.steps, "resumed_from": self.resumed_from,
            "samples_seen": self.samples_seen, "seconds": round(self.seconds, 3),
            "trainable_parameters": self.trainable, "parameters": self.parameters,
            "trainable_share": self.trainable_share, "scores": self.scores, "losses": self.losses,
            "metrics": str(self.metrics) if self.metrics else None, "settings": self.settings,
        }


@dataclass
class MultitaskResult:
    model: nn.Module | None  # the backbone with the first task's head (None on the other processes of torchrun)
    output: Path  # the multi-task checkpoint
    mode: str  # shared | experts | merge | orthogonal
    scores: dict[str, Any]  # task name -> its held-out scores after (val_accuracy, val_top1, val_spearman, ...)
    before: dict[str, Any]  # task name -> its held-out scores before training (the new head)
    record: dict[str, Any]  # what the checkpoint records (`lrc.multitask`)
    results: list[Any] = field(default_factory=list)  # the tasks' own runs (modes that train them apart)

    @property
    def overall(self) -> float | None:
        return (self.record.get("overall") or {}).get("after")

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary (the `--json` output of `lrc finetune --task ...`)."""
        return {"output": str(self.output), "mode": self.mode, "scores": self.scores, "before": self.before,
                "overall": self.record.get("overall"), "tasks": self.record.get("tasks"),
                "settings": {k: v for k, v in self.record.items() if k not in ("tasks", "overall")}}
