"""The markdown body of an lrc model card: what the model is, its size against the original, how it was made,
what was measured (accuracy, speed), how to load it, which files the repo holds and what to cite.

Every number comes from the checkpoint's metadata, `build_report`'s document or the user's measurement files;
local paths are reduced to their last part (a card is public, the machine it was made on is not).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowrank_cli.checkpoint.format import CheckpointInfo
from lowrank_cli.evaluation.counting import format_size
from lowrank_cli.evaluation.report_format import flat_text
from lowrank_cli.models.families import family_of_spec, source_label
from lowrank_cli.models.lrc_folder import CHECKPOINT_FILE, MARKER
from lowrank_cli.models.sentence import recorded_embedding, staged_files
from lowrank_cli.models.spec import ModelSpec
from lowrank_cli.publish.card_perplexity import perplexity_section
from lowrank_cli.publish.inputs import BenchFacts, EvalFacts, dataset_name

LRC_URL = "https://pypi.org/project/lowrank-cli/"
PELA_BIBTEX = """@article{guo2023pela,
  title   = {PELA: Learning Parameter-Efficient Models with Low-Rank Approximation},
  author  = {Guo, Yangyang and Wang, Guangzhi and Kankanhalli, Mohan},
  journal = {arXiv preprint arXiv:2310.10700},
  year    = {2023}
}"""
SVD_LLM_BIBTEX = """@article{wang2024svdllm,
  title   = {SVD-LLM: Truncation-aware Singular Value Decomposition for Large Language Model Compression},
  author  = {Wang, Xin and Zheng, Yu and Wan, Zhongwei and Zhang, Mi},
  journal = {arXiv preprint arXiv:2403.07378},
  year    = {2024}
}"""


def card_body(info: CheckpointInfo, report: dict[str, Any], *, name: str, repo_id: str | None,
              bench: BenchFacts | None, evals: list[EvalFacts], text: bool, tokenizer: list[str] | None) -> str:
    sections = [
        intro(info, name), size_section(report), method_section(info, report), accuracy_section(info, evals),
        perplexity_section(info, evals),
        speed_section(bench), usage_section(repo_id, info.spec, text, tokenizer), sentence_section(info, repo_id),
        files_section(tokenizer, sentence=sentence_names(info)), citation_section(info),
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def source_name(source: dict[str, Any] | None) -> str:
    """A model source as a card names it: a Hub repo as a link, a timm name as is, a local path by its last part."""
    source = source or {}
    kind, ident = source.get("kind"), str(source.get("id") or "?")
    if kind == "hf-hub":
        return f"[{ident}](https://huggingface.co/{ident})"
    label = source_label(source)  # a kind of source a family has (a timm name)
    return label if label is not None else f"a local model (`{Path(ident).name}`)"


def intro(info: CheckpointInfo, name: str) -> str:
    recovered = ", then distilled from the original model to recover its accuracy" if info.recovery else ""
    return (
        f"# {name}\n\n"
        f"`{info.spec.architecture}` ({info.spec.library}) made smaller by low-rank factorization with "
        f"[lrc]({LRC_URL}) (PELA): each linear layer inside the transformer blocks is replaced by two smaller ones "
        f"whose product is the truncated SVD of its weight{recovered}. Original model: "
        f"{source_name((info.provenance or {}).get('source'))}."
    )


def size_section(doc: dict[str, Any]) -> str:
    params, macs, ref = doc["params"], doc["macs"], doc["dense_reference"] or {}
    size = doc["model"]["input_size"] or []
    unit = f"{size[0]} tokens" if len(size) == 1 else ("x".join(map(str, size)) + " image")
    ratio = doc["compression"] or {}

    def row(label: str, original: int | None, this: int | None, factor: float | None) -> str:
        cells = [format_size(v) if v is not None else "-" for v in (original, this)]
        return f"| {label} | {cells[0]} | {cells[1]} | {f'{factor:.2f}x' if factor else '-'} |"

    ref_macs = ref.get("macs")
    lines = ["## Size", "", "| | original | this model | reduction |", "|---|---:|---:|---:|",
             row("parameters", ref.get("params"), params["total"], ratio.get("params")),
             row(f"MACs ({unit}, batch 1)", ref_macs, macs["total"], ratio.get("macs")),
             row("FLOPs", 2 * ref_macs if ref_macs is not None else None, macs["flops"], ratio.get("macs"))]
    how = {"reconstructed": "the same model with every low-rank layer put back to the dense layer it replaced",
           "compare": "measured on the original model", "self": "the model itself"}.get(ref.get("kind"), "-")
    lines += ["", f"Counted by `lrc report` (fvcore, FLOPs = 2 x MACs); original: {how}."]
    if macs["uncounted"]:
        lines[-1] += f" Ops fvcore cannot count are left out of both: {', '.join(sorted(macs['uncounted']))}."
    return "\n".join(lines)


def method_section(info: CheckpointInfo, doc: dict[str, Any]) -> str:
    p = info.provenance or {}
    lines = ["## How it was made", "", f"- Factorization: {_svd_text(p)}.", f"- Ranks: {_rank_rule(p)}."]
    layers = info.layers or {}
    groups: dict[str, list[int]] = {}
    for layer, rank in info.ranks.items():
        groups.setdefault(layer.rsplit(".", 1)[-1], []).append(rank)
    by_group = ", ".join(f"{g} {_span(r)}" for g, r in groups.items())
    energies = [v["kept_energy"] for v in layers.values() if isinstance(v.get("kept_energy"), (int, float))]
    kept = f"; mean kept spectral energy {sum(energies) / len(energies):.3f}" if energies else ""
    lines.append(f"- {len(info.ranks)} linear layers factorized (ranks: {by_group}){kept}.")
    if info.dense:
        reasons: dict[str, int] = {}
        for why in info.dense.values():
            reasons[why] = reasons.get(why, 0) + 1
        lines.append(f"- {len(info.dense)} target layers left dense: "
                     + "; ".join(f"{n} x {why}" for why, n in reasons.items()) + ".")
    if p.get("speed_plan"):
        lines.append(f"- Speed plan (layers kept dense where the factorized form was not faster): "
                     f"{flat_text(p['speed_plan'], 200)}.")
    lines.append(f"- Stored as {doc['model']['dtype']}; written by lrc {info.lrc_version} (checkpoint schema "
                 f"{info.schema}).")
    if info.recovery:
        lines.append(f"- Recovery: {_recovery_text(info.recovery)}.")
    return "\n".join(lines)


def _span(values: list[int]) -> str:
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high}"


def _svd_text(p: dict[str, Any]) -> str:
    calib = p.get("calibration")
    if calib:
        data, _ = dataset_name(str(calib.get("data", "?")))
        return (f"data-aware truncated SVD (SVD-LLM style: whitened by each layer's input second moments on "
                f"{calib.get('samples', '?')} samples of `{data}`)")
    return f"truncated SVD ({p.get('svd', 'exact')}), PELA's one-shot factorization"


def _rank_rule(p: dict[str, Any]) -> str:
    multiple = p.get("rank_multiple", "?")
    budget = p.get("budget")
    if budget:
        what = (f"{100 * budget['keep_fraction']:.0f} % of the target layers' parameters"
                if budget.get("keep_fraction") is not None else f"{format_size(budget.get('target_macs') or 0)} MACs")
        return f"a rank budget of {what}, allocated per layer by kept spectral energy, multiples of {multiple}"
    return (f"PELA's rule r = floor(d_in * d_out / (kappa * (d_in + d_out))) with kappa {_number(p.get('kappa'))}, "
            f"rounded down to a multiple of {multiple}")


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else "?"


def _recovery_text(r: dict[str, Any]) -> str:
    data, _ = dataset_name(str(r.get("data", "?")))
    loss = [("alpha", "feature MSE of every block"), ("beta", "weight-perturbation regulariser"),
            ("gamma", "logit KD"), ("delta", "pooled-output MSE")]
    terms = " + ".join(f"{r[k]:g} x {what}" for k, what in loss if isinstance(r.get(k), (int, float)) and r[k])
    ce = "CE on labels + " if r.get("labels") else ""
    return (f"{r.get('steps', '?')} steps of distillation from {source_name(r.get('teacher'))} on `{data}` "
            f"({r.get('train_images', '?')} training examples), batch {r.get('images_per_step', r.get('batch_size'))}, "
            f"AdamW lr {r.get('lr', '?')} ({r.get('schedule', '?')}), loss = {ce}{terms or 'none'}, "
            f"{r.get('precision', '?')}")


def accuracy_section(info: CheckpointInfo, evals: list[EvalFacts]) -> str:
    rows = []
    accuracy = (info.recovery or {}).get("accuracy") or {}
    data, _ = dataset_name(str((info.recovery or {}).get("data", "?")))
    for key, label in (("teacher", "original"), ("before", "factorized, before recovery"), ("after", "this model")):
        a = accuracy.get(key)
        if a and isinstance(a.get("top1"), (int, float)):
            rows.append((data, "val", label, a["top1"], a.get("top5"), a.get("images")))
    rows += [(e.dataset, e.split or "-", "this model (lrc eval)", e.top1, e.top5, e.images) for e in evals
             if e.top1 is not None]
    if not rows:
        return ""

    def pct(v: float | None) -> str:
        return f"{100 * v:.2f} %" if isinstance(v, (int, float)) else "-"

    lines = ["## Accuracy", "", "| data | split | model | top-1 | top-5 | images |", "|---|---|---|---:|---:|---:|"]
    lines += [f"| {d} | {s} | {m} | {pct(t1)} | {pct(t5)} | {n if n is not None else '-'} |"
              for d, s, m, t1, t5, n in rows]
    lines += ["", "Measured by `lrc recover` (before and after recovery, on the data's val split) and `lrc eval`."]
    return "\n".join(lines)


def speed_section(bench: BenchFacts | None) -> str:
    if bench is None:
        return ""
    mode = f"compiled ({bench.compile})" if bench.compile else "eager"
    size = "x".join(map(str, bench.input_size)) or "?"
    lines = ["## Speed", "", f"Measured by `lrc bench` on {bench.device_name}, {bench.dtype}, {mode}, input {size}:",
             "", "| batch | model | median ms | per second | speed-up |", "|---:|---|---:|---:|---:|"]
    for r in bench.rows:
        label = "this model" if r["model"] == bench.model else "original"
        speed = f"{r['speedup']:.2f}x" if isinstance(r.get("speedup"), (int, float)) else "-"
        lines.append(f"| {r['batch_size']} | {label} | {r['median_ms']:,.2f} | {r['throughput']:,.1f} | {speed} |")
    return "\n".join(lines)


def usage_section(repo_id: str | None, spec: ModelSpec, text: bool, tokenizer: list[str] | None) -> str:
    """How to install and load it: the family of `spec` says which extra and which lines of Python."""
    repo = repo_id or "ORG/REPO"
    load = f'model = lowrank_cli.load("hf-hub:{repo}")  # the low-rank model, in eval mode'
    extra, python = family_of_spec(spec).card_usage(load, repo, text, tokenizer)
    return "\n".join([
        "## How to use", "", "```bash", f'pip install "lowrank-cli{extra}"',
        f"lrc report hf-hub:{repo}          # parameters, MACs, ranks and provenance", "```", "", "```python",
        *python, "```", "",
        "The checkpoint is a plain safetensors file: `lowrank_cli.load` rebuilds the architecture from its metadata, "
        "checks the ranks against the tensor shapes and never unpickles anything.",
    ])


def sentence_section(info: CheckpointInfo, repo_id: str | None) -> str:
    """How to run it as a sentence-transformers model, for a checkpoint made from one (its embedding record)."""
    embedding = recorded_embedding(info)
    if embedding is None:
        return ""
    repo = repo_id or "ORG/REPO"
    modes = embedding.get("pooling") or []
    pooling = f"{' + '.join(modes)} pooling over the tokens" if modes else "no Pooling module"
    normalized = ", then L2-normalised" if embedding.get("normalize") else ""
    return "\n".join([
        "## Use with sentence-transformers", "", "```bash", 'pip install "lowrank-cli[sentence-transformers]"', "```",
        "", "```python", "import lowrank_cli",
        f'model = lowrank_cli.sentence_transformer("hf-hub:{repo}")  # a sentence_transformers.SentenceTransformer',
        'embeddings = model.encode(["The first sentence.", "And a second one."])', *_prompt_lines(embedding), "```", "",
        f"The embedding is the original model's: {pooling}{normalized}; the repo holds its "
        f"{', '.join(f'`{n}`' for n in staged_files(embedding, 0))}. Plain `SentenceTransformer(...)` on this "
        "repo does not work: its transformer is low-rank, a module type outside the `sentence_transformers` package, "
        "and sentence-transformers refuses such types unless you pass `trust_remote_code=True`, which we never ask "
        "you to enable. `lowrank_cli.sentence_transformer` builds the same pipeline without it: it accepts only the "
        "Transformer, Pooling and Normalize modules and imports no code from the repo.",
    ])


def _prompt_lines(embedding: dict[str, Any]) -> list[str]:
    """The usage line of the prompts the model was trained with (config_sentence_transformers.json), if any."""
    names = [name for name, text in (embedding.get("prompts") or {}).items() if text]
    if not names:
        return []
    return [f'queries = model.encode(["A question?"], prompt_name="{names[0]}")  # its prompts: '
            f'{", ".join(names)}']


def sentence_names(info: CheckpointInfo) -> list[str]:
    """The sentence-transformers files `lrc push` stages for this checkpoint (none: not a sentence model)."""
    embedding = recorded_embedding(info)
    return [] if embedding is None else list(staged_files(embedding, 0))


def files_section(tokenizer: list[str] | None, *, sentence: list[str] = ()) -> str:
    lines = ["## Files", "",
             f"- `{CHECKPOINT_FILE}`: the lrc checkpoint; its `lrc.*` metadata holds the architecture, ranks, "
             "provenance, per-layer errors and kept energies, and the recovery settings if it was recovered.",
             f"- `{MARKER}`: marks the repo as an lrc checkpoint (what `hf-hub:` loading looks for).",
             "- `README.md`: this card, generated by `lrc card` from the checkpoint."]
    if sentence:
        lines.append(f"- {', '.join(f'`{n}`' for n in sentence)}: the sentence-transformers pipeline (what "
                     "`lowrank_cli.sentence_transformer` reads).")
    if tokenizer:
        lines.append(f"- tokenizer: {', '.join(f'`{n}`' for n in tokenizer)}.")
    elif tokenizer == []:
        lines.append("- no tokenizer: use the original model's.")
    return "\n".join(lines)


def citation_section(info: CheckpointInfo) -> str:
    entries = [PELA_BIBTEX]
    if (info.provenance or {}).get("calibration"):
        entries.append(SVD_LLM_BIBTEX)
    return "\n".join(["## Citation", "", "```bibtex", "\n\n".join(entries), "```"])
