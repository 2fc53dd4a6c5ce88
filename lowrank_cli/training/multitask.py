"""Multi-task fine-tuning: one backbone, several tasks, each with its own head; adapters shared, kept apart, or
merged (training.multitask_options: the modes).

    from lowrank_cli.training.multitask import finetune_tasks
    result = finetune_tasks("bert_lr.safetensors", ["sst=sst.jsonl", "sts=stsb.jsonl:score"], mode="experts",
                            output="multi.safetensors", epochs=3)
    result.scores["sst"], result.overall        # held-out scores per task, and their mean (accuracy, (r + 1) / 2)
    lowrank_cli.load("multi.safetensors", task="sts")

`shared` is one run over every task's batches (training.shared_strategy). The other modes train each task apart,
one after the other, each as `finetune` trains one task (training.finetune_strategy with training.task_run's
source: the same resume, signals, DDP, compile, metrics and best state), keeping every finished task in a work folder next to the output
(`.OUTPUT.tasks/`) so that an interrupted run resumes at the task it was in; then `experts` stores each task's
adapters unmerged beside the untouched backbone, and `merge` / `orthogonal` merge every task's update into one
backbone (training.merging) and score every task again on it, since merging changes what each head sees. The
output is a multi-task checkpoint (checkpoint.tasks).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from torch import nn

from lowrank_cli.data.tasks import TaskSpec, parse_tasks
from lowrank_cli.errors import InputError, OutputError, UsageError
from lowrank_cli.training.multitask_options import MultitaskOptions
from lowrank_cli.training.options import FinetuneOptions, options_of
from lowrank_cli.training.result import MultitaskResult
from lowrank_cli.training.trainer import ProgressFn


def finetune_tasks(
    model: Any,
    tasks: list[str] | list[TaskSpec],
    *,
    output: str | os.PathLike,
    options: MultitaskOptions | None = None,
    progress: ProgressFn | None = None,
    log: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
    resume_command: str | None = None,
    on_step: Callable[[int, nn.Module], bool | None] | None = None,
    **option_values: Any,
) -> MultitaskResult:
    """Fine-tune `model` (any MODEL source) on every task of `tasks` (`NAME=PATH[:label|:score]` strings or
    TaskSpecs, data.tasks), as `mode` says; write one multi-task checkpoint to `output`. The options are those of
    `MultitaskOptions` (training/multitask_options.py), as keywords or one `options` object."""
    opts = options_of(MultitaskOptions, options, option_values, "finetune_tasks")
    opts = dataclasses.replace(opts, lr=opts.peak_lr)
    specs = parse_tasks(list(tasks), parameter="tasks")
    if len(specs) < 2:
        raise UsageError(f"a multi-task run needs two tasks or more, got {len(specs)}: for one task use "
                         "finetune(model, data) (`lrc finetune --data`)")
    opts.check_task_names([s.name for s in specs])
    log = log or (lambda msg: None)
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=2))
    hooks = dict(progress=progress, log=log, warn=warn, resume_command=resume_command, on_step=on_step)
    if opts.mode == "shared":
        from lowrank_cli.training.run import train
        from lowrank_cli.training.setup import Hooks
        from lowrank_cli.training.shared_strategy import SharedStrategy

        return train(SharedStrategy(opts, model, specs), output, Hooks(**hooks))
    return ApartRuns(model, specs, Path(output), opts, hooks).run()


def fresh(source: Any) -> Any:
    """The model source as each task gets it: a LoadedModel is copied (a task changes the model it trains)."""
    from lowrank_cli.models.loaded import LoadedModel

    return source.twin() if isinstance(source, LoadedModel) else source


def work_folder(output: Path) -> Path:
    """Where a run whose tasks train apart keeps each finished task (and the training state of the current one)."""
    return output.with_name(f".{output.name}.tasks")


def task_options(opts: MultitaskOptions, **changes: Any) -> FinetuneOptions:
    """The FinetuneOptions of one task of a multi-task run."""
    own = {f.name: getattr(opts, f.name) for f in fields(FinetuneOptions)}
    return FinetuneOptions(**{**own, **changes})


class ApartRuns:
    """The modes whose tasks train apart: experts, merge, orthogonal (see the module docstring)."""

    def __init__(self, model: Any, specs: list[TaskSpec], output: Path, opts: MultitaskOptions,
                 hooks: dict[str, Any]):
        self.model, self.specs, self.output, self.opts, self.hooks = model, specs, output, opts, hooks
        self.log = hooks["log"]
        self.work = work_folder(output)
        from lowrank_cli.distributed import DistContext
        from lowrank_cli.devices import resolve_device

        self.ctx = DistContext(device=resolve_device(opts.device))  # one process until `run` joins torchrun's group

    def run(self) -> MultitaskResult:
        from lowrank_cli import distributed

        # One process group for the whole run (each task's training joins it): the work folder is checked and
        # cleaned on the main process while the others wait, and they all wait for its checkpoint.
        self.ctx = distributed.setup(self.opts.device)
        try:
            self.prepare()
            results = self.train_tasks()
            result = None
            try:
                if self.ctx.is_main:
                    from lowrank_cli.training.task_combine import combine

                    result = combine(fresh(self.model), self.specs, self.output, self.opts, self.work, results, self.log)
                    self._write_metrics()
                    shutil.rmtree(self.work, ignore_errors=True)
            finally:
                distributed.barrier(self.ctx)
            return result or MultitaskResult(None, self.output, self.opts.mode, {}, {}, {}, results=results)
        finally:
            distributed.teardown(self.ctx)

    def prepare(self) -> None:
        """Check the output, every task's data and the work folder of an earlier call, before any training."""
        from lowrank_cli import distributed
        from lowrank_cli.atomic import check_output
        from lowrank_cli.data.task_data import check_same_modality
        from lowrank_cli.training.metrics import check_metrics_path
        from lowrank_cli.training.task_run import read_task

        check_output(self.output, force=self.opts.force)
        check_metrics_path(self.output)
        read = [read_task(spec, self.opts)[0] for spec in self.specs]
        check_same_modality(self.specs, [d.modality for d in read])
        problem = None
        if self.ctx.is_main:
            try:
                self._check_work()
            except Exception as e:  # noqa: BLE001 - raised below, once every process knows
                problem = e
        if distributed.any_rank(self.ctx, problem is not None):
            raise problem or OutputError(f"the main process refused the work folder '{self.work}' (see its error)")

    def train_tasks(self) -> list[Any]:
        """Every task's fine-tuning into the work folder (a task finished by an earlier call is kept: None)."""
        from lowrank_cli.errors import Interrupted, TrainingError

        try:
            return [self._train(i, spec) for i, spec in enumerate(self.specs)]
        except (Interrupted, TrainingError):
            raise  # the finished tasks and the current one's state are what a resume continues from
        except BaseException:
            if not self.opts.resume and self.ctx.is_main:  # a fresh run that fails leaves nothing behind
                shutil.rmtree(self.work, ignore_errors=True)
            raise

    def _check_work(self) -> None:
        o = self.opts
        if self.work.exists():
            if o.resume:
                done = sorted(p.stem for p in self.work.glob("*.safetensors"))
                self.log(f"Resuming the multi-task run in '{self.work}' (tasks done: {', '.join(done) or 'none'})")
                return
            if not o.force:
                raise OutputError(f"an earlier, unfinished multi-task run left its work in '{self.work}': continue "
                                  "it with `resume=True`, or pass `force=True` to start again")
            shutil.rmtree(self.work)
        elif o.resume:
            raise InputError(f"`resume=True`: there is no unfinished multi-task run for '{self.output}' (no work "
                             f"folder '{self.work}'): start without `resume=True`")
        self.work.mkdir(parents=True, exist_ok=True)

    def task_output(self, spec: TaskSpec) -> Path:
        return self.work / f"{spec.name}.safetensors"

    def _train(self, index: int, spec: TaskSpec) -> Any:
        """One task's fine-tuning, or what an earlier call of this run left of it."""
        from lowrank_cli.training.finetune_strategy import FinetuneStrategy
        from lowrank_cli.training.run import train
        from lowrank_cli.training.setup import Hooks
        from lowrank_cli.training.state import train_state_path
        from lowrank_cli.training.task_run import TaskOfRun

        out = self.task_output(spec)
        if out.exists():
            self._check_done(index, spec, out)
            self.log(f"{spec.name}: trained earlier in this run: kept")
            return None
        o = self.opts
        opts = task_options(o, merge=o.method == "full", resume=train_state_path(out).exists(), force=True)
        orthogonal = o.mode == "orthogonal"
        log = self.hooks["log"]
        hooks = Hooks(**{**self.hooks, "log": lambda message: log(f"{spec.name}: {message}")})
        self.log(f"Task {index + 1}/{len(self.specs)}: {spec}")
        source = TaskOfRun(spec, block=index if orthogonal else None, blocks=len(self.specs) if orthogonal else None)
        return train(FinetuneStrategy(opts, fresh(self.model), source), out, hooks)

    def _check_done(self, index: int, spec: TaskSpec, out: Path) -> None:
        """A task finished earlier must have been trained as this run asks (the same task, options, block)."""
        from lowrank_cli.models.spec import json_safe
        from lowrank_cli.training.task_combine import task_record
        from lowrank_cli.training.task_run import fingerprint

        found = (task_record(out).get("finetune") or {}).get("fingerprint") or {}
        orthogonal = self.opts.mode == "orthogonal"
        wanted = json_safe(fingerprint(spec, task_options(self.opts), index if orthogonal else None,
                                       len(self.specs) if orthogonal else None))
        changed = [k for k in wanted if found.get(k) != wanted[k]]
        if changed:
            k = changed[0]
            raise UsageError(f"task '{spec.name}' was trained earlier in this run with {k} {found.get(k)!r}; now "
                             f"{k} is {wanted[k]!r}: resume with the same tasks and options, or start again with "
                             "`force=True`")

    def _write_metrics(self) -> None:
        """One metrics log for the run, next to the output: every task's lines, each with its task."""
        from lowrank_cli.atomic import write_text
        from lowrank_cli.training.metrics import metrics_path

        lines = []
        for spec in self.specs:
            path = metrics_path(self.task_output(spec))
            if path.is_file():
                lines += [json.dumps({"task": spec.name, **json.loads(line)})
                          for line in path.read_text().splitlines() if line.strip()]
        write_text(metrics_path(self.output), "".join(line + "\n" for line in lines))
