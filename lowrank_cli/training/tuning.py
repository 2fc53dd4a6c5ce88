"""What every fine-tuning strategy shares (one task: training.finetune_strategy; every task at once:
training.shared_strategy): the model with its method's adapters and what trains, the held-out scorer of a task,
when to evaluate, and the record of the run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowrank_cli.adapters.base import AdapterConfig, Method
from lowrank_cli.adapters.methods import DEFAULT_RANK, LOW_RANK_ADAPTERS, method_for
from lowrank_cli.adapters.targets import adapter_targets, norm_names
from lowrank_cli.data.sampling import derive_seed, seeded
from lowrank_cli.errors import UsageError
from lowrank_cli.models.heads import Head
from lowrank_cli.training.heldout import AccuracyScorer, Scorer, TaskScorer
from lowrank_cli.training.strategy import Models, RunData, Task
from lowrank_cli.training.teacher import load_participant


@dataclass(kw_only=True)
class Tuned(Models):
    """The model being fine-tuned: as loaded (LoadedModel), its method (adapters.base.Method) and head, the
    parameters that train, the parameter counts while training (adapters included: they merge away at the end),
    and the hash of the weights it started from (an adapter file applies to that base only)."""

    loaded: Any
    method: Method
    head: Head
    named: list[tuple[str, nn.Parameter]]
    trained: int
    parameters: int
    base: str = ""
    heads: Any = None  # a shared run's TaskHeads


def load_tuned(env: Any, opts: Any, source: Any) -> Any:
    return load_participant(source, "model", opts.arch, opts.model_args, env.log, opts.library)


def adapter_config(raw: nn.Module, head: Head, opts: Any) -> AdapterConfig:
    """The method's adapters and where they go (`targets`: adapters.targets; RLRR's norms)."""
    low = opts.method in LOW_RANK_ADAPTERS
    targets = adapter_targets(raw, opts.targets, head.modules) if opts.method in ("lora", "dora", "rlrr") else []
    rank = (opts.adapter_rank or DEFAULT_RANK) if low else None
    return AdapterConfig(opts.method, rank, (opts.adapter_alpha or float(rank)) if low else None,
                         opts.adapter_dropout, tuple(targets),
                         tuple(norm_names(raw, head.modules)) if opts.method == "rlrr" else ())


def adapt(env: Any, opts: Any, loaded: Any, head: Head, modality: Any, *, save_dtype: torch.dtype, base: str = "",
          configure: Callable[[AdapterConfig], AdapterConfig] = lambda config: config) -> Tuned:
    """Put the method's adapters on the model (on the CPU, float32: seeded the same way on any device), freeze
    everything that does not train, move it to the device and prepare the data for it (no teacher yet)."""
    raw = loaded.model.to(dtype=torch.float32)
    config = configure(adapter_config(raw, head, opts))
    method = method_for(config)
    with seeded(derive_seed(opts.seed, "adapters")):
        method.apply(raw)
    named = method.trainable(raw, head.modules)
    chosen = {n for n, _ in named}
    for name, p in raw.named_parameters():
        p.requires_grad_(name in chosen)
    trained, total = sum(p.numel() for _, p in named), sum(p.numel() for p in raw.parameters())
    targets = config.targets
    new_head = f", the new head ({', '.join(head.modules)})" if head.modules else ""
    where = (f"adapters on {len(targets)} linear(s){f' and {len(config.norms)} norm(s)' if config.norms else ''}"
             f"{new_head}" if targets else
             "every parameter" if opts.method == "full" else f"the new head ({', '.join(head.modules)})")
    env.log(f"Method {opts.method}: {trained:,} trainable parameters of {total:,} ({100 * trained / total:.2f} %): "
            f"{where}")
    raw.to(device=env.ctx.device).train()
    modality.prepare(loaded, tokenizer=opts.tokenizer, max_length=opts.max_length)
    return Tuned(model=raw, teacher=None, save_dtype=save_dtype, input_size=modality.input_size(raw),
                 loaded=loaded, method=method, head=head, named=named, trained=trained, parameters=total, base=base)


def check_keep(opts: Any, d: RunData) -> None:
    if opts.keep == "best" and d.val is None:
        raise UsageError(f"`keep` best needs held-out data ({d.why_not_scored(opts)}); or keep the last state")


def every(opts: Any, samples: int, world_size: int, total: int) -> int:
    """Steps between held-out evaluations: `eval_every`, else once an epoch (at most the run)."""
    per_epoch = max(1, samples // (opts.batch_size * world_size) // opts.grad_accum)
    return opts.eval_every or min(per_epoch, total)


def task_scorer(setup: Any, d: RunData, task: Task) -> Scorer:
    """A task's held-out scorer: top-1 on images, accuracy or Spearman on texts."""
    model, opts = setup.model, setup.opts
    if d.modality.name == "images":
        return AccuracyScorer(model, d.val, setup.evaluator, model)
    loader = d.modality.held_out_loader(d.val, model, batch_size=opts.eval_batch_size or opts.batch_size,
                                        num_workers=setup.env.workers)
    return TaskScorer(model, loader, setup.ctx.device, regression=task.regression)


def finetune_settings(setup: Any, d: RunData, task: Task, head: Head, *, teacher: bool) -> dict[str, Any]:
    """What the output records of a fine-tuning (`lrc.finetune`) and `--json` prints."""
    o, m, ctx, schedule = setup.opts, setup.models, setup.ctx, setup.schedule
    trained, parameters = m.trained, m.parameters
    settings = {
        "method": o.method, "adapters": m.method.config.record(), "merged": o.merge, "head": head.record(),
        **task.record(), "data": str(task.data.resolve()), "train_samples": len(d.train), "steps": schedule.total,
        "lr": o.lr, "schedule": "warmup-cosine", "warmup_steps": schedule.warmup, "batch_size": o.batch_size,
        "grad_accum": o.grad_accum, "processes": ctx.world_size, "weight_decay": o.weight_decay,
        "clip_grad": o.clip_grad, "label_smoothing": o.label_smoothing, "augment": d.augment,
        "teacher": str(o.teacher) if teacher else None, "gamma": o.kd_weight,
        "temperature": o.temperature, "trainable_parameters": trained, "parameters": parameters,
        "trainable_share": trained / parameters if parameters else 0.0, "seed": o.seed,
        "precision": "bf16" if ctx.device.type == "cuda" else "fp32", "compile": o.compile,
        "base": {"source": m.loaded.source, "sha256": m.base},
    }
    if d.modality.name == "texts":
        settings.update(d.modality.settings(0.0))
    from lowrank_cli.training.setup import resume_changes

    settings.update(resume_changes(setup))
    return settings
