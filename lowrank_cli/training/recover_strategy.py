"""Recovery as a strategy of the one loop: distil a low-rank student towards its dense teacher (PELA Eq. 7).

Which parameters train: those the loss reaches (all but the factorized layers' with `freeze_dense`); the losses:
Eq. 7 with the terms the data allows; held-out data: accuracy on labelled images (the teacher's too), otherwise
the distillation terms (and a text encoder's pooled-output cosine); written: the student with `lrc.recovery`.
`method` progressive (training.progressive) swaps in its layers when the models load, sets lambda every step as a
callback, and converts the layers back before the output is scored and written.
A causal LM (a family whose text is a stream) reads its text as windows of `seq_len` tokens once its teacher is
loaded (data.token_stream.as_stream); its loss adds the token-level KL by default and its held-out windows are
scored by perplexity (training.heldout.PerplexityScorer), the teacher's measured once.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_cli.checkpoint.format import record_recovery
from lowrank_cli.data.modality import check_model, modality_for
from lowrank_cli.data.token_stream import as_stream
from lowrank_cli.errors import UsageError
from lowrank_cli.evaluation.accuracy import check_classes
from lowrank_cli.models.sentence import embedding_of
from lowrank_cli.models.structure import innermost_blocks
from lowrank_cli.training.callbacks import held_out_eval, measured_before
from lowrank_cli.training.heldout import (AccuracyScorer, DistillationScorer, PerplexityScorer,
                                          windows_perplexity)
from lowrank_cli.training.losses import RecoveryLoss
from lowrank_cli.training.options import RECOVER_LR, SENTENCE_LR
from lowrank_cli.training.parallel import distribution
from lowrank_cli.training.progressive import Progressive, factorized_layer_types
from lowrank_cli.training.result import RecoverResult
from lowrank_cli.training.setup import loss_summary, resume_changes, write_checkpoint
from lowrank_cli.training.step import params_reached
from lowrank_cli.training.strategy import Models, RunData, training_loader
from lowrank_cli.training.teacher import load_pair, name_of, reads_token_stream

SENTENCE_DELTA = 1.0  # the pooled term's weight for a sentence-transformers model, unless `delta` says otherwise
SKIPPED_WARNING = 0.01  # the share of unreadable training samples above which a run warns (once, at the end)


@dataclass(kw_only=True)
class Pair(Models):
    """The student and its teacher as loaded (LoadedModels), and the (name, layer, teacher weight) of each
    factorized layer (L_rwp)."""

    student: Any
    teacher_loaded: Any
    pairs: list[tuple[str, nn.Module, torch.Tensor]]


class RecoverStrategy:
    """One call of `recover` (its options: training.options.RecoverOptions)."""

    api, phase = "recover", "recover"

    def __init__(self, opts: Any, student: Any, teacher: Any, data: Path):
        self.opts, self.student, self.teacher, self.data = opts, student, teacher, data
        self.method = Progressive.from_options(opts) if opts.method == "progressive" else None
        # The residuals never change and start equal on every rank: no buffer broadcast each step.
        self.distribution = distribution(opts, broadcast_buffers=self.method is None)

    def read_data(self, env: Any) -> RunData:
        o = self.opts
        modality = modality_for(self.data)
        # A causal LM holds out the tail of its token stream (data.token_stream), not a share of the lines.
        stream = modality.name == "texts" and reads_token_stream(self.teacher if self.teacher is not None
                                                                 else self.student)
        train, val, val_from = modality.find(self.data, evaluate=o.evaluate_accuracy and not stream, seed=o.seed,
                                             val_data=None if o.val_data is None else Path(o.val_data),
                                             val_fraction=o.val_fraction)
        return RunData(modality, train, val, val_from=val_from)

    def fixed_for_resume(self, env: Any, d: RunData) -> dict[str, Any]:
        return self.opts.fixed_for_resume(env.ctx.world_size, d.samples)

    def load_models(self, env: Any, d: RunData) -> Pair:
        dev = env.ctx.device
        s, t, pairs, dense = load_pair(self.student, self.teacher, self.opts, device=dev, log=env.log, warn=env.warn)
        raw, tea = s.model, t.model
        if self.method is not None:  # the loss's pairs become the progressive layers; the dense linears go
            layers = dict(self.method.swap_in(raw, dense))
            pairs = [(name, layers[name], weight) for name, _, weight in pairs]
        check_model(d.modality, tea, name_of(t), self.data)
        save_dtype = next(raw.parameters()).dtype
        raw.to(device=dev, dtype=torch.float32).train()
        tea.to(device=dev, dtype=torch.float32).eval().requires_grad_(False)
        if not as_stream(d, self.data, t, self.opts, evaluate=self.opts.evaluate_accuracy):
            # a sentence-transformers model: at its own max_seq_length, as its users run it
            max_length = self.opts.max_length or (embedding_of(t) or {}).get("max_seq_length")
            d.modality.prepare(t, tokenizer=self.opts.tokenizer, max_length=max_length)
        return Pair(model=raw, teacher=tea, save_dtype=save_dtype, input_size=d.modality.input_size(tea),
                    blocks=innermost_blocks(raw), student=s, teacher_loaded=t, pairs=pairs)

    def loss(self, env: Any, d: RunData, m: Pair) -> RecoveryLoss:
        """Eq. 7 with the terms the data allows: labels only when they fit the student, accuracy only when the
        val split fits the teacher."""
        weights, embedding = self._weights(m, d)
        if weights.alpha > 0 and not m.blocks:
            raise UsageError(f"{name_of(m.student)} has no repeated transformer blocks to distil features from: use "
                             "`alpha` 0 with labels or `gamma` > 0")
        d.use_labels = d.modality.labelled(d.train)
        if d.use_labels and (problem := check_classes(m.model, d.train, "the student")):
            env.warn(f"labels not used ({problem}): distillation only")
            d.use_labels = False
        if d.labelled_val and (problem := check_classes(m.teacher, d.val, "the teacher")):
            env.warn(f"accuracy not measured: {problem}")
            d.val_labels_fit, d.why_no_accuracy = False, problem  # still held out: scored by distillation
        if not d.use_labels and not (weights.alpha or weights.gamma or weights.beta or weights.delta):
            raise UsageError("the data has no labels (or none that fit the model) and alpha, beta, gamma and delta "
                             "are 0: nothing to learn from; keep `alpha` 1")
        return RecoveryLoss(weights, use_labels=d.use_labels, pairs=[(layer, w) for _, layer, w in m.pairs],
                            embedding=embedding)

    def _weights(self, m: Pair, d: RunData) -> tuple[Any, dict[str, Any] | None]:
        """The loss weights and the embedding of a sentence-transformers model (models.sentence), whose pooled
        term is on by default; a sentence model without a Pooling module has no embedding to distil."""
        weights, o = self.opts.weights_for(d.modality.name == "tokens"), self.opts
        embedding = embedding_of(m.student) or embedding_of(m.teacher_loaded)
        if embedding is not None and not embedding.get("pooling"):
            if o.delta:
                raise UsageError("`delta` distils the pooled embedding, and this sentence-transformers model has no "
                                 "Pooling module: leave out `delta`")
            embedding = None
        if embedding is not None and o.delta is None:
            weights = replace(weights, delta=SENTENCE_DELTA)
        if o.lr is None:  # settled here, once the models say what they are; build_setup reads it after loss()
            self.opts = replace(o, lr=SENTENCE_LR if embedding is not None else RECOVER_LR)
        self.delta = weights.delta
        return weights, embedding

    def loader(self, env: Any, d: RunData, m: Pair, total: int) -> tuple[Any, Any]:
        return training_loader(env, self.opts, d, m.teacher, m.input_size, total)

    def method_callbacks(self, schedule: Any) -> list[Any]:
        if self.method is None:
            return []
        self.method.start(schedule.total)
        return [self.method]

    def trainable(self, env: Any, d: RunData, m: Pair, loss: RecoveryLoss) -> list[tuple[str, nn.Parameter]]:
        """The student's parameters that train: those the loss reaches (all but the factorized layers' with
        freeze_dense). The others get requires_grad=False, which DDP needs and which spares AdamW the work."""
        raw = m.model
        reached = params_reached(raw, m.teacher, loss, m.blocks, m.input_size, env.ctx.device)
        lowrank_prefixes = tuple(n + "." for n, mod in raw.named_modules() if isinstance(mod, factorized_layer_types()))
        named = []
        for name, p in raw.named_parameters():
            trains = name in reached and (not self.opts.freeze_dense or name.startswith(lowrank_prefixes))
            p.requires_grad_(trains)
            if trains:
                named.append((name, p))
        unreached = [n for n, _ in raw.named_parameters() if n not in reached]
        if unreached:
            env.log(f"Frozen (the loss does not reach them): {', '.join(unreached[:4])}"
                    f"{', ...' if len(unreached) > 4 else ''}")
        if not named:
            raise UsageError("no parameter of the student would train: check `freeze_dense` and the loss weights")
        return named

    def changeable_on_resume(self, d: RunData, m: Pair, schedule: Any) -> dict[str, Any]:
        changeable = self.opts.changeable_on_resume(total=schedule.total, warmup=schedule.warmup,
                                                    teacher=name_of(m.teacher_loaded), data=str(self.data.resolve()))
        # `gamma` unset means the family's default: compare the weight the run used (a state written before that
        # default existed says 0.0 for a model that is not a causal LM)
        return {**changeable, "gamma": self.opts.weights_for(d.modality.name == "tokens").gamma}

    def before_training(self, setup: Any) -> None:
        """Accuracy of the teacher and of the student before training (a resumed run reuses the first run's)."""
        d, m, state, evaluate = setup.data, setup.models, setup.state, setup.evaluator
        setup.env.log(d.modality.describe(d.train, d.val, d.why_not_scored(self.opts)))
        if d.modality.name == "tokens" and d.val is not None and "teacher_perplexity" not in state.extra:
            state.extra["teacher_perplexity"] = windows_perplexity(m.teacher, d.val.windows, setup.ctx.device,
                                                                   self.opts.eval_batch_size or self.opts.batch_size)
        if d.labelled_val:
            teacher = state.extra.get("teacher") or evaluate(m.teacher, d.val, "eval teacher", m.teacher)
            before = state.extra.get("before") or evaluate(m.model, d.val, "eval before", m.teacher)
            state.extra.update(teacher=teacher, before=before)

    def held_out(self, setup: Any) -> Any:
        """Held-out evaluation in the loop, when there is held-out data; None otherwise."""
        o, d, env = self.opts, setup.data, setup.env
        if o.keep == "best" and d.val is None:
            raise UsageError(f"`keep` best needs held-out data ({d.why_not_scored(o)}): give `val_data` or "
                             "`val_fraction`, or keep the last state")
        if d.val is None:
            return None
        scorer = self.scorer(setup)
        keep = o.keep or "best"
        held = held_out_eval(scorer, every=o.eval_every or max(1, setup.schedule.total // 10), keep=keep,
                             state=setup.state, saved=setup.store.extra_tensors, total=setup.schedule.total,
                             log=env.log)
        env.log(f"Held-out: {d.val_from} ({len(d.val)} samples), {scorer.score.name} every {held.every} steps; "
                f"keeping the {keep} state")
        if not d.labelled_val:  # labelled images: the accuracy before is measured with the teacher's
            measured_before(setup.state, scorer)
        return held

    def scorer(self, setup: Any) -> Any:
        """How the held-out data is scored: accuracy on labelled images, else the distillation terms."""
        d, o = setup.data, self.opts
        if d.labelled_val:
            return AccuracyScorer(setup.model, d.val, setup.evaluator, setup.models.teacher)
        batch_size = o.eval_batch_size or o.batch_size
        loader = d.modality.held_out_loader(d.val, setup.models.teacher, batch_size=batch_size,
                                            num_workers=setup.env.workers)
        if d.modality.name == "tokens":
            return PerplexityScorer(setup.step, loader, setup.ctx.device, d.val.windows, batch_size)
        return DistillationScorer(setup.step, loader, setup.ctx.device, text=d.modality.name == "texts")

    def after_training(self, setup: Any, trainer: Any) -> dict[str, Any]:
        """The best state back (before the layers are converted), the layers converted, the output scored."""
        held = setup.held_out
        kept = held.restore_best(setup.model) if held is not None else None
        if self.method is not None:
            self.method.finish(setup.model)  # W_res dropped: LowRankLinear layers from here on
        if held is None:
            return {}
        d, before = setup.data, setup.state.extra.get("held_out_before")
        after = None if d.labelled_val else held.scorer()  # labelled images: accuracy after, below
        teacher = setup.state.extra.get("teacher_perplexity")
        return {"held_out": {"data": d.val_from, "samples": len(d.val), "metric": held.scorer.score.name,
                             "every": held.every, "before": None if d.labelled_val else before, "after": after,
                             **({"teacher_perplexity": teacher} if teacher is not None else {})},
                "kept": kept, "after_is": after_is(kept)}

    def write(self, setup: Any, trainer: Any, ended: dict[str, Any]) -> RecoverResult:
        d, m, state, raw = setup.data, setup.models, setup.state, setup.model
        raw.eval()
        if state.skipped > SKIPPED_WARNING * (state.images_seen + state.skipped):
            setup.env.warn(f"{state.skipped} of {state.images_seen + state.skipped} training samples were unreadable "
                           "and skipped (corrupt or truncated files): the run learnt from the rest; fix or remove "
                           "those files")
        accuracy = {"teacher": None, "before": None, "after": None}
        if d.labelled_val:
            accuracy = {"teacher": state.extra["teacher"], "before": state.extra["before"],
                        "after": setup.evaluator(raw, d.val, "eval after", m.teacher)}
        losses = loss_summary(setup, trainer.history)
        settings = {**self.settings(setup), **ended}
        record_recovery(raw, {**settings, "images_seen": state.images_seen, "skipped_images": state.skipped,
                              "seconds": round(state.seconds, 3), "accuracy": accuracy,
                              "final_losses": {k: v["last"] for k, v in losses.items()}},
                        spec=m.student.spec, source=m.student.source)
        write_checkpoint(setup)
        setup.env.log(f"Wrote {setup.env.output}")
        return RecoverResult(
            model=raw, output=setup.env.output, steps=setup.schedule.total, resumed_from=trainer.resumed_from,
            images_seen=state.images_seen, skipped=state.skipped, seconds=state.seconds, accuracy=accuracy,
            losses=losses, history=trainer.history, metrics=setup.metrics, settings=settings)

    def settings(self, setup: Any) -> dict[str, Any]:
        """What the checkpoint records of this recovery (`lrc.recovery`) and `--json` prints."""
        o, d, ctx = self.opts, setup.data, setup.ctx
        settings = {
            "teacher": setup.models.teacher_loaded.source or {"id": name_of(setup.models.teacher_loaded)},
            "data": str(self.data.resolve()), "train_images": len(d.train), "labels": d.use_labels,
            "steps": setup.schedule.total, "lr": o.lr, "schedule": "warmup-cosine",
            "warmup_steps": setup.schedule.warmup, "batch_size": o.batch_size, "grad_accum": o.grad_accum,
            "processes": ctx.world_size, "images_per_step": o.batch_size * o.grad_accum * ctx.world_size,
            "alpha": o.alpha, "beta": o.beta,
            "gamma": o.weights_for(d.modality.name == "tokens").gamma, "eps": o.eps, "temperature": o.temperature,
            "label_smoothing": o.label_smoothing, "weight_decay": o.weight_decay, "clip_grad": o.clip_grad,
            "freeze_dense": o.freeze_dense, "augment": o.augment,
            "trained_parameters": sum(p.numel() for _, p in setup.trainable), "seed": o.seed,
            "precision": "bf16" if ctx.device.type == "cuda" else "fp32", "compile": o.compile,
            **(self.method.settings() if self.method is not None else {"method": "pela"}),
        }
        settings.update(d.modality.settings(getattr(self, "delta", o.delta or 0.0)))
        settings["augment"] = d.augment
        if d.modality.augments:
            settings["augment_reason"] = d.augment_reason
        if not d.labelled_val and d.modality.name == "images":
            settings["accuracy_not_measured"] = d.why_not_scored(o)
        settings.update(resume_changes(setup))
        return settings


SELECTION = "selection score"


def after_is(kept: dict[str, Any] | None) -> str:
    """What the "after" figure is: with keep best, the held-out data that scores it also chose the kept step, so it
    is the selection score (optimistic); with the last state kept, an unbiased held-out score."""
    if kept and kept.get("which") == "best":
        return (f"{SELECTION}: the held-out data that chose the kept step (of every eval_every) scored it too, so "
                "it is optimistic; measure the output on other data (lrc eval) for an unbiased figure")
    return "held-out score: the last state is kept, the held-out data chose nothing"
