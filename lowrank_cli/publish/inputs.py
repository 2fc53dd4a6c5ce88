"""The measurements a card may quote besides the checkpoint's own: `lrc bench --json` and `lrc eval --json` files.

Each is read once and checked before anything is built, so a wrong file is one clear error, not a card that
quotes another model's speed: a bench file must have measured a model with exactly the checkpoint's parameter
count.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowrank_cli.errors import InputError


@dataclass
class BenchFacts:
    """The rows of an `lrc bench --json` file that a card shows: this model's, and its reference's."""

    device_name: str
    dtype: str
    compile: str | None
    input_size: list[int]
    model: str  # the label of the checkpoint's rows
    reference: str | None
    rows: list[dict[str, Any]]


@dataclass
class EvalFacts:
    """One `lrc eval --json` result: top-1 / top-5 on a labelled image folder, or a causal LM's perplexity on text."""

    dataset: str  # the folder's name (its parent's for .../val)
    split: str | None
    top1: float | None
    top5: float | None
    images: int
    perplexity: float | None = None
    tokens: int = 0  # the tokens a perplexity scored
    seq_len: int | None = None


def read_json_file(path: str | Path, parameter: str, what: str) -> dict[str, Any]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"`{parameter}` '{path}' does not exist: write it with {what}")
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"`{parameter}` '{path}' is not valid JSON ({e}): write it again with {what}") from None
    if not isinstance(doc, dict):
        raise InputError(f"`{parameter}` '{path}' is not a JSON object: write it with {what}")
    return doc


def read_bench(path: str | Path, params: int) -> BenchFacts:
    """The bench rows of the model with `params` parameters (the checkpoint) and of its reference."""
    what = "lrc bench CHECKPOINT --against DENSE --json > FILE"
    doc = read_json_file(path, "bench", what)
    models, rows = doc.get("models"), doc.get("rows")
    if not isinstance(models, dict) or not isinstance(rows, list) or not rows:
        raise InputError(f"`bench` '{path}' is not an lrc bench --json document (no models / rows): write it with "
                         f"{what}")
    label = next((name for name, m in models.items() if isinstance(m, dict) and m.get("params") == params), None)
    if label is None:
        counts = ", ".join(f"{name}: {m.get('params'):,}" for name, m in models.items()
                           if isinstance(m, dict) and isinstance(m.get("params"), int))
        raise InputError(f"`bench` '{path}' measured other models ({counts or 'no parameter counts'}), not this "
                         f"checkpoint ({params:,} parameters): run {what} on this checkpoint")
    reference = doc.get("reference")
    keep = [r for r in rows if isinstance(r, dict) and r.get("model") in (label, reference)]
    needed = ("batch_size", "median_ms", "throughput")
    if not keep or not all(isinstance(r.get(k), (int, float)) for r in keep for k in needed):
        raise InputError(f"`bench` '{path}' has rows without {', '.join(needed)}: write it again with {what}")
    return BenchFacts(str(doc.get("device_name") or doc.get("device") or "?"), str(doc.get("dtype") or "?"),
                      doc.get("compile"), list(doc.get("input_size") or []), label, reference, keep)


def read_eval(path: str | Path) -> EvalFacts:
    what = "lrc eval CHECKPOINT --data DIR --json > FILE"
    doc = read_json_file(path, "evals", what)
    perplexity = doc.get("perplexity")
    if isinstance(perplexity, (int, float)) and perplexity >= 1 and isinstance(doc.get("data"), str):
        dataset, split = dataset_name(doc["data"])
        seq_len = doc.get("seq_len")
        return EvalFacts(dataset, split, None, None, 0, float(perplexity), int(doc.get("tokens") or 0),
                         seq_len if isinstance(seq_len, int) else None)
    top1, top5 = doc.get("top1"), doc.get("top5")
    if not isinstance(top1, (int, float)) or not 0 <= top1 <= 1 or not isinstance(doc.get("data"), str):
        raise InputError(f"`evals` '{path}' is not an lrc eval --json document (no top1 in [0, 1] or perplexity, "
                         "and data): "
                         f"write it with {what}")
    dataset, split = dataset_name(doc["data"])
    return EvalFacts(dataset, split, float(top1), float(top5) if isinstance(top5, (int, float)) else None,
                     int(doc.get("images") or 0))


def dataset_name(data: str) -> tuple[str, str | None]:
    """A data folder as a card names it: (its name, the split) - imagenet/val -> ("imagenet", "val"); a local path
    is never written into a card in full."""
    path = Path(data.rstrip("/\\"))
    if path.name in ("val", "validation", "test", "train") and path.parent.name:
        return path.parent.name, path.name
    return path.name or str(data), None
