"""The training loop: steps from a saved position to the end, with logging, periodic saves and clean stops.

A run is never lost. Every `save_every` steps the training state (weights, optimizer, step, data position) is
written atomically (training/state.py); SIGINT / SIGTERM finish the current step, save and raise Interrupted with
the command that resumes; a non-finite loss stops before the optimizer step, so the last saved state stays good.
The model's own randomness (dropout, drop path) is reseeded every step from (seed, step, rank).

Everything else hooks in as callbacks (training/callbacks.py): a method that changes the model or the loss as
training goes (`before_step(step)`, `gauges` logged in the metrics and the progress line), held-out evaluation
(`evaluate`, with the best state saved with the training state), the caller's `on_step` (may ask to stop). The
run's pieces (model, optimizer, data, state, its file, the schedule) come in one training.setup.Setup.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from lowrank_cli import distributed
from lowrank_cli.data.sampling import derive_seed
from lowrank_cli.errors import InputError, Interrupted, TrainingError
from lowrank_cli.training.schedule import lr_factor
from lowrank_cli.training.signals import StopRequest
from lowrank_cli.training.step import StepStats

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
    """Runs `setup.step` from `setup.state` to the schedule's last step. The metrics file gets a line every
    `log_every` steps on the main process; `history` collects the same lines on every process."""

    def __init__(self, setup: Any):
        self.setup, self.state, self.callbacks = setup, setup.state, setup.callbacks
        self.step_fn, self.model, self.optimizer = setup.step, setup.model, setup.optimizer
        self.schedule, self.opts, self.ctx = setup.schedule, setup.opts, setup.env.ctx
        self.total = setup.schedule.total
        self.history: list[dict[str, Any]] = []
        self.resumed_from = self.state.step  # 0 for a fresh run
        self.saved_at = self.state.step if self.state.step > 0 else -1
        self._interval: dict[str, float] = {}
        self._interval_steps = self._interval_samples = 0
        self._interval_start = time.perf_counter()

    # -- what every run does before a step ------------------------------------------------------------------

    def _before_step(self, step: int) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule.lr * lr_factor(step, self.schedule.warmup, self.total)
        torch.manual_seed(derive_seed(self.opts.seed, "step", step, self.ctx.rank))
        for callback in self.callbacks:
            callback.before_step(step)

    # -- the loop ---------------------------------------------------------------------------------------------

    def _batches(self) -> Iterator[tuple[int, int, Any]]:
        """(epoch, micro-batches of that epoch consumed after this one, batch), from the saved position."""
        epoch, start = self.state.epoch, self.state.batch
        sampler = self.setup.sampler
        while True:
            sampler.set_epoch(epoch)
            sampler.set_start_batch(start)
            for position, batch in enumerate(self.setup.loader, start + 1):
                yield epoch, position, batch
            epoch, start = epoch + 1, 0

    def save(self) -> None:
        extra: dict[str, torch.Tensor] = {}
        for callback in self.callbacks:
            extra.update(callback.save(self.state))
        self.setup.store.save(self.ctx, self.state, self.model, self.optimizer, self.setup.param_names, extra)
        self.saved_at = self.state.step

    def _held_out(self) -> dict[str, float] | None:
        step, may_keep = self.state.step, all(callback.may_keep() for callback in self.callbacks)
        found = [m for m in (c.evaluate(step, self.model, may_keep) for c in self.callbacks) if m is not None]
        return {k: v for metrics in found for k, v in metrics.items()} if found else None

    def run(self) -> None:
        state, phase, progress = self.state, self.setup.phase, self.setup.env.progress
        progress(phase, state.step, self.total, "")
        first_step = state.step + 1
        stream = self._batches()
        with StopRequest() as stop:
            while state.step < self.total:
                stats = self._step(stream)
                self._log(stats, first_step, self._held_out())
                if state.step % self.opts.save_every == 0 or state.step == self.total:
                    self.save()
                asked = any([callback.after_step(state.step, self.model) for callback in self.callbacks])
                if distributed.any_rank(self.ctx, asked or stop.signal is not None) and state.step < self.total:
                    if self.saved_at != state.step:
                        self.save()
                    raise Interrupted(
                        f"interrupted by {stop.signal or 'request'} at step {state.step}/{self.total}; the training "
                        f"state is saved in '{self.setup.store.path}'. Resume with: {self.setup.resume_hint(None)}")
        if self.saved_at != state.step:  # resumed at the end: nothing ran, nothing new to save
            self.save()

    def _step(self, stream: Iterator[tuple[int, int, Any]]) -> StepStats:
        state, lr = self.state, self.schedule.lr
        start = time.perf_counter()
        self._before_step(state.step)
        micro = [next(stream) for _ in range(self.opts.grad_accum)]
        try:
            stats = self.step_fn.step([b for _, _, b in micro], step=state.step + 1)
        except TrainingError as e:
            kept = (f"the last good training state (step {self.saved_at}) is kept in '{self.setup.store.path}'; "
                    f"resume from it with a lower `lr` (now {lr:g}): {self.setup.resume_hint(lr / 10)}"
                    if self.saved_at > 0 else
                    f"no training state was saved yet; start again with a lower `lr` (now {lr:g})")
            raise TrainingError(f"training stopped: {e}; {kept}") from None
        epoch, position, _ = micro[-1]
        if position >= self.setup.sampler.batches_per_epoch:
            epoch, position = epoch + 1, 0
        state.step += 1
        state.epoch, state.batch = epoch, position
        state.images_seen += stats.images
        state.skipped += stats.skipped
        state.seconds += time.perf_counter() - start
        tried_enough = state.skipped >= min(self.setup.data.samples, NO_DATA_AFTER) or state.step >= self.total
        if state.images_seen == 0 and tried_enough:
            data = self.setup.data
            why = data.modality.unreadable(data.train) if hasattr(data.modality, "unreadable") else "unreadable"
            raise NoUsableData(f"none of the {state.skipped} training samples tried so far could be read (the "
                               f"first: {why}): nothing to train on; check the files of `data`")
        return stats

    def _log(self, stats: StepStats, first_step: int, held_out: dict[str, float] | None = None) -> None:
        """Average the terms over the steps since the last line; the first step of a call is logged too, so that
        a short or resumed run shows numbers at once; so is every step with held-out metrics."""
        state, phase, progress = self.state, self.setup.phase, self.setup.env.progress
        for name, value in [*stats.terms.items(), ("grad_norm", stats.grad_norm)]:
            self._interval[name] = self._interval.get(name, 0.0) + value
        self._interval_steps += 1
        self._interval_samples += stats.images
        if not (state.step % self.opts.log_every == 0 or state.step in (first_step, self.total) or held_out):
            progress(phase, state.step, self.total, None)
            return
        elapsed = time.perf_counter() - self._interval_start
        gauges = {k: v for callback in self.callbacks for k, v in callback.gauges().items()}
        samples = self.setup.data.sample_name  # images, texts or windows (a causal LM's token windows)
        line = {"step": state.step, "epoch": round(state.images_seen / self.setup.data.samples, 4),
                "lr": self.optimizer.param_groups[0]["lr"], **gauges,
                **{k: v / self._interval_steps for k, v in self._interval.items()},
                f"{samples}_per_s": round(self._interval_samples / elapsed, 2) if elapsed > 0 else None,
                samples: state.images_seen, "skipped": state.skipped, "seconds": round(state.seconds, 3),
                **(held_out or {})}
        self.history.append(line)
        if self.ctx.is_main:
            with open(self.setup.metrics, "a") as f:
                f.write(json.dumps(line) + "\n")
        status = " ".join(f"{k} {line[k]:.3g}" for k in [*self.step_fn.terms, *gauges]) + (
            f" | {line[f'{samples}_per_s']:.0f} {self.setup.data.unit}/s" if line[f"{samples}_per_s"] else "")
        status += "".join(callback.status() for callback in self.callbacks)
        progress(phase, state.step, self.total, status)
        self._interval, self._interval_steps, self._interval_samples = {}, 0, 0
        self._interval_start = time.perf_counter()
