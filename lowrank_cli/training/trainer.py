"""The training loop: steps from a saved position to the end, with logging, periodic saves and clean stops.

A run is never lost. Every `save_every` steps the training state (weights, optimizer, step, data position) is
written atomically (training/state.py); SIGINT / SIGTERM finish the current step, save and raise Interrupted with
the command that resumes; a non-finite loss stops before the optimizer step, so the last saved state stays good.
The model's own randomness (dropout, drop path) is reseeded every step from (seed, step, rank).

Methods that change the model or the loss as training goes (a schedule of their own) hook in with
`before_step(step)` callbacks; `after_step(step, model)` callbacks may ask to stop (return True). `gauges` are
values such a method shows: each is logged in the metrics and in the progress line.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_cli import distributed
from lowrank_cli.data.sampling import EpochSampler, derive_seed
from lowrank_cli.errors import InputError, Interrupted, TrainingError
from lowrank_cli.training.schedule import lr_factor
from lowrank_cli.training.signals import StopRequest
from lowrank_cli.training.state import TrainState, save_train_state
from lowrank_cli.training.step import Distiller, StepStats

# With none of this many samples readable (or of the whole set, if smaller), the data is broken, not unlucky.
NO_DATA_AFTER = 256


class NoUsableData(InputError):
    """Training met only unreadable samples."""


ProgressFn = Callable[[str, int, int, "str | None"], None]  # (phase, done, total, status)


def resume_hint(command: str | None, api: str, lr: float | None = None) -> str:
    """How to continue an interrupted run: the CLI command given (with a lower --lr after a failure), else the call."""
    if command:
        return command + (f" --lr {lr:g}" if lr is not None else "")
    return f"{api}(..., resume=True{f', lr={lr:g}' if lr is not None else ''})"


class Trainer:
    """Runs `distiller` from `state` to `total` steps. `metrics` (a JSONL file) gets a line every `log_every`
    steps on the main process; `history` collects the same lines on every process."""

    def __init__(self, distiller: Distiller, loader: Any, sampler: EpochSampler, state: TrainState, *,
                 ctx: distributed.DistContext, model: nn.Module, optimizer: torch.optim.Optimizer,
                 param_names: list[str], state_path: Path, metrics: Path, total: int, grad_accum: int, lr: float,
                 warmup: int, save_every: int, log_every: int, seed: int, train_samples: int, unit: str,
                 progress: ProgressFn, resume_hint: Callable[[float | None], str]):
        self.distiller, self.loader, self.sampler, self.state = distiller, loader, sampler, state
        self.ctx, self.model, self.optimizer, self.param_names = ctx, model, optimizer, param_names
        self.state_path, self.metrics, self.total, self.grad_accum = state_path, metrics, total, grad_accum
        self.lr, self.warmup, self.save_every, self.log_every, self.seed = lr, warmup, save_every, log_every, seed
        self.train_samples, self.unit, self.progress, self.resume_hint = train_samples, unit, progress, resume_hint
        self.phase = "recover"  # the progress bar's name for the training steps
        self.before_step: list[Callable[[int], None]] = [self._set_lr, self._reseed]
        # Held-out evaluation: `evaluate(step)` returns the held-out metrics, every `eval_every` steps and at the
        # end; `best` (training.heldout.KeepBest) remembers the best state and travels with the training state.
        self.evaluate: Callable[[int], dict[str, float]] | None = None
        self.eval_every = 0
        self.best: Any = None
        self.may_keep: Callable[[], bool] = lambda: True  # whether the state of this step could be the output
        self.after_step: list[Callable[[int, nn.Module], bool | None]] = []
        self.gauges: dict[str, Callable[[], float]] = {}  # name -> its value at the step just done
        self.history: list[dict[str, Any]] = []
        self.resumed_from = state.step  # 0 for a fresh run
        self.saved_at = state.step if state.step > 0 else -1
        self._interval: dict[str, float] = {}
        self._interval_steps = self._interval_samples = 0
        self._interval_start = time.perf_counter()

    # -- the callbacks every run has ------------------------------------------------------------------------

    def _set_lr(self, step: int) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * lr_factor(step, self.warmup, self.total)

    def _reseed(self, step: int) -> None:
        torch.manual_seed(derive_seed(self.seed, "step", step, self.ctx.rank))

    # -- the loop ---------------------------------------------------------------------------------------------

    def _batches(self) -> Iterator[tuple[int, int, Any]]:
        """(epoch, micro-batches of that epoch consumed after this one, batch), from the saved position."""
        epoch, start = self.state.epoch, self.state.batch
        while True:
            self.sampler.set_epoch(epoch)
            self.sampler.set_start_batch(start)
            for position, batch in enumerate(self.loader, start + 1):
                yield epoch, position, batch
            epoch, start = epoch + 1, 0

    def save(self) -> None:
        extra = None
        if self.best is not None:
            self.state.extra["best"] = self.best.record()
            extra = {f"best.{k}": v for k, v in self.best.weights.items()}
        distributed.on_main(self.ctx, save_train_state, self.state_path, self.state, self.model, self.optimizer,
                            self.param_names, extra)
        self.saved_at = self.state.step

    def _held_out(self) -> dict[str, float] | None:
        step = self.state.step
        if self.evaluate is None or not (step % self.eval_every == 0 or step == self.total):
            return None
        metrics = self.evaluate(step)
        if self.best is not None and self.may_keep():
            self.best.observe(step, metrics, self.model)
        return metrics

    def run(self) -> None:
        state = self.state
        self.progress(self.phase, state.step, self.total, "")
        first_step = state.step + 1
        stream = self._batches()
        with StopRequest() as stop:
            while state.step < self.total:
                stats = self._step(stream)
                self._log(stats, first_step, self._held_out())
                if state.step % self.save_every == 0 or state.step == self.total:
                    self.save()
                asked = any([bool(callback(state.step, self.model)) for callback in self.after_step])
                if distributed.any_rank(self.ctx, asked or stop.signal is not None) and state.step < self.total:
                    if self.saved_at != state.step:
                        self.save()
                    raise Interrupted(
                        f"interrupted by {stop.signal or 'request'} at step {state.step}/{self.total}; the training "
                        f"state is saved in '{self.state_path}'. Resume with: {self.resume_hint(None)}")
        if self.saved_at != state.step:  # resumed at the end: nothing ran, nothing new to save
            self.save()

    def _step(self, stream: Iterator[tuple[int, int, Any]]) -> StepStats:
        state = self.state
        start = time.perf_counter()
        for callback in self.before_step:
            callback(state.step)
        micro = [next(stream) for _ in range(self.grad_accum)]
        try:
            stats = self.distiller.step([b for _, _, b in micro], step=state.step + 1)
        except TrainingError as e:
            kept = (f"the last good training state (step {self.saved_at}) is kept in '{self.state_path}'; resume "
                    f"from it with a lower `lr` (now {self.lr:g}): {self.resume_hint(self.lr / 10)}"
                    if self.saved_at > 0 else
                    f"no training state was saved yet; start again with a lower `lr` (now {self.lr:g})")
            raise TrainingError(f"training stopped: {e}; {kept}") from None
        epoch, position, _ = micro[-1]
        if position >= self.sampler.batches_per_epoch:
            epoch, position = epoch + 1, 0
        state.step += 1
        state.epoch, state.batch = epoch, position
        state.images_seen += stats.images
        state.skipped += stats.skipped
        state.seconds += time.perf_counter() - start
        tried_enough = state.skipped >= min(self.train_samples, NO_DATA_AFTER) or state.step >= self.total
        if state.images_seen == 0 and tried_enough:
            raise NoUsableData(f"none of the {state.skipped} training samples tried so far could be read (corrupt, "
                               "truncated or not images): nothing to train on; check the files of `data`")
        return stats

    def _log(self, stats: StepStats, first_step: int, held_out: dict[str, float] | None = None) -> None:
        """Average the terms over the steps since the last line; the first step of a call is logged too, so that
        a short or resumed run shows numbers at once; so is every step with held-out metrics."""
        state = self.state
        for name, value in [*stats.terms.items(), ("grad_norm", stats.grad_norm)]:
            self._interval[name] = self._interval.get(name, 0.0) + value
        self._interval_steps += 1
        self._interval_samples += stats.images
        if not (state.step % self.log_every == 0 or state.step in (first_step, self.total) or held_out):
            self.progress(self.phase, state.step, self.total, None)
            return
        elapsed = time.perf_counter() - self._interval_start
        line = {"step": state.step, "epoch": round(state.images_seen / self.train_samples, 4),
                "lr": self.optimizer.param_groups[0]["lr"], **{name: read() for name, read in self.gauges.items()},
                **{k: v / self._interval_steps for k, v in self._interval.items()},
                "images_per_s": round(self._interval_samples / elapsed, 2) if elapsed > 0 else None,
                "images": state.images_seen, "skipped": state.skipped, "seconds": round(state.seconds, 3),
                **(held_out or {})}
        self.history.append(line)
        if self.ctx.is_main:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(line) + "\n")
        status = " ".join(f"{k} {line[k]:.3g}" for k in [*self.distiller.terms, *self.gauges]) + (
            f" | {line['images_per_s']:.0f} {self.unit}/s" if line["images_per_s"] else "")
        if self.best is not None and self.best.value is not None:
            status += f" | {self.best.score.name} {self.best.value:.4g} (best)"
        self.progress(self.phase, state.step, self.total, status)
        self._interval, self._interval_steps, self._interval_samples = {}, 0, 0
        self._interval_start = time.perf_counter()
