"""How the student's forward runs in a training step: compiled or eager, and spread over the processes of
torchrun. One replaceable step: a run asks its distribution to `prepare` the models once the trainable parameters
are chosen (FSDP shards them there), to `wrap` the forward its step calls, and for the model's state dict as the
output is written (`gathered`); DataParallel here, FullyShard (training/fsdp.py) for `shard` fsdp, chosen where
the run's options are read."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

from lowrank_cli import distributed
from lowrank_cli.training.step import compile_hooked


@dataclass(frozen=True)
class DataParallel:
    """Every process holds the whole model and sees its share of each batch; DDP averages the gradients.

    broadcast_buffers: False when the buffers never change and start equal on every rank (the progressive
    method's residuals), so DDP sends none each step. find_unused_parameters: True when a step may leave
    parameters without a gradient (a head per task, one task per batch)."""

    broadcast_buffers: bool = True
    find_unused_parameters: bool = False
    name = "ddp"
    shards = False  # every process holds the whole model: each evaluates its share of the held-out data

    def prepare(self, env: Any, data: Any, models: Any,
                trainable: list[tuple[str, nn.Parameter]]) -> list[tuple[str, nn.Parameter]]:
        """Nothing to do before AdamW is built: every process keeps its whole model."""
        return trainable

    @contextlib.contextmanager
    def gathered(self, model: nn.Module) -> Iterator[None]:
        """The model's state dict is whole on every process already."""
        yield

    def wrap(self, ctx: distributed.DistContext, forward: Callable[..., Any]) -> Callable[..., Any]:
        if not ctx.enabled:
            return forward
        from torch.nn.parallel import DistributedDataParallel

        dev = ctx.device
        return DistributedDataParallel(forward, device_ids=[dev.index] if dev.type == "cuda" else None,
                                       broadcast_buffers=self.broadcast_buffers,
                                       find_unused_parameters=self.find_unused_parameters)


def distribution(opts: Any, *, broadcast_buffers: bool = True, find_unused_parameters: bool = False) -> Any:
    """How a run spreads its student over the processes: data parallel, or sharded with FSDP2 (`shard` fsdp, a
    recovery under torchrun only). The one place that reads how to spread it, for a run's strategy to ask (`opts`
    is the run's options)."""
    if getattr(opts, "shard", "ddp") == "fsdp":
        from lowrank_cli.training.fsdp import FullyShard, check_launch

        check_launch()
        return FullyShard()
    return DataParallel(broadcast_buffers=broadcast_buffers, find_unused_parameters=find_unused_parameters)


def forwards(model: nn.Module, teacher: nn.Module | None, *, compile: bool, distribution: Any,
             ctx: distributed.DistContext) -> tuple[Callable[..., Any], Callable[..., Any] | None]:
    """(the student's forward, the teacher's): compiled when asked (block hooks kept), the student's spread over the
    processes."""
    forward, teacher_forward = model, teacher
    if compile:
        forward = compile_hooked(model)
        teacher_forward = compile_hooked(teacher) if teacher is not None else None
    return distribution.wrap(ctx, forward), teacher_forward
