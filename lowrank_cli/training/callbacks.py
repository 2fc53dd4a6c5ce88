"""What hooks into the training loop (training/trainer.py) besides the step itself: a method's own schedule
(training.progressive: lambda), held-out evaluation with the best state kept, the caller's `on_step`.

A callback overrides what it needs of `Callback`; the trainer calls every callback's hook in order. A new method
adds a callback here (or next to its method), not lines in the loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lowrank_cli.training.heldout import KeepBest, Scorer
from lowrank_cli.training.state import TrainState


class Callback:
    """The hooks of the loop, each a no-op here."""

    def on_state(self, state: TrainState) -> None:
        """The run's state is known (fresh, or the interrupted run's): set what depends on its step."""

    def before_step(self, step: int) -> None:
        """Before optimizer step `step` + 1 (`step` steps are done)."""

    def evaluate(self, step: int, model: nn.Module, may_keep: bool) -> dict[str, float] | None:
        """Held-out metrics after step `step`, logged with it (None: none now). `may_keep`: whether this step's
        state could be the output (see `may_keep`)."""
        return None

    def after_step(self, step: int, model: nn.Module) -> bool:
        """After the step is logged and saved; True asks the run to stop (as SIGINT does)."""
        return False

    def gauges(self) -> dict[str, float]:
        """Values this callback shows, logged in the metrics and the progress line after each step."""
        return {}

    def may_keep(self) -> bool:
        """Whether the state of the step just done could be the output (a state that still leans on what the
        method removes at the end cannot)."""
        return True

    def status(self) -> str:
        """Appended to the progress line."""
        return ""

    def save(self, state: TrainState) -> dict[str, torch.Tensor]:
        """Tensors saved with the training state (and JSON in `state.extra`), for a resumed run to continue."""
        return {}


class OnStep(Callback):
    """The caller's `on_step(step, model)`; True stops the run as SIGINT does (tests, notebooks)."""

    def __init__(self, fn: Callable[[int, nn.Module], bool | None]):
        self.fn = fn

    def after_step(self, step: int, model: nn.Module) -> bool:
        return bool(self.fn(step, model))


def kept_last(total: int) -> dict[str, Any]:
    """What a run without a kept best state keeps: its last step."""
    return {"which": "last", "step": total}


class HeldOutEval(Callback):
    """`scorer` on the held-out data every `every` steps and at the last; with `best`, the weights of the best
    score so far, kept in the training state too (so a resumed run keeps the same best) and put back at the end."""

    def __init__(self, scorer: Scorer, *, every: int, total: int, best: KeepBest | None, log: Callable[[str], None]):
        self.scorer, self.every, self.total, self.best, self.log = scorer, every, total, best, log

    def evaluate(self, step: int, model: nn.Module, may_keep: bool) -> dict[str, float] | None:
        if not (step % self.every == 0 or step == self.total):
            return None
        metrics = self.scorer("eval")
        if self.best is not None and may_keep:
            self.best.observe(step, metrics, model)
        return metrics

    def status(self) -> str:
        if self.best is None or self.best.value is None:
            return ""
        return f" | {self.best.score.name} {self.best.value:.4g} (best)"

    def save(self, state: TrainState) -> dict[str, torch.Tensor]:
        if self.best is None:
            return {}
        state.extra["best"] = self.best.record()
        return {f"best.{k}": v for k, v in self.best.weights.items()}

    def restore_best(self, model: nn.Module) -> dict[str, Any]:
        """Put the best weights back into `model` (keep best); returns what was kept (which, step, score)."""
        best, kept = self.best, kept_last(self.total)
        if best is not None and best.step is not None:
            kept = {"which": "best", **best.record()}
            if best.step != self.total:
                best.restore(model)
                self.log(f"Keeping the state of step {best.step} ({best.score.name} {best.value:.4g}), the best "
                         f"held-out score; the last step {self.total} scored less")
        return kept


def held_out_eval(scorer: Scorer, *, every: int, keep: str, state: TrainState, saved: Callable[[], dict],
                  total: int, log: Callable[[str], None]) -> HeldOutEval:
    """The held-out evaluation of a run; `keep` best remembers the best state, continuing the interrupted run's
    (`saved()`: the tensors saved with its state, read only when the run resumes past step 0)."""
    best = None
    if keep == "best":
        tensors = saved() if state.step > 0 else {}
        weights = {k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")}
        best = KeepBest(scorer.score, state.extra.get("best"), weights)
    return HeldOutEval(scorer, every=every, total=total, best=best, log=log)


def measured_before(state: TrainState, measure: Callable[[], Any]) -> Any:
    """The held-out scores before training: a resumed run reuses the first run's (they travel in its state)."""
    before = state.extra.get("held_out_before") or measure()
    state.extra["held_out_before"] = before
    return before
