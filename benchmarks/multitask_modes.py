"""Multi-task fine-tuning modes against each other and against single-task fine-tuning, on a dense and on a
compressed backbone, measured in one run (issue 16's evidence).

    python benchmarks/multitask_modes.py [--epochs 3] [--lr 2e-3] [--adapter-rank 8] [--modalities texts,images]
        [--control images] [--json out.json] [--workdir DIR]
    python benchmarks/multitask_modes.py --quick        # tiny models and data, 1 epoch: a smoke test (< 60 s)

Data (benchmarks/multitask_data.py, nothing downloaded):
- texts: the first paragraphs of the docstrings of 7 standard-library modules; tasks `module` (which module, 7
  classes), `same` (are two docstrings of one module) and `similar` (a graded similarity 0-5 of two docstrings,
  scored by Spearman). Each task holds out 20 % of its training file (`val_fraction`, 96 samples); the texts rows
  are also scored on the tasks' dev.jsonl (120 samples each, texts no training saw) with `evaluate_tasks`.
- images: scikit-learn's digits (32x32) under two label sets over the very same images, `digit` (10 classes) and
  `parity` (even / odd), held out on the val/ split (450 images).

Backbones: random-weight models learn little through adapters, and no pretrained model ships offline, so each
backbone is a stand-in for a pretrained one: trained here, with full fine-tuning (`finetune(method="full")`), on
a related but different task of the same inputs: a small BERT (a WordPiece vocabulary of the training
docstrings' words, hidden 128, 3 layers, 128 positions) on the module GROUP (files and processes / development /
numbers), a small timm ViT (32x32 images, 4x4 patches, embed 64, depth 4) on "digit >= 5". That model is the dense
backbone; its one-shot SVD factorization at kappa 2 (`lowrank_cli.factorize`, no recovery) the compressed one.
These proxies are far weaker than real pretrained models, and their weights are small: an adapter's update is a
large share of them (printed under each table), which is the regime where merging hurts most.

Rows, every one with the same method (LoRA), adapter rank, seed, epochs, batch and learning rate, and keep="last"
(the held-out score of the final state: picking the best state on the split that is reported flatters the runs that
pick per task, single-task, against shared, which picks one state for all):
- single-task: each task fine-tuned alone (T models);
- experts: those very runs, kept as one backbone with each task's adapters beside it (`load(..., task=)` merges
  one); its scores ARE the single-task ones, only what is stored differs;
- merge average | weighted | concat | svd (rank = the adapter rank): the same runs again, every task's update
  merged into one backbone and every task scored again on it with its own head. `weighted` weighs by training
  samples, which are equal here, so it must equal `average`;
- single-task Tx epochs (`--control`): each task alone for T times the epochs, i.e. as many adapter steps as the
  shared run takes, to tell the other tasks' signal from the extra steps;
- shared sequential | interleaved | proportional: one set of adapters trained on all tasks' batches, one head per
  task, the same epochs over every task (so the same total steps as the T single-task runs together);
- orthogonal: LoRA whose B is each task's block of one fixed orthogonal matrix (only A trains), merged exactly.
The single-task / experts / merge rows come from ONE training per task (`ApartRuns.train_tasks`), combined several
ways (`task_combine.combine`); `train s` is that training's time (plus the combination's).

Columns: each task's held-out score (accuracy, or Spearman for `similar`: shown as (r + 1) / 2), the overall score
(the mean of the accuracies and (r + 1) / 2 of the correlations), `dev overall` (texts), `tasks alone`: the overall
of the runs a merge combined, before it (the loss is `tasks alone` - `overall`), `interference`:
||sum of updates||^2 / sum of ||update||^2 (1: orthogonal updates, T: all alike; training.merging.merge_summary),
`trained`: the parameters one run trains (adapters and heads) and their share of the parameters while training,
`stored`: what the output holds, in backbones (T for single-task; the backbone plus every task's adapters and
heads for experts; plus the heads only for the merged and shared outputs).

Noise: with 96 held-out texts a task's accuracy moves by about +-0.05 from sampling alone (the overall by about
+-0.03); with 450 images by about +-0.02. The runs are deterministic (seed 0): a rerun gives the same digits.
One CPU thread by default: on a shared 2-core machine two threads ran the small ViT 5-10x slower.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import inspect
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # digits.py
sys.path.insert(0, str(ROOT / "benchmarks"))  # multitask_data.py

import lowrank_cli  # noqa: E402
from lowrank_cli.checkpoint.format import record_source  # noqa: E402
from lowrank_cli.data.tasks import parse_tasks  # noqa: E402
from lowrank_cli.evaluation.counting import count_params  # noqa: E402
from lowrank_cli.evaluation.task_scores import overall_score, task_score  # noqa: E402
from lowrank_cli.training.finetune import finetune  # noqa: E402
from lowrank_cli.training.multitask import ApartRuns, finetune_tasks  # noqa: E402
from lowrank_cli.training.multitask_options import MultitaskOptions  # noqa: E402
from lowrank_cli.training.task_combine import combine  # noqa: E402

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
SCHEDULES = ("sequential", "interleaved", "proportional")
RULES = ("average", "weighted", "concat", "svd")
# Sizes: the full run, and --quick's (a smoke test, not a measurement).
SIZES = {
    "full": dict(bert=dict(hidden=128, layers=3, heads=4, intermediate=512), words=3000,
                 vit=dict(embed_dim=64, depth=4, num_heads=4), pretrain_epochs=(12, 8), max_per_class=None),
    "quick": dict(bert=dict(hidden=32, layers=2, heads=2, intermediate=64), words=300,
                  vit=dict(embed_dim=32, depth=2, num_heads=2), pretrain_epochs=(0.3, 0.3), max_per_class=12),
}


# ------------------------------------------------------------------------------------------------ backbones


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def write_vocab(texts: list[str], path: Path, words: int) -> Path:
    """A WordPiece vocab.txt: the special tokens, every single character and its ## form, then the `words` most
    frequent lowercase words of `texts` (so every text tokenizes without [UNK])."""
    counts = collections.Counter(w for t in texts for w in _words(t))
    chars = sorted({c for w in counts for c in w})
    tokens = [*SPECIALS, *chars, *(f"##{c}" for c in chars),
              *(w for w, _ in counts.most_common(words) if len(w) > 1)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(dict.fromkeys(tokens)) + "\n", encoding="utf-8")
    return path


def bert_tokenizer(vocab_file: Path):
    """A fast BERT tokenizer over `vocab_file` on transformers 4 and 5 (tests/hf_fixtures.bert_tokenizer without its
    check against the fixture's fixed vocabulary): transformers 5 reads `vocab=`, and ignores `vocab_file=`."""
    import transformers

    cls = transformers.BertTokenizerFast
    key = "vocab" if "vocab" in inspect.signature(cls.__init__).parameters else "vocab_file"
    return cls(**{key: str(vocab_file)})


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def compressed_of(dense: Path, output: Path, kappa: float) -> Path:
    """The dense backbone factorized at `kappa` (one-shot SVD), saved as an lrc checkpoint that names its source."""
    loaded = lowrank_cli.load_model(str(dense))
    lowrank_cli.factorize(loaded.model, kappa=kappa, device="cpu")
    record_source(loaded.model, loaded.source)
    return lowrank_cli.save(loaded.model, output)


def text_backbone(data: Path, work: Path, size: dict, common: dict) -> tuple[Path, dict]:
    """A small BERT with a vocabulary of the docstrings' words, fully fine-tuned on the module group of the module
    task's training texts; returns (the dense checkpoint, what its pretraining scored)."""
    import transformers
    from multitask_data import GROUPS

    transformers.logging.set_verbosity_error()
    folder = work / "bert"
    train = _read_jsonl(data / "module" / "train.jsonl")
    vocab = write_vocab([r["text"] for r in train], folder / "vocab.txt", size["words"])
    tokenizer = bert_tokenizer(vocab)
    b = size["bert"]
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=b["hidden"],
                                     num_hidden_layers=b["layers"], num_attention_heads=b["heads"],
                                     intermediate_size=b["intermediate"], max_position_embeddings=128,
                                     num_labels=len(GROUPS))
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    group = {m: g for g, members in GROUPS.items() for m in members}
    groups = _write_jsonl(work / "groups.jsonl", [{"text": r["text"], "label": group[r["label"]]} for r in train])
    return _pretrain(folder, groups, work / "bert_dense.safetensors", size["pretrain_epochs"][0], common)


def image_backbone(data: Path, work: Path, size: dict, common: dict) -> tuple[Path, dict]:
    """A small timm ViT fully fine-tuned on "digit >= 5" (big / small) over the digits' training images."""
    import timm
    from digits import relabel_imagefolder
    from timm.models import save_for_hf

    big = relabel_imagefolder(data / "digits", work / "big", lambda d: "big" if int(d) >= 5 else "small")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=2, img_size=32, patch_size=4,
                              **size["vit"])
    save_for_hf(model.eval(), str(work / "vit"), safe_serialization=True)
    return _pretrain(work / "vit", big, work / "vit_dense.safetensors", size["pretrain_epochs"][1], common)


def _pretrain(folder: Path, data: Path, output: Path, epochs: float, common: dict) -> tuple[Path, dict]:
    started = time.perf_counter()
    r = finetune(str(folder), data, output=output, method="full", epochs=epochs, lr=1e-3, **common)
    score = task_score(r.scores["after"])
    print(f"pretrained {folder.name} on {Path(data).name}: held-out {score[0]} {score[1]:.3f} "
          f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    return output, {"task": Path(data).stem, "metric": score[0], "score": score[1],
                    "seconds": round(time.perf_counter() - started, 1)}


# ------------------------------------------------------------------------------------------------ the rows


def _stored(path: Path) -> int:
    """Every number an output file stores (the backbone, every head, experts' adapters)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def _row(mode: str, variant: str | None, backbone: str, record: dict, seconds: float, output: Path | None,
         backbone_size: int, *, alone: list | None = None, stored: float | None = None) -> dict:
    """One row of the table from a multi-task checkpoint's record; `alone`: the FinetuneResults of the tasks' own
    runs, when the row combines runs that trained apart (their overall before the combination)."""
    tasks = record["tasks"]
    scores = {t["name"]: (t["scores"]["after"] or {}) for t in tasks}
    trained = [t.get("trainable_parameters") or 0 for t in tasks]
    parameters = [t.get("parameters") or 0 for t in tasks]
    merge = record.get("merge") or {}
    return {
        "mode": mode, "variant": variant, "backbone": backbone,
        "scores": {n: task_score(s)[1] if s else None for n, s in scores.items()},
        "raw_scores": scores,
        "overall": (record.get("overall") or {}).get("after"),
        "alone": overall_score({t["name"]: r.scores["after"] for t, r in zip(tasks, alone)}) if alone else None,
        "interference": merge.get("interference"), "cosines": merge.get("cosines"),
        "trained": max(trained), "trained_share": max(t / p for t, p in zip(trained, parameters) if p),
        "stored": stored if stored is not None else _stored(output) / backbone_size,
        "seconds": round(seconds, 1), "output": str(output) if output else None,
    }


def backbone_rows(name: str, source: Path, tasks: list[str], work: Path, opts: MultitaskOptions,
                  dev_tasks: list[str] | None, control: bool) -> list[dict]:
    """Every row of one backbone: the apart runs combined every way, the shared schedules, orthogonal; with
    `control`, single-task runs T times as long (as many adapter steps as a shared run takes)."""
    specs = parse_tasks(tasks)
    work.mkdir(parents=True, exist_ok=True)
    size = count_params(lowrank_cli.load(str(source))).total
    rows = []

    def add(row: dict, output: Path | None) -> None:
        rows.append(_with_dev(row, output, dev_tasks, opts))
        alone = f", tasks alone {_fmt(row['alone'])}" if row["alone"] is not None else ""
        print(f"  [{name}] {label(row)}: overall {_fmt(row['overall'])}{alone} ({row['seconds']:.0f} s)",
              file=sys.stderr, flush=True)

    # One training per task (single-task = experts' runs), combined as experts and by every merge rule.
    trained_in, results, runs = _apart(source, specs, work / f"{name}_experts.safetensors",
                                       dataclasses.replace(opts, mode="experts"))
    variants = [("experts", None, runs.opts)] + [
        ("merge", rule, dataclasses.replace(opts, mode="merge", merge_rule=rule,
                                            merge_rank=opts.adapter_rank if rule == "svd" else None))
        for rule in RULES]
    for mode, rule, o in variants:
        o.check()
        out = work / f"{name}_{mode}{'_' + rule if rule else ''}.safetensors"
        started = time.perf_counter()
        result = combine(str(source), specs, out, o, runs.work, results, lambda msg: None)
        seconds = trained_in + time.perf_counter() - started
        row = _with_dev(_row(mode, rule, name, result.record, seconds, out, size,
                             alone=results if mode == "merge" else None), out, dev_tasks, opts)
        if mode == "experts":  # the same runs, each task its own model: T backbones (and their heads)
            row["update_size"] = update_sizes(source, out, result.record)
            single = _row("single-task", None, name, result.record, trained_in, None, size, stored=len(specs))
            add({**single, **{k: row[k] for k in ("dev", "dev_overall") if k in row}}, None)
        add(row, None)
    shutil.rmtree(runs.work, ignore_errors=True)
    if control:
        longer = dataclasses.replace(opts, mode="experts", epochs=opts.epochs * len(specs))
        out = work / f"{name}_single_long.safetensors"
        seconds, long_results, runs = _apart(source, specs, out, longer)
        result = combine(str(source), specs, out, longer, runs.work, long_results, lambda msg: None)
        shutil.rmtree(runs.work, ignore_errors=True)
        add(_row("single-task", f"{len(specs)}x epochs", name, result.record, seconds, out, size,
                 stored=len(specs)), out)

    for mode, schedule in [("shared", s) for s in SCHEDULES] + [("orthogonal", None)]:
        out = work / f"{name}_{mode}{'_' + schedule if schedule else ''}.safetensors"
        o = dataclasses.replace(opts, mode=mode, schedule=schedule)
        started = time.perf_counter()
        result = finetune_tasks(str(source), tasks, output=out, options=o, log=lambda msg: None,
                                warn=lambda msg: None)
        add(_row(mode, schedule, name, result.record, time.perf_counter() - started, out, size,
                 alone=result.results or None), out)
    return rows


def update_sizes(source: Path, experts: Path, record: dict) -> dict[str, float]:
    """Each task's update relative to the backbone, ||delta|| / ||W|| over the weights it changed (the adapters
    merged; the head left out), read from the experts' checkpoint: how far a merge moves the other tasks."""
    from lowrank_cli.adapters.base import in_head

    base = dict(lowrank_cli.load(str(source)).named_parameters())
    sizes = {}
    for task in record["tasks"]:
        tuned = lowrank_cli.load(str(experts), task=task["name"])
        changed = [(p.detach().double(), base[n].detach().double()) for n, p in tuned.named_parameters()
                   if not in_head(n, task["head"]["modules"]) and n in base and p.shape == base[n].shape
                   and not torch.equal(p, base[n])]
        delta = sum(float((p - b).square().sum()) for p, b in changed)
        weight = sum(float(b.square().sum()) for _, b in changed)
        sizes[task["name"]] = math.sqrt(delta / weight) if weight else 0.0
    return sizes


def _apart(source: Path, specs: list, output: Path, opts: MultitaskOptions) -> tuple[float, list, ApartRuns]:
    """Every task fine-tuned on its own (the runs of experts and merge), in the ApartRuns' work folder; returns
    (seconds, their FinetuneResults, the runs)."""
    opts.check()
    runs = ApartRuns(str(source), specs, output, opts,
                     dict(progress=None, on_step=None, resume_command=None, log=lambda msg: None,
                          warn=lambda msg: None))
    started = time.perf_counter()
    runs.prepare()
    results = runs.train_tasks()
    return time.perf_counter() - started, results, runs


def _with_dev(row: dict, output: Path | None, dev_tasks: list[str] | None, opts: MultitaskOptions) -> dict:
    """The row with every task scored on its dev file (texts no training saw), by `evaluate_tasks`."""
    if dev_tasks is None or output is None:
        return row
    from lowrank_cli.evaluation.multitask import evaluate_tasks

    found = evaluate_tasks(str(output), dev_tasks, tokenizer=opts.tokenizer, device="cpu")
    row["dev"] = {n: task_score(s)[1] for n, s in found["tasks"].items()}
    row["dev_overall"] = found["overall"]
    return row


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


# ------------------------------------------------------------------------------------------------ the run


def modality_rows(modality: str, data: Path, work: Path, args, size: dict, common: dict) -> dict:
    """The pretrained backbone of `modality`, its compression, and every row on both."""
    work.mkdir(parents=True, exist_ok=True)
    if modality == "texts":
        tasks = [f"module={data}/module/train.jsonl", f"same={data}/same/train.jsonl",
                 f"similar={data}/similar/train.jsonl:score"]
        dev = [t.replace("train.jsonl", "dev.jsonl") for t in tasks]
        pre = dict(common, val_fraction=0.2)
        dense, pretraining = text_backbone(data, work, size, pre)
        own = dict(val_fraction=0.2, tokenizer=str(work / "bert"))
    else:
        tasks, dev = [f"digit={data}/digits", f"parity={data}/parity"], None
        dense, pretraining = image_backbone(data, work, size, dict(common, augment="none"))
        own = dict(augment="none")
    compressed = compressed_of(dense, work / f"{dense.stem.split('_')[0]}_lr.safetensors", args.kappa)
    opts = MultitaskOptions(method="lora", adapter_rank=args.adapter_rank, epochs=args.epochs, lr=args.lr,
                            keep="last", **common, **own)
    rows = []
    for name, source in (("dense", dense), ("compressed", compressed)):
        started = time.perf_counter()
        rows += backbone_rows(name, source, tasks, work / name, opts, dev, modality in args.control.split(","))
        print(f"{modality}, {name} backbone: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    params = {name: count_params(lowrank_cli.load(str(p))).total for name, p in (("dense", dense),
                                                                                 ("compressed", compressed))}
    return {"tasks": [s.name for s in parse_tasks(tasks)], "pretraining": pretraining, "parameters": params,
            "rows": rows}


def label(row: dict) -> str:
    return row["mode"] + (f" {row['variant']}" if row["variant"] else "")


def table(modality: str, found: dict) -> str:
    names, rows = found["tasks"], found["rows"]
    dev = any("dev" in r for r in rows)
    head = ["mode", "backbone", *names, "overall", *(["dev overall"] if dev else []), "tasks alone",
            "interference", "trained", "stored", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        interference = "-" if r["interference"] is None else f"{r['interference']:.2f}"
        cells = [label(r), r["backbone"], *(_fmt(r["scores"][n]) for n in names), f"**{_fmt(r['overall'])}**",
                 *([_fmt(r.get("dev_overall"))] if dev else []), _fmt(r["alone"]), interference,
                 f"{r['trained']:,} ({100 * r['trained_share']:.1f} %)", f"{r['stored']:.2f}x",
                 f"{r['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=float, default=3.0, help="passes over every task's training data")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--adapter-rank", type=int, default=8,
                        help="LoRA rank of every mode; orthogonal needs rank x tasks <= the compressed layers' ranks")
    parser.add_argument("--kappa", type=float, default=2.0)
    parser.add_argument("--modalities", default="texts,images")
    parser.add_argument("--control", default="images",
                        help="modalities that also get single-task runs T times as long (none: \"\")")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see the noise note above)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write every row here")
    parser.add_argument("--quick", action="store_true", help="tiny models and data: a smoke test, not a measurement")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.adapter_rank = 1.0, 2
    torch.set_num_threads(args.threads)
    size = SIZES["quick" if args.quick else "full"]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lrc-multitask-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"working in {work}", file=sys.stderr)
    from multitask_data import write_digit_label_sets, write_text_tasks

    data = work / "data"
    shutil.rmtree(data, ignore_errors=True)  # written afresh: multitask_data does not overwrite its links
    write_text_tasks(data, max_per_module=20 if args.quick else 100)
    write_digit_label_sets(data, image_size=32, max_per_class=size["max_per_class"])
    common = dict(batch_size=args.batch_size, seed=0, num_workers=0, device="cpu", log_every=10**6,
                  save_every=10**6, force=True)
    started = time.perf_counter()
    found = {m: modality_rows(m, data, work / m, args, size, common) for m in args.modalities.split(",")}
    seconds = time.perf_counter() - started

    settings = (f"LoRA rank {args.adapter_rank}, {args.epochs:g} epochs of every task, batch {args.batch_size}, "
                f"lr {args.lr:g}, seed 0, compressed = kappa {args.kappa:g} one-shot SVD; {args.threads} CPU "
                f"thread(s), {seconds / 60:.1f} min in all")
    print(f"\n{settings}")
    for modality, f in found.items():
        pre = f["pretraining"]
        print(f"\n### {modality}: backbone pretrained on {pre['task']} ({pre['metric']} {pre['score']:.3f}); "
              f"parameters dense {f['parameters']['dense']:,}, compressed {f['parameters']['compressed']:,}\n")
        print(table(modality, f))
        sizes = [f"{r['backbone']}: " + ", ".join(f"{t} {v:.2f}" for t, v in r["update_size"].items())
                 for r in f["rows"] if r.get("update_size")]
        print(f"\nEach task's update, ||delta|| / ||W|| over the weights it changes: {'; '.join(sizes)}")
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"workdir": str(work), "json": str(args.json)},
                                         "machine": machine(), "seconds": round(seconds, 1), "modalities": found},
                                        indent=1, default=str))
    print(f"\nfiles in {work}")


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"


if __name__ == "__main__":
    main()
