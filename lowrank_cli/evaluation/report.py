"""`lrc report`: what a model costs (parameters, MACs), what factorization saved, and what the file says about itself.


    report = build_report("deit_lr.safetensors")              # any MODEL source, or a plain safetensors file
    report.document["compression"]                            # {"params": 1.96, "macs": 1.91}
    failed = apply_gates(report, max_params=50_000_000)       # CI gates; failed ones are returned

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
from lowrank_cli.checkpoint.format import info_of
from lowrank_cli.errors import InputError, UsageError

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
    compare: str | None = None,
    library: str | None = None,
    log: Callable[[str], None] | None = None,
) -> Report:
    """The report of any MODEL source (timm name, hf-hub:, local-dir:, folder, weights file + arch, lrc
    checkpoint) or of a plain safetensors file without lrc metadata (counted from its header unless `arch`)."""
    from lowrank_cli.models.sources import load_model

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
    from lowrank_cli.models.inputs import check_input_size

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
        reference=reference,
    )


def report_model(
    model: nn.Module,
    *,
    input_size: tuple[int, ...] | None = None,
    source: dict[str, Any] | None = None,
    spec: Any = None,
    checkpoint: Any = None,
    reference: dict[str, Any] | None = None,
) -> Report:
    """The report of a model in memory (dense, factorized by `lowrank_cli.factorize`, or loaded by lrc).

    `checkpoint` defaults to the model's lrc record (`checkpoint.format.info_of`); `reference` is a measured dense reference (`measure_reference`);
    without it the reference is reconstructed from the low-rank layers (or is the model itself when dense).
    """
    from lowrank_cli.evaluation.counting import count_macs, count_params

    checkpoint = checkpoint if checkpoint is not None else info_of(model)
    spec = spec if spec is not None else getattr(checkpoint, "spec", None)
    size = tuple(input_size or default_input_size(model))
    params = count_params(model)
    macs = count_macs(model, size)
    layers = _layer_rows(model, macs.by_module, checkpoint)
    document = _skeleton(source or {"argument": None, "kind": "model", "id": type(model).__name__})
    timm_arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    document["model"] = {
        "architecture": spec.architecture if spec is not None else timm_arch,
        "library": spec.library if spec is not None else ("timm" if timm_arch else None),
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
    lowrank = [r for r in layers if r["kind"] == "lowrank"]
    if reference is None:
        if lowrank:
            reference = {
                "kind": "reconstructed",
                "source": None,
                "params": params.total + sum(r["dense_params"] - r["params"] for r in lowrank),
                "macs": macs.total + sum(r["dense_macs"] - r["macs"] for r in lowrank),
            }
        else:
            reference = {"kind": "self", "source": None, "params": params.total, "macs": macs.total}
    _set_reference(document, reference)
    return Report(document, checkpoint)


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
    from lowrank_cli.evaluation.counting import count_macs, count_params
    from lowrank_cli.models.sources import load_model

    log = log or (lambda msg: None)
    log(f"Loading the --compare model {source}")
    loaded = load_model(source, arch=arch, model_args=model_args, revision=revision, library=library, log=log)
    if expect_arch and loaded.spec.architecture != expect_arch:
        log(f"Note: --compare {source} is {loaded.spec.architecture}, the reported model is {expect_arch}")
    macs = None
    if count_macs_too:
        size = tuple(input_size or default_input_size(loaded.model))
        try:
            macs = count_macs(loaded.model, size).total
        except InputError as e:
            raise InputError(f"--compare {source}: {e}") from None
    return {"kind": "compare", "source": source, "params": count_params(loaded.model).total, "macs": macs}


def default_input_size(model: nn.Module, seq_len: int | None = None) -> tuple[int, ...]:
    """(C, H, W) the model is built for (its pretrained_cfg, corrected for img_size / in_chans overrides), or
    (seq_len,) for a text model."""
    from lowrank_cli.models import inputs as model_inputs

    try:
        return model_inputs.default_input_size(model, seq_len)
    except InputError:  # e.g. 4 input channels: no image mode, but the size is still known
        import timm.data

        return tuple(int(v) for v in timm.data.resolve_data_config({}, model=model)["input_size"])


# ------------------------------------------------------------------------------------------------ gates


def apply_gates(
    report: Report,
    *,
    max_params: int | None = None,
    max_macs: int | None = None,
    min_compression: float | None = None,
) -> list[dict[str, Any]]:
    """Evaluate the CI gates, record them in `report.document["gates"]`, return the failed ones.

    A gate that cannot be evaluated (no MACs without the architecture, no compression without a dense
    reference) is a UsageError: a CI gate must never pass for want of a number.
    """
    doc = report.document
    gates = []
    if max_params is not None:
        value = doc["params"]["total"]
        gates.append({"name": "max_params", "option": "--max-params", "limit": max_params, "value": value,
                      "passed": value <= max_params})
    if max_macs is not None:
        value = doc["macs"]["total"]
        if value is None:
            raise UsageError(
                "--max-macs needs the MACs, which a plain weights file does not give: pass --arch NAME "
                "(and --model-arg KEY=VALUE as needed) so lrc can build the model"
            )
        gates.append({"name": "max_macs", "option": "--max-macs", "limit": max_macs, "value": value,
                      "passed": value <= max_macs})
    if min_compression is not None:
        if doc["compression"] is None:
            raise UsageError(
                "--min-compression needs a dense reference, and this file has no lrc metadata to rebuild one: "
                "pass --compare MODEL (the dense source, e.g. --compare deit_base)"
            )
        value = doc["compression"]["params"]
        gates.append({"name": "min_compression", "option": "--min-compression", "limit": min_compression,
                      "value": value, "passed": value >= min_compression})
    doc["gates"] = gates
    return report.failed_gates


def describe_gate(gate: dict[str, Any]) -> str:
    """'params 86.57M > 50.00M allowed', 'compression 1.96x >= 1.80x required', ..."""
    from lowrank_cli.evaluation.counting import format_size

    value, limit, ok = gate["value"], gate["limit"], gate["passed"]
    if gate["name"] == "min_compression":
        return f"compression {value:.2f}x {'>=' if ok else '<'} {limit:.2f}x required"
    what = "params" if gate["name"] == "max_params" else "MACs"
    return f"{what} {format_size(value)} {'<=' if ok else '>'} {format_size(limit)} allowed"


def parse_ratio(text: str | float | None) -> float | None:
    """--min-compression: 1.8 or 1.8x; must be a finite number > 0."""
    if text is None or isinstance(text, float):
        return text
    raw = str(text).strip().lower().removesuffix("x")
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"--min-compression '{text}' is not a ratio: write e.g. --min-compression 1.8")
    return value


# ------------------------------------------------------------------------------------------------ pieces


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


def _speedup(entry: Any) -> float | None:
    """A speed gain from a `--plan speed` entry, whatever its exact keys: an explicit ratio, or dense / low-rank
    timings."""
    if not isinstance(entry, dict):
        return None
    for key in ("speedup", "gain", "speed_gain"):
        if isinstance(entry.get(key), (int, float)):
            return float(entry[key])
    dense = next((v for k, v in entry.items() if "dense" in k and isinstance(v, (int, float))), None)
    low = next((v for k, v in entry.items() if ("lowrank" in k or "low_rank" in k) and isinstance(v, (int, float))), None)
    return float(dense) / float(low) if dense and low else None


def _layer_rows(model: nn.Module, by_module: dict[str, int], checkpoint: Any) -> list[dict[str, Any]]:
    """One row per linear of the model: low-rank layers and plain nn.Linear (not those inside a low-rank pair)."""
    from lowrank_cli.layers.lowrank_linear import LowRankLinear

    info_layers = getattr(checkpoint, "layers", None) or {}
    plan = getattr(checkpoint, "plan", None)
    plan_layers = plan.get("layers", {}) if isinstance(plan, dict) else {}
    plan_layers = plan_layers if isinstance(plan_layers, dict) else {}
    rows = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in inside):
            continue
        if isinstance(module, LowRankLinear):
            inside.append(name + ".")
            d_in, d_out, rank = module.in_features, module.out_features, module.rank
            params = sum(p.numel() for p in module.parameters())
            first, second = by_module.get(f"{name}.first", 0), by_module.get(f"{name}.second", 0)
            tokens = first // (d_in * rank)
            bias = d_out if module.second.bias is not None else 0
            meta = info_layers.get(name) or {}
            rows.append({
                "name": name, "kind": "lowrank", "d_in": d_in, "d_out": d_out, "rank": rank,
                "params": params, "macs": first + second, "tokens": tokens,
                "dense_params": d_in * d_out + bias, "dense_macs": tokens * d_in * d_out,
                "kept_energy": _float_or_none(meta.get("kept_energy")),
                "rel_error": _float_or_none(meta.get("rel_error")),
                "plan": plan_layers.get(name), "speedup": _speedup(plan_layers.get(name)),
            })
        elif isinstance(module, nn.Linear):
            d_in, d_out = module.in_features, module.out_features
            params = sum(p.numel() for p in module.parameters(recurse=False))
            macs = by_module.get(name, 0)
            rows.append({
                "name": name, "kind": "dense", "d_in": d_in, "d_out": d_out, "rank": None,
                "params": params, "macs": macs, "tokens": macs // (d_in * d_out),
                "dense_params": params, "dense_macs": macs,
                "kept_energy": None, "rel_error": None,
                "plan": plan_layers.get(name), "speedup": _speedup(plan_layers.get(name)),
            })
    return rows


def _float_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


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
    with safe_open(str(path), framework="pt") as f:
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


# ------------------------------------------------------------------------------------------------ markdown


def _fmt_params(n: int | None) -> str:
    from lowrank_cli.evaluation.counting import format_size

    return "-" if n is None else f"{format_size(n)} ({n:,})"


def summary_rows(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) lines shared by the terminal table and the markdown summary."""
    from lowrank_cli.evaluation.counting import format_size

    rows: list[tuple[str, str]] = []
    src = doc["source"]
    rows.append(("source", f"{src['argument'] or src['id']} ({src['kind']})"))
    model = doc["model"]
    if model["architecture"]:
        size = "x".join(map(str, model["input_size"])) if model["input_size"] else "?"
        if model["input_size"] and len(model["input_size"]) == 1:
            size = f"{model['input_size'][0]} tokens"
        rows.append(("model", f"{model['architecture']} ({model['library'] or '?'}), input {size}, {model['dtype']}"))
    p = doc["params"]
    rows.append(("parameters", _fmt_params(p["total"])))
    if p["counted_from"] == "model":
        rows.append(("  low-rank layers", _fmt_params(p["lowrank"])))
        rows.append(("  dense linears", _fmt_params(p["dense_linear"])))
        rows.append(("  other", _fmt_params(p["other"])))
    else:
        rows.append(("  counted from", "tensor shapes in the file header (no split by layer kind)"))
    m = doc["macs"]
    if m["total"] is None:
        rows.append(("MACs", m["note"]))
    else:
        rows.append(("MACs", f"{format_size(m['total'])} MACs = {format_size(m['flops'])} FLOPs "
                             f"(fvcore, batch 1; FLOPs = 2 x MACs)"))
        if m["uncounted"]:
            ops = ", ".join(f"{op} x{n}" for op, n in sorted(m["uncounted"].items()))
            rows.append(("  NOT counted", f"{ops} (fvcore has no handle: the MACs above leave these out)"))
        else:
            rows.append(("  uncounted ops", "none"))
    ref = doc["dense_reference"]
    if ref is not None:
        how = {"compare": f"--compare {ref['source']}, measured", "reconstructed": "rebuilt from the low-rank layers",
               "self": "the model itself: it has no low-rank layers"}[ref["kind"]]
        macs = f", {format_size(ref['macs'])} MACs" if ref["macs"] is not None else ""
        rows.append(("dense reference", f"{format_size(ref['params'])} params{macs} ({how})"))
    c = doc["compression"]
    if c is not None:
        text = f"{c['params']:.2f}x params" if c["params"] is not None else "? params"
        if c["macs"] is not None:
            text += f", {c['macs']:.2f}x MACs"
        rows.append(("compression", text))
    layers = doc["layers"]
    low = [r for r in layers if r["kind"] == "lowrank"]
    if layers:
        rows.append(("linears", f"{len(low)} low-rank, {len(layers) - len(low)} dense"))
    energies = [r["kept_energy"] for r in low if r["kept_energy"] is not None]
    if energies:
        rows.append(("kept energy", f"min {min(energies):.3f}, mean {sum(energies) / len(energies):.3f}, "
                                    f"max {max(energies):.3f} (sum of kept sigma^2 / sum of all)"))
    prov = doc["provenance"]
    if prov is not None:
        parts = [
            f"{k.replace('_', ' ')} {prov[k]:g}" if isinstance(prov[k], float) else f"{k.replace('_', ' ')} {prov[k]}"
            for k in ("kappa", "rank_multiple", "svd", "dtype") if prov[k] is not None
        ]
        src_info = prov["source"]
        if isinstance(src_info, dict):
            revision = f"@{src_info['revision'][:12]}" if src_info.get("revision") else ""
            parts.insert(0, f"from {src_info.get('id', '?')}{revision}")
        elif src_info:
            parts.insert(0, f"from {src_info}")
        parts.append(f"lrc {prov['lrc_version']}")
        if prov["saved"]:
            parts.append(f"saved {prov['saved']}")
        rows.append(("provenance", ", ".join(parts)))
        if prov["left_dense"]:
            rows.append(("  left dense", f"{len(prov['left_dense'])} target linear(s): "
                                         + "; ".join(f"{k} ({v})" for k, v in list(prov["left_dense"].items())[:3])
                                         + ("; ..." if len(prov["left_dense"]) > 3 else "")))
    if doc["recovery"] is not None:
        rows.append(("recovery", _flat(doc["recovery"])))
    for gate in doc["gates"]:
        rows.append((f"gate {gate['option']}", ("passed: " if gate["passed"] else "FAILED: ") + describe_gate(gate)))
    return rows


def _flat(value: Any, limit: int = 400) -> str:
    if isinstance(value, dict):
        text = ", ".join(f"{k} {_flat(v, limit)}" for k, v in value.items())
    elif isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, list):
        text = "[" + ", ".join(_flat(v, limit) for v in value[:6]) + (", ...]" if len(value) > 6 else "]")
    else:
        text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def layer_columns(doc: dict[str, Any]) -> list[str]:
    cols = ["layer", "d_in", "d_out", "rank", "params", "MACs", "kept energy"]
    if any(r["speedup"] is not None for r in doc["layers"]):
        cols.append("speed gain")
    return cols


def layer_cells(row: dict[str, Any], with_speed: bool) -> list[str]:
    from lowrank_cli.evaluation.counting import format_size

    cells = [
        row["name"], str(row["d_in"]), str(row["d_out"]),
        str(row["rank"]) if row["rank"] is not None else "dense",
        format_size(row["params"]), format_size(row["macs"]),
        f"{row['kept_energy']:.4f}" if row["kept_energy"] is not None else "-",
    ]
    if with_speed:
        cells.append(f"{row['speedup']:.2f}x" if row["speedup"] is not None else "-")
    return cells


def to_markdown(doc: dict[str, Any], per_layer: bool = False) -> str:
    """GitHub-flavoured markdown (for $GITHUB_STEP_SUMMARY): the totals, and the per-layer table if asked."""

    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    name = doc["source"]["argument"] or doc["source"]["id"]
    lines = [f"### lrc report: `{name}`", "", "| | |", "|---|---|"]
    for label, value in summary_rows(doc):
        indent = len(label) - len(label.lstrip())
        label = "&nbsp;&nbsp;" * (indent // 2) + label.strip()
        if label.startswith("gate "):
            value = ("✅ " if value.startswith("passed") else "❌ ") + value
        lines.append(f"| {cell(label)} | {cell(value)} |")
    if per_layer and doc["layers"]:
        cols = layer_columns(doc)
        align = "|".join("---" if i == 0 else "---:" for i in range(len(cols)))  # numbers right-aligned
        lines += ["", "| " + " | ".join(cols) + " |", f"|{align}|"]
        for row in doc["layers"]:
            lines.append("| " + " | ".join(cell(c) for c in layer_cells(row, len(cols) > 7)) + " |")
    return "\n".join(lines) + "\n"
