"""Fine-tuning a causal LM on plain text: next-token training with the method's adapters (LoRA, DoRA, RLRR) or
every weight (full), merged back at the same ranks, the held-out perplexity tracked and the best state kept.

    finetune("llama_lr.safetensors", "domain.txt", output="llama_domain_lr.safetensors", method="lora")

The text is one token stream in windows of `seq_len` tokens (data.token_stream, as a causal LM's recovery reads
it; the tokenizer pads with nothing: windows are all real tokens). The model keeps its own head (lm_head, tied to
the token embeddings or not): there is no new head, so `method` head has nothing to train and is refused. The
loss is the cross-entropy of each token's prediction of the next one. `finetune` picks this strategy when the
model's family reads text as a stream (training.finetune).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lowrank_cli.adapters.files import weights_hash
from lowrank_cli.checkpoint.format import record_finetune
from lowrank_cli.data.token_stream import StreamData
from lowrank_cli.errors import UsageError
from lowrank_cli.models.heads import Head
from lowrank_cli.training.finetune_strategy import DataFile, FinetuneStrategy
from lowrank_cli.training.heldout import PerplexityScorer
from lowrank_cli.training.losses import LossWeights, logits_of
from lowrank_cli.training.strategy import RunData, Task
from lowrank_cli.training.tuning import adapt


@dataclass
class NextTokenTask(Task):
    """What a causal LM's fine-tuning learns: the next token of its text."""

    def record(self) -> dict[str, Any]:
        return {"task": "next-token", "classes": None}


class NextTokenLoss:
    """Cross-entropy of each position's logits against the next token of the window (labels: the window's ids)."""

    use_labels = True
    active = ["loss", "ce"]

    def __init__(self, label_smoothing: float = 0.0):
        self.weights = LossWeights(alpha=0.0, label_smoothing=label_smoothing)  # no block outputs kept

    def __call__(self, *, student_out: object, teacher_out: object = None, student_blocks=(), teacher_blocks=(),
                 labels: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = logits_of(student_out)[:, :-1]
        ce = F.cross_entropy(logits.float().flatten(0, 1), labels[:, 1:].flatten(),
                             label_smoothing=self.weights.label_smoothing)
        return {"loss": ce, "ce": ce}


def check_next_token(opts: Any, name: str) -> None:
    """What a causal LM's next-token fine-tuning cannot do, before anything trains."""
    if opts.method == "head":
        raise UsageError(f"`method` head trains a new classification head, and {name} is a causal LM fine-tuned on "
                         "text for its next tokens, with its own head: use lora, dora, rlrr or full")
    if opts.teacher is not None:
        raise UsageError("a causal LM's next-token fine-tuning learns from the text alone: leave out `teacher` "
                         "(distillation from a dense model is `lrc recover`)")


class TextFile(DataFile):
    """A causal LM's fine-tuning text: what the output records of it (the windows, the tokenizer)."""

    def settings(self, opts: Any, d: RunData) -> dict[str, Any]:
        return d.modality.settings(0.0)


class NextTokenStrategy(FinetuneStrategy):
    """One next-token fine-tuning of an already loaded causal LM (`loaded`: LoadedModel) on the text at `path`."""

    def __init__(self, opts: Any, loaded: Any, path: Path):
        from lowrank_cli.models.loaded import name_of

        super().__init__(opts, loaded, TextFile(path))
        check_next_token(opts, name_of(loaded))
        self.loaded, self.path = loaded, path

    def read_data(self, env: Any) -> RunData:
        o = self.opts
        stream = StreamData(self.path, val_data=None if o.val_data is None else Path(o.val_data),
                            val_fraction=o.val_fraction, seq_len=o.seq_len, evaluate=o.evaluate_accuracy)
        stream.prepare(self.loaded, tokenizer=o.tokenizer, max_length=o.max_length)
        return RunData(stream, stream.train, stream.val, use_labels=True, val_from=stream.val_from,
                       task=NextTokenTask(None, False, self.path), why_no_accuracy="no held-out text: give "
                       "`val_data` or `val_fraction`, or more text")

    def load_models(self, env: Any, d: RunData) -> Any:
        loaded = self.loaded
        save_dtype, base = next(loaded.model.parameters()).dtype, weights_hash(loaded.model)
        vocab = int(getattr(loaded.model.config, "vocab_size", 0) or 0)
        head = Head([], vocab)  # its own head, which trains only with `method` full
        record_finetune(loaded.model, d.task.record(), spec=loaded.spec, source=loaded.source)
        return adapt(env, self.opts, loaded, head, d.modality, save_dtype=save_dtype, base=base,
                     configure=self.source.configure)

    def loss(self, env: Any, d: RunData, m: Any) -> NextTokenLoss:
        return NextTokenLoss(self.opts.label_smoothing)

    def held_out(self, setup: Any) -> Any:
        """Held-out perplexity every `eval_every` steps (default once an epoch), the best (lowest) state kept."""
        from lowrank_cli.training.callbacks import held_out_eval, measured_before
        from lowrank_cli.training.tuning import check_keep, every

        o, d = self.opts, setup.data
        check_keep(o, d)
        if d.val is None:
            return None
        batch_size = o.eval_batch_size or o.batch_size
        scorer = PerplexityScorer(setup.step, None, setup.ctx.device, d.val.windows, batch_size)
        held = held_out_eval(scorer, every=every(o, d.samples, setup.ctx.world_size, setup.schedule.total),
                             keep=o.keep or "best", state=setup.state, saved=setup.store.extra_tensors,
                             total=setup.schedule.total, log=setup.env.log)
        before = measured_before(setup.state, lambda: scorer("eval before"))
        setup.env.log(f"Held-out: {d.val_from} ({len(d.val)} windows), val_perplexity every {held.every} steps; "
                      f"keeping the {o.keep or 'best'} state; before: val_perplexity {before['val_perplexity']:.4g}")
        return held

