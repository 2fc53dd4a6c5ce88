"""Two parts of a report beyond parameters and MACs: the compression ratio over the target layers (any factorized
model), and what generating a token costs (a causal LM).

Ratio. SVD-LLM's compression ratio R is the fraction of the target layers' parameters removed; PELA's kappa is how
many times smaller each layer gets. The rank rule r = floor(d_in*d_out / (kappa*(d_in+d_out))) keeps 1/kappa of a
layer, so R = 1 - 1/kappa. Ranks are whole and rounded down to the rank multiple, so the ratio achieved is a little
above the one asked: `ratio_doc` states both, over the weights of the target layers (the low-rank layers and the
targets left dense; biases left out, as the rank rule leaves them out).

Decoding. The MACs of one generated token at a context of C tokens: one token through every linear and norm, and
attention of that token over C keys. They are counted by fvcore on a one-token forward (no cache object anywhere)
whose attention, over its one key, is then scaled to C keys (`scaled_dot_product_attention` MACs grow linearly in
the keys). The KV cache a token adds comes from the config (the model family's `kv_cache_bytes_per_token`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lowrank_cli.errors import UsageError
from lowrank_cli.models.families import family_of, input_spec

ATTENTION = "scaled_dot_product_attention"


def ratio_doc(layers: list[dict[str, Any]], provenance: dict[str, Any] | None,
              record: dict[str, Any] | None) -> dict[str, Any] | None:
    """{"asked", "achieved", "kappa_asked", "kappa_achieved", "target_params", "removed"} of a model with low-rank
    layers (None without): achieved = removed / target_params over the target layers' weights; asked from the
    checkpoint's provenance `ratio`, else its `kappa` (null when it says neither, e.g. a rank budget). `record` is
    the report's provenance part (its `left_dense`: the targets kept dense)."""
    lowrank = [r for r in layers if r["kind"] == "lowrank"]
    if not lowrank:
        return None
    left_dense = set((record or {}).get("left_dense") or {})
    dense_targets = [r for r in layers if r["kind"] == "dense" and r["name"] in left_dense]
    target = sum(r["d_in"] * r["d_out"] for r in lowrank + dense_targets)
    removed = sum(r["d_in"] * r["d_out"] - r["rank"] * (r["d_in"] + r["d_out"]) for r in lowrank)
    achieved = removed / target
    kappa = (provenance or {}).get("kappa")
    asked = (provenance or {}).get("ratio")
    if asked is None and isinstance(kappa, (int, float)):
        asked = 1 - 1 / kappa
    return {
        "asked": asked, "achieved": achieved,
        "kappa_asked": kappa if isinstance(kappa, (int, float)) else None,
        "kappa_achieved": 1 / (1 - achieved) if achieved < 1 else None,
        "target_params": target, "removed": removed,
    }


def decode_doc(model: nn.Module, layers: list[dict[str, Any]], context_len: int | None,
               prefill_tokens: int) -> dict[str, Any] | None:
    """What one generated token costs at `context_len` tokens of context (default `prefill_tokens`, the report's
    sequence length): {"context", "macs_per_token", "attention_macs_per_token", "dense_macs_per_token",
    "kv_cache_bytes_per_token", "kv_cache_bytes"}; None for a model that does not generate."""
    from lowrank_cli.evaluation.counting import count_macs

    per_token_cache = family_of(model).kv_cache_bytes_per_token(model)
    if per_token_cache is None:
        if context_len is not None:
            raise UsageError(f"`context_len` is the context of a generated token; {type(model).__name__} does not "
                             "generate: leave it out")
        return None
    context = prefill_tokens if context_len is None else context_len
    positions = input_spec(model).positions
    if context < 1 or (positions and context > positions):
        limit = f"between 1 and the model's {positions} positions" if positions else "at least 1"
        raise UsageError(f"`context_len` must be {limit}, got {context}")
    one = count_macs(model, (1,))
    attention = one.by_operator.get(ATTENTION, 0) * context  # one key in the count, `context` keys when decoding
    macs = one.total - one.by_operator.get(ATTENTION, 0) + attention
    saved = sum(r["d_in"] * r["d_out"] - r["rank"] * (r["d_in"] + r["d_out"]) for r in layers if r["kind"] == "lowrank")
    return {
        "context": context, "macs_per_token": macs, "attention_macs_per_token": attention,
        "dense_macs_per_token": macs + saved, "kv_cache_bytes_per_token": per_token_cache,
        "kv_cache_bytes": per_token_cache * context,
    }
