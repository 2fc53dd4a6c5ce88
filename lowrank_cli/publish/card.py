"""The model card of an lrc checkpoint: `lrc card`, and the README.md that `lrc push` uploads.

    card = build_card("deit_lr_rec.safetensors", repo_id="org/deit-base-lr2", bench="bench.json")
    card.card.save("README.md")            # huggingface_hub's ModelCard: YAML front matter + markdown body

Everything in it comes from the checkpoint itself (its `lrc.*` metadata and `build_report`'s counts) and from
the measurement files the user passes (`lrc bench --json`, `lrc eval --json`): nothing is typed in by hand, so
the card cannot drift from the file it describes. The front matter is huggingface_hub's `ModelCardData`, as the
Hub reads it: library_name, tags, base_model (the Hub repo the dense weights came from), pipeline_tag, license
(given, or the source's where it is known) and measured accuracies as model-index. The body is written by
`publish.card_body`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowrank_cli.checkpoint.format import CheckpointInfo, is_lrc_checkpoint, read_info
from lowrank_cli.errors import InputError
from lowrank_cli.models.families import TEXT, family_of_spec
from lowrank_cli.models.lrc_folder import LrcFiles, checkpoint_path, lrc_files
from lowrank_cli.models.spec import ModelSpec
from lowrank_cli.publish.card_perplexity import perplexity_results
from lowrank_cli.publish.inputs import EvalFacts, dataset_name, read_bench, read_eval, read_json_file

LIBRARY_NAME = "lowrank-cli"  # the Hub's library_name: the package users install to load the repo
BASE_TAGS = ["lrc", "low-rank", "pela", "svd", "compressed"]


@dataclass
class Card:
    """A model card and what it was made from (`lrc push` reuses the checkpoint, its report and its folder)."""

    card: Any  # huggingface_hub.ModelCard
    checkpoint: Path
    info: CheckpointInfo
    report: dict[str, Any]  # build_report's document
    files: LrcFiles | None = None  # when the checkpoint came from an lrc folder or Hub repo
    notes: list[str] = field(default_factory=list)  # what could not be said (no license known, ...)

    @property
    def is_text(self) -> bool:
        return is_text_spec(self.info.spec)


def is_text_spec(spec: ModelSpec) -> bool:
    """A text model (it takes token ids, and is published with its tokenizer), as its family reads the spec."""
    return family_of_spec(spec).spec_modality(spec) == TEXT


def resolve_checkpoint(source: str | Path, revision: str | None = None) -> tuple[Path, LrcFiles | None]:
    """The lrc checkpoint file a CHECKPOINT argument names (a file, an lrc folder, an lrc Hub repo)."""
    files = lrc_files(source, revision)
    path = files.checkpoint if files is not None else checkpoint_path(source)
    if not is_lrc_checkpoint(path):
        raise InputError(f"'{source}' is not an lrc checkpoint (a safetensors file without lrc metadata): write one "
                         "with lrc factorize MODEL -o FILE.safetensors")
    return path, files


def build_card(
    checkpoint: str | Path,
    *,
    repo_id: str | None = None,
    revision: str | None = None,
    bench: str | Path | None = None,
    evals: list[str | Path] | tuple = (),
    license: str | None = None,
    tokenizer: list[str] | None = None,
    files: LrcFiles | None = None,
    log: Callable[[str], None] | None = None,
) -> Card:
    """The model card of an lrc checkpoint (a file, an lrc folder or an lrc Hub repo, `revision` for the Hub).

    `repo_id` is where it will live (the loading snippet names it); `bench` an `lrc bench --json` file that
    measured this checkpoint; `evals` `lrc eval --json` files; `license` overrides the source's license;
    `tokenizer` the tokenizer files published next to it (None: not known, as for a card alone). A caller that
    has resolved an lrc folder already passes its `files` (then `checkpoint` is its checkpoint file).
    """
    from huggingface_hub import ModelCard

    from lowrank_cli.evaluation.report import build_report
    from lowrank_cli.publish.card_body import card_body

    log = log or (lambda msg: None)
    path, files = (files.checkpoint, files) if files is not None else resolve_checkpoint(checkpoint, revision)
    info, _ = read_info(path)
    if not info.ranks:
        raise InputError(f"'{checkpoint}' has no low-rank layers (a dense model saved by lrc): factorize it first, "
                         "e.g. lrc factorize MODEL --kappa 2 -o FILE.safetensors")
    if bench is not None:
        read_json_file(bench, "bench", "lrc bench CHECKPOINT --json > FILE")  # a bad file fails before the counting
    eval_facts = [read_eval(e) for e in evals]
    report = build_report(str(path), log=log).document
    bench_facts = read_bench(bench, report["params"]["total"]) if bench is not None else None
    notes: list[str] = []
    license = license or source_license(info, log)
    if license is None:
        notes.append("no license is known for the source model: pass `license` (e.g. apache-2.0)")
    name = repo_id.split("/")[-1] if repo_id else path.stem
    data = card_data(info, license=license, name=name, results=accuracy_results(info, eval_facts) + perplexity_results(info, eval_facts))
    body = card_body(info, report, name=name, repo_id=repo_id, bench=bench_facts, evals=eval_facts,
                     text=is_text_spec(info.spec), tokenizer=tokenizer)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    return Card(card, path, info, report, files, notes)


def card_data(info: CheckpointInfo, *, license: str | None, name: str, results: list[dict[str, Any]]) -> Any:
    """The YAML front matter, as huggingface_hub's ModelCardData."""
    from huggingface_hub import EvalResult, ModelCardData

    task = pipeline_tag(info.spec)
    eval_results = [EvalResult(task_type=task or "other", dataset_type=r["dataset"], dataset_name=r["dataset"],
                               dataset_split=r["split"], metric_type=r["metric"], metric_name=r["metric_name"],
                               metric_value=r["value"]) for r in results]
    return ModelCardData(
        library_name=LIBRARY_NAME,
        tags=tags_of(info),
        base_model=base_model(info),
        pipeline_tag=task,
        license=license,
        model_name=name if eval_results else None,  # the model-index's name; alone it means nothing to the Hub
        metrics=sorted({r["metric"] for r in results}) or None,
        eval_results=eval_results or None,
    )


def tags_of(info: CheckpointInfo) -> list[str]:
    tags = [*BASE_TAGS, info.spec.library]
    provenance = info.provenance or {}
    if provenance.get("calibration"):
        tags.append("data-aware")
    if info.recovery is not None:
        tags.append("distillation")
    return tags


def pipeline_tag(spec: ModelSpec) -> str | None:
    """The Hub task of the architecture, as its family says (timm models classify images or embed them without a
    head; transformers classes say it in their name; a bare encoder extracts features)."""
    return family_of_spec(spec).pipeline_tag(spec)


def base_model(info: CheckpointInfo) -> str | None:
    """The Hub repo the dense weights came from (an hf-hub source, or the repo a named source's weights came from:
    a timm name's); None for local files."""
    source = (info.provenance or {}).get("source") or {}
    if source.get("kind") == "hf-hub":
        return source.get("id")
    return source.get("hub")


def source_license(info: CheckpointInfo, log: Callable[[str], None]) -> str | None:
    """The source's license where it is known: timm's pretrained_cfg carries it; else the base model's own card
    on the Hub (through the cache; offline and not cached, it is not known)."""
    from_cfg = (info.spec.pretrained_cfg or {}).get("license")
    if isinstance(from_cfg, str) and from_cfg:
        return from_cfg
    repo = base_model(info)
    if repo is None:
        return None
    from huggingface_hub import ModelCard
    from huggingface_hub import errors as hf_errors

    from lowrank_cli.models.hub import hub_download

    try:
        readme = hub_download(repo, "README.md", ((info.provenance or {}).get("source") or {}).get("revision"))
        found = ModelCard.load(readme, ignore_metadata_errors=True).data.license
    except (hf_errors.EntryNotFoundError, InputError, ValueError, OSError) as e:
        log(f"the license of {repo} is not known ({str(e).splitlines()[0][:120]})")
        return None
    return found if isinstance(found, str) and found else None


def accuracy_results(info: CheckpointInfo, evals: list[EvalFacts]) -> list[dict[str, Any]]:
    """Measured accuracies of this model, in percent: after recovery (on its data's val split), and each eval; an
    eval of the same data and split replaces the recovery's figure (one value per metric, as the Hub expects)."""
    results = []
    after = ((info.recovery or {}).get("accuracy") or {}).get("after")
    if after and isinstance(after.get("top1"), (int, float)):
        dataset, _ = dataset_name(str(info.recovery.get("data") or "recovery data"))
        results += _top_k(dataset, "val", after.get("top1"), after.get("top5"))
    for e in evals:
        if e.top1 is not None:
            results += _top_k(e.dataset, e.split, e.top1, e.top5)
    latest = {(r["dataset"], r["split"], r["metric"]): r for r in results}
    return list(latest.values())


def _top_k(dataset: str, split: str | None, top1: float, top5: float | None) -> list[dict[str, Any]]:
    rows = [{"dataset": dataset, "split": split, "metric": "accuracy", "metric_name": "top-1 accuracy (%)",
             "value": round(100 * top1, 2)}]
    if top5 is not None:
        rows.append({"dataset": dataset, "split": split, "metric": "top_5_accuracy",
                     "metric_name": "top-5 accuracy (%)", "value": round(100 * top5, 2)})
    return rows

