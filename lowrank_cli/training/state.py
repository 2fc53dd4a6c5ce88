"""The training state of `lrc recover`: everything `--resume` needs, in one safetensors file, written atomically.

    <output stem>.train.safetensors
        tensors   model.<name>                  the student's weights (its state dict)
                  optimizer.<index>.<key>       AdamW's per-parameter state (exp_avg, exp_avg_sq, step)
        metadata  format = "pt", lrc.train_state = JSON:
                  schema, step, epoch, batch (micro-batches of that epoch already consumed), images seen,
                  skipped images, seconds, the optimizer's param groups and parameter names, the learning-rate
                  schedule (`schedule`: a pure function of the step, see recover.lr_factor), the options of the
                  run (`fingerprint`), and `extra` (the accuracy measured before training, so a resumed run
                  reports it without measuring again).

No pickle: tensors go through safetensors and everything else is JSON, so a training state from elsewhere is
as safe to read as a model checkpoint. One file, replaced atomically, so a crash while saving leaves the
previous state intact.

Randomness needs no saved generator state: recovery reseeds every step from (seed, step, rank) and every
image's augmentation from (seed, epoch, index) (see recover.py), so the step and the data position determine
the rest of the run whatever the number of data-loader workers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_cli.atomic import utf8_path, write_safetensors
from lowrank_cli.errors import InputError, UsageError

SCHEMA = 1
KEY = "lrc.train_state"


def train_state_path(output: str | Path) -> Path:
    """`out.safetensors` -> `out.train.safetensors`, next to the output."""
    output = Path(output)
    return output.with_name(output.stem + ".train.safetensors")


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch the next micro-batch comes from
    batch: int = 0  # micro-batches of `epoch` already consumed (by each rank)
    images_seen: int = 0  # over all ranks
    skipped: int = 0  # unreadable images met so far, over all ranks
    seconds: float = 0.0  # training time so far (not counting evaluation)
    schedule: dict[str, Any] = field(default_factory=dict)  # kind, lr, warmup_steps, total_steps
    fingerprint: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def _tensors_of(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors, seen = {}, set()
    for name, t in model.state_dict().items():
        t = t.detach()
        key = t.untyped_storage().data_ptr()
        if key in seen and t.numel():  # safetensors refuses shared memory: tied weights are stored twice
            t = t.clone()
        seen.add(key)
        tensors[f"model.{name}"] = t.to("cpu").contiguous()
    return tensors


def save_train_state(path: str | Path, state: TrainState, model: nn.Module, optimizer: torch.optim.Optimizer,
                     param_names: list[str], extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the training state atomically (rank 0 only, under torchrun). `extra_tensors` (e.g. the best weights
    so far) are stored under `extra.` and read back by `read_extra_tensors`."""
    path = Path(path)
    tensors = _tensors_of(model)
    tensors.update({f"extra.{k}": v.detach().to("cpu").contiguous() for k, v in (extra_tensors or {}).items()})
    opt = optimizer.state_dict()
    values: dict[str, dict[str, Any]] = {}
    for index, per_param in opt["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                values.setdefault(str(index), {})[key] = value
    document = {
        "schema": SCHEMA,
        **asdict(state),
        "optimizer": {"param_groups": opt["param_groups"], "values": values, "param_names": param_names},
    }
    write_safetensors(path, tensors, {"format": "pt", KEY: json.dumps(document)})
    return path


def read_train_state(path: str | Path) -> tuple[TrainState, dict[str, Any]]:
    """The training state's JSON part (no tensor is read): (TrainState, the whole document)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"training state '{path}' does not exist")
    try:
        with utf8_path(path) as name, safe_open(name, framework="pt") as f:
            meta = f.metadata() or {}
        document = json.loads(meta[KEY])
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types for every kind of damage
        raise InputError(
            f"training state '{path}' is unreadable ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__}):"
            " it is damaged; delete it and start again without `resume=True`"
        ) from None
    if int(document.get("schema", 0)) > SCHEMA:
        raise InputError(f"training state '{path}' was written by a newer lrc (schema {document['schema']}): "
                         "upgrade lrc")
    fields = {k: document[k] for k in TrainState.__dataclass_fields__ if k in document}
    return TrainState(**fields), document


def _parameter(key: str) -> str:
    """A fingerprint key as the parameter it names: states written by lrc 0.1 keyed options by CLI flag."""
    return key[2:].replace("-", "_") if key.startswith("--") else key


def _shown(key: str) -> str:
    return f"`{key}`" if key.isidentifier() else key  # parameters render as options on the CLI


def changed_options(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(option, then, now) for each option whose value differs from the interrupted run's (keys name the option,
    in backticks when it is a parameter, see errors.PARAMETER)."""
    saved = {_parameter(k): v for k, v in saved.items()}
    return [(_shown(k), saved[k], v) for k, v in current.items() if k in saved and saved[k] != v]


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse a resume whose options cannot continue the same run (data order, batch shape), naming the option."""
    for option, then, now in changed_options(saved, current):
        raise UsageError(
            f"cannot resume: {option} was {then} in the interrupted run and is {now} now, so the training state saved "
            f"in '{path}' does not apply: resume with the same {option}, or start again without `resume=True` (pass `force=True` "
            "to replace the saved state)"
        )


def read_extra_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The `extra_tensors` saved with a training state (an empty dict when there are none)."""
    from safetensors import safe_open

    with utf8_path(path) as name, safe_open(name, framework="pt") as f:
        return {k[len("extra."):]: f.get_tensor(k) for k in f.keys() if k.startswith("extra.")}


def load_train_state(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                     param_names: list[str]) -> TrainState:
    """Fill `model` and `optimizer` from the file; return the step, data position and the rest.

    The optimizer's hyper-parameters (lr, weight decay) come back as saved; the caller sets the current ones.
    """
    from safetensors.torch import load_file

    path = Path(path)
    state, document = read_train_state(path)
    with utf8_path(path) as name:
        tensors = load_file(name)
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    missing = sorted(set(model.state_dict()) - set(weights))
    unexpected = sorted(set(weights) - set(model.state_dict()))
    wrong = [k for k, v in model.state_dict().items() if k in weights and tuple(weights[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        first = (missing or unexpected or wrong)[0]
        raise InputError(
            f"training state '{path}' does not fit the student ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(wrong)} differently shaped tensors, e.g. {first}): the student changed since the interrupted "
            "run; resume with the same student, or start again without `resume=True`"
        )
    with torch.no_grad():
        model.load_state_dict(weights, strict=True)
    saved_names = document["optimizer"]["param_names"]
    if saved_names != param_names:
        raise UsageError(
            f"cannot resume: the trained parameters differ from the interrupted run's ({len(saved_names)} then, "
            f"{len(param_names)} now): was `freeze_dense` changed? resume with the same options"
        )
    opt_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            opt_state.setdefault(int(index), {})[name] = value
    for index, values in document["optimizer"]["values"].items():
        opt_state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": opt_state, "param_groups": document["optimizer"]["param_groups"]})
    return state


class StateFile:
    """Where a run's training state lives and how it is written and read back: one safetensors file (above),
    written by the main process. The one place a run saves or loads its state, so that another layout (a sharded
    model saved by every process with torch.distributed.checkpoint) is another class with these methods."""

    layout = "ddp"

    def __init__(self, path: Path):
        self.path = Path(path)

    def exists(self) -> bool:
        return self.path.exists()

    def visible_everywhere(self, ctx: Any) -> bool:
        from lowrank_cli import distributed

        return distributed.all_ranks(ctx, self.path.is_file())

    def read(self) -> TrainState:
        return read_train_state(self.path)[0]

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer, param_names: list[str]) -> TrainState:
        return load_train_state(self.path, model, optimizer, param_names)

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return read_extra_tensors(self.path)

    def save(self, ctx: Any, state: TrainState, model: nn.Module, optimizer: torch.optim.Optimizer,
             param_names: list[str], extra_tensors: dict[str, torch.Tensor] | None) -> None:
        from lowrank_cli import distributed

        distributed.on_main(ctx, save_train_state, self.path, state, model, optimizer, param_names, extra_tensors)

    def remove(self) -> None:
        """A finished run leaves no state (called on the main process, after the output is written)."""
        self.path.unlink(missing_ok=True)
