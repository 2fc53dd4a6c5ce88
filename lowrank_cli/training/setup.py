"""The setup of one training run, built by one function for every kind of run.

`build_setup(strategy, env)` goes through the same steps for a recovery, a fine-tuning and a multi-task run: data
(a wrong folder fails before any model loads), the resume check, the models, the loss, the length and the
learning-rate schedule, the training batches, the trainable parameters and AdamW, the training state (fresh or the
interrupted run's), the metrics log, the step (compiled, spread over the processes) and the callbacks. What differs
between runs is asked of the `strategy` (training/strategy.py says what each answers); what is the same is written
once, here. training/run.py then trains and hands the end back to the strategy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_cli import distributed
from lowrank_cli.errors import InputError, UsageError
from lowrank_cli.training.callbacks import Callback, HeldOutEval, OnStep
from lowrank_cli.training.heldout import Evaluator
from lowrank_cli.training.metrics import metrics_path, truncate_metrics
from lowrank_cli.training.parallel import forwards
from lowrank_cli.training.schedule import param_groups
from lowrank_cli.training.state import StateFile, TrainState, changed_options, check_fingerprint
from lowrank_cli.training.step import Distiller
from lowrank_cli.training.strategy import Strategy
from lowrank_cli.training.trainer import ProgressFn, resume_hint


def _quiet(*args: Any) -> None:
    return None


@dataclass
class Hooks:
    """What the caller of a training is told, and how it can stop the run."""

    log: Callable[[str], None] = _quiet
    warn: Callable[[str], None] = _quiet
    progress: ProgressFn | None = None
    resume_command: str | None = None  # printed on interruption (the CLI command that resumes)
    on_step: Callable[[int, nn.Module], bool | None] | None = None


@dataclass
class RunEnv:
    """Where one run happens: its processes, its loader workers, its output and whom it tells (the main process
    only: the hooks of the other processes are silent)."""

    ctx: distributed.DistContext
    workers: int
    output: Path
    store: StateFile
    log: Callable[[str], None]
    warn: Callable[[str], None]
    progress: ProgressFn
    resume_command: str | None = None
    on_step: Callable[[int, nn.Module], bool | None] | None = None

    @classmethod
    def create(cls, ctx: distributed.DistContext, workers: int, output: Path, store: StateFile,
               hooks: Hooks) -> RunEnv:
        main = ctx.is_main
        progress = hooks.progress if (hooks.progress is not None and main) else _quiet
        return cls(ctx, workers, output, store, hooks.log if main else _quiet, hooks.warn if main else _quiet,
                   progress, hooks.resume_command, hooks.on_step)


@dataclass(frozen=True)
class Schedule:
    """AdamW's learning rate: a linear warm-up over `warmup` steps, then a cosine to 0 at `total`."""

    lr: float
    warmup: int
    total: int

    def record(self) -> dict[str, Any]:
        return {"kind": "warmup-cosine", "lr": self.lr, "warmup_steps": self.warmup, "total_steps": self.total}


@dataclass
class Setup:
    """Everything one run trains with. `data` and `models` are the strategy's own objects; the loop reads
    `data.samples`, `data.unit`, `models.model` (the plain student), `models.teacher` (or None), `models.blocks`
    (the blocks whose outputs are distilled), `models.input_size` and `models.on_batch`."""

    env: RunEnv
    opts: Any
    api: str  # what the resume hint calls
    phase: str  # what the progress bar calls the training steps
    data: Any
    models: Any
    loss: Any
    loader: Any
    sampler: Any
    schedule: Schedule
    trainable: list[tuple[str, nn.Parameter]]
    optimizer: torch.optim.Optimizer
    state: TrainState
    metrics: Path
    step: Distiller | None = None
    callbacks: list[Callback] = field(default_factory=list)
    held_out: HeldOutEval | None = None  # also among the callbacks
    distribution: Any = None  # how the models are spread (training.parallel): its `gathered` state dict is written

    @property
    def ctx(self) -> distributed.DistContext:
        return self.env.ctx

    @property
    def model(self) -> nn.Module:
        return self.models.model

    @property
    def store(self) -> StateFile:
        return self.env.store

    @property
    def param_names(self) -> list[str]:
        return [n for n, _ in self.trainable]

    @property
    def evaluator(self) -> Evaluator:
        return evaluator(self.env, self.opts, whole=getattr(self.distribution, "shards", False))

    def resume_hint(self, lr: float | None = None) -> str:
        return resume_hint(self.env.resume_command, self.api, lr)


def build_setup(strategy: Strategy, env: RunEnv) -> Setup:
    """The setup of `strategy`'s run, step by step (the module docstring)."""
    opts, ctx = strategy.opts, env.ctx
    data = strategy.read_data(env)  # a wrong data folder fails before any model is loaded
    fixed = strategy.fixed_for_resume(env, data)
    saved = saved_state(env, fixed, opts.resume)
    models = strategy.load_models(env, data)
    _check_finite(models)
    loss = strategy.loss(env, data, models)
    opts = strategy.opts  # the loss settles what depends on the models (recover: a sentence model's lr)
    total = total_steps(opts, data.samples, ctx.world_size)
    loader, sampler = strategy.loader(env, data, models, total)
    schedule = Schedule(opts.lr, warmup_steps(opts, total), total)
    callbacks = strategy.method_callbacks(schedule)
    trainable = strategy.trainable(env, data, models, loss)
    if not trainable:  # the no-op rule: a run that trains nothing writes nothing
        raise UsageError("no parameter of the model would train (nothing to train): check the method, its targets "
                         "and what is frozen")
    trainable = strategy.distribution.prepare(env, data, models, trainable)  # FSDP shards the models here
    optimizer, groups = adamw(trainable, opts, ctx.device)
    fingerprint = {**fixed, **strategy.changeable_on_resume(data, models, schedule)}
    state = start_state(env, saved, models.model, optimizer, groups, trainable, fingerprint, schedule)
    for callback in callbacks:
        callback.on_state(state)
    setup = Setup(env, opts, strategy.api, strategy.phase, data, models, loss, loader, sampler, schedule, trainable,
                  optimizer, state, metrics_path(env.output), callbacks=callbacks,
                  distribution=strategy.distribution)
    strategy.before_training(setup)
    start_metrics(setup)
    setup.step = build_step(setup, strategy.distribution)
    try:
        setup.held_out = strategy.held_out(setup)
    except BaseException:
        setup.step.close()
        raise
    setup.callbacks += [setup.held_out] if setup.held_out is not None else []
    setup.callbacks += [OnStep(env.on_step)] if env.on_step is not None else []
    return setup


# ---------------------------------------------------------------------------------------------- the steps


def evaluator(env: RunEnv, opts: Any, whole: bool = False) -> Evaluator:
    """Accuracy as the run measures it: each rank its share of the images, or (`whole`: a sharded model, whose
    forwards every rank must run together) every rank all of them, in the same batches."""
    ctx = distributed.DistContext(device=env.ctx.device) if whole else env.ctx
    return Evaluator(opts.eval_batch_size or opts.batch_size, env.workers, ctx, env.progress)


def saved_state(env: RunEnv, fixed: dict[str, Any], resume: bool) -> TrainState | None:
    """The interrupted run's state (its JSON part), checked against what a resume must keep; None for a fresh run."""
    if not resume:
        return None
    store = env.store
    if not store.visible_everywhere(env.ctx):
        raise InputError(f"`resume=True`: '{store.path}' is not visible to every process: put the output on a "
                         "file system that all nodes share")
    saved = store.read()
    check_fingerprint(saved.fingerprint, fixed, store.path)
    return saved


def total_steps(opts: Any, samples: int, world_size: int) -> int:
    """`steps`, or `epochs` of whole global batches."""
    if opts.steps is not None:
        return opts.steps
    per_epoch = max(1, samples // (opts.batch_size * world_size))  # whole global batches only
    return max(1, math.ceil(opts.epochs * per_epoch / opts.grad_accum))


def warmup_steps(opts: Any, total: int) -> int:
    warmup = opts.warmup_steps if opts.warmup_steps is not None else int(round(opts.warmup_fraction * total))
    return min(warmup, max(total - 1, 0))


def adamw(named: list[tuple[str, nn.Parameter]], opts: Any, device: torch.device) -> tuple[Any, list[dict]]:
    """AdamW over the trainable parameters, and its groups (no decay on biases, norms and tokens)."""
    groups = param_groups(named, opts.weight_decay)
    return torch.optim.AdamW(groups, lr=opts.lr, fused=True if device.type == "cuda" else None), groups


CHANGED_ON_RESUME = "changed_on_resume"  # state.extra: the options a resume changed, kept in the checkpoint's record


def resume_changes(setup: Any) -> dict[str, Any]:
    """{"changed_on_resume": [{at_step, option, then, now}, ...]} when a resume changed an option (the run is then
    not the uninterrupted one), else {}: what the checkpoint's record and --json carry."""
    changes = setup.state.extra.get(CHANGED_ON_RESUME)
    return {CHANGED_ON_RESUME: changes} if changes else {}


def start_state(env: RunEnv, saved: TrainState | None, model: nn.Module, optimizer: torch.optim.Optimizer,
                groups: list[dict], named: list[tuple[str, nn.Parameter]], fingerprint: dict[str, Any],
                schedule: Schedule) -> TrainState:
    """A fresh state, or the interrupted run's (weights and optimizer loaded), with this call's schedule and
    options (a changed option is said: the result will differ from an uninterrupted run's)."""
    if saved is None:
        return TrainState(schedule=schedule.record(), fingerprint=fingerprint)
    state = env.store.load(model, optimizer, [n for n, _ in named])
    changes = changed_options(saved.fingerprint, fingerprint)
    for option, then, now in changes:
        env.warn(f"{option} was {then} in the interrupted run and is {now} now: the result will differ from an "
                 "uninterrupted run (recorded in the checkpoint as `changed_on_resume`)")
    state.extra.setdefault(CHANGED_ON_RESUME, []).extend(
        {"at_step": state.step, "option": option.strip("`"), "then": then, "now": now} for option, then, now in changes)
    state.schedule, state.fingerprint = schedule.record(), fingerprint
    for group, fresh in zip(optimizer.param_groups, groups):  # the saved groups carry the old decay
        group["weight_decay"] = fresh["weight_decay"]
    if state.step >= schedule.total:
        env.log(f"The saved state is at step {state.step} of {schedule.total}: no training left")
    else:
        env.log(f"Resuming at step {state.step}/{schedule.total} (epoch {state.epoch}, batch {state.batch})")
    return state


def start_metrics(setup: Setup) -> None:
    """A fresh run starts the metrics log, a resumed one continues it from the resumed step."""
    if setup.ctx.is_main:
        if setup.opts.resume:
            truncate_metrics(setup.metrics, setup.state.step)
        else:
            from lowrank_cli.atomic import write_text

            write_text(setup.metrics, "")


def build_step(setup: Setup, distribution: Any) -> Distiller:
    """One training step of the setup: the student's forward compiled and spread as asked, the teacher's too."""
    m, opts, ctx = setup.models, setup.opts, setup.ctx
    forward, teacher_forward = forwards(m.model, m.teacher, compile=opts.compile, distribution=distribution,
                                        ctx=ctx)
    step = Distiller(m.model, m.teacher, setup.loss, m.blocks, optimizer=setup.optimizer,
                     params=[p for _, p in setup.trainable], clip_grad=opts.clip_grad, device=ctx.device,
                     input_size=m.input_size, ctx=ctx, forward=forward, teacher_forward=teacher_forward)
    step.on_batch = m.on_batch
    return step


def loss_summary(setup: Setup, history: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """First and last logged value of each term (all of the run's lines, also those before a resume)."""
    from lowrank_cli.training.metrics import metrics_lines

    lines = metrics_lines(setup.metrics) if setup.ctx.is_main else history
    losses = {}
    for term in setup.loss.active:
        values = [line[term] for line in lines if term in line]
        if values:
            losses[term] = {"first": values[0], "last": values[-1]}
    return losses


def write_checkpoint(setup: Setup) -> None:
    """Write the trained model to the output (in the dtype it came in), then drop the training state."""

    def write() -> None:
        from lowrank_cli.checkpoint.io import save

        dtype = setup.models.save_dtype
        save(setup.model, setup.env.output, force=True, dtype=dtype if dtype != torch.float32 else None)
        setup.store.remove()

    gathered = setup.distribution.gathered(setup.model) if setup.distribution is not None else nullcontext()
    with gathered:  # every process takes part in gathering a sharded model
        distributed.on_main(setup.ctx, write)



def _check_finite(models: Any) -> None:
    """A student or teacher with NaN / inf weights is named before any step (not as a NaN loss at step 1)."""
    from lowrank_cli.models.weights import check_finite

    check_finite(models.model, "the student")
    if models.teacher is not None:
        check_finite(models.teacher, "the teacher")
