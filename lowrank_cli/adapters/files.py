"""Adapter files: what `finetune(..., merge=False)` writes instead of a whole model, and how a base takes them.

One safetensors file with the adapters' tensors and the new head's, and `__metadata__` `lrc.adapters` (JSON):
the method and its config (targets, rank, ...), the head (modules, outputs), the task (classes or a score), the
spec of the fine-tuned model, the fine-tuning record, and the base it was trained on: its source and the sha256 of
its weights (`weights_hash`: names, dtypes, shapes and bytes of its state dict, so the same weights match in any
file format). Applying the file to another base is refused before anything changes.

    record, tensors = read_adapter_file("flowers_adapters.safetensors")
    model = apply_adapter_file(lowrank_cli.load_model("deit_lr.safetensors"), "flowers_adapters.safetensors")
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_cli.adapters.base import AdapterConfig, Method, in_head
from lowrank_cli.adapters.methods import method_for
from lowrank_cli.errors import InputError

KEY = "lrc.adapters"
SCHEMA = 1


def weights_hash(model: nn.Module) -> str:
    """sha256 of a model's state dict: every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def head_tensors(model: nn.Module, head: list[str]) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items() if in_head(k, head)}


def write_adapter_file(path: str | Path, model: nn.Module, method: Method, head: list[str],
                       record: dict[str, Any]) -> Path:
    """Write the adapters and the head of `model` (not merged) with `record` (method, head, task, base, ...)."""
    from lowrank_cli.atomic import check_output, write_safetensors
    from lowrank_cli.models.spec import json_safe

    tensors = {**method.adapter_tensors(model), **head_tensors(model, head)}
    tensors = {k: v.to("cpu").contiguous() for k, v in tensors.items()}
    path = check_output(path, force=True, needed_bytes=sum(t.numel() * t.element_size() for t in tensors.values()))
    write_safetensors(path, tensors, {"format": "pt", KEY: json.dumps(json_safe({"schema": SCHEMA, **record}))})
    return path


def read_adapter_file(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(record, tensors) of an adapter file; anything else is an InputError that says what the file is."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from lowrank_cli.atomic import utf8_path

    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"adapter file '{path}' does not exist: check the path")
    try:
        with utf8_path(path) as name, safe_open(name, framework="pt") as f:
            meta = f.metadata() or {}
        record = json.loads(meta[KEY]) if KEY in meta else None
    except Exception as e:  # safetensors' own errors for truncated or foreign files; bad JSON
        raise InputError(f"'{path}' is not a readable adapter file ({str(e).splitlines()[0][:120] if str(e) else e!r}):"
                         " write it again with `merge=False`") from None
    if not isinstance(record, dict) or not {"method", "adapters", "head", "base"} <= set(record):
        raise InputError(f"'{path}' is not an lrc adapter file (no complete `{KEY}` metadata): adapter files are "
                         "written by finetune with `merge=False`")
    if int(record.get("schema", 0)) > SCHEMA:
        raise InputError(f"'{path}' was written by a newer lrc (adapter schema {record['schema']}): upgrade lrc")
    with utf8_path(path) as name:
        return record, load_file(name)


def check_base(record: dict[str, Any], model: nn.Module, path: Path) -> None:
    """The base must be the very weights the adapters were trained on."""
    wanted, source = record["base"].get("sha256"), record["base"].get("source") or {}
    found = weights_hash(model)
    if found != wanted:
        raise InputError(f"the adapters in '{path}' were trained on another base (weights sha256 {str(wanted)[:12]}, "
                         f"{source.get('id', 'unnamed')}); this base has sha256 {found[:12]}: load them with the base "
                         "they name")


def apply_adapter_file(loaded: Any, path: str | Path, *, merge: bool = True) -> nn.Module:
    """Give `loaded` (a LoadedModel of the base) the head and the adapters of the file, merged unless `merge` is
    False; returns the model (also in `loaded.model`), in eval mode, with its fine-tuning record."""
    from lowrank_cli.checkpoint.format import move_record, record_finetune
    from lowrank_cli.models.heads import replace_head

    path = Path(path).expanduser()
    record, tensors = read_adapter_file(path)
    check_base(record, loaded.model, path)
    finetune = record.get("finetune") or {}
    base = loaded.model
    head = replace_head(loaded, int(record["head"]["outputs"]), classes=record.get("classes"),
                        regression=record.get("task") == "regression")
    model = loaded.model
    if model is not base:
        move_record(base, model, head.renamed)
    method = method_for(AdapterConfig.from_record(record["adapters"]))
    method.apply(model)
    expected = set(method.adapter_tensors(model)) | set(head_tensors(model, head.modules))
    if set(tensors) != expected:
        extra, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
        raise InputError(f"the adapter file '{path}' does not fit its base: {len(missing)} missing tensor(s) "
                         f"({', '.join(missing[:2])}), {len(extra)} unexpected ({', '.join(extra[:2])}): it is damaged "
                         "or from another lrc; write it again")
    with torch.no_grad():
        model.load_state_dict(tensors, strict=False)
    if merge:
        method.merge(model)
    record_finetune(model, {**finetune, "merged": merge, "adapter_file": str(path)}, spec=loaded.spec,
                    source=loaded.source)
    return model.eval()
