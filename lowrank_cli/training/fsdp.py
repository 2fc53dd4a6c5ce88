"""`shard` fsdp: the student and its frozen teacher sharded over the processes of torchrun with PyTorch FSDP2
(`torch.distributed.fsdp.fully_shard`), for a recovery whose models, gradients and AdamW states do not fit one
process.

Each repeated block (the family's blocks: a decoder layer, a timm block) becomes one FSDP unit, then the root
(embeddings, final norm, head): a process holds 1/N of every parameter, gradient and optimizer state, and gathers
one block at a time for its forward and backward. The parameters the loss does not reach are frozen before the
sharding (FSDP2 keeps requires_grad per parameter), and AdamW is built over the sharded parameters afterwards.

Mixed precision: on CUDA the gathered parameters are bf16 (the compute dtype lrc trains in there, autocast) and
the gradients are reduced in fp32; the sharded master weights and AdamW stay fp32. On the CPU everything stays
fp32: lrc trains in fp32 there (no autocast), bf16 matmuls on most CPUs are slower than fp32 ones, and a bf16
all-gather would make an FSDP run differ from the single-process run it must reproduce.

The training state goes through torch.distributed.checkpoint (training/fsdp_state.py); the output is the full
state dict gathered on rank 0 and written as one lrc file (`gathered`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowrank_cli import distributed
from lowrank_cli.errors import UsageError


def check_launch() -> None:
    """`shard` fsdp needs the processes of torchrun (a usage error otherwise, before anything loads)."""
    if not distributed.launched_by_torchrun():
        raise UsageError("`shard` fsdp shards the models over the processes of torchrun, and this is one process "
                         "started without it: run `torchrun --nproc_per_node N -m lowrank_cli recover ... --shard "
                         "fsdp`, or leave out `shard` fsdp")


def mixed_precision(device: torch.device) -> Any:
    """bf16 gathered parameters and fp32 gradient reduction on CUDA; None (all fp32) elsewhere (module docstring)."""
    if device.type != "cuda":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard_model(model: nn.Module, blocks: list[str], device: torch.device) -> nn.Module:
    """fully_shard every block of `blocks` (names of submodules), then the root; in place, returns `model`. The
    mesh is the run's device type over all processes (FSDP's default would be CUDA whenever CUDA is there, also
    for a `device` cpu run)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    policy = mixed_precision(device)
    kwargs: dict[str, Any] = {"mp_policy": policy} if policy is not None else {}
    kwargs["mesh"] = init_device_mesh(device.type, (dist.get_world_size(),))
    modules = dict(model.named_modules())
    for name in blocks:
        fully_shard(modules[name], **kwargs)
    fully_shard(model, **kwargs)
    return model


class ShardedForward:
    """The student's forward for the step: the FSDP module itself, with `no_sync` (as DDP has) so that the
    micro-batches of a step but the last accumulate their gradients without reducing them."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        self.module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)


@dataclass(frozen=True)
class FullyShard:
    """The `distribution` of `shard` fsdp (training.parallel.DataParallel is the other)."""

    name = "fsdp"
    shards = True  # a forward is collective: every process evaluates all the held-out data, in the same batches

    def prepare(self, env: Any, data: Any, models: Any,
                trainable: list[tuple[str, nn.Parameter]]) -> list[tuple[str, nn.Parameter]]:
        """Shard student and teacher (after the trainable parameters are chosen); the trainable parameters as
        the sharded ones that replaced them, for AdamW."""
        from lowrank_cli.models.structure import innermost_blocks

        if not models.blocks:
            raise UsageError("`shard` fsdp shards the model per repeated block (decoder layer, transformer block), "
                             "and this model has none: use `shard` ddp")
        dev = env.ctx.device
        if models.teacher is not None:
            teacher_blocks = innermost_blocks(models.teacher)
            shard_model(models.teacher, teacher_blocks, dev)
        shard_model(models.model, models.blocks, dev)
        params = dict(models.model.named_parameters())
        sharded = [(name, params[name]) for name, _ in trainable]
        env.log(f"FSDP: student and teacher sharded over {env.ctx.world_size} processes, {len(models.blocks)} "
                f"blocks each ({'bf16 parameters, fp32 reduction' if dev.type == 'cuda' else 'fp32'})")
        return sharded

    def wrap(self, ctx: distributed.DistContext, forward: Callable[..., Any]) -> Callable[..., Any]:
        return ShardedForward(forward)

    @contextlib.contextmanager
    def gathered(self, model: nn.Module) -> Iterator[None]:
        """The whole model's state dict on rank 0 (on the CPU), as `model.state_dict()` there while this lasts, so
        that the checkpoint writer writes the full model; every process must enter (it gathers)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        model.state_dict = lambda *args, **kwargs: dict(full)  # type: ignore[method-assign]
        try:
            yield
        finally:
            del model.state_dict
