"""After the tasks of a multi-task run trained apart: one checkpoint with every task.

experts      the untouched backbone with the first task's head; every task's head and adapters (unmerged) beside
             it, for `load(..., task=NAME)` to merge the one asked for; each task's scores are its own run's
merge       every task's update (its merged adapters minus the backbone, training.merging.task_deltas) combined by
             the merge rule into one backbone; every task scored again on it with its own head
orthogonal   the same with the exact sum (the orthogonal blocks keep the tasks' updates apart)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_cli.adapters.base import in_head
from lowrank_cli.data.tasks import TaskSpec
from lowrank_cli.errors import InputError
from lowrank_cli.evaluation.task_scores import overall_score, task_score
from lowrank_cli.training.multitask_options import MultitaskOptions
from lowrank_cli.training.result import MultitaskResult


def task_record(path: Path) -> dict[str, Any]:
    """What a finished task left: an adapter file's record, or a whole fine-tuned checkpoint's (method full),
    both with `method`, `head`, `task`, `classes` and the run's `finetune` settings (scores, data, counts)."""
    from lowrank_cli.adapters.files import KEY
    from lowrank_cli.checkpoint.format import open_header, read_info

    meta, _ = open_header(path)
    if KEY in meta:
        from lowrank_cli.adapters.files import read_adapter_file

        return read_adapter_file(path)[0]
    finetune = read_info(path)[0].finetune or {}
    return {**finetune, "finetune": finetune}


def _tensors(path: Path, record: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(head tensors, adapter tensors) of a finished task."""
    from lowrank_cli.adapters.files import KEY, head_tensors, read_adapter_file
    from lowrank_cli.checkpoint.format import open_header

    modules = record["head"]["modules"]
    if KEY in open_header(path)[0]:
        tensors = read_adapter_file(path)[1]
        return ({k: v for k, v in tensors.items() if in_head(k, modules)},
                {k: v for k, v in tensors.items() if not in_head(k, modules)})
    from lowrank_cli.checkpoint.io import read_checkpoint

    return head_tensors(read_checkpoint(path).model, modules), {}



def _tuned(base: Any, path: Path, record: dict[str, Any]) -> nn.Module:
    """A finished task's whole model in float32: the backbone with its adapters merged (or its full fine-tuning).
    float32 so that the update (tuned - base) of a bf16 / fp16 backbone is not one rounding step of W."""
    from lowrank_cli.adapters.base import AdapterConfig
    from lowrank_cli.adapters.files import KEY, apply_adapter_file
    from lowrank_cli.adapters.methods import method_for
    from lowrank_cli.checkpoint.format import open_header

    if KEY in open_header(path)[0]:
        model = apply_adapter_file(base.twin(), path, merge=False).float()  # the base's hash is of its own dtype
        method_for(AdapterConfig.from_record(record["adapters"])).merge(model)
        return model
    from lowrank_cli.checkpoint.io import read_checkpoint

    return read_checkpoint(path).model.float()


def combine(source: Any, specs: list[TaskSpec], output: Path, opts: MultitaskOptions, work: Path,
            results: list[Any], log) -> MultitaskResult:
    from lowrank_cli.checkpoint.format import record_finetune
    from lowrank_cli.checkpoint.tasks import write_multitask
    from lowrank_cli.training.teacher import load_participant

    paths = [work / f"{s.name}.safetensors" for s in specs]
    records = [task_record(p) for p in paths]
    tensors = [_tensors(p, r) for p, r in zip(paths, records)]
    base = load_participant(source, "model", opts.arch, opts.model_args, lambda msg: None, opts.library)
    save_dtype = next(base.model.parameters()).dtype
    names = [s.name for s in specs]
    final = with_task_head(base, records[0], tensors[0][0])
    stored = {n: {**t[0], **(t[1] if opts.mode == "experts" else {})} for n, t in zip(names, tensors)}
    before = {n: (r["finetune"].get("scores") or {}).get("before") for n, r in zip(names, records)}
    merge_info: dict[str, Any] = {}
    if opts.mode == "experts":
        after = {n: (r["finetune"].get("scores") or {}).get("after") for n, r in zip(names, records)}
    else:
        merge_info = _merge_into(final, base, paths, records, names, opts, log)
        after = rescore(final, specs, records, [t[0] for t in tensors], opts, log)
    first = records[0]["finetune"]
    # The record of the model `load(output)` gives: the first task's, adapters merged (experts: at load time).
    scores = {**(first.get("scores") or {}), "before": before[names[0]], "after": after[names[0]]}
    record_finetune(final.model, {**first, "task_name": names[0], "merged": True, "scores": scores,
                                  "multitask": opts.mode}, spec=final.spec, source=final.source)
    record = multitask_record(specs, records, opts, before, after, merge_info)
    write_multitask(output, final.model, record, stored, dtype=save_dtype)
    log(f"Wrote {output} ({opts.mode}: {len(specs)} tasks, {', '.join(names)})")
    return MultitaskResult(final.model.eval(), output, opts.mode, after, before, record, results=results)


def _merge_into(final: Any, base: Any, paths: list[Path], records: list[dict[str, Any]], names: list[str],
                opts: MultitaskOptions, log) -> dict[str, Any]:
    """Every task's update to the backbone, combined by the run's rule and added to `final` in place."""
    from lowrank_cli.training.merging import apply_deltas, merge_deltas, merge_summary, task_deltas

    deltas = {}
    for name, path, record in zip(names, paths, records):
        reference = with_task_head(base, record, {})  # the backbone as the task's model names it, not trained
        tuned = _tuned(base, path, record)
        deltas[name] = task_deltas(reference.model.float(), tuned, exclude=record["head"]["modules"])
        del reference, tuned
    weights = opts.task_weights
    if opts.rule == "weighted" and not weights:
        weights = {n: float(r["finetune"].get("train_samples") or 1) for n, r in zip(names, records)}
    merged = merge_deltas(deltas, rule=opts.rule, weights=weights, rank=opts.merge_rank)
    summary = merge_summary(deltas, merged)
    apply_deltas(final.model, merged)
    log(f"Merged the {len(names)} tasks' updates ({opts.rule}{f', rank {opts.merge_rank}' if opts.merge_rank else ''})")
    return {"rule": opts.rule, "weights": weights, "rank": opts.merge_rank, **(summary or {})}


def rescore(final: Any, specs: list[TaskSpec], records: list[dict[str, Any]], heads: list[dict[str, torch.Tensor]],
            opts: MultitaskOptions, log) -> dict[str, dict[str, float] | None]:
    """Every task's held-out scores on the merged backbone with its own head (the same split its run held out)."""
    from lowrank_cli.devices import resolve_device
    from lowrank_cli.training.task_run import read_task

    device = resolve_device(opts.device)
    found = {}
    for spec, record, head in zip(specs, records, heads):
        d, task = read_task(spec, opts)
        if d.val is None:
            found[spec.name] = None
            continue
        twin = with_task_head(final, record, head)
        d.modality.prepare(twin, tokenizer=opts.tokenizer, max_length=opts.max_length)
        found[spec.name] = score_held_out(twin.model.to(device), d, task.regression, opts, device)
        log(f"{spec.name}: on the merged backbone: " + ", ".join(f"{k} {v:.4g}" for k, v in found[spec.name].items()))
    return found


def score_held_out(model: nn.Module, d: Any, regression: bool, opts: Any, device: torch.device) -> dict[str, float]:
    """A task's held-out scores with the keys a fine-tuning run gives them (val_top1 / val_accuracy / ...)."""
    batch_size = opts.eval_batch_size or opts.batch_size
    model.eval()
    if d.modality.name == "images":
        from lowrank_cli.evaluation.accuracy import evaluate

        result = evaluate(model, d.val, batch_size=batch_size, device=device, num_workers=0, transform_from=model)
        return {"val_top1": result["top1"], "val_top5": result["top5"]}
    from lowrank_cli.evaluation.task_scores import score_loader

    loader = d.modality.held_out_loader(d.val, model, batch_size=batch_size, num_workers=0)
    return {f"val_{k}": v for k, v in score_loader(model, loader, device, regression).items() if k != "samples"}


def multitask_record(specs: list[TaskSpec], records: list[dict[str, Any]], opts: MultitaskOptions,
                     before: dict[str, Any], after: dict[str, Any], merge_info: dict[str, Any]) -> dict[str, Any]:
    """`lrc.multitask`: the mode, every task (head, classes, metric, scores, adapters when kept), the overall."""
    tasks = []
    for spec, record in zip(specs, records):
        run = record["finetune"]
        scores = after.get(spec.name)
        tasks.append({
            "name": spec.name, "data": run.get("data"), "target": spec.target, "task": record.get("task"),
            "classes": record.get("classes"), "pairs": bool(run.get("pairs")),
            "metric": task_score(scores)[0] if scores else None, "head": record["head"],
            "adapters": record.get("adapters") if opts.mode == "experts" else None,
            "scores": {"before": before.get(spec.name), "after": scores, "kept": (run.get("scores") or {}).get("kept")},
            "trainable_parameters": run.get("trainable_parameters"), "parameters": run.get("parameters"),
            "train_samples": run.get("train_samples"), "steps": run.get("steps"),
        })
    return {"schema": 1, **opts.settings(), "method": opts.method, "tasks": tasks,
            "adapters": records[0].get("adapters"), "merge": merge_info or None,
            "overall": {"before": overall_of(before), "after": overall_of(after)}}


def with_task_head(loaded: Any, record: dict[str, Any], head: dict[str, torch.Tensor]) -> Any:
    """A copy of `loaded` (a LoadedModel) with the head of a task (its adapter-file record and head tensors)."""
    from lowrank_cli.checkpoint.format import move_record, record_finetune
    from lowrank_cli.models.heads import replace_head

    twin = loaded.twin()
    base = twin.model
    made = replace_head(twin, int(record["head"]["outputs"]), classes=record.get("classes"),
                        regression=record.get("task") == "regression")
    if twin.model is not base:
        move_record(base, twin.model, made.renamed)
    missing = set(head) - set(twin.model.state_dict())
    if missing:
        raise InputError(f"a task's head does not fit the model ({', '.join(sorted(missing)[:2])}): its work file is "
                         "damaged; start again with `force=True`")
    with torch.no_grad():
        twin.model.load_state_dict(head, strict=False)
    record_finetune(twin.model, {"task": record.get("task"), "classes": record.get("classes")}, spec=twin.spec,
                    source=twin.source)  # what evaluation checks the task's data against
    return twin


def overall_of(scores: dict[str, dict[str, float] | None]) -> float | None:
    known = {name: s for name, s in scores.items() if s}
    return overall_score(known) if known and len(known) == len(scores) else None
