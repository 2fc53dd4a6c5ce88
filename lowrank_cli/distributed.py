"""Data-parallel training under torchrun: detection, set-up and tear-down, and agreement between ranks.

    torchrun --standalone --nproc_per_node 8 -m lowrank_cli recover ...     # one node, 8 GPUs
    torchrun --nnodes 2 --node_rank R --master_addr HOST --nproc_per_node 8 -m lowrank_cli recover ...

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them everything here is a no-op for a single process,
so the same code runs with and without torchrun (as in nanoGPT). The backend is nccl for CUDA and gloo for the
CPU. Only rank 0 logs and writes files; every decision that ends or changes the run (stop, error, resume) is
taken by all ranks together (`any_rank`, `all_ranks`), so no rank waits forever in a collective that the
others have left.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from lowrank_cli.errors import EnvironmentProblem, LrcError, UsageError


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # True when setup() created the process group (and teardown() ends it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"environment variable {name}='{value}' is not a whole number (set by torchrun?)") from None


def setup(device: str | torch.device | None = "auto", timeout_minutes: float = 30.0, group: bool = False) -> DistContext:
    """Join the process group torchrun describes (if any) and pick this process's device.

    device: "auto" (cuda:LOCAL_RANK when CUDA is there, else cpu), "cpu", "cuda" or "cuda:N". A process group
    that the caller created already (library use inside an existing DDP script) is used as it is. group: create
    the process group under torchrun even for one process (FSDP and torch.distributed.checkpoint need one).
    """
    import torch.distributed as dist

    from lowrank_cli.devices import resolve_device

    dev = resolve_device(device)
    if not launched_by_torchrun() and not (dist.is_available() and dist.is_initialized()):
        return DistContext(device=dev)
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world_size)
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise EnvironmentProblem(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) here: start at most "
                f"{torch.cuda.device_count()} processes per node (--nproc_per_node)"
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    owns = False
    if world_size > 1 or dist.is_initialized() or group:
        if not dist.is_available():
            raise EnvironmentProblem("this PyTorch build has no torch.distributed: run a single process")
        if not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            kwargs = {"device_id": dev} if dev.type == "cuda" else {}
            dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes), **kwargs)
            owns = True
        world_size, rank = dist.get_world_size(), dist.get_rank()
    return DistContext(rank, world_size, local_rank, local_world, dev, owns)


def teardown(ctx: DistContext) -> None:
    import torch.distributed as dist

    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def _reduce(ctx: DistContext, value: float, op) -> float:
    import torch.distributed as dist

    if not ctx.enabled:
        return value
    t = torch.tensor([float(value)], device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=op)
    return float(t.item())


def any_rank(ctx: DistContext, flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one."""
    import torch.distributed as dist

    return _reduce(ctx, 1.0 if flag else 0.0, dist.ReduceOp.MAX) > 0


def all_ranks(ctx: DistContext, flag: bool) -> bool:
    """True on every rank when `flag` is true on all of them."""
    import torch.distributed as dist

    return _reduce(ctx, 1.0 if flag else 0.0, dist.ReduceOp.MIN) > 0


def all_reduce_sum(ctx: DistContext, tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks, in place (a no-op for one process). gloo needs CPU tensors, nccl CUDA ones."""
    import torch.distributed as dist

    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(ctx: DistContext) -> None:
    import torch.distributed as dist

    if ctx.enabled:
        dist.barrier()


class RankFailed(LrcError):
    """Raised on the ranks that did nothing wrong when another rank failed in `on_main`."""


def on_main(ctx: DistContext, fn, *args, **kwargs):
    """Run `fn` on rank 0 only (writing a file), and make every rank learn whether it worked.

    Rank 0 re-raises its own exception; the others raise RankFailed, so no rank is left waiting in a
    collective for a rank that has stopped.
    """
    result, error = None, None
    if ctx.is_main:
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the other ranks have been told
            error = e
    ok = all_ranks(ctx, error is None)
    if error is not None:
        raise error
    if not ok:
        raise RankFailed("rank 0 failed: see its message")
    return result
