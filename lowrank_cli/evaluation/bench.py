"""Inference speed: latency and throughput of one or more models on one device, measured in the same run.

    rows = bench({"dense": dense, "lrc": lowrank}, device="cuda", dtype="bf16", batch_sizes=[1, 256],
                 compile=True)

What makes the numbers comparable:

* every model sees the same input (random, made once per batch size), in eval mode under
  `torch.inference_mode`, with the same treatment (`compile`, `cuda_graphs`) applied to each;
* warm-up calls first (they also compile, autotune and record CUDA graphs), then timed repeats;
* the models' repeats are interleaved (A B, B A, A B, ...), so that drift (clock boost, thermal throttling,
  other processes on a shared machine) hits every model alike;
* on CUDA every timed repeat is bracketed by CUDA events after a synchronisation; a repeat is made of as many
  calls as it takes to last `min_sample_s`, so that launch jitter and timer resolution do not dominate small
  batches;
* the median is reported with its spread (10th and 90th percentiles of the repeats).

MACs are fvcore's count (`lowrank_cli.evaluation.counting.count_macs`) of one image, times the batch size: a forward pass
of these models costs the same per image at every batch size, and counting at batch 1 avoids tracing a full
batch (deit_base at batch 16 takes many seconds on a small CPU).

Peak memory: on CUDA, the model's own weights plus the largest allocation seen above the resident memory during
its warm-up calls (`torch.cuda.max_memory_allocated`); on the CPU no per-model figure is reliable (the
allocator never returns memory to the OS, and the process holds every model at once), so the row says None
and `process_peak_rss()` gives the process's peak resident set instead.

The options are checked and resolved in `lowrank_cli.evaluation.bench_options`, the timing machinery is in
`lowrank_cli.evaluation.bench_runner`; `lowrank_cli.evaluation.profiling.profile()` splits one forward pass into
GEMMs, attention kernels and everything else.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from lowrank_cli.devices import SHORT_DTYPE
from lowrank_cli.evaluation.bench_options import BenchOptions, BenchSetup, resolve_setup
from lowrank_cli.evaluation.bench_runner import Runner, allow_recompiles, capture_graph, cudagraph_skips, time_rounds
from lowrank_cli.models.inputs import default_input_size, example_input, forward_failed
from lowrank_cli.timing import quantile

PEAK_MEMORY_NOTE = {
    "cuda": "weights + largest extra allocation during warm-up (torch.cuda.max_memory_allocated)",
    "cpu": "not measured per model on the CPU (see process_peak_rss_bytes: the whole process)",
}


# p90 / p10 of the repeats above which a timing is reported as noisy. An idle CPU or GPU stays within a few
# percent; other processes on a shared machine (or a VM's neighbours) push it far above this.
NOISY_SPREAD = 1.2


def noise_warning(rows: Sequence["BenchRow"]) -> str | None:
    """One line naming the noisy (model, batch) timings, with what to do about it; None when all are steady."""
    noisy = [r for r in rows if r.noisy]
    if not noisy:
        return None
    worst = max(noisy, key=lambda r: r.p90_ms / r.p10_ms)
    which = ", ".join(f"{r.model} at batch {r.batch_size}" for r in noisy)
    return (f"noisy timings ({which}; worst p90 {worst.p90_ms / worst.p10_ms:.2f}x p10): something else is using "
            "the device, so medians and speed-ups are uncertain; rerun on a quiet machine, or raise `repeats` / "
            "`min_time`")


@dataclass
class BenchRow:
    """One model at one batch size. Times are per forward pass of the whole batch."""

    model: str
    batch_size: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float  # the least disturbed repeat: on a shared machine, noise only ever adds time
    repeats: int  # timed repeats (samples) behind the median
    calls_per_repeat: int  # forward calls averaged inside one repeat
    throughput: float  # images per second: batch_size / median
    macs: int | None  # multiply-accumulates of one forward pass of the batch (None: could not be counted)
    peak_memory_bytes: int | None  # see the module docstring; None on the CPU
    speedup: float | None = None  # reference median / this median (> 1: faster than the reference)
    mac_ratio: float | None = None  # reference MACs / these MACs (what the MAC count alone promises)
    reference: str | None = None
    device: str = "cpu"
    dtype: str = "fp32"
    compile: str | None = None  # None, or the torch.compile mode ("default", "reduce-overhead", ...)
    cuda_graphs: bool = False
    fused: bool = False  # its low-rank layers ran through the fused kernel (models.fusion)
    grouped: bool = False  # its low-rank layers that read one input ran grouped (models.grouping)
    runtime: str | None = None  # the way it ran, eager / compile / graphs (bench_ways; None: as compile says)
    fastest: bool = False  # bench_ways: this model's fastest way at this batch size (its speedup: best vs best)
    samples_ms: list[float] = field(default_factory=list)

    @property
    def noisy(self) -> bool:
        """The repeats disagree by more than a quiet machine allows: the median, and every ratio, is uncertain."""
        return self.repeats >= 3 and self.p90_ms > NOISY_SPREAD * self.p10_ms

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["noisy"] = self.noisy
        for k in ("median_ms", "p10_ms", "p90_ms", "min_ms", "throughput"):
            d[k] = round(d[k], 4)
        for k in ("speedup", "mac_ratio"):
            d[k] = None if d[k] is None else round(d[k], 4)
        d["samples_ms"] = [round(v, 4) for v in self.samples_ms]
        return d


def process_peak_rss() -> int | None:
    """Peak resident set size of this process in bytes (Linux / macOS), or None where unknown."""
    try:
        import resource
        import sys
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def weight_bytes(model: nn.Module) -> int:
    seen: dict[int, int] = {}
    for t in (*model.parameters(), *model.buffers()):
        seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


# ------------------------------------------------------------------------------------------------ bench


def bench(models: Mapping[str, nn.Module], options: BenchOptions | None = None, *,
          progress: Callable[[str], None] | None = None, warn: Callable[[str], None] | None = None,
          **given: Any) -> list[BenchRow]:
    """Time every model at every batch size on one device; returns one BenchRow per (batch size, model).

    The options are a BenchOptions, or its fields as keywords (`device="cuda", batch_sizes=[1, 256]`):
    models: name -> module. The modules are moved to `device` and `dtype`, put in eval mode and (see `fused`)
        fused, in place.
    reference: the model the others are compared with (speedup, mac_ratio); default the first one.
    compile: False, True (torch.compile default mode) or a mode name; the same for every model.
        `dynamic=False`: each batch size gets its own specialised graph.
    cuda_graphs: replay each model from a CUDA graph (CUDA only): with compile, torch.compile's
        "reduce-overhead" mode; without, a graph captured with torch.cuda.graph.
    fused: run the low-rank layers through the fused kernel (models.fusion.fuse_lowrank): True (CUDA with Triton,
        bf16 / fp16; an EnvironmentProblem where it cannot); None (default, models.fusion.FUSED_BY_DEFAULT) and
        False: the models as given.
    warmup: calls before timing (default 3 on CUDA, 1 on the CPU; compiled models get 2 more).
    repeats: exactly this many timed repeats per model; default: at least 5 (3 on the CPU) and until each model
        has run `min_time` seconds (default 2 s on CUDA, 1 s on the CPU) or `max_repeats` repeats.
    min_sample_s: one repeat is as many back-to-back calls as last this long (default 20 ms on CUDA, 50 ms on
        the CPU); a single call when one call is longer.
    interleave: alternate the models' repeats (A B B A A B ...) instead of timing them one after the other.
    `evaluation.bench_ways.bench_ways` runs this once per way (runtime, grouping) and picks each model's fastest.
    """
    options = replace(options or BenchOptions(), **given)
    warn = warn or (lambda msg: None)
    progress = progress or (lambda msg: None)
    setup = resolve_setup(models, options)
    if setup.cuda and setup.device.index is not None:
        torch.cuda.set_device(setup.device)  # CUDA events, graphs and streams below use the current device
    if setup.dtype in (torch.bfloat16, torch.float16) and not setup.cuda:
        warn(f"{SHORT_DTYPE[setup.dtype]} on the CPU is slow on most processors (no native matrix units): the "
             "timings say little about a GPU")
    from lowrank_cli.models.fusion import resolve_fused

    fuse = resolve_fused(options.fused, setup.device, dtype=setup.dtype)  # `fused=True` where it cannot: refused
    size = _prepare_models(models, setup, options.input_size)
    if fuse:
        _fuse(models, progress)
    per_image_macs = _macs_per_image(models, setup, size, options.seed, warn) if options.count_macs else {}
    rows = _timed(models, setup, size, per_image_macs, options.seed, progress, warn)
    message = noise_warning(rows)
    if message:
        warn(message)
    return rows


def _timed(models: Mapping[str, nn.Module], setup: BenchSetup, size: tuple[int, ...],
           per_image_macs: dict[str, int | None], seed: int, progress: Callable[[str], None],
           warn: Callable[[str], None]) -> list[BenchRow]:
    """The rows of every batch size: each model compiled as asked, warmed up, timed in interleaved rounds."""
    fns = _compiled(models, setup)
    rows: list[BenchRow] = []
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        for bs in setup.sizes:
            x = example_input(models[setup.reference], size, bs, device=setup.device, dtype=setup.dtype,
                              generator=gen)
            runners = [_warmed_up(setup, name, models[name], fns[name], x, bs, progress, warn) for name in setup.names]
            time_rounds(runners, x, setup.interleave, setup.min_repeats, setup.max_repeats, setup.min_time,
                        progress, bs)
            rows += _rows(setup, runners, bs, per_image_macs)
            del runners, x
            if setup.cuda:
                torch.cuda.empty_cache()
    return rows


def _prepare_models(models: Mapping[str, nn.Module], setup: BenchSetup,
                    input_size: Sequence[int] | None) -> tuple[int, ...]:
    """Every model on the device, in the dtype and in eval mode, checked by one forward pass at the input size
    (default: the reference model's); returns that size."""
    if input_size is None:
        input_size = default_input_size(models[setup.reference])
    size = tuple(int(v) for v in input_size)
    for model in models.values():
        model.to(device=setup.device, dtype=setup.dtype)
        model.eval()
        check_input_size(model, size, setup.device, setup.dtype)
    return size


def _fuse(models: Mapping[str, nn.Module], progress: Callable[[str], None]) -> None:
    """The fused kernel swapped into every model with low-rank layers (see `bench`'s `fused`)."""
    from lowrank_cli.models.fusion import fuse_lowrank

    for name, model in models.items():
        summary = fuse_lowrank(model)
        if summary.layers:
            progress(f"{name}: {summary.describe()}")


def is_fused(model: nn.Module) -> bool:
    from lowrank_cli.layers.fused_lowrank import FusedLowRankLinear

    return any(isinstance(m, FusedLowRankLinear) for m in model.modules())


def is_grouped(model: nn.Module) -> bool:
    from lowrank_cli.models.grouping import is_grouped as grouped

    return grouped(model)


def _macs_per_image(models: Mapping[str, nn.Module], setup: BenchSetup, size: tuple[int, ...], seed: int,
                    warn: Callable[[str], None]) -> dict[str, int | None]:
    """Each model's MACs for one image (None where fvcore could not count them: the MAC ratio is left out)."""
    from lowrank_cli.evaluation.counting import count_macs

    one = example_input(models[setup.reference], size, device=setup.device, dtype=setup.dtype,
                        generator=torch.Generator().manual_seed(seed))
    per_image: dict[str, int | None] = {}
    for name, model in models.items():
        try:
            per_image[name] = count_macs(model, one).total
        except Exception as e:  # a count that fails must not cost the timing
            warn(f"could not count the MACs of {name} ({type(e).__name__}: {str(e)[:100]}): MAC ratio left out")
            per_image[name] = None
    return per_image


def _compiled(models: Mapping[str, nn.Module], setup: BenchSetup) -> dict[str, Callable[[torch.Tensor], Any]]:
    """What each model's timed call runs: the model, or torch.compile of it in the setup's mode."""
    mode = setup.mode
    if not mode:
        return dict(models)
    allow_recompiles(2 * len(models) * len(setup.sizes) + 8)
    return {name: torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)
            for name, model in models.items()}


def _warmed_up(setup: BenchSetup, name: str, model: nn.Module, fn: Callable[[torch.Tensor], Any], x: torch.Tensor,
               bs: int, progress: Callable[[str], None], warn: Callable[[str], None]) -> Runner:
    """One model ready to time at batch `bs`: captured in a CUDA graph when asked (without compile), warmed up."""
    mode = setup.mode
    captured = 0
    if setup.cuda_graphs and not mode:
        progress(f"{name}, batch {bs}: capturing a CUDA graph")
        fn, captured = capture_graph(fn, x, setup.device)
    runner = Runner(name, model, fn, setup.device, mark_step=setup.graphed and bool(mode), compiled=bool(mode))
    runner.peak_extra = captured
    warmup = setup.warmup
    progress(f"{name}, batch {bs}: warm-up ({warmup} call{'s' if warmup > 1 else ''}{', compiling' if mode else ''})")
    skips = cudagraph_skips()
    runner.warm_up(x, warmup, setup.min_sample_s)
    if setup.graphed and mode and cudagraph_skips() > skips:
        warn(f"torch.compile ran {name} at batch {bs} without CUDA graphs (it skipped them; "
             "TORCH_LOGS=perf_hints says why): its row is not a CUDA-graph timing")
    return runner


def _rows(setup: BenchSetup, runners: list[Runner], bs: int, per_image_macs: dict[str, int | None]) -> list[BenchRow]:
    """The timed runners of one batch size as rows, with their ratios to the reference."""
    ref = next(r for r in runners if r.name == setup.reference)
    ref_median = statistics.median(ref.samples)
    compared = len(runners) > 1
    ref_macs = None if per_image_macs.get(setup.reference) is None else per_image_macs[setup.reference] * bs
    rows = []
    for r in runners:
        median = statistics.median(r.samples)
        macs = None if per_image_macs.get(r.name) is None else per_image_macs[r.name] * bs
        rows.append(BenchRow(
            model=r.name,
            batch_size=bs,
            median_ms=median,
            p10_ms=quantile(r.samples, 0.1),
            p90_ms=quantile(r.samples, 0.9),
            min_ms=min(r.samples),
            repeats=len(r.samples),
            calls_per_repeat=r.calls,
            throughput=bs / (median / 1e3),
            macs=macs,
            peak_memory_bytes=(weight_bytes(r.model) + r.peak_extra) if setup.cuda else None,
            speedup=ref_median / median if compared else None,
            mac_ratio=(ref_macs / macs) if (compared and macs and ref_macs) else None,
            reference=setup.reference if compared else None,
            device=str(setup.device),
            dtype=SHORT_DTYPE[setup.dtype],
            compile=setup.mode,
            cuda_graphs=setup.graphed,
            fused=is_fused(r.model),
            grouped=is_grouped(r.model),
            samples_ms=list(r.samples),
        ))
    return rows


def check_input_size(model: nn.Module, input_size: Sequence[int], device: torch.device, dtype: torch.dtype) -> None:
    """A batch-1 forward at `input_size`, so that a wrong input size fails with one clear line."""
    try:
        with torch.inference_mode():
            model(example_input(model, tuple(input_size), device=device, dtype=dtype, zeros=True))
    except Exception as e:
        raise forward_failed(e, model, tuple(input_size)) from None
