"""Perplexity of a causal LM on text: `lrc eval MODEL --data text.txt`, and the held-out score a training run can
track (`window_nll` on windows it cuts itself).

    result = evaluate_perplexity(model, "wiki.test.raw.txt", "./llama", seq_len=2048)   # {"perplexity": ...}

The standard WikiText-2 protocol: the text is one token stream (data.token_windows), cut into windows of `seq_len`
tokens, each predicting its next tokens; `stride` (default `seq_len`) < `seq_len` slides them, each later window
scoring only its `stride` new tokens with the earlier ones as context. perplexity = exp(total negative
log-likelihood / tokens scored), summed in float64 over the scored tokens. The model runs as it is (its dtype and
device, eval mode, no KV cache); logits are taken in float32.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_cli.data.token_windows import scoring_windows, token_stream, window_count
from lowrank_cli.errors import UsageError
from lowrank_cli.models.families import family_of, input_spec
from lowrank_cli.models.inputs import output_tensor

DEFAULT_BATCH_SIZE = 4  # windows per forward pass: a window's logits are seq_len x vocab floats


@torch.no_grad()
def window_nll(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, scored: list[int] | torch.Tensor
               ) -> tuple[float, int]:
    """(summed negative log-likelihood, tokens scored) of a batch of windows: inputs and targets (B, L) token ids,
    `scored[b]` the last targets of window b that count."""
    logits = output_tensor(model(inputs)).float()
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    positions = torch.arange(targets.shape[1], device=targets.device)
    keep = positions[None, :] >= targets.shape[1] - torch.as_tensor(scored, device=targets.device)[:, None]
    return float(nll[keep].double().sum()), int(keep.sum())


def perplexity(model: nn.Module, ids: torch.Tensor, *, seq_len: int, stride: int | None = None,
               batch_size: int = DEFAULT_BATCH_SIZE, device: str | torch.device | None = None,
               progress: Callable[[int, int], None] | None = None, what: str = "the text") -> dict[str, Any]:
    """Perplexity of `model` on the token stream `ids` (1-D): {"perplexity", "nll" (per token), "tokens" (scored),
    "windows", "seq_len", "stride"}. `progress(done, total)` after each batch of windows."""
    if batch_size < 1:
        raise UsageError(f"`batch_size` must be at least 1, got {batch_size}")
    stride = seq_len if stride is None else stride
    windows = scoring_windows(ids, length=seq_len, stride=stride, what=what)
    total = window_count(ids.numel(), seq_len, stride)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, tokens, done = 0.0, 0, 0
    try:
        with family_of(model).plain_outputs(model):
            for batch in _batches(windows, batch_size):
                inputs, targets, scored = (torch.stack([w[0] for w in batch]).to(device),
                                           torch.stack([w[1] for w in batch]).to(device), [w[2] for w in batch])
                batch_nll, batch_tokens = window_nll(model, inputs, targets, scored)
                nll, tokens, done = nll + batch_nll, tokens + batch_tokens, done + len(batch)
                if progress is not None:
                    progress(done, total)
    finally:
        model.train(was_training)
    mean = nll / tokens
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": tokens, "windows": done, "seq_len": seq_len,
            "stride": stride}


def evaluate_perplexity(model: nn.Module, data: str | os.PathLike, tokenizer: Any, *, seq_len: int | None = None,
                        stride: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                        device: str | torch.device | None = None,
                        progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Perplexity of a causal LM on a .txt / .jsonl file or a folder of them (`data.token_windows.corpus_text`),
    tokenized by `tokenizer` (a tokenizer, or the folder / Hub repo that has it); `seq_len` defaults to the model's
    (at most its positions). Also "text_tokens": the tokens of the whole text, of which "tokens" were scored."""
    if isinstance(tokenizer, (str, os.PathLike)):
        from lowrank_cli.data.texts import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    spec = input_spec(model)
    length = spec.sized(seq_len)[0]
    ids = token_stream(data, tokenizer, vocab_size=spec.vocab_size)
    result = perplexity(model, ids, seq_len=length, stride=stride, batch_size=batch_size, device=device,
                        progress=progress, what=f"text data '{data}'")
    return {**result, "text_tokens": int(ids.numel())}


def _batches(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
