"""The perplexities a causal LM's card quotes: held-out perplexity measured by `lrc recover` (the original model's,
before and after) or `lrc finetune` (before and after), and `lrc eval --json` files of perplexity. The same
figures go into the model-index (metric `perplexity`, lower is better) and into a "Perplexity" table of the body.
"""

from __future__ import annotations

from typing import Any

from lowrank_cli.checkpoint.format import CheckpointInfo
from lowrank_cli.publish.inputs import EvalFacts, dataset_name


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def measured(info: CheckpointInfo) -> list[tuple[str, str, str, float]]:
    """(data, split, which model, perplexity) that the checkpoint's own records hold, in the order of the runs."""
    rows = []
    recovery = info.recovery or {}
    held = recovery.get("held_out") or {}
    if held.get("metric") == "val_perplexity":
        data, _ = dataset_name(str(recovery.get("data") or "recovery data"))
        for label, value in (("original", held.get("teacher_perplexity")),
                             ("factorized, before recovery", (held.get("before") or {}).get("val_perplexity")),
                             ("this model", (held.get("after") or {}).get("val_perplexity"))):
            if _number(value) is not None:
                rows.append((data, "held-out", label, float(value)))
    finetune = info.finetune or {}
    scores = finetune.get("scores") or {}
    if scores.get("metric") == "val_perplexity":
        data, _ = dataset_name(str(finetune.get("data") or "fine-tuning data"))
        rows = [r for r in rows if r[2] != "this model"]  # the fine-tuned model is this one now
        for label, value in (("before fine-tuning", (scores.get("before") or {}).get("val_perplexity")),
                             ("this model", (scores.get("after") or {}).get("val_perplexity"))):
            if _number(value) is not None:
                rows.append((data, "held-out", label, float(value)))
    return rows


def perplexity_results(info: CheckpointInfo, evals: list[EvalFacts]) -> list[dict[str, Any]]:
    """This model's perplexities for the model-index: its records' held-out figure and each eval of perplexity
    (an eval of the same data and split replaces it)."""
    results = [{"dataset": d, "split": s, "metric": "perplexity", "metric_name": "perplexity", "value": round(v, 3)}
               for d, s, label, v in measured(info) if label == "this model"]
    for e in evals:
        if e.perplexity is not None:
            results.append({"dataset": e.dataset, "split": e.split, "metric": "perplexity",
                            "metric_name": f"perplexity ({e.seq_len} tokens per window)" if e.seq_len else
                            "perplexity", "value": round(e.perplexity, 3)})
    latest = {(r["dataset"], r["split"]): r for r in results}
    return list(latest.values())


def perplexity_section(info: CheckpointInfo, evals: list[EvalFacts]) -> str:
    rows = [(d, s, label, v, "-") for d, s, label, v in measured(info)]
    rows += [(e.dataset, e.split or "-", "this model (lrc eval)", e.perplexity, f"{e.tokens:,}") for e in evals
             if e.perplexity is not None]
    if not rows:
        return ""
    lines = ["## Perplexity", "", "| data | split | model | perplexity | tokens |", "|---|---|---|---:|---:|"]
    lines += [f"| {d} | {s} | {m} | {v:.3f} | {n} |" for d, s, m, v, n in rows]
    lines += ["", "Lower is better. Measured by `lrc recover` / `lrc finetune` on held-out windows of the text and by "
              "`lrc eval` (next-token perplexity over windows of the text's token stream)."]
    return "\n".join(lines)
