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

`profile()` splits one forward pass into GEMMs (the linear layers), attention kernels and everything else,
which says where the time goes once the GEMMs are smaller.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lowrank_cli.devices import SHORT_DTYPE, resolve_dtype
from lowrank_cli.errors import UsageError
from lowrank_cli.models.inputs import example_input
from lowrank_cli.timing import cuda_graphed, quantile, synchronize

# torch.compile modes that run the compiled graph through CUDA graphs.
_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")

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
            "the device, so medians and speed-ups are uncertain; rerun on a quiet machine, or raise --repeats / "
            "--min-time")


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


@dataclass
class Profile:
    """Where the time of one forward pass goes (milliseconds per forward)."""

    model: str
    batch_size: int
    gemm_ms: float  # matrix multiplies of the linear layers (addmm / mm / linear / gemm kernels)
    attention_ms: float  # fused attention kernels (scaled_dot_product_*, flash, fmha) and bmm
    other_ms: float  # everything else: norms, activations, residual adds, copies, launch gaps on the CPU side
    total_ms: float
    where: str  # "cpu ops (self time)" or "cuda kernels"
    top: list[tuple[str, str, float]] = field(default_factory=list)  # (kind, name, ms), largest first

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["top"] = [{"kind": k, "name": n, "ms": round(ms, 4)} for k, n, ms in self.top]
        for k in ("gemm_ms", "attention_ms", "other_ms", "total_ms"):
            d[k] = round(d[k], 4)
        return d


# ------------------------------------------------------------------------------------------------ options


def parse_batch_sizes(text: str | Iterable[int]) -> list[int]:
    """"1,32,256" -> [1, 32, 256] (each a whole number >= 1, duplicates dropped, order kept)."""
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    sizes: list[int] = []
    for item in items:
        try:
            n = int(item)
        except (TypeError, ValueError):
            n = 0
        if n < 1 or (isinstance(item, float) and not float(item).is_integer()):
            raise UsageError(f"--batch-size '{text}' is not a comma-separated list of whole numbers >= 1 (e.g. 1,32,256)")
        if n not in sizes:
            sizes.append(n)
    if not sizes:
        raise UsageError("--batch-size is empty: give e.g. 1,32,256")
    return sizes


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


# ------------------------------------------------------------------------------------------------ timing


class _Runner:
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


def resolve_compile_mode(compile: bool | str, cuda_graphs: bool) -> str | None:
    if compile in (False, None, "", "none"):
        return None
    mode = "default" if compile is True else str(compile)
    if mode not in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
        raise UsageError(
            f"--compile-mode '{mode}' is not a torch.compile mode: use default, reduce-overhead, max-autotune or "
            "max-autotune-no-cudagraphs"
        )
    if cuda_graphs and mode == "default":
        mode = "reduce-overhead"  # torch.compile's own CUDA graphs
    if cuda_graphs and mode == "max-autotune-no-cudagraphs":
        raise UsageError("--cuda-graphs contradicts --compile-mode max-autotune-no-cudagraphs: drop one of them")
    return mode


def bench(
    models: Mapping[str, nn.Module],
    *,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "fp32",
    batch_sizes: Sequence[int] | str = (1,),
    input_size: Sequence[int] | None = None,
    reference: str | None = None,
    compile: bool | str = False,
    cuda_graphs: bool = False,
    warmup: int | None = None,
    repeats: int | None = None,
    min_time: float | None = None,
    max_repeats: int = 200,
    min_sample_s: float | None = None,
    interleave: bool = True,
    count_macs: bool = True,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> list[BenchRow]:
    """Time every model at every batch size on one device; returns one BenchRow per (batch size, model).

    models: name -> module. The modules are moved to `device` and `dtype` and put in eval mode, in place.
    reference: the model the others are compared with (speedup, mac_ratio); default the first one.
    compile: False, True (torch.compile default mode) or a mode name; the same for every model.
        `dynamic=False`: each batch size gets its own specialised graph.
    cuda_graphs: replay each model from a CUDA graph (CUDA only): with compile, torch.compile's
        "reduce-overhead" mode; without, a graph captured with torch.cuda.graph.
    warmup: calls before timing (default 3 on CUDA, 1 on the CPU; compiled models get 2 more).
    repeats: exactly this many timed repeats per model; default: at least 5 (3 on the CPU) and until each model
        has run `min_time` seconds (default 2 s on CUDA, 1 s on the CPU) or `max_repeats` repeats.
    min_sample_s: one repeat is as many back-to-back calls as last this long (default 20 ms on CUDA, 50 ms on
        the CPU); a single call when one call is longer.
    interleave: alternate the models' repeats (A B B A A B ...) instead of timing them one after the other.
    """
    from lowrank_cli.devices import resolve_device

    if not models:
        raise UsageError("nothing to benchmark: give at least one model")
    warn = warn or (lambda msg: None)
    progress = progress or (lambda msg: None)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, torch.float32)
    sizes = parse_batch_sizes(batch_sizes)
    names = list(models)
    reference = names[0] if reference is None else reference
    if reference not in models:
        raise UsageError(f"reference '{reference}' is not one of the benchmarked models ({', '.join(names)})")
    mode = resolve_compile_mode(compile, cuda_graphs)
    if cuda_graphs and dev.type != "cuda":
        raise UsageError("--cuda-graphs needs a CUDA device: drop it, or use --device cuda")
    if repeats is not None and repeats < 1:
        raise UsageError(f"--repeats must be >= 1, got {repeats}")
    cuda = dev.type == "cuda"
    # torch.compile's reduce-overhead and max-autotune modes replay CUDA graphs on their own (cudagraph trees).
    graphed = bool(cuda_graphs) or (cuda and mode in _CUDAGRAPH_MODES)
    if cuda and dev.index is not None:
        torch.cuda.set_device(dev)  # CUDA events, graphs and streams below use the current device
    warmup = (3 if cuda else 1) + (2 if mode else 0) if warmup is None else max(1, warmup)
    min_time = (2.0 if cuda else 1.0) if min_time is None else min_time
    min_sample_s = (0.02 if cuda else 0.05) if min_sample_s is None else min_sample_s
    min_repeats = repeats if repeats is not None else (5 if cuda else 3)
    max_repeats = repeats if repeats is not None else max(max_repeats, min_repeats)
    if dt in (torch.bfloat16, torch.float16) and not cuda:
        warn(f"{SHORT_DTYPE[dt]} on the CPU is slow on most processors (no native matrix units): the timings say "
             "little about a GPU")

    if input_size is None:
        from lowrank_cli.models.inputs import default_input_size

        input_size = default_input_size(models[reference])
    input_size = tuple(int(v) for v in input_size)

    for name, model in models.items():
        model.to(device=dev, dtype=dt)
        model.eval()
        check_input_size(model, input_size, dev, dt)

    per_image_macs: dict[str, int | None] = {}
    if count_macs:
        from lowrank_cli.evaluation.counting import count_macs as _count

        one = example_input(models[reference], input_size, device=dev, dtype=dt,
                            generator=torch.Generator().manual_seed(seed))
        for name, model in models.items():
            try:
                per_image_macs[name] = _count(model, one).total
            except Exception as e:  # a count that fails must not cost the timing
                warn(f"could not count the MACs of {name} ({type(e).__name__}: {str(e)[:100]}): MAC ratio left out")
                per_image_macs[name] = None

    if mode:
        _allow_recompiles(2 * len(models) * len(sizes) + 8)
    fns: dict[str, Callable[[torch.Tensor], Any]] = {}
    for name, model in models.items():
        fns[name] = torch.compile(model, mode=None if mode == "default" else mode, dynamic=False) if mode else model

    rows: list[BenchRow] = []
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        for bs in sizes:
            x = example_input(models[reference], input_size, bs, device=dev, dtype=dt, generator=gen)
            runners: list[_Runner] = []
            for name in names:
                fn = fns[name]
                captured = 0
                if cuda_graphs and not mode:
                    progress(f"{name}, batch {bs}: capturing a CUDA graph")
                    torch.cuda.synchronize(dev)
                    before = torch.cuda.memory_allocated(dev)
                    torch.cuda.reset_peak_memory_stats(dev)
                    fn = cuda_graphed(fn, x)  # the graph's pool holds the activations from now on
                    torch.cuda.synchronize(dev)
                    captured = torch.cuda.max_memory_allocated(dev) - before
                runner = _Runner(name, models[name], fn, dev, mark_step=graphed and bool(mode), compiled=bool(mode))
                runner.peak_extra = captured
                progress(f"{name}, batch {bs}: warm-up ({warmup} call{'s' if warmup > 1 else ''}"
                         f"{', compiling' if mode else ''})")
                skips = _cudagraph_skips()
                runner.warm_up(x, warmup, min_sample_s)
                if graphed and mode and _cudagraph_skips() > skips:
                    warn(f"torch.compile ran {name} at batch {bs} without CUDA graphs (it skipped them; "
                         "TORCH_LOGS=perf_hints says why): its row is not a CUDA-graph timing")
                runners.append(runner)
            _time(runners, x, interleave, min_repeats, max_repeats, min_time, progress, bs)
            ref = next(r for r in runners if r.name == reference)
            ref_median = statistics.median(ref.samples)
            for r in runners:
                median = statistics.median(r.samples)
                macs = None if per_image_macs.get(r.name) is None else per_image_macs[r.name] * bs
                ref_macs = None if per_image_macs.get(reference) is None else per_image_macs[reference] * bs
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
                    peak_memory_bytes=(weight_bytes(r.model) + r.peak_extra) if cuda else None,
                    speedup=ref_median / median if len(runners) > 1 else None,
                    mac_ratio=(ref_macs / macs) if (len(runners) > 1 and macs and ref_macs) else None,
                    reference=reference if len(runners) > 1 else None,
                    device=str(dev),
                    dtype=SHORT_DTYPE[dt],
                    compile=mode,
                    cuda_graphs=graphed,
                    samples_ms=list(r.samples),
                ))
            del runners, x
            if cuda:
                torch.cuda.empty_cache()
    message = noise_warning(rows)
    if message:
        warn(message)
    return rows


def _cudagraph_skips() -> int:
    """How many times inductor has declined to use CUDA graphs in this process (0 where it keeps no count)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["inductor"].get("cudagraph_skips", 0))


def _allow_recompiles(n: int) -> None:
    """Every model x batch size is one more compiled entry on the same forward code (VisionTransformer.forward):
    raise dynamo's per-code limit so that none silently falls back to eager."""
    import torch._dynamo

    cfg = torch._dynamo.config
    for attr in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, attr) and getattr(cfg, attr) < n:
            setattr(cfg, attr, n)


def _time(runners: list[_Runner], x: torch.Tensor, interleave: bool, min_repeats: int, max_repeats: int,
          min_time: float, progress: Callable[[str], None], bs: int) -> None:
    def done(r: _Runner) -> bool:
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


# ------------------------------------------------------------------------------------------------ profile

_ATTENTION = re.compile(r"scaled_dot_product|flash|fmha|attention|sdpa|\bbmm\b|baddbmm", re.IGNORECASE)
_GEMM = re.compile(
    r"addmm|\bmm\b|aten::mm|matmul|linear|gemm|nvjet|xmma|cublas|cutlass|tensorop|s16816|h16816|mkl|"
    r"triton_tem_fused_.*mm",
    re.IGNORECASE,
)
# Wrappers whose self time is bookkeeping, not work (and would be counted twice under their children).
_SKIP = re.compile(r"^(ProfilerStep|\[memory\]|## |Torch-Compiled Region|CompiledFunction)")


def classify(name: str) -> str:
    """'gemm', 'attention' or 'other' for a profiler op or kernel name."""
    if _ATTENTION.search(name):
        return "attention"
    if _GEMM.search(name):
        return "gemm"
    return "other"


def profile(
    model: nn.Module,
    x: torch.Tensor,
    *,
    name: str = "model",
    calls: int = 1,
    fn: Callable[[torch.Tensor], Any] | None = None,
    top: int = 8,
) -> Profile:
    """Split the time of `calls` forward passes of `model` on `x` (already on its device) into GEMMs, attention
    and the rest. On CUDA the kernels' device time is split by kernel name; on the CPU the ops' self time.
    `fn` (e.g. a compiled model) is called instead of `model` when given; warm it up first."""
    import os

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # no "gpuGetDeviceCount failed" line on machines without CUDA
    fn = model if fn is None else fn  # not `fn or model`: a compiled module has no truth value (len() raises)
    cuda = x.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.inference_mode():
        fn(x)  # one call outside the trace: lazy initialisation is not the model's time
        synchronize(x.device)
        with torch_profile(activities=activities) as prof:
            for _ in range(calls):
                fn(x)
            synchronize(x.device)
    totals: dict[tuple[str, str], float] = {}

    def add(kind: str, name: str, us: float) -> None:
        totals[(kind, name)] = totals.get((kind, name), 0.0) + us / 1e3

    if cuda:
        for evt in prof.events():
            if evt.device_type == torch.autograd.DeviceType.CUDA:
                add(classify(evt.name), evt.name, evt.time_range.elapsed_us())
        where = "cuda kernels"
    else:
        # Walk the op tree: a GEMM or attention op counts with everything under it (aten::linear -> t, addmm ->
        # the bias copy), any other op with its self time, its children judged on their own.
        def walk(evt) -> None:
            if _SKIP.match(evt.name):
                for child in evt.cpu_children:
                    walk(child)
                return
            kind = classify(evt.name)
            if kind != "other":
                add(kind, evt.name, evt.cpu_time_total)
                return
            add(kind, evt.name, evt.self_cpu_time_total)
            for child in evt.cpu_children:
                walk(child)

        for evt in prof.events():
            if evt.cpu_parent is None and evt.device_type == torch.autograd.DeviceType.CPU and not evt.is_async:
                walk(evt)
        totals = {k: v for k, v in totals.items() if v > 0}
        where = "cpu ops (linear / attention ops with everything under them, other ops self time)"
    by_kind = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    for (kind, _), ms in totals.items():
        by_kind[kind] += ms / calls
    ranked = sorted(((k, n, ms / calls) for (k, n), ms in totals.items()), key=lambda t: -t[2])
    return Profile(
        model=name,
        batch_size=int(x.shape[0]),
        gemm_ms=by_kind["gemm"],
        attention_ms=by_kind["attention"],
        other_ms=by_kind["other"],
        total_ms=sum(by_kind.values()),
        where=where,
        top=[(k, n[:80], ms) for k, n, ms in ranked[:top]],
    )


def check_input_size(model: nn.Module, input_size: Sequence[int], device: torch.device, dtype: torch.dtype) -> None:
    """A batch-1 forward at `input_size`, so that a wrong --input-size fails with one clear line."""
    try:
        with torch.inference_mode():
            model(example_input(model, tuple(input_size), device=device, dtype=dtype, zeros=True))
    except Exception as e:
        from lowrank_cli.models.inputs import forward_failed

        raise forward_failed(e, model, tuple(input_size)) from None
