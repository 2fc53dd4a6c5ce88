"""Several tasks' batches as one resumable stream: the trainer's `loader` and `sampler` at once.

    stream = MultiTaskLoader({"sst": (loader, sampler), "sts": (loader2, sampler2)}, schedule="proportional", seed=0)
    stream.set_epoch(e); stream.set_start_batch(k)     # as an EpochSampler (data.sampling)
    for batch in stream:                               # the rest of combined epoch e, from its batch k
        batch.task, batch.parts(), batch.skipped, len(batch)

Each task keeps its own (loader, sampler), made by its modality's `loader(...)`. A combined epoch is a list of task
names, `order(epoch)`, a pure function of (schedule, batches per task, seed, epoch):

- sequential: every batch of the first task's epoch, then every batch of the second's, ... in the order given.
- interleaved: one batch of each task in turn, for as many rounds as the longest task has batches; a shorter task
  starts its next epoch when it runs out, so that every task gets as many turns.
- proportional: each task's batches once, in a shuffled order seeded by (seed, epoch): a task's share of the batches
  is its share of the data, and its batches are spread over the whole epoch.

From the order alone, the position in the combined stream fixes every task's own (epoch, batch), so a run resumed
at (epoch, batch) sees exactly what the uninterrupted run saw. Under DDP each task's sampler already shards by
rank, and the batches per task (so the order) are the same on every rank: all ranks take the same task together.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lowrank_cli.data.sampling import derive_seed
from lowrank_cli.errors import UsageError

SCHEDULES = ("sequential", "interleaved", "proportional")


@dataclass
class TaskBatch:
    """One task's batch: what the wrapped batch has (`parts()`, `skipped`, `to`), and the task it is of."""

    task: str
    batch: Any

    def parts(self) -> tuple[Any, Any, Any]:
        return self.batch.parts()

    @property
    def skipped(self) -> int:
        return self.batch.skipped

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TaskBatch:
        return TaskBatch(self.task, self.batch.to(device, non_blocking=non_blocking))

    def __len__(self) -> int:
        # The samples (the wrapped batches are NamedTuples, whose len() counts their fields).
        return len(self.parts()[0])


class MultiTaskLoader:
    """The batches of several tasks, one combined epoch at a time; `tasks` maps each name to its (loader, sampler),
    the sampler an EpochSampler (or anything with `set_epoch`, `set_start_batch` and `batches_per_epoch`)."""

    def __init__(self, tasks: Mapping[str, tuple[Iterable, Any]], *, schedule: str = "proportional", seed: int = 0):
        if schedule not in SCHEDULES:
            raise UsageError(f"`schedule` {schedule!r} is not a multi-task schedule: use one of {', '.join(SCHEDULES)}")
        if not tasks:
            raise UsageError("no task to train on: give at least one task, NAME=PATH")
        self.tasks = dict(tasks)
        self.schedule, self.seed = schedule, seed
        self.sizes = {name: sampler.batches_per_epoch for name, (_, sampler) in self.tasks.items()}
        empty = [name for name, size in self.sizes.items() if size < 1]
        if empty:
            raise UsageError(f"task '{empty[0]}' has no batch in an epoch: lower `batch_size` or give it more data")
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        if self.schedule == "interleaved":
            return max(self.sizes.values()) * len(self.sizes)
        return sum(self.sizes.values())

    def turns(self, name: str) -> int:
        """The batches task `name` gives to every combined epoch."""
        return max(self.sizes.values()) if self.schedule == "interleaved" else self.sizes[name]

    def order(self, epoch: int) -> list[str]:
        """The task of each batch of combined epoch `epoch`."""
        names = list(self.sizes)
        if self.schedule == "interleaved":
            return names * max(self.sizes.values())
        blocks = [name for name in names for _ in range(self.sizes[name])]
        if self.schedule == "sequential":
            return blocks
        g = torch.Generator().manual_seed(derive_seed(self.seed, "multitask", epoch))
        return [blocks[i] for i in torch.randperm(len(blocks), generator=g).tolist()]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.start_batch = 0

    def set_start_batch(self, k: int) -> None:
        if not 0 <= k <= self.batches_per_epoch:
            raise UsageError(f"cannot resume at batch {k}: a combined epoch of the tasks has {self.batches_per_epoch} "
                             "batches here (did the data, a task, `batch_size` or the number of processes change?)")
        self.start_batch = k

    def positions(self, epoch: int, k: int) -> dict[str, tuple[int, int]]:
        """Each task's own (epoch, batches consumed of it) after the first k batches of combined epoch `epoch`."""
        taken = self.order(epoch)[:k]
        return {name: divmod(epoch * self.turns(name) + taken.count(name), size) for name, size in self.sizes.items()}

    def __len__(self) -> int:
        # What is left of this combined epoch, as EpochSampler's len() is.
        return self.batches_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[TaskBatch]:
        return self._batches(self.epoch, self.start_batch)

    def _batches(self, epoch: int, start: int) -> Iterator[TaskBatch]:
        streams = {name: self._task_stream(name, *where) for name, where in self.positions(epoch, start).items()}
        for name in self.order(epoch)[start:]:
            yield TaskBatch(name, next(streams[name]))

    def _task_stream(self, name: str, epoch: int, start: int) -> Iterator[Any]:
        """Task `name`'s batches from its own (epoch, start batch) on, epoch after epoch; positions its sampler only
        when the first batch is asked for, so that a task not taken in this combined epoch is left alone."""
        loader, sampler = self.tasks[name]
        while True:
            sampler.set_epoch(epoch)
            sampler.set_start_batch(start)
            count = 0
            for count, batch in enumerate(loader, 1):
                yield batch
            if count != self.sizes[name] - start:
                raise RuntimeError(f"task '{name}' gave {count} batches where its sampler promised "
                                   f"{self.sizes[name] - start}")
            epoch, start = epoch + 1, 0
