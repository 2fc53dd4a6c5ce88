"""A report document as text: the (label, value) summary lines and per-layer cells shared by the terminal tables
(`lrc report`) and GitHub-flavoured markdown (`lrc report --markdown`)."""

from __future__ import annotations

from typing import Any

from lowrank_cli.evaluation.counting import format_size
from lowrank_cli.evaluation.gates import describe_gate

Rows = list[tuple[str, str]]


def summary_rows(doc: dict[str, Any]) -> Rows:
    """(label, value) lines shared by the terminal table and the markdown summary."""
    rows = _source_rows(doc) + _param_rows(doc) + _mac_rows(doc) + _decode_rows(doc) + _reference_rows(doc)
    rows += _ratio_rows(doc) + _layer_rows(doc) + _provenance_rows(doc)
    if doc["recovery"] is not None:
        rows.append(("recovery", flat_text(doc["recovery"])))
    if doc.get("finetune"):
        rows.append(("fine-tuned", _finetune_text(doc["finetune"])))
    if doc.get("multitask"):
        rows.append(("multi-task", _multitask_text(doc["multitask"], doc["tasks"])))
    for gate in doc["gates"]:
        rows.append((f"gate {gate['option']}", ("passed: " if gate["passed"] else "FAILED: ") + describe_gate(gate)))
    return rows


def _finetune_text(record: dict[str, Any]) -> str:
    """Method, task, trainable share and the held-out score of an `lrc finetune` output, on one line."""
    task = (f"{len(record['classes'])} classes ({flat_text(record['classes'])})" if record.get("classes") else
            "a regression score")
    text = f"{record.get('method')}{'' if record.get('merged', True) else ' (not merged)'}, {task}"
    if record.get("trainable_share") is not None:
        text += f", {100 * record['trainable_share']:.2f} % of the parameters trained"
    scores = record.get("scores") or {}
    if scores.get("after") and scores.get("metric") in scores["after"]:
        text += f", held-out {scores['metric']} {scores['after'][scores['metric']]:.4g}"
    return text


def _multitask_text(settings: dict[str, Any], tasks: list[dict[str, Any]]) -> str:
    """How many tasks, the mode (and method), the overall score: the table `task_cells` lists the tasks."""
    text = f"{len(tasks)} tasks ({', '.join(t['name'] for t in tasks)}), {settings.get('mode')} mode"
    if settings.get("method"):
        text += f" ({settings['method']})"
    overall = settings.get("overall")
    if isinstance(overall, dict) and isinstance(overall.get("after"), (int, float)):
        text += f", overall held-out score {overall['after']:.4g} (mean of accuracies and (r + 1) / 2)"
    elif isinstance(overall, (int, float)) and not isinstance(overall, bool):
        text += f", overall {overall:.4g}"
    return text


TASK_COLUMNS = ["task", "kind", "metric", "held-out", "trainable"]


def task_cells(row: dict[str, Any]) -> list[str]:
    """One task of a multi-task checkpoint: name, kind (classes N / score, pairs), metric, held-out value after
    training, trainable parameters of its head and adapters."""
    kind = f"classes {len(row['classes'])}" if row.get("classes") else "score"
    if row.get("pairs"):
        kind += ", pairs"
    held_out = row.get("held_out")
    trainable = row.get("trainable_parameters")
    return [row["name"], kind, str(row.get("metric") or "-"), "-" if held_out is None else f"{held_out:.4g}",
            format_params(trainable) if isinstance(trainable, int) else "-"]


def format_params(n: int | None) -> str:
    return "-" if n is None else f"{format_size(n)} ({n:,})"


def flat_text(value: Any, limit: int = 400) -> str:
    """A JSON value on one line (floats to 4 significant digits, lists cut after 6 items), at most `limit` long."""
    if isinstance(value, dict):
        text = ", ".join(f"{k} {flat_text(v, limit)}" for k, v in value.items())
    elif isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, list):
        text = "[" + ", ".join(flat_text(v, limit) for v in value[:6]) + (", ...]" if len(value) > 6 else "]")
    else:
        text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _source_rows(doc: dict[str, Any]) -> Rows:
    src = doc["source"]
    rows = [("source", f"{src['argument'] or src['id']} ({src['kind']})")]
    model = doc["model"]
    if model["architecture"]:
        size = "x".join(map(str, model["input_size"])) if model["input_size"] else "?"
        if model["input_size"] and len(model["input_size"]) == 1:
            size = f"{model['input_size'][0]} tokens"
        rows.append(("model", f"{model['architecture']} ({model['library'] or '?'}), input {size}, {model['dtype']}"))
    return rows


def _param_rows(doc: dict[str, Any]) -> Rows:
    p = doc["params"]
    rows = [("parameters", format_params(p["total"]))]
    if p["counted_from"] == "model":
        rows.append(("  low-rank layers", format_params(p["lowrank"])))
        rows.append(("  dense linears", format_params(p["dense_linear"])))
        rows.append(("  other", format_params(p["other"])))
    else:
        rows.append(("  counted from", "tensor shapes in the file header (no split by layer kind)"))
    return rows


def _mac_rows(doc: dict[str, Any]) -> Rows:
    m = doc["macs"]
    if m["total"] is None:
        return [("MACs", m["note"])]
    rows = [("MACs", f"{format_size(m['total'])} MACs = {format_size(m['flops'])} FLOPs "
                     f"(fvcore, batch 1; FLOPs = 2 x MACs)")]
    if m["uncounted"]:
        ops = ", ".join(f"{op} x{n}" for op, n in sorted(m["uncounted"].items()))
        rows.append(("  NOT counted", f"{ops} (fvcore has no handle: the MACs above leave these out)"))
    else:
        rows.append(("  uncounted ops", "none"))
    return rows


def _decode_rows(doc: dict[str, Any]) -> Rows:
    """A causal LM: one generated token's MACs at its context, against the dense model's, and its KV cache."""
    d = doc.get("decode")
    if not d:
        return []
    gain = d["dense_macs_per_token"] / d["macs_per_token"] if d["macs_per_token"] else None
    return [("decode", f"{format_size(d['macs_per_token'])} MACs per token at a context of {d['context']} tokens "
                       f"(dense {format_size(d['dense_macs_per_token'])}{f': {gain:.2f}x' if gain else ''})"),
            ("  KV cache", f"{format_bytes(d['kv_cache_bytes_per_token'])} per token, "
                           f"{format_bytes(d['kv_cache_bytes'])} at {d['context']} tokens")]


def _ratio_rows(doc: dict[str, Any]) -> Rows:
    """The fraction of the target layers' parameters removed (SVD-LLM's ratio) and kappa: achieved, and asked."""
    r = doc.get("ratio")
    if not r:
        return []
    text = f"{100 * r['achieved']:.1f} % of the target layers' parameters removed"
    if r["kappa_achieved"] is not None:
        text += f" (kappa {r['kappa_achieved']:.3g})"
    if r["asked"] is not None:
        kappa = f", kappa {r['kappa_asked']:.3g}" if r["kappa_asked"] is not None else ""
        text += f"; asked {100 * r['asked']:.1f} %{kappa}"
    return [("ratio", text)]


def format_bytes(n: int) -> str:
    """Binary units: 131072 -> "128.0 KiB"."""
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"


def _reference_rows(doc: dict[str, Any]) -> Rows:
    rows: Rows = []
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
    return rows


def _layer_rows(doc: dict[str, Any]) -> Rows:
    rows: Rows = []
    layers = doc["layers"]
    low = [r for r in layers if r["kind"] == "lowrank"]
    if layers:
        rows.append(("linears", f"{len(low)} low-rank, {len(layers) - len(low)} dense"))
    energies = [r["kept_energy"] for r in low if r["kept_energy"] is not None]
    if energies:
        rows.append(("kept energy", f"min {min(energies):.3f}, mean {sum(energies) / len(energies):.3f}, "
                                    f"max {max(energies):.3f} (sum of kept sigma^2 / sum of all)"))
    return rows


def _provenance_rows(doc: dict[str, Any]) -> Rows:
    prov = doc["provenance"]
    if prov is None:
        return []
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
    streamed = (prov.get("other") or {}).get("streamed")  # lrc factorize read the source block by block, or whole
    if streamed is not None:
        parts.append("streamed block by block" if streamed else "loaded whole")
    parts.append(f"lrc {prov['lrc_version']}")
    if prov["saved"]:
        parts.append(f"saved {prov['saved']}")
    rows = [("provenance", ", ".join(parts))]
    if prov["left_dense"]:
        rows.append(("  left dense", f"{len(prov['left_dense'])} target linear(s): "
                                     + "; ".join(f"{k} ({v})" for k, v in list(prov["left_dense"].items())[:3])
                                     + ("; ..." if len(prov["left_dense"]) > 3 else "")))
    return rows


def layer_columns(doc: dict[str, Any]) -> list[str]:
    cols = ["layer", "d_in", "d_out", "rank", "params", "MACs", "kept energy"]
    if any(r["speedup"] is not None for r in doc["layers"]):
        cols.append("speed gain")
    return cols


def layer_cells(row: dict[str, Any], with_speed: bool) -> list[str]:
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
    if doc.get("tasks"):
        lines += ["", "| " + " | ".join(TASK_COLUMNS) + " |", "|" + "|".join(["---"] * len(TASK_COLUMNS)) + "|"]
        for row in doc["tasks"]:
            lines.append("| " + " | ".join(cell(c) for c in task_cells(row)) + " |")
    if per_layer and doc["layers"]:
        cols = layer_columns(doc)
        align = "|".join("---" if i == 0 else "---:" for i in range(len(cols)))  # numbers right-aligned
        lines += ["", "| " + " | ".join(cols) + " |", f"|{align}|"]
        for row in doc["layers"]:
            lines.append("| " + " | ".join(cell(c) for c in layer_cells(row, len(cols) > 7)) + " |")
    return "\n".join(lines) + "\n"
