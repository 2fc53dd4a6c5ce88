"""The timing machinery of `lrc bench`: one model prepared for timing (compiled or graphed, warmed up), and the
interleaved rounds of timed repeats that all models of one batch size go through together."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lowrank_cli.timing import cuda_graphed, synchronize


class Runner:
    """One model, prepared for timing at one batch size: compiled / graphed as asked, warmed up."""

    def __init__(self, name: str, model: nn.Module, fn: Callable[[torch.Tensor], Any], device: torch.device,
                 mark_step: bool, compiled: bool = False) -> None:
        self.name = name
        self.compiled = compiled
        self.model = model
        self.fn = fn
        self.device = device
        self.mark_step = mark_step  # cudagraph trees: a new "iteration" per call, outputs are never kept
        self.calls = 1
        self.samples: list[float] = []
        self.peak_extra = 0

    def call(self, x: torch.Tensor) -> None:
        if self.mark_step:
            torch.compiler.cudagraph_mark_step_begin()
        self.fn(x)

    def sample(self, x: torch.Tensor) -> float:
        """Milliseconds per call, averaged over `self.calls` back-to-back calls."""
        dev = self.device
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(dev)
            start.record()
            for _ in range(self.calls):
                self.call(x)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / self.calls
        t0 = time.perf_counter()
        for _ in range(self.calls):
            self.call(x)
        return (time.perf_counter() - t0) * 1e3 / self.calls

    def warm_up(self, x: torch.Tensor, calls: int, min_sample_s: float) -> None:
        dev = self.device
        last = 0.0
        for i in range(max(calls, 1)):
            # The first call of a compiled model compiles (max-autotune: benchmarks candidate kernels on scratch
            # tensors); that memory is not the model's, so its peak is left out. CUDA graphs record later.
            measure = dev.type == "cuda" and not (self.compiled and i == 0 and calls > 1)
            if measure:
                torch.cuda.synchronize(dev)
                before = torch.cuda.memory_allocated(dev)
                torch.cuda.reset_peak_memory_stats(dev)
            t0 = time.perf_counter()
            self.call(x)
            synchronize(dev)
            last = time.perf_counter() - t0
            if measure:
                self.peak_extra = max(self.peak_extra, torch.cuda.max_memory_allocated(dev) - before)
        # How many calls make one repeat last min_sample_s: a single call when the last warm-up call was long
        # enough already (no extra call on a slow CPU), else measured on a few calls.
        if last < min_sample_s:
            probe = max(1, min(100, int(min_sample_s / max(last, 1e-6) / 4)))
            self.calls = probe
            last = self.sample(x) / 1e3
        self.calls = max(1, min(1000, math.ceil(min_sample_s / max(last, 1e-7))))


def capture_graph(fn: Callable[[torch.Tensor], Any], x: torch.Tensor,
                  device: torch.device) -> tuple[Callable[[torch.Tensor], Any], int]:
    """`fn` captured in a CUDA graph on `x`, and the bytes the capture allocated (the graph's pool holds the
    activations from now on: they count in the model's peak memory)."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    graphed = cuda_graphed(fn, x)
    torch.cuda.synchronize(device)
    return graphed, torch.cuda.max_memory_allocated(device) - before


def time_rounds(runners: list[Runner], x: torch.Tensor, interleave: bool, min_repeats: int, max_repeats: int,
                min_time: float, progress: Callable[[str], None], bs: int) -> None:
    """Timed repeats into each runner's `samples`, until each has `min_repeats` and `min_time` seconds of them
    (or `max_repeats`)."""

    def done(r: Runner) -> bool:
        n = len(r.samples)
        return n >= max_repeats or (n >= min_repeats and sum(r.samples) / 1e3 * r.calls >= min_time)

    if interleave:
        # Whole rounds until every model is done: each model is sampled in every round, so all of them see the
        # same stretch of time (and the same drift).
        round_ = 0
        while not all(done(r) for r in runners):
            order = runners if round_ % 2 == 0 else runners[::-1]  # A B, B A: no model always goes first
            for r in order:
                r.samples.append(r.sample(x))
            round_ += 1
            progress(f"batch {bs}: repeat {round_}")
    else:
        for r in runners:
            while not done(r):
                r.samples.append(r.sample(x))
                progress(f"{r.name}, batch {bs}: repeat {len(r.samples)}")


def cudagraph_skips() -> int:
    """How many times inductor has declined to use CUDA graphs in this process (0 where it keeps no count)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["inductor"].get("cudagraph_skips", 0))


def allow_recompiles(n: int) -> None:
    """Every model x batch size is one more compiled entry on the same forward code (VisionTransformer.forward):
    raise dynamo's per-code limit so that none silently falls back to eager."""
    import torch._dynamo

    cfg = torch._dynamo.config
    for attr in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, attr) and getattr(cfg, attr) < n:
            setattr(cfg, attr, n)
