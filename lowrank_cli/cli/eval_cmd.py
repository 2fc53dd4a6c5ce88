"""`lrc eval`: top-1 / top-5 accuracy of any MODEL on labelled images (or scores on labelled texts, or the
perplexity of a causal LM on text); each task of a multi-task checkpoint on its own data with --task NAME=PATH,
and the overall score."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from lowrank_cli.cli import console
from lowrank_cli.cli.command import LrcCommand
from lowrank_cli.cli.option_params import options_of, with_options
from lowrank_cli.cli.options import Fused, Json, Model, Progress
from lowrank_cli.models.runtime import RunOptions
from lowrank_cli.models.source_options import SourceOptions

EVAL_EPILOG = """\
Examples:

  lrc eval deit_lr_rec.safetensors --data imagenet/          (imagenet/val/<class>/...)

  lrc eval deit_base --data imagenet/val --json

  lrc eval deit_lr_rec.safetensors --data imagenet/ --device cuda --no-fused     (the two linears per layer)

  lrc eval sst_lr.safetensors --data sst_dev.jsonl       (a fine-tuned text model: accuracy, or Pearson / Spearman)

  lrc eval glue_lr.safetensors --task sst=sst_dev.jsonl --task sts=stsb_dev.jsonl:score --json
                                                         (a multi-task checkpoint: each task, then the overall score)

  lrc eval llama_lr.safetensors --data wiki.test.raw.txt --seq-len 2048
                  (a causal LM: perplexity over windows of 2048 tokens; the dense folder gives the baseline)
"""


Data = Annotated[Optional[Path], typer.Option(
    "--data", metavar="DIR|FILE", show_default=False,
    help="Labelled images: DIR/val/<class>/..., or a class tree DIR/<class>/...; for a fine-tuned text model a "
    ".jsonl / .csv file of text[, text_pair] and label or score; for a causal LM a .txt / .jsonl file or a folder "
    "of them (perplexity). A multi-task checkpoint: its first task.")]
Task = Annotated[Optional[list[str]], typer.Option(
    "--task", metavar="NAME=PATH[:label|:score]", show_default=False,
    help="A multi-task checkpoint: score task NAME on the labelled data PATH (repeatable, instead of --data); "
    "then the overall score.")]
Tokenizer = Annotated[Optional[str], typer.Option(
    "--tokenizer", metavar="DIR|REPO", show_default=False,
    help="Text data: the model's tokenizer (default: the one its checkpoint names).")]
MaxLength = Annotated[Optional[int], typer.Option(
    "--max-length", min=1, show_default=False, help="Text data: tokens per text at most (default: the model's).")]
BatchSize = Annotated[Optional[int], typer.Option(
    "--batch-size", min=1, show_default=False,
    help="Images per batch (default 128); for perplexity, windows of --seq-len tokens (default 4).")]
Stride = Annotated[Optional[int], typer.Option(
    "--stride", min=1, show_default=False,
    help="Perplexity: tokens between the starts of windows of --seq-len tokens (default --seq-len: disjoint windows, "
    "the WikiText-2 protocol); "
    "a smaller stride scores each token with more context.")]
Workers = Annotated[Optional[int], typer.Option(
    "--workers", min=0, show_default=False, help="Data-loading processes (default: the CPUs, at most 8).")]


@with_options(options_of(SourceOptions, only=("arch", "model_args")))
@with_options(options_of(SourceOptions, only=("device", "seq_len")), after="batch_size")
@with_options(options_of(RunOptions), after="fused")
def eval_command(
    model: Model,
    data: Data = None,
    task: Task = None,
    batch_size: BatchSize = None,
    workers: Workers = None,
    fused: Fused = None,
    json_out: Json = False,
    progress: Progress = None,
    tokenizer: Tokenizer = None,
    max_length: MaxLength = None,
    stride: Stride = None,
    **source,
) -> None:
    """Measure the accuracy of any MODEL on labelled images or texts, or a causal LM's perplexity on text.

    The images are DIR/val/<class>/..., or DIR/<class>/... when DIR is a class tree; texts a .jsonl / .csv file;
    a causal LM's text a .txt / .jsonl file or a folder of them, scored in windows of --seq-len tokens.
    A multi-task checkpoint takes one --task NAME=PATH per task to score instead (or --data for its first task).
    --fused runs the low-rank layers through the fused Triton kernel on CUDA (default: the two linears);
    --runtime compile / graphs (CUDA) torch.compiles it; --no-group runs shared-input low-rank layers one by one.
    """
    from lowrank_cli.adapters.loading import load_model
    from lowrank_cli.data.labelled_texts import is_labelled_text_file
    from lowrank_cli.data.sampling import default_workers
    from lowrank_cli.data.texts import looks_like_text_data
    from lowrank_cli.devices import resolve_device
    from lowrank_cli.errors import InputError, UsageError
    from lowrank_cli.evaluation.accuracy import evaluate, val_split
    from lowrank_cli.models.families import family_of
    from lowrank_cli.models.fusion import fuse_lowrank, resolve_fused
    from lowrank_cli.models.weights import check_finite

    console.show_progress(progress)
    device, arch, model_args, seq_len = source["device"], source["arch"], source["model_args"], source["seq_len"]
    run = _run_options(source, device, bool(task))  # --runtime graphs off CUDA: refused before anything is read
    if task:
        if data is not None:
            raise UsageError("--data and --task both say what to score: give --data for a model, or one --task "
                             "NAME=PATH per task of a multi-task checkpoint")
        if arch is not None or model_args:
            raise UsageError("--arch and --model-arg build a model from a bare weights file; a multi-task checkpoint "
                             "rebuilds itself: leave them out")
        return _eval_tasks(model, task, batch_size or 128, device, workers, fused, json_out, tokenizer, max_length)
    if data is None:
        raise UsageError("say what to score the model on: --data DIR|FILE (labelled images or texts), or for a "
                         "multi-task checkpoint one --task NAME=PATH per task")
    if is_labelled_text_file(data) or looks_like_text_data(data):
        return _eval_text_data(model, data, arch, batch_size, device, json_out, tokenizer, max_length, seq_len,
                               stride, run)
    if tokenizer is not None or max_length is not None or seq_len is not None or stride is not None:
        raise UsageError("--tokenizer, --max-length, --seq-len and --stride are for text data; --data here is images")
    image_set = val_split(data)  # a wrong folder fails before the model loads
    dev = resolve_device(device)
    fuse = resolve_fused(fused, dev)  # --fused without CUDA or Triton: exit 6 before the loading
    loaded = load_model(model, arch=arch, model_args=model_args,
                        log=lambda msg: console.info(f"Model: {msg}"))
    check_finite(loaded.model, f"'{model}'")
    _first_task(loaded)
    if family_of(loaded.model).metric == "perplexity":
        raise InputError(f"--data '{data}' holds images, and {model} is a causal LM, scored by its perplexity on "
                         "text: give --data a .txt / .jsonl file or a folder of them")
    loaded.model.to(dev).float()
    summary = fuse_lowrank(loaded.model) if fuse else None
    if summary is not None and summary.layers:
        console.info(f"Model: {summary.describe()}")
    with console.progress() as bar:
        task = bar.add_task("accuracy", total=None, status="")
        result = evaluate(_ready(loaded.model, dev, run), image_set, batch_size=batch_size or 128, device=dev,
                          num_workers=default_workers() if workers is None else workers,
                          progress=lambda done, total: bar.update(task, completed=done, total=total))
    result = {"model": model, "data": str(image_set.root), **result, "fused": bool(summary and summary.layers)}
    if json_out:
        console.print_json(result)
        return
    skipped = f", {result['skipped']} unreadable skipped" if result["skipped"] else ""
    console.out.print(
        f"top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%  "
        f"({result['images']} images of {result['data']}{skipped})"
    )


def _run_options(source: dict, device: str, tasks: bool) -> Any:
    """--runtime and --group taken out of `source`, the runtime checked for the device (and refused with --task:
    each task's model is built by the multi-task evaluation, eager)."""
    from lowrank_cli.devices import resolve_device
    from lowrank_cli.errors import UsageError
    from lowrank_cli.models.runtime import RunOptions, check_runtime

    run = RunOptions(source.pop("runtime"), source.pop("group"))
    if tasks and (run.runtime != "eager" or run.group is not None):
        raise UsageError("--runtime and --group set how one model runs; the tasks of --task run eager, grouped by "
                         "default: leave them out, or score one task with --data")
    check_runtime(run.runtime, resolve_device(device))
    return run


def _ready(model: Any, dev: Any, run: Any) -> Any:
    """The model on its device grouped as --group says (unless fused) and set up as --runtime says."""
    from lowrank_cli.evaluation.bench import is_fused
    from lowrank_cli.models.grouping import apply_group
    from lowrank_cli.models.runtime import apply_runtime

    if not is_fused(model):
        summary = apply_group(model, run.group, console.info)
        if summary.groups:
            console.info(f"Model: {summary.describe()}")
    return apply_runtime(model, run.runtime, dev)


def _eval_text_data(model: str, data: Path, arch: str | None, batch_size: int | None, device: str, json_out: bool,
                    tokenizer: str | None, max_length: int | None, seq_len: int | None, stride: int | None,
                    run: Any) -> None:
    """Text data: a causal LM's perplexity, or a fine-tuned text model's scores on labelled texts, as its family
    says (`metric`)."""
    from lowrank_cli.adapters.loading import load_model
    from lowrank_cli.errors import UsageError
    from lowrank_cli.models.families import family_of
    from lowrank_cli.models.weights import check_finite

    loaded = load_model(model, arch=arch, log=lambda msg: console.info(f"Model: {msg}"))
    check_finite(loaded.model, f"'{model}'")
    _first_task(loaded)
    if family_of(loaded.model).metric == "perplexity":
        if max_length is not None:
            raise UsageError("--max-length cuts texts for a text classifier; a causal LM reads --seq-len windows")
        return _eval_perplexity(model, loaded, data, batch_size, device, json_out, tokenizer, seq_len, stride, run)
    if seq_len is not None or stride is not None:
        raise UsageError("--seq-len and --stride cut a causal LM's text into windows; this model classifies whole "
                         "texts (--max-length)")
    return _eval_texts(model, loaded, data, batch_size or 128, device, json_out, tokenizer, max_length, run)


def _eval_texts(model: str, loaded, data: Path, batch_size: int, device: str, json_out: bool, tokenizer: str | None,
                max_length: int | None, run: Any) -> None:
    """A fine-tuned text classifier (or regressor) on a labelled .jsonl / .csv file."""
    from lowrank_cli.data.labelled_texts import read_labelled_texts
    from lowrank_cli.data.texts import load_tokenizer
    from lowrank_cli.devices import resolve_device
    from lowrank_cli.errors import UsageError
    from lowrank_cli.evaluation.task_scores import evaluate_texts
    from lowrank_cli.models.families import TEXT, modality_of

    read_labelled_texts(data)
    dev = resolve_device(device)
    if modality_of(loaded.model) != TEXT or getattr(loaded.model.config, "num_labels", 0) < 1:
        raise UsageError(f"--data '{data}' holds labelled texts: give a text classifier (an lrc finetune output)")
    loaded.model.to(dev).float()
    runnable = _ready(loaded.model, dev, run)
    result = evaluate_texts(runnable, data, load_tokenizer(_tokenizer_source(loaded, tokenizer)),
                            max_length=max_length, batch_size=batch_size, device=dev)
    result = {"model": model, "data": str(data), **result}
    if json_out:
        console.print_json(result)
        return
    scores = (f"accuracy {100 * result['accuracy']:.2f}%" if "accuracy" in result else
              f"Pearson {result['pearson']:.4f}  Spearman {result['spearman']:.4f}")
    console.out.print(f"{scores}  ({result['texts']} texts of {result['data']})")


def _eval_perplexity(model: str, loaded, data: Path, batch_size: int | None, device: str, json_out: bool,
                     tokenizer: str | None, seq_len: int | None, stride: int | None, run: Any) -> None:
    """A causal LM (dense or lrc) on text: perplexity over windows of --seq-len tokens."""
    from lowrank_cli.data.texts import load_tokenizer
    from lowrank_cli.devices import resolve_device
    from lowrank_cli.evaluation.perplexity import DEFAULT_BATCH_SIZE, evaluate_perplexity

    dev = resolve_device(device)
    source = _tokenizer_source(loaded, tokenizer)
    loaded.model.to(dev).float()
    with console.progress() as bar:
        task = bar.add_task("perplexity", total=None, status="windows")
        runnable = _ready(loaded.model, dev, run)
        result = evaluate_perplexity(runnable, data, load_tokenizer(source), seq_len=seq_len, stride=stride,
                                     batch_size=batch_size or DEFAULT_BATCH_SIZE, device=dev,
                                     progress=lambda done, total: bar.update(task, completed=done, total=total))
    result = {"model": model, "data": str(data), "tokenizer": str(source), **result}
    if json_out:
        console.print_json(result)
        return
    console.out.print(f"perplexity {result['perplexity']:.4f}  ({result['tokens']:,} tokens scored in "
                      f"{result['windows']} windows of {result['seq_len']}, stride {result['stride']}, of "
                      f"{result['text_tokens']:,} in {result['data']})", highlight=False)


def _tokenizer_source(loaded, tokenizer: str | None) -> str:
    """--tokenizer, else the model's own: its folder or Hub repo, or the one its checkpoint's record names."""
    from lowrank_cli.data.task_data import recorded_tokenizer
    from lowrank_cli.errors import UsageError

    source = tokenizer or loaded.files or recorded_tokenizer(loaded.checkpoint)
    if source is None:
        raise UsageError("the model names no tokenizer: pass --tokenizer DIR_OR_REPO")
    return str(source)


def _first_task(loaded) -> None:
    """A multi-task checkpoint scored with --data: the model of its first task (its adapters merged in experts mode)."""
    from lowrank_cli.adapters.task_models import model_for_task
    from lowrank_cli.checkpoint.tasks import task_names

    if getattr(loaded.checkpoint, "multitask", None) is not None:
        names = task_names(loaded.checkpoint)
        console.info(f"Model: a multi-task checkpoint; scoring its first task '{names[0]}' (its tasks: "
                     f"{', '.join(names)}; score each with --task NAME=PATH)")
        model_for_task(loaded, None)


def _eval_tasks(model: str, tasks: list[str], batch_size: int, device: str, workers: int | None, fused: bool | None,
                json_out: bool, tokenizer: str | None, max_length: int | None) -> None:
    """Each named task of a multi-task checkpoint on its own data, then the overall score."""
    from lowrank_cli.data.sampling import default_workers
    from lowrank_cli.data.tasks import parse_tasks
    from lowrank_cli.evaluation.multitask import evaluate_tasks
    from lowrank_cli.evaluation.task_scores import task_score

    specs = parse_tasks(tasks, parameter="tasks")  # a malformed --task or a missing file fails before any loading
    result = evaluate_tasks(model, specs, tokenizer=tokenizer, max_length=max_length, batch_size=batch_size,
                            device=device, num_workers=default_workers() if workers is None else workers,
                            fused=fused, log=lambda msg: console.info(msg if msg.startswith("Task") else f"Model: {msg}"))
    if json_out:
        console.print_json({"model": model, **result})
        return
    width = max(len(name) for name in [*result["tasks"], "overall"])
    for name, scores in result["tasks"].items():
        if "top1" in scores:
            text = f"top-1 {100 * scores['top1']:.2f}%  top-5 {100 * scores['top5']:.2f}%  ({scores['images']} images"
        elif "accuracy" in scores:
            text = f"accuracy {100 * scores['accuracy']:.2f}%  ({scores['texts']} texts"
        else:
            text = f"Spearman {scores['spearman']:.4f}  Pearson {scores['pearson']:.4f}  ({scores['texts']} texts"
        console.out.print(f"{name:<{width}}  {text} of {scores['data']})", highlight=False)
    metrics = ", ".join(f"{name} {task_score(s)[0]}" for name, s in result["tasks"].items())
    console.out.print(f"{'overall':<{width}}  {result['overall']:.4f}  (mean over tasks of the accuracy, or "
                      f"(Pearson r + 1) / 2 of a score: {metrics})", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("eval", cls=LrcCommand, epilog=EVAL_EPILOG)(eval_command)
