"""Generation speed of causal LMs, dense and compressed in one run: prefill latency and decode tokens/s.

    rows = bench_generate({"lrc": low, "dense": dense}, new_tokens=64, batch_sizes=[1, 16], device="cuda",
                          runtime="graphs", reference="dense")

Each repeat is one greedy `generate` of exactly `new_tokens` tokens from a fixed random prompt; a logits processor
(called once per generated token, after the forward that produced it) stamps the time, so that one call gives the
prefill (the prompt's forward and the first token) and every decode step. On CUDA each stamp synchronises first.
The models' repeats are interleaved (A B, B A, ...), the medians reported. `runtime` (models.runtime): eager runs
transformers' dynamic cache; compile and graphs a static KV cache with the forward compiled (graphs: CUDA graph
trees, transformers' recipe for fast decoding; CUDA only).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lowrank_cli.errors import UsageError


@dataclass
class GenerateRow:
    """One model at one batch size: per-call medians over the repeats."""

    model: str
    batch_size: int
    prompt_tokens: int
    new_tokens: int
    prefill_ms: float  # the prompt's forward and the first token
    decode_ms_per_token: float  # one decode step (all sequences of the batch)
    decode_tokens_per_s: float  # batch_size tokens per decode step
    runtime: str
    cache: str  # "static" or "dynamic"
    grouped: bool
    prefill_speedup: float | None = None  # reference prefill / this prefill
    decode_speedup: float | None = None  # this tokens/s / the reference's
    reference: str | None = None
    prefill_samples_ms: list[float] = field(default_factory=list)
    decode_samples_ms: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("prefill_ms", "decode_ms_per_token", "decode_tokens_per_s", "prefill_speedup", "decode_speedup"):
            d[k] = None if d[k] is None else round(d[k], 4)
        for k in ("prefill_samples_ms", "decode_samples_ms"):
            d[k] = [round(v, 4) for v in d[k]]
        return d


class _Stamps:
    """A logits processor that records when each token's scores arrive."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())
        return scores


def check_generates(models: Mapping[str, nn.Module]) -> None:
    """Every model is a causal LM (its family gives its KV cache), else a UsageError naming it."""
    from lowrank_cli.models.runtime import generates

    for name, model in models.items():
        if not generates(model):
            raise UsageError(f"`generate` times a causal LM's decoding, and '{name}' is not one (it has no KV cache "
                             "to fill): leave `generate` out to time its forward pass")


def context_limit(models: Mapping[str, nn.Module]) -> tuple[str, int] | None:
    """(name, positions) of the model with the fewest learned positions; None when no model has a limit."""
    from lowrank_cli.models.inputs import input_spec

    limits = [(name, input_spec(m).positions) for name, m in models.items() if input_spec(m).positions]
    return min(limits, key=lambda item: item[1]) if limits else None


def default_prompt_tokens(models: Mapping[str, nn.Module], new_tokens: int) -> int:
    """The prompt length when none is given: the default input length, shortened so that the prompt and the new
    tokens fit every model's positions (at least 1 token; a longer `generate` is refused by check_context)."""
    from lowrank_cli.models.inputs import default_input_size

    prompt = default_input_size(next(iter(models.values())))[0]
    limit = context_limit(models)
    return prompt if limit is None else max(1, min(prompt, limit[1] - new_tokens))


def check_context(models: Mapping[str, nn.Module], prompt_tokens: int, new_tokens: int) -> None:
    """The prompt and the new tokens fit every model's learned positions, else a UsageError saying what to lower
    (past them a model with absolute positions fails mid-run, and a rotary one times tokens it never learned)."""
    limit = context_limit(models)
    if limit is not None and prompt_tokens + new_tokens > limit[1]:
        name, positions = limit
        raise UsageError(f"a prompt of {prompt_tokens} tokens and {new_tokens} new ones need {prompt_tokens + new_tokens}"
                         f" positions, and '{name}' has {positions}: lower `seq_len` or `generate`")


def bench_generate(models: Mapping[str, nn.Module], *, new_tokens: int, batch_sizes: Sequence[int] = (1,),
                   prompt_tokens: int = 128, device: str | torch.device = "auto", dtype: Any = "fp32",
                   runtime: str = "eager", reference: str | None = None, repeats: int = 3, seed: int = 0,
                   progress: Callable[[str], None] | None = None) -> list[GenerateRow]:
    """Prefill and decode speed of every model at every batch size (see the module docstring)."""
    from lowrank_cli.devices import resolve_device, resolve_dtype
    from lowrank_cli.models.runtime import apply_runtime

    if new_tokens < 2:
        raise UsageError(f"`generate` must be at least 2 (a prefill and one decode step), got {new_tokens}")
    check_generates(models)
    check_context(models, prompt_tokens, new_tokens)
    dev, dt = resolve_device(device), resolve_dtype(dtype, torch.float32)
    reference = reference or next(iter(models))
    progress = progress or (lambda msg: None)
    for model in models.values():
        model.to(device=dev, dtype=dt).eval()
        apply_runtime(model, runtime, dev)
    vocab = min(int(getattr(m.config, "vocab_size", 2)) for m in models.values())
    rows: list[GenerateRow] = []
    for bs in batch_sizes:
        prompt = torch.randint(0, vocab, (bs, prompt_tokens), generator=torch.Generator().manual_seed(seed)).to(dev)
        samples = _timed(models, prompt, new_tokens, repeats, dev, progress)
        rows += _rows(models, samples, bs, prompt_tokens, new_tokens, runtime, reference)
    return rows


def _generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int, dev: torch.device) -> tuple[float, float]:
    """One greedy generate of exactly `new_tokens`: (prefill ms, ms per decode step)."""
    stamps = _Stamps(dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, num_beams=1, logits_processor=[stamps],
                       pad_token_id=0)
    t = stamps.times
    return (t[0] - start) * 1e3, (t[-1] - t[0]) * 1e3 / (len(t) - 1)


def _timed(models: Mapping[str, nn.Module], prompt: torch.Tensor, new_tokens: int, repeats: int, dev: torch.device,
           progress: Callable[[str], None]) -> dict[str, list[tuple[float, float]]]:
    """One warm-up generate per model (it compiles and records graphs), then `repeats` interleaved timed ones."""
    names = list(models)
    for name in names:
        progress(f"{name}, batch {prompt.shape[0]}: warm-up generate")
        _generate(models[name], prompt, new_tokens, dev)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for i in range(max(1, repeats)):
        for name in names if i % 2 == 0 else names[::-1]:
            samples[name].append(_generate(models[name], prompt, new_tokens, dev))
        progress(f"batch {prompt.shape[0]}: repeat {i + 1}")
    return samples


def _rows(models: Mapping[str, nn.Module], samples: dict[str, list[tuple[float, float]]], bs: int,
          prompt_tokens: int, new_tokens: int, runtime: str, reference: str) -> list[GenerateRow]:
    from lowrank_cli.models.grouping import is_grouped

    medians = {n: (statistics.median(p for p, _ in s), statistics.median(d for _, d in s)) for n, s in samples.items()}
    ref_prefill, ref_decode = medians[reference]
    compared = len(models) > 1
    rows = []
    for name, model in models.items():
        prefill, decode = medians[name]
        cache = getattr(getattr(model, "generation_config", None), "cache_implementation", None) or "dynamic"
        rows.append(GenerateRow(
            model=name, batch_size=bs, prompt_tokens=prompt_tokens, new_tokens=new_tokens, prefill_ms=prefill,
            decode_ms_per_token=decode, decode_tokens_per_s=bs * 1e3 / decode, runtime=runtime, cache=cache,
            grouped=is_grouped(model), prefill_speedup=ref_prefill / prefill if compared else None,
            decode_speedup=ref_decode / decode if compared else None, reference=reference if compared else None,
            prefill_samples_ms=[p for p, _ in samples[name]], decode_samples_ms=[d for _, d in samples[name]]))
    return rows
