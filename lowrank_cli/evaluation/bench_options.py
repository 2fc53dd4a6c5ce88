"""The options of one `lrc bench` run (`evaluation.bench.bench`), checked before anything slow happens and
resolved for the device: batch sizes, the torch.compile mode, CUDA graphs, warm-up and repeat counts."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowrank_cli.devices import resolve_dtype
from lowrank_cli.errors import UsageError
from lowrank_cli.option_fields import option

# torch.compile modes that run the compiled graph through CUDA graphs.
_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


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
            raise UsageError(f"`batch_sizes` '{text}' is not a comma-separated list of whole numbers >= 1 "
                             "(e.g. 1,32,256)")
        if n not in sizes:
            sizes.append(n)
    if not sizes:
        raise UsageError("`batch_sizes` is empty: give e.g. 1,32,256")
    return sizes


def resolve_compile_mode(compile: bool | str, cuda_graphs: bool) -> str | None:
    if compile in (False, None, "", "none"):
        return None
    mode = "default" if compile is True else str(compile)
    if mode not in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
        raise UsageError(
            f"`compile` '{mode}' is not a torch.compile mode: use default, reduce-overhead, max-autotune or "
            "max-autotune-no-cudagraphs"
        )
    if cuda_graphs and mode == "default":
        mode = "reduce-overhead"  # torch.compile's own CUDA graphs
    if cuda_graphs and mode == "max-autotune-no-cudagraphs":
        raise UsageError("`cuda_graphs=True` contradicts `compile=max-autotune-no-cudagraphs`: drop one of them")
    return mode


@dataclass
class BenchOptions:
    """What `bench` measures and how (each option once; see `bench` for what they mean)."""

    device: Any = option("auto", help="Where to run (auto: cuda when available).")
    dtype: Any = option("fp32", help="Precision every model is cast to.")
    batch_sizes: Any = option((1,), help="Batch sizes (a list, or comma-separated).")
    input_size: Sequence[int] | None = option(None, help="Per-example input size (default: the reference's).")
    reference: str | None = option(None, help="The model the others are compared with (default: the first).")
    compile: bool | str = option(False, help="torch.compile: False, True (default mode) or a mode name.")
    cuda_graphs: bool = option(False, help="Replay each model from a CUDA graph (CUDA only).")
    fused: bool | None = option(None, help="Run the low-rank layers through the fused kernel.")
    warmup: int | None = option(None, help="Calls before timing (default 3 on CUDA, 1 on the CPU; +2 compiled).")
    repeats: int | None = option(None, help="Exactly this many timed repeats (default: min_time decides).")
    min_time: float | None = option(None, help="Seconds of timed repeats (default 2 on CUDA, 1 on the CPU).")
    max_repeats: int = option(200, help="At most this many timed repeats.")
    min_sample_s: float | None = option(None, help="Seconds one repeat lasts at least (default 20 / 50 ms).")
    interleave: bool = option(True, help="Alternate the models' repeats (A B B A ...).")
    count_macs: bool = option(True, help="Count each model's MACs (fvcore) for the MAC ratio.")
    seed: int = option(0, help="Seed of the random inputs.")


@dataclass
class BenchSetup:
    """The options of one `bench` run, checked, with the device's defaults filled in."""

    device: torch.device
    dtype: torch.dtype
    sizes: list[int]
    names: list[str]
    reference: str
    mode: str | None  # the torch.compile mode, None when eager
    cuda_graphs: bool  # asked for: without a compile mode, lrc captures each model in a CUDA graph
    graphed: bool  # the models replay CUDA graphs (asked for, or a compile mode that graphs on its own)
    warmup: int
    min_time: float
    min_sample_s: float
    min_repeats: int
    max_repeats: int
    interleave: bool

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def resolve_setup(models: Mapping[str, nn.Module], options: BenchOptions) -> BenchSetup:
    """`bench`'s options checked (a UsageError for what cannot work) and resolved for the device."""
    from lowrank_cli.devices import resolve_device

    o = options
    device, dtype, batch_sizes, reference, compile, cuda_graphs = (o.device, o.dtype, o.batch_sizes, o.reference,
                                                                   o.compile, o.cuda_graphs)
    warmup, repeats, min_time, max_repeats, min_sample_s = o.warmup, o.repeats, o.min_time, o.max_repeats, o.min_sample_s

    if not models:
        raise UsageError("nothing to benchmark: give at least one model")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, torch.float32)
    sizes = parse_batch_sizes(batch_sizes)
    names = list(models)
    reference = names[0] if reference is None else reference
    if reference not in models:
        raise UsageError(f"reference '{reference}' is not one of the benchmarked models ({', '.join(names)})")
    mode = resolve_compile_mode(compile, cuda_graphs)
    if cuda_graphs and dev.type != "cuda":
        raise UsageError("`cuda_graphs=True` needs a CUDA device: drop it, or use `device=cuda`")
    if repeats is not None and repeats < 1:
        raise UsageError(f"`repeats` must be >= 1, got {repeats}")
    cuda = dev.type == "cuda"
    min_repeats = repeats if repeats is not None else (5 if cuda else 3)
    return BenchSetup(
        device=dev, dtype=dt, sizes=sizes, names=names, reference=reference, mode=mode,
        cuda_graphs=bool(cuda_graphs),
        # torch.compile's reduce-overhead and max-autotune modes replay CUDA graphs on their own (cudagraph trees).
        graphed=bool(cuda_graphs) or (cuda and mode in _CUDAGRAPH_MODES),
        warmup=(3 if cuda else 1) + (2 if mode else 0) if warmup is None else max(1, warmup),
        min_time=(2.0 if cuda else 1.0) if min_time is None else min_time,
        min_sample_s=(0.02 if cuda else 0.05) if min_sample_s is None else min_sample_s,
        min_repeats=min_repeats,
        max_repeats=repeats if repeats is not None else max(max_repeats, min_repeats),
        interleave=o.interleave,
    )
