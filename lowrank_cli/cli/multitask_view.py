"""What `lrc finetune --task ...` prints: every task's held-out scores before and after, and the overall."""

from __future__ import annotations

from typing import Any

from lowrank_cli.cli import console


def _value(name: str | None, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.2f} %" if name in ("top1", "accuracy") else f"{value:.4f}"


def print_multitask_summary(s: dict[str, Any]) -> None:
    from rich.table import Table

    from lowrank_cli.evaluation.task_scores import task_score

    settings = s["settings"]
    how = {"shared": f"shared adapters, {settings.get('schedule')} schedule",
           "experts": "one set of adapters per task, merged at load(task=)",
           "merge": f"per-task adapters merged ({settings.get('merge_rule')}"
                    f"{', rank ' + str(settings['merge_rank']) if settings.get('merge_rank') else ''})",
           "orthogonal": "orthogonal LoRA blocks, updates summed"}[s["mode"]]
    table = Table(title=f"lrc finetune -> {s['output']}", title_justify="left")
    for column in ("task", "kind", "metric", "before", "after", "trainable"):
        table.add_column(column)
    for task in s["tasks"]:
        kind = "score" if task["task"] == "regression" else f"{len(task['classes'] or [])} classes"
        kind += " (pairs)" if task.get("pairs") else ""
        after, before = (task["scores"] or {}).get("after"), (task["scores"] or {}).get("before")
        metric = task_score(after)[0] if after else None
        key = next((k for k in (after or {}) if k.removeprefix("val_") == metric), None)
        share = (f"{100 * task['trainable_parameters'] / task['parameters']:.2f} %"
                 if task.get("trainable_parameters") and task.get("parameters") else "-")
        table.add_row(task["name"], kind, metric or "-", _value(metric, (before or {}).get(key)),
                      _value(metric, (after or {}).get(key)), share)
    console.out.print(table)
    overall = s.get("overall") or {}
    console.out.print(f"mode {s['mode']} ({how}); method {settings.get('method')}; overall "
                      f"{_value('accuracy', overall.get('before'))} -> {_value('accuracy', overall.get('after'))} "
                      "(mean of accuracies and (r + 1) / 2 of correlations)")
