"""`lrc report`: what a model costs (parameters, MACs), what factorization saved, and what the file says about itself.


    report = build_report("deit_lr.safetensors")              # any MODEL source, or a plain safetensors file
    report.document["compression"]                            # {"params": 1.96, "macs": 1.91}
    failed = apply_gates(report, max_params=50_000_000)       # CI gates (evaluation.gates): the failed ones

The per-layer rows are built in `evaluation.report_layers`, the text forms (tables, markdown) in
`evaluation.report_format`.

`Report.document` is the `--json` output: plain JSON types only, with the keys documented in
docs/report_schema.md (`schema` is bumped whenever a key changes meaning or goes away).

Counting conventions:
- Parameters are counted exactly, each shared tensor once, split into low-rank layers, plain nn.Linear layers and
  everything else (embeddings, norms, convs, tokens). A plain safetensors file without lrc metadata and without
  `--arch` is counted from its header (tensor shapes), nothing is loaded.
- MACs are fvcore's multiply-accumulates for one image (batch 1) at the model's own input size, with the
  handles lrc adds (fused attention, ...); FLOPs = 2 x MACs. Ops fvcore still cannot count are listed in
  `macs.uncounted`, never dropped silently.
- The dense reference is the `--compare` model measured at the same input size, or, without it, the model with
  every low-rank layer put back to the dense layer it replaced: d_in*d_out parameters instead of r*(d_in+d_out),
  and `tokens` times that in MACs, where `tokens` (rows the layer sees per image) is measured from fvcore's
  per-module count of the layer's first factor. A model without low-rank layers is its own reference (1.0x).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from lowrank_cli._version import __version__
from lowrank_cli.atomic import utf8_path
from lowrank_cli.checkpoint.format import info_of
from lowrank_cli.errors import InputError
from lowrank_cli.evaluation.report_layers import layer_rows
from lowrank_cli.evaluation.report_lm import decode_doc, ratio_doc
from lowrank_cli.models.families import family_of
from lowrank_cli.models.inputs import check_input_size, default_input_size

REPORT_SCHEMA = 1

# Provenance keys that lrc factorize writes; anything else goes to provenance["other"].
_PROVENANCE_KEYS = ("source", "kappa", "rank_multiple", "svd", "dtype", "saved")
# Batch-norm statistics are tensors in a state dict but not parameters.
_NOT_PARAMS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class Report:
    """`document` is the JSON report; `checkpoint` (the lrc metadata, spectra included) feeds `--plot`."""

    document: dict[str, Any]
    checkpoint: Any = None  # CheckpointInfo or None

    @property
    def failed_gates(self) -> list[dict[str, Any]]:
        return [g for g in self.document["gates"] if not g["passed"]]


# ------------------------------------------------------------------------------------------------ building


def build_report(
    source: str,
    *,
    arch: str | None = None,
    model_args: dict[str, Any] | None = None,
    revision: str | None = None,
    input_size: tuple[int, ...] | None = None,
    seq_len: int | None = None,
    context_len: int | None = None,
    compare: str | None = None,
    library: str | None = None,
    log: Callable[[str], None] | None = None,
) -> Report:
    """The report of any MODEL source (timm name, hf-hub:, local-dir:, folder, weights file + arch, lrc
    checkpoint) or of a plain safetensors file without lrc metadata (counted from its header unless `arch`). A
    causal LM's MACs are its prefill at `seq_len` tokens, with the cost of one generated token at `context_len`
    tokens of context (default `seq_len`) and its KV cache (`decode`)."""
    from lowrank_cli.adapters.loading import load_model

    log = log or (lambda msg: None)
    path = Path(source).expanduser()
    if not arch and path.is_file() and path.suffix == ".safetensors" and not _is_lrc_file(path):
        report = _report_tensor_shapes(path, source)
        if compare:
            reference = measure_reference(compare, input_size=input_size, log=log, count_macs_too=False)
            _set_reference(report.document, reference)
        return report
    loaded = load_model(source, arch=arch, model_args=model_args, revision=revision, library=library, log=log)
    source_doc = _source_doc(source, loaded.source)
    reference = None
    check_input_size(loaded.model, input_size)
    size = input_size if seq_len is None and input_size else default_input_size(loaded.model, seq_len)
    if compare:
        reference = measure_reference(
            compare, input_size=size, log=log, library=library,
            arch=arch if _is_bare_file(compare) else None,
            model_args=model_args if _is_bare_file(compare) else None,
            expect_arch=loaded.spec.architecture,
        )
    what = f"{size[0]} tokens" if len(size) == 1 else f"input size {'x'.join(map(str, size))}"
    log(f"Counting MACs at {what} (fvcore, batch 1)")
    return report_model(
        loaded.model, input_size=size, source=source_doc, spec=loaded.spec, checkpoint=loaded.checkpoint,
        reference=reference, context_len=context_len,
    )


def report_model(
    model: nn.Module,
    *,
    input_size: tuple[int, ...] | None = None,
    source: dict[str, Any] | None = None,
    spec: Any = None,
    checkpoint: Any = None,
    reference: dict[str, Any] | None = None,
    context_len: int | None = None,
) -> Report:
    """The report of a model in memory (dense, factorized by `lowrank_cli.factorize`, or loaded by lrc).

    `checkpoint` defaults to the model's lrc record (`checkpoint.format.info_of`); `reference` is a measured dense
    reference (`measure_reference`); without it the reference is reconstructed from the low-rank layers (or is the
    model itself when dense). A causal LM also gets `decode`: one generated token at `context_len` tokens of
    context (default its sequence length).
    """
    from lowrank_cli.evaluation.counting import count_macs, count_params

    checkpoint = checkpoint if checkpoint is not None else info_of(model)
    spec = spec if spec is not None else getattr(checkpoint, "spec", None)
    size = tuple(input_size or default_input_size(model))
    params = count_params(model)
    macs = count_macs(model, size)
    layers = layer_rows(model, macs.by_module, checkpoint)
    document = _skeleton(source or {"argument": None, "kind": "model", "id": type(model).__name__})
    known = (spec.architecture, spec.library) if spec is not None else family_of(model).describe(model)
    document["model"] = {
        "architecture": known[0],
        "library": known[1],
        "model_args": dict(spec.model_args) if spec is not None else {},
        "input_size": list(size),
        "dtype": _model_dtype(model),
    }
    document["params"] = {
        "total": params.total, "lowrank": params.lowrank, "dense_linear": params.dense_linear,
        "other": params.other, "counted_from": "model",
    }
    document["macs"] = {
        "total": macs.total, "flops": macs.flops, "batch": 1, "by_operator": dict(macs.by_operator),
        "uncounted": dict(macs.uncounted), "note": None,
    }
    document["layers"] = layers
    if checkpoint is not None:
        document["provenance"] = _provenance(checkpoint)
        document["recovery"] = checkpoint.recovery
        if checkpoint.finetune is not None:  # optional: reports of other checkpoints stay as they were
            document["finetune"] = checkpoint.finetune
        if getattr(checkpoint, "multitask", None) is not None:  # optional too: a multi-task checkpoint's tasks
            document["multitask"], document["tasks"] = _multitask_doc(checkpoint.multitask)
    document["ratio"] = ratio_doc(layers, checkpoint.provenance if checkpoint is not None else None,
                                  document["provenance"])
    decode = decode_doc(model, layers, context_len, size[0])
    if decode is not None:
        document["decode"] = decode
    _set_reference(document, reference if reference is not None else _rebuilt_reference(document))
    return Report(document, checkpoint)


def _multitask_doc(record: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the multi-task settings: mode, method, overall, ...; one row per task) of an `lrc.multitask` record."""
    rows = []
    for task in record["tasks"]:
        metric = task.get("metric")
        rows.append({
            "name": task["name"], "task": task["task"], "classes": task.get("classes"), "pairs": bool(task.get("pairs")),
            "metric": metric, "held_out": held_out_score(task.get("scores"), metric),
            "trainable_parameters": task.get("trainable_parameters"), "data": task.get("data"),
        })
    return {k: v for k, v in record.items() if k != "tasks"}, rows


def held_out_score(scores: Any, metric: str | None) -> float | None:
    """A task's held-out `metric` after training, from its recorded scores ({"val_top1": ...}, {"top1": ...}, or a
    fine-tuning's {"after": {...}}); None when they do not say."""
    if not isinstance(scores, dict) or not metric:
        return None
    if isinstance(scores.get("after"), dict):
        scores = scores["after"]
    for key in (metric, f"val_{metric}"):
        if isinstance(scores.get(key), (int, float)) and not isinstance(scores.get(key), bool):
            return float(scores[key])
    return None


def _rebuilt_reference(document: dict[str, Any]) -> dict[str, Any]:
    """The dense model without measuring one: every low-rank layer put back to the dense layer it replaced, or
    the model itself when it has no low-rank layer."""
    params, macs = document["params"]["total"], document["macs"]["total"]
    lowrank = [r for r in document["layers"] if r["kind"] == "lowrank"]
    if not lowrank:
        return {"kind": "self", "source": None, "params": params, "macs": macs}
    return {
        "kind": "reconstructed",
        "source": None,
        "params": params + sum(r["dense_params"] - r["params"] for r in lowrank),
        "macs": macs + sum(r["dense_macs"] - r["macs"] for r in lowrank),
    }


def measure_reference(
    source: str,
    *,
    input_size: tuple[int, ...] | None = None,
    arch: str | None = None,
    model_args: dict[str, Any] | None = None,
    revision: str | None = None,
    expect_arch: str | None = None,
    count_macs_too: bool = True,
    library: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The `--compare` model, measured for real: {"kind": "compare", "source", "params", "macs"}."""
    from lowrank_cli.adapters.loading import load_model
    from lowrank_cli.evaluation.counting import count_macs, count_params

    log = log or (lambda msg: None)
    log(f"Loading the `compare` model {source}")
    loaded = load_model(source, arch=arch, model_args=model_args, revision=revision, library=library, log=log)
    if expect_arch and loaded.spec.architecture != expect_arch:
        log(f"Note: `compare` {source} is {loaded.spec.architecture}, the reported model is {expect_arch}")
    macs = None
    if count_macs_too:
        size = tuple(input_size or default_input_size(loaded.model))
        try:
            macs = count_macs(loaded.model, size).total
        except InputError as e:  # e.args[0]: the message as raised, its `parameters` left for the caller to render
            raise InputError(f"`compare` {source}: {e.args[0]}") from None
    return {"kind": "compare", "source": source, "params": count_params(loaded.model).total, "macs": macs}


def _skeleton(source: dict[str, Any]) -> dict[str, Any]:
    return {
        "schema": REPORT_SCHEMA,
        "lrc_version": __version__,
        "source": source,
        "model": None,
        "params": None,
        "macs": None,
        "dense_reference": None,
        "compression": None,
        "ratio": None,
        "provenance": None,
        "recovery": None,
        "layers": [],
        "gates": [],
    }


def _set_reference(document: dict[str, Any], reference: dict[str, Any] | None) -> None:
    document["dense_reference"] = reference
    if reference is None:
        document["compression"] = None
        return
    params, macs = document["params"]["total"], document["macs"]["total"]
    document["compression"] = {
        "params": reference["params"] / params if params else None,
        "macs": reference["macs"] / macs if macs and reference.get("macs") is not None else None,
    }


def _is_lrc_file(path: Path) -> bool:
    from lowrank_cli.checkpoint.format import is_lrc_checkpoint

    return is_lrc_checkpoint(path)  # raises InputError for a truncated / corrupt file


def _is_bare_file(source: str) -> bool:
    path = Path(source).expanduser()
    return path.is_file() and not (path.suffix == ".safetensors" and _is_lrc_file(path))


def _file_facts(path: Path) -> tuple[str, int]:
    from lowrank_cli.models.weights import file_sha256

    return file_sha256(path), path.stat().st_size


def _source_doc(argument: str, loaded_source: dict[str, Any]) -> dict[str, Any]:
    doc = {
        "argument": argument,
        "kind": loaded_source.get("kind"),
        "id": loaded_source.get("id"),
        "revision": loaded_source.get("revision"),
        "sha256": loaded_source.get("sha256"),
        "file_bytes": None,
    }
    path = Path(argument).expanduser()
    if path.is_file():
        sha, size = _file_facts(path) if doc["sha256"] is None else (doc["sha256"], path.stat().st_size)
        doc["sha256"], doc["file_bytes"] = sha, size
    return doc


def _model_dtype(model: nn.Module) -> str | None:
    for p in model.parameters():
        if p.is_floating_point():
            return str(p.dtype).removeprefix("torch.")
    return None


def _provenance(info: Any) -> dict[str, Any]:
    stored = dict(info.provenance or {})
    doc = {key: stored.pop(key, None) for key in _PROVENANCE_KEYS}
    doc["lrc_version"] = info.lrc_version
    doc["file_schema"] = info.schema
    doc["factorized"] = len(info.ranks)
    doc["left_dense"] = dict(info.dense or {})
    doc["other"] = stored
    return doc


def _report_tensor_shapes(path: Path, argument: str) -> Report:
    """A safetensors file with no lrc metadata and no --arch: parameters from the header, no MACs."""
    from safetensors import safe_open

    from lowrank_cli.checkpoint.format import open_header

    open_header(path)  # the one place that turns a bad header / truncation into a clear InputError
    total, dtypes = 0, {}
    with utf8_path(path) as name, safe_open(name, framework="pt") as f:
        for key in f.keys():
            if key.rsplit(".", 1)[-1] in _NOT_PARAMS:
                continue
            piece = f.get_slice(key)
            dtype = piece.get_dtype()
            if not dtype.startswith(("F", "BF")):  # integer tensors are indices / counters, not weights
                continue
            n = math.prod(piece.get_shape())
            total += n
            dtypes[dtype] = dtypes.get(dtype, 0) + n
    sha, size = _file_facts(path)
    document = _skeleton({
        "argument": argument, "kind": "safetensors", "id": str(path.resolve()), "revision": None,
        "sha256": sha, "file_bytes": size,
    })
    names = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    main_dtype = max(dtypes, key=dtypes.get) if dtypes else None
    document["model"] = {"architecture": None, "library": None, "model_args": {}, "input_size": None,
                         "dtype": names.get(main_dtype, main_dtype)}
    document["params"] = {"total": total, "lowrank": None, "dense_linear": None, "other": None,
                          "counted_from": "tensor_shapes"}
    document["macs"] = {
        "total": None, "flops": None, "batch": 1, "by_operator": {}, "uncounted": {},
        "note": "not counted: a plain weights file does not say which model runs it; pass --arch NAME "
                "(and --model-arg KEY=VALUE as needed) to count MACs",
    }
    return Report(document, None)
