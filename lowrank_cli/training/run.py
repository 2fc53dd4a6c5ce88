"""One training run of any kind: the setup (training.setup), the loop (training.trainer), the strategy's end; and
what every run needs around it (`train`): the outputs checked before anything loads, torch.distributed set up and
torn down, out-of-memory as an environment problem, and a fresh run that fails leaving nothing behind."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from lowrank_cli import distributed
from lowrank_cli.atomic import locked_output
from lowrank_cli.data.sampling import default_workers
from lowrank_cli.errors import EnvironmentProblem, InputError, Interrupted, OutputError, TrainingError
from lowrank_cli.training.metrics import check_metrics_path, metrics_path
from lowrank_cli.training.setup import Hooks, RunEnv, build_setup
from lowrank_cli.training.stores import check_layout, state_store
from lowrank_cli.training.trainer import NoUsableData, Trainer


def run_training(strategy: Any, env: RunEnv) -> Any:
    """Set up, train, and end as the strategy says (the step's hooks are removed once the model is scored)."""
    setup = build_setup(strategy, env)
    trainer = Trainer(setup)
    try:
        trainer.run()
        ended = strategy.after_training(setup, trainer)
    finally:
        setup.step.close()
    return strategy.write(setup, trainer, ended)


@locked_output
def train(strategy: Any, output: str | os.PathLike, hooks: Hooks) -> Any:
    """`strategy`'s run writing `output` (its training state next to it), with what every training needs around
    it; an interrupted run keeps its state to resume."""
    opts, output = strategy.opts, Path(output)
    store = state_store(opts, output)
    _check_outputs(output, store, opts)
    ctx = distributed.setup(opts.device, group=getattr(opts, "shard", "ddp") == "fsdp")
    workers = default_workers(ctx.local_world_size) if opts.num_workers is None else opts.num_workers
    try:
        return run_training(strategy, RunEnv.create(ctx, workers, output, store, hooks))
    except torch.cuda.OutOfMemoryError:
        _forget_failed_run(output, store, opts, ctx)
        raise EnvironmentProblem(
            f"out of GPU memory at `batch_size` {opts.batch_size}: use a smaller `batch_size` with a larger "
            "`grad_accum` (same images per step)"
        ) from None
    except (Interrupted, TrainingError):
        _forget_failed_run(output, store.path, opts, ctx)  # a saved training state keeps its metrics: a resume's
        raise
    except BaseException as e:
        _forget_failed_run(output, store, opts, ctx, drop_state=isinstance(e, NoUsableData))
        raise
    finally:
        distributed.teardown(ctx)


def _forget_failed_run(output: Path, store: Any, opts: Any, ctx, drop_state: bool = False) -> None:
    """A fresh run that failed leaves nothing behind: its metrics log (and, when it trained on nothing, its state).
    A resumed run keeps both: they belong to the run it continues."""
    if opts.resume or not ctx.is_main:
        return
    if drop_state:
        store.remove()
    if not store.exists():
        metrics_path(output).unlink(missing_ok=True)


def _check_outputs(output: Path, store: Any, opts: Any) -> None:
    """The output and the training state of an earlier run, checked before anything is loaded."""
    from lowrank_cli.atomic import check_output

    check_output(output, force=opts.force)
    check_metrics_path(output)
    state_path = store.path
    check_layout(store, output, opts.resume)
    if opts.resume and not store.exists():
        raise InputError(f"`resume=True`: there is no training state '{state_path}' to continue (it is written every "
                         "`save_every` steps, and removed when a run finishes): start without `resume=True`")
    if not opts.resume and store.exists():
        if not opts.force:
            raise OutputError(f"the training state of an earlier, unfinished run is at '{state_path}': continue it "
                              "with `resume=True`, or pass `force=True` to start again")
        store.remove()  # starting again: a later resume must not find the old run
