"""Progressive compression (PC-LoRA, Hwang et al., arXiv 2406.09117): the dense weights fade out while the
low-rank factors learn under distillation.

Every factorized layer of the student trains as a ProgressiveLinear (layers/progressive_linear.py):

    y = lambda(t) * W_res x + second(first(x)) + b

- init "svd" (the default): first / second are the truncated SVD `factorize` computed (data-aware with `calib`)
  and W_res = W - second @ first, so the student is exactly the dense model at t = 0 and exactly a PELA low-rank
  model once lambda = 0. (This combination is lrc's, not the paper's.)
- init "lora" (the paper's): W_res = W, first random (Kaiming uniform, as LoRA's A), second zero, the LoRA scale
  lora_alpha / rank on second, folded into it at the end.
- b is trainable and never decays (the public unofficial implementations decay it with W and lose every bias).
- lambda(t), t the optimizer steps done, q = round(decay_end * total steps): linear 1 - t/q, sine
  1 - sin(pi t / 2q), cosine cos(pi t / 2q), and 0 for t >= q. A pure function of the step, set by a
  `before_step` callback of the trainer, so a resumed run sees the same lambdas as an uninterrupted one.

At the end every ProgressiveLinear becomes the LowRankLinear it stands for (`finish`): the output is an ordinary
lrc checkpoint with no dense residual in it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowrank_cli.layers.lowrank_linear import LowRankLinear
from lowrank_cli.layers.progressive_linear import ProgressiveLinear
from lowrank_cli.models.structure import swap_in
from lowrank_cli.training.callbacks import Callback
from lowrank_cli.training.options import (  # the vocabularies and defaults, written once with the options
    DEFAULT_DECAY,
    DEFAULT_DECAY_END,
    DEFAULT_INIT,
    SCHEDULES,
)


def decay_factor(kind: str, step: int, q: int) -> float:
    """lambda for the optimizer step `step` (0-based: the steps done before it) when it reaches 0 at step `q`."""
    if step >= q:
        return 0.0
    t = step / q
    if kind == "linear":
        return 1.0 - t
    if kind == "sine":
        return 1.0 - math.sin(math.pi * t / 2)
    if kind == "cosine":
        return math.cos(math.pi * t / 2)
    raise ValueError(f"unknown decay schedule {kind!r}; choose one of {SCHEDULES}")


def decay_steps(decay_end: float, total: int) -> int:
    """q: the first step at which lambda is 0 (at least 1: the first step always sees the dense weights; at most
    total - 1: the last step always trains the pure low-rank model that is written)."""
    from lowrank_cli.errors import UsageError

    if total < 2:
        raise UsageError("`method` progressive fades the dense weights out over the run: give it at least 2 `steps`")
    return min(max(1, round(decay_end * total)), total - 1)


def lora_factor_fn(seed: int):
    """A `factorize` factor function for init lora: first Kaiming-uniform (LoRA's A, seeded per layer from
    `seed`), second zero, so the product is 0 and its relative error 1; no SVD runs."""
    from lowrank_cli.compress.svd import Factors
    from lowrank_cli.data.sampling import derive_seed

    def factors(name: str, weight: torch.Tensor, rank: int) -> Factors:
        generator = torch.Generator().manual_seed(derive_seed(seed, "lora-init", name))
        first = torch.empty(rank, weight.shape[1], dtype=torch.float32)
        nn.init.kaiming_uniform_(first, a=math.sqrt(5), generator=generator)
        second = torch.zeros(weight.shape[0], rank, dtype=torch.float32)
        return Factors(first, second, torch.zeros(0), kept_energy=0.0, rel_error=1.0, method="lora")

    return factors


@dataclass
class Progressive(Callback):
    """The progressive method of one recovery: swaps the layers in, sets lambda every step (a trainer callback,
    whose lambda is logged as a gauge; a state that still leans on W_res is never kept as the best), swaps them
    out."""

    init: str = DEFAULT_INIT
    decay: str = DEFAULT_DECAY
    decay_end: float = DEFAULT_DECAY_END
    lora_alpha: float | None = None
    q: int = 1  # set by start()
    lam: float = 1.0  # the current lambda
    layers: dict[str, ProgressiveLinear] = field(default_factory=dict)

    @classmethod
    def from_options(cls, opts: Any) -> Progressive:
        return cls(init=opts.init or DEFAULT_INIT, decay=opts.decay or DEFAULT_DECAY,
                   decay_end=opts.decay_end if opts.decay_end is not None else DEFAULT_DECAY_END,
                   lora_alpha=opts.lora_alpha)

    def scale(self, rank: int) -> float:
        """LoRA's scale alpha / r on `second` (init lora with `lora_alpha`); 1 otherwise."""
        return self.lora_alpha / rank if (self.init == "lora" and self.lora_alpha is not None) else 1.0

    def swap_in(self, model: nn.Module, dense: dict[str, nn.Linear]) -> list[tuple[str, nn.Module]]:
        """Replace each LowRankLinear of `model` by its ProgressiveLinear, whose residual comes from the dense
        linear of the same name in `dense` (the student before factorization), taken out of `dense` so that each
        dense weight is freed once its residual exists. Returns (name, layer) pairs."""
        for name, low in [(n, m) for n, m in model.named_modules() if isinstance(m, LowRankLinear)]:
            linear = dense.pop(name)
            with torch.no_grad():
                if self.init == "svd":
                    product = low.second.weight.float() @ low.first.weight.float()
                    residual = (linear.weight.float() - product.to(linear.weight.device)).to(linear.weight.dtype)
                else:
                    residual = linear.weight
            layer = ProgressiveLinear.around(linear, low.first.weight, low.second.weight, residual=residual,
                                             scale=self.scale(low.rank))
            swap_in(model, name, layer)
            self.layers[name] = layer
            del linear, residual
        return list(self.layers.items())

    def start(self, total: int) -> None:
        """The run has `total` optimizer steps: lambda reaches 0 at q = decay_end x total."""
        self.q = decay_steps(self.decay_end, total)

    def before_step(self, step: int) -> None:
        """Trainer callback: the lambda of this step, on every layer."""
        self.lam = decay_factor(self.decay, step, self.q)
        for layer in self.layers.values():
            layer.set_lambda(self.lam)

    def on_state(self, state: Any) -> None:
        """The lambda of the saved step (a resumed run may have no step left to set it)."""
        self.before_step(state.step)

    def gauges(self) -> dict[str, float]:
        return {"lambda": self.lam}

    def may_keep(self) -> bool:
        return self.lam == 0

    def finish(self, model: nn.Module) -> None:
        """Drop the residuals: every ProgressiveLinear becomes its LowRankLinear (lambda 0 from here on)."""
        for name, layer in self.layers.items():
            swap_in(model, name, layer.to_lowrank())
        self.layers = {}
        self.lam = 0.0

    def settings(self) -> dict[str, Any]:
        """What the recovery record says of the method."""
        return {"method": "progressive", "init": self.init, "decay": self.decay, "decay_end": self.decay_end,
                "decay_steps": self.q, **({"lora_alpha": self.lora_alpha} if self.init == "lora" else {})}


def factorized_layer_types() -> tuple[type[nn.Module], ...]:
    """The layers that hold a student's low-rank factors while it trains (what `freeze_dense` keeps training)."""
    return (LowRankLinear, ProgressiveLinear)
