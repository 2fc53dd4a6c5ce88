"""A `shard` fsdp recovery through the Python API, run by torchrun from tests/training/test_fsdp.py:

    torchrun --nproc_per_node 2 tests/training/fsdp_driver.py '{"student": ..., "teacher": ..., "data": ...,
        "output": ..., "stop_at": 3 or null, "gathered": path or null, "options": {...}}'

`stop_at`: interrupt after that step (as the caller's on_step may), leaving the sharded training state.
`gathered`: after the run, the trained (sharded) model's full state dict gathered on rank 0 and written there as
plain safetensors, for the test to compare with the lrc file the run wrote.
`probe`: {"ids": safetensors file of token ids (key "ids"), "logits": path}: at the last step the sharded model
itself (every rank, a sharded forward is collective) runs on those ids, and rank 0 writes its logits there."""

from __future__ import annotations

import json
import sys

import lowrank_cli
from lowrank_cli.errors import Interrupted


def gather(model, path: str) -> None:
    """The sharded model's full state dict, gathered on rank 0 and written there (every rank takes part)."""
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        save_file({k: v.contiguous() for k, v in full.items()}, path)


def probe_logits(model, probe: dict) -> None:
    """The sharded model's logits on the probe's ids, written on rank 0 (every rank takes part)."""
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file, save_file

    ids = load_file(probe["ids"])["ids"]
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    if dist.get_rank() == 0:
        save_file({"logits": logits.contiguous()}, probe["logits"])


def main(spec: dict) -> int:
    stop_at, steps, gathered = spec.get("stop_at"), spec["options"]["steps"], spec.get("gathered")
    probe = spec.get("probe")

    def on_step(step, model) -> bool:
        if gathered and step == steps:  # the last step: the model as the run writes it (keep last)
            gather(model, gathered)
        if probe and step == steps:
            probe_logits(model, probe)
        return step == stop_at

    try:
        lowrank_cli.recover(spec["student"], spec["teacher"], spec["data"], output=spec["output"], shard="fsdp",
                            on_step=on_step, **spec["options"])
    except Interrupted:
        print("interrupted")  # torchrun exits 1 for any child's non-zero code: say it here
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
