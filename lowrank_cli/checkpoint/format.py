"""What an lrc checkpoint says about itself (see checkpoint/__init__ for the keys), and the accessors of a model's record."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lowrank_cli._version import __version__
from lowrank_cli.atomic import utf8_path
from lowrank_cli.errors import InputError
from lowrank_cli.layers.lowrank_linear import LowRankLinear
from lowrank_cli.models.families import family_of_spec
from lowrank_cli.models.spec import DEFAULT_LIBRARY, ModelSpec, json_safe

SCHEMA = 1


PREFIX = "lrc."
# A multi-task checkpoint (checkpoint.tasks): its tasks' own tensors are stored under this prefix, outside the
# model's state dict, and `lrc.multitask` describes them.
TASKS_PREFIX = "tasks/"
MULTITASK_SCHEMA = 1
MULTITASK_MODES = ("shared", "experts", "merge", "orthogonal")


@dataclass
class CheckpointInfo:
    """What an lrc checkpoint says about itself; also attached to models lrc builds, as `model.lrc_info`."""

    spec: ModelSpec
    ranks: dict[str, int] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    dense: dict[str, str] = field(default_factory=dict)
    spectra: dict[str, list[float]] = field(default_factory=dict)
    recovery: dict[str, Any] | None = None
    plan: dict[str, Any] | None = None
    finetune: dict[str, Any] | None = None
    multitask: dict[str, Any] | None = None  # a multi-task checkpoint's tasks (checkpoint.tasks)
    schema: int = SCHEMA
    lrc_version: str = __version__
    path: Path | None = None


# The attribute that carries a model's record. Read it with info_of and change it through the functions below:
# one place knows how the record is attached, so no module sets attributes on models behind another's back.
ATTRIBUTE = "lrc_info"


def info_of(model: nn.Module) -> CheckpointInfo | None:
    """The lrc record of a model lrc built or loaded (None for any other model)."""
    return getattr(model, ATTRIBUTE, None)


def attach_info(model: nn.Module, info: CheckpointInfo) -> CheckpointInfo:
    """Give `model` its record (what `lowrank_cli.save` writes); returns it."""
    setattr(model, ATTRIBUTE, info)
    return info


def info_for_saving(model: nn.Module) -> CheckpointInfo:
    """The model's record, or a new one describing any model its family can describe (how to rebuild it)."""
    from lowrank_cli.models.build import spec_of

    return info_of(model) or CheckpointInfo(spec=spec_of(model))


def record_source(model: nn.Module, source: dict[str, Any]) -> None:
    """Note where the dense weights came from (kind, id, revision / sha256) in the model's provenance."""
    info = info_of(model) or attach_info(model, info_for_saving(model))
    info.provenance["source"] = source


def record_recovery(model: nn.Module, recovery: dict[str, Any], *, spec: ModelSpec,
                    source: dict[str, Any] | None = None) -> None:
    """Record a recovery run (settings, accuracy) on a low-rank model; a low-rank model lrc did not build (a
    LoadedModel made by hand) is described first from `spec` and `source`, as lrc would have."""
    info = info_of(model) or attach_info(model, CheckpointInfo(
        spec=spec, ranks=lowrank_ranks(model), provenance={"source": source} if source is not None else {}))
    info.recovery = recovery


def record_finetune(model: nn.Module, finetune: dict[str, Any], *, spec: ModelSpec,
                    source: dict[str, Any] | None = None) -> None:
    """Record a fine-tuning run (method, head, classes or task, settings, scores) on a model, and the spec that
    rebuilds it with its new head; a model lrc did not describe yet (a dense source) is described first."""
    info = info_of(model) or attach_info(model, CheckpointInfo(
        spec=spec, ranks=lowrank_ranks(model), provenance={"source": source} if source is not None else {}))
    info.spec = spec
    info.finetune = finetune


def move_record(old: nn.Module, new: nn.Module, renamed: dict[str, str]) -> None:
    """Give `new` the record of `old` (a transformers encoder put inside a task class), following the modules that
    moved (`encoder.layer.0...` becomes `bert.encoder.layer.0...`): the per-layer records are keyed by name."""
    info = info_of(old)
    if info is None:
        return
    attach_info(new, info)
    for table in (info.layers, info.dense, info.spectra):
        moved = {renamed.get(k, k): v for k, v in table.items()}
        table.clear()
        table.update(moved)


def lowrank_ranks(model: nn.Module) -> dict[str, int]:
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def open_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    from safetensors import safe_open

    from lowrank_cli.checkpoint.shards import TensorSet, index_of

    if index_of(path) is not None:  # a sharded set: the record sits in its index, the shapes in the shards
        tensors = TensorSet.open(path)
        return tensors.metadata, tensors.shapes
    if not path.exists():
        raise InputError(f"'{path}' does not exist: check the path")
    if not path.is_file():
        raise InputError(f"'{path}' is not a file")
    try:
        with utf8_path(path) as name, safe_open(name, framework="pt") as f:
            meta = f.metadata() or {}  # may be None for files written without metadata
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own types for bad headers, truncation, wrong format
        raise InputError(
            f"'{path}' is not a readable safetensors file ({str(e).splitlines()[0][:160]}): it may be truncated or "
            "corrupt; write it again"
        ) from None
    return meta, shapes


def header_dtypes(path: Path) -> dict[str, str]:
    """{tensor name: its dtype as the header says it (torch's name: float32, int8, ...)}, without reading a tensor."""
    from safetensors import safe_open

    from lowrank_cli.checkpoint.shards import TensorSet, index_of

    if index_of(path) is not None:
        return {k: DTYPE_NAMES.get(e.dtype, e.dtype) for k, e in TensorSet.open(path).entries.items()}
    with utf8_path(path) as name, safe_open(name, framework="pt") as f:
        return {k: DTYPE_NAMES.get(f.get_slice(k).get_dtype(), f.get_slice(k).get_dtype()) for k in f.keys()}


# safetensors' dtype codes by the names torch gives them (the others, e.g. F8_E4M3, are shown as safetensors writes them).
DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
               "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def is_lrc_checkpoint(path: str | Path) -> bool:
    meta, _ = open_header(Path(path))
    return PREFIX + "schema" in meta


def _json(meta: dict[str, str], key: str, default: Any, path: Path) -> Any:
    """One `lrc.*` value, parsed and checked against SHAPES before anything is built from it (its size was checked
    by `check_sizes` before)."""
    if PREFIX + key not in meta:
        return default
    try:
        value = json.loads(meta[PREFIX + key])
    except json.JSONDecodeError:
        raise InputError(f"'{path}': metadata '{PREFIX}{key}' is not valid JSON: the file is corrupt; write it again") from None
    except RecursionError:
        raise InputError(f"'{path}': metadata '{PREFIX}{key}' is nested deeper than JSON can be read (lrc writes at "
                         f"most {MAX_DEPTH} levels): the file is corrupt or was edited; write it again") from None
    if _depth(value) > MAX_DEPTH:
        raise InputError(f"'{path}': metadata '{PREFIX}{key}' is nested more than {MAX_DEPTH} levels deep, deeper than "
                         "lrc writes: the file is corrupt or was edited; write it again")
    problem = None if value is None and default is None else _shape_problem(key, value)
    if problem:
        raise InputError(f"'{path}': metadata '{PREFIX}{key}' {problem}: the file is corrupt; write it again")
    return value


# How deep a JSON value may nest (a transformers config inside model_args, a task's adapters inside multitask: < 10).
MAX_DEPTH = 64
# The plain `lrc.*` strings (schema, version, library, architecture) are names and numbers.
MAX_NAME = 256
# The JSON values grow with the model: per-layer records with the number of tensors, spectra with the layers' widths.
# This much, plus 4 kB per tensor and 16 characters per row or column of each tensor, is far more than lrc writes.
BASE_LIMIT = 1 << 20
NAMES = ("schema", "version", "library", "architecture")


def metadata_limit(shapes: dict[str, tuple[int, ...]]) -> int:
    """The most characters one `lrc.*` JSON value of a file with these tensors may hold."""
    return BASE_LIMIT + 4096 * len(shapes) + 16 * sum(sum(shape) for shape in shapes.values())


def check_sizes(meta: dict[str, str], shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    """Refuse an `lrc.*` value far larger than lrc writes for these tensors (a 100 MB string), before it is parsed."""
    limit = metadata_limit(shapes)
    for key, value in meta.items():
        if not key.startswith(PREFIX):
            continue
        most = MAX_NAME if key[len(PREFIX):] in NAMES else limit
        if len(value) > most:
            raise InputError(f"'{path}': metadata '{key}' holds {len(value):,} characters, more than lrc writes there "
                             f"for a file of {len(shapes)} tensors (at most {most:,}): the file is corrupt or was "
                             "edited; write it again")


def _depth(value: Any) -> int:
    """How deep `value` nests (1 for a flat object), counted without recursion, stopping past MAX_DEPTH."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, (dict, list)):
            continue
        deepest = max(deepest, depth)
        if depth > MAX_DEPTH:
            break
        stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


# What each JSON value must be: a mapping, and what its values must be (None: anything JSON).
SHAPES: dict[str, Any] = {
    "model_args": None, "pretrained_cfg": None, "provenance": None, "recovery": None, "plan": None, "finetune": None,
    "multitask": None,
    "ranks": "rank", "layers": dict, "dense": str, "spectra": list,
}
MAX_RANK = 1 << 20


def _shape_problem(key: str, value: Any) -> str | None:
    if not isinstance(value, dict):
        return f"is a {type(value).__name__}, not a JSON object"
    kind = SHAPES.get(key)
    for name, item in value.items():
        if kind == "rank":
            if not (isinstance(item, int) and not isinstance(item, bool) and 0 < item <= MAX_RANK):
                return f"gives '{name}' the rank {json.dumps(item)}: a rank is a whole number from 1 to {MAX_RANK}"
        elif kind is not None and not isinstance(item, kind):
            return f"gives '{name}' a {type(item).__name__}, not a {kind.__name__}"
        if kind is list and not all(isinstance(v, (int, float)) for v in item):
            return f"gives '{name}' a list that is not all numbers"
    return None


def read_info(path: str | Path) -> tuple[CheckpointInfo, dict[str, tuple[int, ...]]]:
    """The checkpoint's metadata and tensor shapes, without reading any tensor."""
    path = Path(path)
    meta, shapes = open_header(path)
    check_sizes(meta, shapes, path)
    if PREFIX + "schema" not in meta:
        raise InputError(f"'{path}' is a safetensors file without lrc metadata: not written by lrc (use `arch` with report)")
    try:
        schema = int(meta[PREFIX + "schema"])
    except ValueError:
        raise InputError(f"'{path}': unreadable lrc schema '{meta[PREFIX + 'schema']}': the file is corrupt") from None
    if schema > SCHEMA:
        raise InputError(
            f"'{path}' was written by lrc {meta.get(PREFIX + 'version', '?')} (file schema {schema}); this lrc "
            f"{__version__} reads schema <= {SCHEMA}: upgrade lrc"
        )
    if PREFIX + "architecture" not in meta:
        raise InputError(f"'{path}': lrc metadata names no architecture: the file is corrupt; write it again")
    spec = ModelSpec(
        architecture=meta[PREFIX + "architecture"],
        model_args=_json(meta, "model_args", {}, path),
        pretrained_cfg=_json(meta, "pretrained_cfg", {}, path),
        library=meta.get(PREFIX + "library", DEFAULT_LIBRARY),
        family=meta.get(PREFIX + "family"),
    )
    info = CheckpointInfo(
        spec=spec,
        ranks=_json(meta, "ranks", {}, path),
        provenance=_json(meta, "provenance", {}, path),
        layers=_json(meta, "layers", {}, path),
        dense=_json(meta, "dense", {}, path),
        spectra=_json(meta, "spectra", {}, path),
        recovery=_json(meta, "recovery", None, path),
        plan=_json(meta, "plan", None, path),
        finetune=_json(meta, "finetune", None, path),
        multitask=_multitask(meta, shapes, path),
        schema=schema,
        lrc_version=meta.get(PREFIX + "version", "?"),
        path=path,
    )
    return info, shapes


def multitask_problem(value: Any) -> str | None:
    """What is wrong with an `lrc.multitask` record (None when it is one this lrc reads): a known mode, a non-empty
    list of tasks with unique names, each with its head (modules, outputs) and, in `experts` mode, its adapters."""
    if not isinstance(value, dict):
        return f"is a {type(value).__name__}, not a JSON object"
    if not (isinstance(value.get("schema"), int) and value["schema"] >= 1):
        return "has no schema number"
    if value.get("mode") not in MULTITASK_MODES:
        return f"has the mode {json.dumps(value.get('mode'))}, not one of {', '.join(MULTITASK_MODES)}"
    tasks = value.get("tasks")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, dict) for t in tasks):
        return "has no tasks (a non-empty list of objects)"
    names = [t.get("name") for t in tasks]
    if not all(isinstance(n, str) and n and "/" not in n for n in names):
        return f"names a task {json.dumps(next(n for n in names if not (isinstance(n, str) and n and '/' not in n)))}"
    if len(set(names)) != len(names):
        return f"names the task '{next(n for n in names if names.count(n) > 1)}' twice"
    for t in tasks:
        head = t.get("head")
        if not (isinstance(head, dict) and isinstance(head.get("outputs"), int) and head["outputs"] > 0
                and isinstance(head.get("modules"), list) and head["modules"]
                and all(isinstance(m, str) for m in head["modules"])):
            return f"gives the task '{t['name']}' no head (modules and outputs)"
        if t.get("task") not in ("classification", "regression"):
            return f"gives the task '{t['name']}' the kind {json.dumps(t.get('task'))}, not classification or regression"
        if value["mode"] == "experts" and not isinstance(t.get("adapters"), dict):
            return f"gives the task '{t['name']}' no adapters, which `experts` mode needs"
    return None


def _multitask(meta: dict[str, str], shapes: dict[str, tuple[int, ...]], path: Path) -> dict[str, Any] | None:
    """The `lrc.multitask` record, checked: a newer layout is refused with "upgrade lrc", and every task it names
    must have its head's tensors in the file."""
    value = _json(meta, "multitask", None, path)
    if value is None:
        return None
    what = f"'{path}': metadata '{PREFIX}multitask'"
    schema = value.get("schema") if isinstance(value, dict) else None
    if isinstance(schema, int) and schema > MULTITASK_SCHEMA:
        raise InputError(f"'{path}' was written by lrc {meta.get(PREFIX + 'version', '?')} (multi-task schema "
                         f"{schema}); this lrc {__version__} reads schema <= {MULTITASK_SCHEMA}: upgrade lrc")
    problem = multitask_problem(value)
    if problem:
        raise InputError(f"{what} {problem}: the file is corrupt; write it again")
    for task in value["tasks"]:
        if not any(k.startswith(f"{TASKS_PREFIX}{task['name']}/head/") for k in shapes):
            raise InputError(f"{what} names the task '{task['name']}', whose head has no tensors in the file: the file "
                             "is corrupt; write it again")
    return value


def _compact(values: list[float]) -> list[float]:
    top = max(values) if values else 1.0
    return [float(f"{v / top:.4g}") for v in values] if top > 0 else values


def metadata_of(model: nn.Module, info: CheckpointInfo) -> dict[str, str]:
    ranks = lowrank_ranks(model)
    meta = {
        "format": "pt",
        PREFIX + "schema": str(SCHEMA),
        PREFIX + "version": __version__,
        PREFIX + "library": info.spec.library,
        PREFIX + "family": family_of_spec(info.spec).name,
        PREFIX + "architecture": info.spec.architecture,
        PREFIX + "model_args": json.dumps(json_safe(info.spec.model_args)),
        PREFIX + "pretrained_cfg": json.dumps(json_safe(info.spec.pretrained_cfg)),
        PREFIX + "ranks": json.dumps(ranks),
        PREFIX + "provenance": json.dumps(json_safe(info.provenance)),
        PREFIX + "layers": json.dumps(json_safe({k: v for k, v in info.layers.items() if k in ranks})),
        PREFIX + "dense": json.dumps(info.dense),
        PREFIX + "spectra": json.dumps({k: _compact(v) for k, v in info.spectra.items()}),
    }
    if info.recovery is not None:
        meta[PREFIX + "recovery"] = json.dumps(json_safe(info.recovery))
    if info.plan is not None:
        meta[PREFIX + "plan"] = json.dumps(json_safe(info.plan))
    if info.finetune is not None:
        meta[PREFIX + "finetune"] = json.dumps(json_safe(info.finetune))
    if info.multitask is not None:
        meta[PREFIX + "multitask"] = json.dumps(json_safe(info.multitask))
    return meta
