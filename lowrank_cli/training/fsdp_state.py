"""The training state of a `shard` fsdp run: sharded, written by every process with torch.distributed.checkpoint.

    <output stem>.train/                 replaced as a whole (written as .train.partial/, then renamed)
        .metadata, __R_0.distcp          DCP: the student's weights and AdamW's state, each process its shards
                                         (the state dicts of torch.distributed.checkpoint.state_dict, keyed by
                                         parameter names, so a run on another number of processes reshards
                                         them), and the extra tensors (`keep` best: the best weights, sharded)
        state.json                       step, epoch, batch, images seen, ... (training/state.py's TrainState),
                                         the layout, the processes that wrote it, the trained parameters' names
                                         and the extra tensors' shapes and dtypes

No pickle of ours: tensors go through DCP, the rest is JSON. DCP itself writes its `.metadata` index with
pickle and reads it back so: lrc first unpickles it with an allow-list (training/dcp_index.py). As for
the one-file state, randomness needs no saved generator: it is reseeded from (seed, step, rank) every step.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_cli import distributed
from lowrank_cli.atomic import write_text
from lowrank_cli.errors import InputError, UsageError
from lowrank_cli.training.dcp_index import check_index
from lowrank_cli.training.state import SCHEMA, TrainState

LAYOUT = "fsdp"
DOCUMENT = "state.json"


def sharded_state_path(output: str | Path) -> Path:
    """`out.safetensors` -> `out.train/`, next to the output."""
    output = Path(output)
    return output.with_name(output.stem + ".train")


class ShardedState:
    """training.state.StateFile's methods for a sharded state (every method is called on every process)."""

    layout = LAYOUT

    def __init__(self, path: Path):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.old = self.path.with_name(self.path.name + ".old")
        self.loaded_into: nn.Module | None = None  # the model `load` filled (its layout is the extra tensors')

    def _current(self) -> Path:
        """The state folder; the previous one when a save died between its two renames."""
        if not (self.path / DOCUMENT).is_file() and (self.old / DOCUMENT).is_file():
            return self.old
        return self.path

    def exists(self) -> bool:
        return (self._current() / DOCUMENT).is_file() or self.path.exists()

    def visible_everywhere(self, ctx: Any) -> bool:
        return distributed.all_ranks(ctx, (self._current() / DOCUMENT).is_file())

    def _document(self) -> dict[str, Any]:
        path = self._current() / DOCUMENT
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"training state '{self.path}' is unreadable ({type(e).__name__}): it is damaged; delete "
                             "it and start again without `resume=True`") from None
        if int(document.get("schema", 0)) > SCHEMA:
            raise InputError(f"training state '{self.path}' was written by a newer lrc (schema {document['schema']}):"
                             " upgrade lrc")
        return document

    def read(self) -> TrainState:
        document = self._document()
        return TrainState(**{k: document[k] for k in TrainState.__dataclass_fields__ if k in document})

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer, param_names: list[str]) -> TrainState:
        """Fill the sharded `model` and `optimizer` from the state (resharded when it was written by another number
        of processes); return the step, data position and the rest."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        document = self._document()
        if document.get("param_names") != param_names:
            raise UsageError(
                f"cannot resume: the trained parameters differ from the interrupted run's "
                f"({len(document.get('param_names') or [])} then, {len(param_names)} now): was `freeze_dense` "
                "changed? resume with the same options")
        model_sd, optim_sd = get_state_dict(model, optimizer)
        check_index(self._current())
        try:
            dcp.load({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(self._current()))
        except Exception as e:  # noqa: BLE001 - DCP wraps every rank's failure in its own exception types
            first = str(e).strip().splitlines()[-1][:160] if str(e).strip() else type(e).__name__
            raise InputError(f"training state '{self.path}' does not fit the student or is damaged ({first}): "
                             "resume with the same student, or start again without `resume=True`") from None
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
        self.loaded_into = model
        return self.read()

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """The `extra_tensors` saved with the state (the best weights of `keep` best), read after `load`: one
        named `<prefix>.<model tensor>` is sharded as that tensor of the model is."""
        import torch.distributed.checkpoint as dcp

        saved = self._document().get("extra_tensors") or {}
        if not saved:
            return {}
        model = self.loaded_into
        weights = model.state_dict() if model is not None else {}
        extra = {}
        for key, (shape, dtype) in saved.items():
            like = weights.get(key.split(".", 1)[-1])
            extra[key] = torch.empty_like(like) if like is not None and list(like.shape) == shape else \
                torch.empty(shape, dtype=getattr(torch, dtype))
        check_index(self._current())
        dcp.load({"extra": extra}, checkpoint_id=str(self._current()))
        return extra

    def save(self, ctx: Any, state: TrainState, model: nn.Module, optimizer: torch.optim.Optimizer,
             param_names: list[str], extra_tensors: dict[str, torch.Tensor] | None) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        distributed.on_main(ctx, shutil.rmtree, self.partial, ignore_errors=True)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        extra = dict(extra_tensors or {})
        dcp.save({"model": model_sd, "optimizer": optim_sd, **({"extra": extra} if extra else {})},
                 checkpoint_id=str(self.partial))
        shapes = {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in extra.items()}
        document = {"schema": SCHEMA, "layout": LAYOUT, "processes": ctx.world_size, **asdict(state),
                    "param_names": param_names, "extra_tensors": shapes}
        distributed.on_main(ctx, self._publish, document)

    def _publish(self, document: dict[str, Any]) -> None:
        """The whole new state replaces the old: the JSON last into the partial folder, then two renames."""
        write_text(self.partial / DOCUMENT, json.dumps(document))
        shutil.rmtree(self.old, ignore_errors=True)
        if self.path.exists():
            os.rename(self.path, self.old)
        os.rename(self.partial, self.path)
        shutil.rmtree(self.old, ignore_errors=True)

    def remove(self) -> None:
        """A finished (or restarted) run leaves no state."""
        for path in (self.path, self.partial, self.old):
            shutil.rmtree(path, ignore_errors=True)
