"""Where a run keeps its training state, by `shard`: one safetensors file (training/state.py, `shard` ddp) or a
folder sharded with torch.distributed.checkpoint (training/fsdp_state.py, `shard` fsdp)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowrank_cli.errors import UsageError
from lowrank_cli.training.fsdp_state import ShardedState, sharded_state_path
from lowrank_cli.training.state import StateFile, train_state_path


def state_stores(output: str | Path) -> dict[str, Any]:
    """Every layout a run writing `output` may keep its training state in, by `shard` value."""
    return {"ddp": StateFile(train_state_path(output)), "fsdp": ShardedState(sharded_state_path(output))}


def state_store(opts: Any, output: str | Path) -> Any:
    """Where the run writing `output` keeps its training state, and in which layout: one file (StateFile), or
    sharded with torch.distributed.checkpoint for `shard` fsdp (training.fsdp_state.ShardedState). The one place
    a run picks it (`opts` are the run's options)."""
    return state_stores(output)[getattr(opts, "shard", "ddp")]


def check_layout(store: Any, output: str | Path, resume: bool) -> None:
    """A resume must find the state in its own layout: the state of a `shard` fsdp run does not resume as ddp,
    nor the other way round (a usage error naming the option)."""
    if not resume or store.exists():
        return
    for shard, other in state_stores(output).items():
        if shard != store.layout and other.exists():
            raise UsageError(f"cannot resume: the interrupted run was `shard` {shard} (its training state is "
                             f"'{other.path}') and this run is `shard` {store.layout}: resume with `shard` {shard}")
