"""The optimizer's schedule: linear warm-up then cosine to 0, and AdamW groups (no decay on biases, norms, tokens)."""

from __future__ import annotations

import math
from typing import Any

from torch import nn


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier for the optimizer step `step` (0-based): linear warm-up, then cosine to 0."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(named: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices (linear and factor weights), none on biases, norms and tokens."""
    tokens = ("cls_token", "pos_embed", "dist_token", "reg_token")
    decays = [p.ndim >= 2 and not n.endswith(tokens) for n, p in named]
    groups = ({"params": [p for (_, p), d in zip(named, decays) if d], "weight_decay": weight_decay},
              {"params": [p for (_, p), d in zip(named, decays) if not d], "weight_decay": 0.0})
    return [g for g in groups if g["params"]]
