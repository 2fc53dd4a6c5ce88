"""The recovery loss of PELA (Eq. 7), one term per function, plus the hooks that collect block outputs.

    L = L_ce + alpha * L_fd + beta * L_rwp + gamma * L_kd + delta * L_pool

- L_ce: cross-entropy on the labels (with optional label smoothing), when the data has labels.
- L_fd: feature distillation: the mean over the transformer blocks of the MSE between the student's and the
  frozen teacher's block outputs, all tokens (identity mapping: the shapes are the same).
- L_rwp: regularized weight perturbation: for each factorized layer, (max_ij |second@first - W|_ij - eps)^2
  with W the teacher's dense weight of the same module name; the mean over layers. Squared as in the authors'
  code (`F.mse_loss(torch.norm(rebuild - W, inf), eps)`), so the term is 0 exactly at a perturbation of eps.
- L_kd: optional logit distillation, KL(teacher || student) at temperature T, scaled by T^2 (Hinton et al.).
- L_pool (text models): optional MSE between the final pooled outputs (the model's pooler, else the mean of the
  last hidden state over the real tokens).

Text batches are padded: with an attention mask, L_fd, L_pool and token-level L_kd count the real tokens only.

Terms whose weight is 0 are not computed at all, so the defaults (alpha=1, beta=0, gamma=0) cost one MSE per
block. Everything is computed in float32, also under bf16 autocast.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lowrank_cli.layers.lowrank_linear import LowRankLinear
from lowrank_cli.training.features import first_tensor

# The names under which the terms are logged, in this order (loss = the weighted sum).
TERMS = ("loss", "ce", "fd", "rwp", "kd", "pool")


@dataclass(frozen=True)
class LossWeights:
    alpha: float = 1.0  # feature distillation
    beta: float = 0.0  # weight perturbation regulariser
    gamma: float = 0.0  # logit distillation
    eps: float = 1e-3  # the perturbation L_rwp aims at
    temperature: float = 1.0  # of the logit distillation
    label_smoothing: float = 0.0  # of the cross-entropy
    delta: float = 0.0  # pooled-output distillation (text models)

    def check(self) -> None:
        from lowrank_cli.errors import UsageError

        for name in ("alpha", "beta", "gamma", "eps", "label_smoothing", "delta"):
            value = getattr(self, name)
            if not value >= 0 or value == float("inf"):  # also refuses NaN
                raise UsageError(f"`{name}` must be a finite number >= 0, got {value}")
        if not self.label_smoothing < 1:
            raise UsageError(f"`label_smoothing` must be below 1, got {self.label_smoothing}")
        if not self.temperature > 0 or self.temperature == float("inf"):
            raise UsageError(f"`temperature` must be a finite number > 0, got {self.temperature}")


# ---------------------------------------------------------------------------------------------- the terms


def masked_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """MSE over every element, or with `mask` (batch, tokens) over the real tokens' elements only."""
    if mask is None or student.dim() < 3 or student.shape[:2] != mask.shape:
        return F.mse_loss(student.float(), teacher.detach().float())
    m = mask.to(torch.float32).unsqueeze(-1)
    squared = (student.float() - teacher.detach().float()).pow(2) * m
    return squared.sum() / (m.sum() * student.shape[-1]).clamp_min(1.0)


def feature_distillation(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                         mask: torch.Tensor | None = None) -> torch.Tensor:
    """L_fd: mean over blocks of the MSE between block outputs (every token, or the real ones under `mask`)."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"feature distillation needs the same, non-zero number of blocks: {len(student)} vs "
                         f"{len(teacher)}")
    losses = [masked_mse(s, t, mask) for s, t in zip(student, teacher)]
    return torch.stack(losses).mean()


def weight_perturbation(pairs: Iterable[tuple[LowRankLinear, torch.Tensor]], eps: float) -> torch.Tensor:
    """L_rwp: mean over factorized layers of (max_ij |second@first - W|_ij - eps)^2, in float32. A layer is any
    module with `first` and `second` (a ProgressiveLinear's product carries its LoRA scale)."""
    losses = []
    for layer, dense in pairs:
        product = layer.second.weight.float() @ layer.first.weight.float() * getattr(layer, "scale", 1.0)
        losses.append(((product - dense.float()).abs().amax() - eps) ** 2)
    if not losses:
        raise ValueError("weight perturbation needs at least one factorized layer")
    return torch.stack(losses).mean()


def logit_distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """L_kd: KL(softmax(teacher/T) || softmax(student/T)) * T^2, averaged over the batch (token-level logits,
    e.g. a masked-LM head: averaged over the real tokens under `mask`)."""
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
    if student.dim() == 3:
        per_token = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)
        m = mask.to(per_token.dtype) if mask is not None and mask.shape == per_token.shape else torch.ones_like(per_token)
        return (per_token * m).sum() / m.sum().clamp_min(1.0) * temperature**2
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def pooled_output(output: object, mask: torch.Tensor | None, last_block: torch.Tensor | None = None) -> torch.Tensor:
    """The final pooled output of a transformers model: its pooler's, else the mean over the real tokens of its
    last hidden state (a model with a head returns none: then the last block's output)."""
    if isinstance(output, dict):
        if isinstance(output.get("pooler_output"), torch.Tensor):
            return output["pooler_output"]
        hidden = output.get("last_hidden_state")
        if hidden is None:
            hidden = last_block
        if isinstance(hidden, torch.Tensor):
            if mask is None:
                return hidden.mean(1)
            m = mask.to(hidden.dtype).unsqueeze(-1)
            return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    from lowrank_cli.errors import UsageError

    raise UsageError("`delta` distils the final pooled output, which only transformers encoders (a pooler or a last "
                     "hidden state) return: leave out `delta`")


def classification(student: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """L_ce: cross-entropy on the labels (labels are class indices)."""
    return F.cross_entropy(student.float(), labels, label_smoothing=label_smoothing)


def logits_of(output: object) -> torch.Tensor:
    """A model's logits: timm models return a tensor; a tuple (distilled heads) gives its first element; a
    transformers output its `logits`."""
    if isinstance(output, dict):
        if isinstance(output.get("logits"), torch.Tensor):
            return output["logits"]
        from lowrank_cli.errors import UsageError

        raise UsageError("the model has no head (its output has no logits), so there are no labels or logits to "
                         "learn from: leave out `gamma`, and use `alpha` (hidden states) or `delta` (pooled output)")
    return first_tensor(output)


class RecoveryLoss:
    """Eq. 7 over one batch. `pairs` ((LowRankLinear, teacher W) per factorized layer) is needed when beta > 0."""

    def __init__(self, weights: LossWeights, *, use_labels: bool,
                 pairs: Sequence[tuple[LowRankLinear, torch.Tensor]] = (), embedding: dict | None = None):
        weights.check()
        self.weights, self.embedding = weights, embedding  # embedding: a sentence model's (models.sentence)
        self.use_labels = use_labels
        self.pairs = list(pairs)
        if weights.beta > 0 and not self.pairs:
            raise ValueError("beta > 0 needs the (low-rank layer, teacher weight) pairs")

    @property
    def active(self) -> list[str]:
        """The terms this loss computes (and logs), `loss` first."""
        w = self.weights
        return ["loss"] + [name for name, on in (("ce", self.use_labels), ("fd", w.alpha > 0), ("rwp", w.beta > 0),
                                                 ("kd", w.gamma > 0), ("pool", w.delta > 0)) if on]

    def __call__(self, *, student_out: object, teacher_out: object,
                 student_blocks: Sequence[torch.Tensor], teacher_blocks: Sequence[torch.Tensor],
                 labels: torch.Tensor | None, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """`student_out` / `teacher_out`: the models' outputs (logits, or a transformers output); `mask`: the
        attention mask of a padded text batch."""
        w = self.weights
        terms: dict[str, torch.Tensor] = {}
        if self.use_labels:
            terms["ce"] = classification(logits_of(student_out), labels, w.label_smoothing)
        terms.update(self._distillation(student_out, teacher_out, student_blocks, teacher_blocks, mask))
        if w.beta > 0:
            device_type = self.pairs[0][0].first.weight.device.type
            with torch.autocast(device_type, enabled=False):  # the max of a difference needs float32 products
                terms["rwp"] = weight_perturbation(self.pairs, w.eps)
        return self._total(terms)

    def held_out(self, *, student_out: object, teacher_out: object, student_blocks: Sequence[torch.Tensor],
                 teacher_blocks: Sequence[torch.Tensor], mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The distillation terms on held-out data (no labels, no weight regulariser) and their weighted sum."""
        terms = self._distillation(student_out, teacher_out, student_blocks, teacher_blocks, mask)
        if not terms:
            return {"loss": torch.tensor(0.0)}
        return self._total(terms)

    def _distillation(self, student_out: object, teacher_out: object, student_blocks: Sequence[torch.Tensor],
                      teacher_blocks: Sequence[torch.Tensor], mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The terms that compare the student with the teacher: block features, logits, pooled output."""
        w = self.weights
        terms: dict[str, torch.Tensor] = {}
        if w.alpha > 0:
            terms["fd"] = feature_distillation(student_blocks, teacher_blocks, mask)
        if w.gamma > 0:
            terms["kd"] = logit_distillation(logits_of(student_out), logits_of(teacher_out), w.temperature, mask)
        if w.delta > 0:
            s_last, t_last = (student_blocks[-1], teacher_blocks[-1]) if student_blocks else (None, None)
            terms["pool"] = masked_mse(self.pooled(student_out, mask, s_last), self.pooled(teacher_out, mask, t_last),
                                       None)
        return terms

    def pooled(self, output: object, mask: torch.Tensor | None, last_block: torch.Tensor | None) -> torch.Tensor:
        """What the pooled term and held-out cosine compare: a sentence model's embedding as its folder defines it
        (scaled by sqrt(dim) when normalized, so the MSE weighs like a hidden state's), else `pooled_output`."""
        if self.embedding is None:
            return pooled_output(output, mask, last_block)
        from lowrank_cli.models.sentence import embed

        hidden = output.get("last_hidden_state") if isinstance(output, dict) else None
        if not isinstance(hidden, torch.Tensor):
            hidden = last_block
        if not self.embedding.get("pooling") or not isinstance(hidden, torch.Tensor):
            from lowrank_cli.errors import UsageError

            raise UsageError("`delta` distils the embedding, and this sentence-transformers model has no Pooling "
                             "module: leave out `delta`")
        out = embed(hidden, mask, self.embedding)
        return out * out.shape[-1] ** 0.5 if self.embedding.get("normalize") else out

    def _total(self, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        w = self.weights
        total = terms.get("ce", 0.0)
        for name, weight in (("fd", w.alpha), ("rwp", w.beta), ("kd", w.gamma), ("pool", w.delta)):
            if name in terms:
                total = total + weight * terms[name]
        if not isinstance(total, torch.Tensor):
            raise ValueError("the loss has no term: give alpha, beta or gamma > 0, or labelled data")
        return {"loss": total, **terms}
