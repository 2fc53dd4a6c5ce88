"""Reproducible data order and randomness: a rank's share of each epoch, resumable mid-epoch, and per-sample
seeds that do not depend on worker count or on what ran before.

Randomness is a pure function of (seed, epoch, index) for data and (seed, step, rank) for the model, so a
resumed run computes exactly what the uninterrupted run would have, with any number of loader workers."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
import signal
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lowrank_cli.errors import InputError, UsageError


class EpochSampler(Sampler[int]):
    """This rank's sample indices for one epoch; use as `sampler=` with `DataLoader(batch_size=batch_size)`.

    Like torch's DistributedSampler: the permutation comes from (seed + epoch), identical on all ranks,
    and rank r takes positions r, r + world_size, ... of it. drop_last=True trims the epoch to whole
    global batches (batch_size * world_size), so every rank sees the same number of full batches;
    drop_last=False pads with indices from the start instead, so every sample is seen (a few twice) and
    only the last batch may be short.

    Resuming: `set_epoch(e)` then `set_start_batch(k)` skips the k batches already consumed, and the
    rest is exactly what the uninterrupted run would have seen. `set_epoch` resets the start to 0.
    """

    def __init__(self, num_samples: int, batch_size: int, shuffle: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = True):
        if num_samples < 0 or batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler arguments: num_samples={num_samples} batch_size={batch_size}"
                             f" rank={rank} world_size={world_size}")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.shuffle, self.seed = shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0
        self.start_batch = 0

    @property
    def per_rank(self) -> int:
        """Samples per rank in a whole epoch."""
        if self.drop_last:
            return self.num_samples // (self.batch_size * self.world_size) * self.batch_size
        return math.ceil(self.num_samples / self.world_size)

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.per_rank / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.start_batch = 0

    def set_start_batch(self, k: int) -> None:
        if not 0 <= k <= self.batches_per_epoch:
            raise UsageError(f"cannot resume at batch {k}: an epoch has {self.batches_per_epoch} batches here"
                             " (did the data, `batch_size` or the number of processes change?)")
        self.start_batch = k

    def epoch_indices(self) -> list[int]:
        """This rank's whole epoch, ignoring the start batch."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        total = self.per_rank * self.world_size
        if total > len(order) and order:  # pad (drop_last=False): repeat from the start, as often as needed
            order = (order * math.ceil(total / len(order)))
        return order[:total][self.rank::self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.start_batch * self.batch_size:])

    def __len__(self) -> int:
        # What is left of this epoch, so that len(loader) counts the batches still to come.
        return max(self.per_rank - self.start_batch * self.batch_size, 0)


def epoch_loader(dataset: Dataset, collate_fn: Callable, *, batch_size: int, shuffle: bool, seed: int, rank: int,
                 world_size: int, drop_last: bool, num_workers: int, what: str,
                 unit: str) -> tuple[DataLoader, EpochSampler]:
    """A DataLoader over `dataset` whose order is an EpochSampler's (resumable, sharded per rank); shared by
    images and texts. `what` and `unit` name the data in the too-little-data error."""
    if batch_size < 1:
        raise UsageError(f"`batch_size` must be at least 1, got {batch_size}")
    if num_workers < 0:
        raise UsageError(f"`num_workers` must be 0 or more, got {num_workers}")
    sampler = EpochSampler(len(dataset), batch_size, shuffle, seed, rank, world_size, drop_last)
    if sampler.batches_per_epoch == 0:
        raise InputError(f"{what} has {len(dataset)} {unit}, fewer than one batch of {batch_size} x {world_size} "
                         f"process(es): lower `batch_size` or add {unit}")
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=False,  # the sampler already decided
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        # Seeds the workers' RNGs (augmentations) reproducibly, differently per rank.
        generator=torch.Generator().manual_seed(seed * 1000 + rank),
    )
    return loader, sampler


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (stable across processes and Python versions, unlike hash())."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's CPU generators for a block, then put their states back."""
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.random.set_rng_state(cpu)


def default_workers(processes_per_node: int = 1) -> int:
    """Data-loading workers per training process: the node's CPUs shared between its processes, at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus // max(processes_per_node, 1) - 1))


def ignore_sigint_in_worker(worker_id: int) -> None:
    # Ctrl-C reaches the whole process group: workers leave it to the main process, which saves and exits.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


