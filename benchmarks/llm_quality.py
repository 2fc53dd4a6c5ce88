"""Held-out perplexity of a small trained Llama (GQA) factorized at several ratios, in SVD-LLM's table shape.

    OMP_NUM_THREADS=2 python benchmarks/llm_quality.py --work-dir /tmp/llm          # ~15 min on a quiet 2-core CPU
    OMP_NUM_THREADS=2 python benchmarks/llm_quality.py --work-dir /tmp/llm --quick  # smoke run, ~2 min

The model, corpus and tokenizer come from benchmarks/llm_corpus.py (standard-library docstrings, split by module;
the model is cached under --work-dir). Rows: dense; plain SVD (no data); whitened SVD with calibration statistics
gathered on the unfactorized model (`--calib-mode parallel`); whitened SVD where each decoder layer is calibrated on
the outputs of the layers already factorized (`--calib-mode sequential`); sequential followed by a short
`lrc recover` (hidden-state MSE + KL against the dense model, on the train split). Columns: `--ratio` 0.2 / 0.4 /
0.6 (the fraction of the decoder layers' linear parameters removed). Perplexity is `lrc eval`'s protocol (disjoint
windows, stride = seq-len) on the held-out modules, which neither training, calibration nor recovery saw.
Markdown to stdout, JSON to --out. Quality only: timings on a shared machine mean nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llm_corpus  # noqa: E402

RATIOS = (0.2, 0.4, 0.6)
ROWS = ("plain SVD", "whitened, parallel", "whitened, sequential", "whitened, sequential + recover")


def perplexity(model: str, test: Path, tokenizer: Path, seq_len: int) -> float:
    import lowrank_cli
    from lowrank_cli.evaluation.perplexity import evaluate_perplexity

    loaded = lowrank_cli.load_model(model).model
    return evaluate_perplexity(loaded, test, str(tokenizer), seq_len=seq_len)["perplexity"]


def factorized(dense: Path, out: Path, row: str, ratio: float, paths: dict, args) -> Path:
    from lowrank_cli.compress.factorize_source import factorize_file

    calib = {} if row == "plain SVD" else dict(calib=str(paths["calib"]), calib_samples=args.calib_samples,
                                              calib_mode="parallel" if "parallel" in row else "sequential",
                                              tokenizer=str(dense))
    factorize_file(str(dense), str(out), ratio=ratio, rank_multiple=1, seq_len=args.seq_len, **calib)
    return out


def recovered(student: Path, dense: Path, out: Path, paths: dict, args) -> Path | None:
    """`lrc recover` through the public API; None (the row reads "n/a") where this lrc cannot recover a causal LM."""
    import lowrank_cli

    try:
        lowrank_cli.recover(str(student), str(dense), str(paths["train"]), output=out, steps=args.recover_steps,
                            batch_size=8, lr=1e-3, seq_len=args.seq_len, keep="last", device="cpu",
                            warn=lambda m: None)
    except Exception as exc:  # noqa: BLE001 - reported, and the table goes on
        print(f"recover: n/a ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})", file=sys.stderr)
        return None
    return out


def table(doc: dict) -> str:
    lines = ["| method | " + " | ".join(f"ratio {r:g}" for r in RATIOS) + " |", "|---" * (len(RATIOS) + 1) + "|",
             "| dense | " + " | ".join(f"{doc['dense']:.2f}" for _ in RATIOS) + " |"]
    for row in ROWS:
        cells = [doc["perplexity"][row].get(f"{r:g}") for r in RATIOS]
        lines.append(f"| {row} | " + " | ".join("n/a" if c is None else f"{c:.2f}" for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, required=True, help="holds the cached corpus and model")
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps: a smoke run")
    parser.add_argument("--calib-samples", type=int, default=None)
    parser.add_argument("--recover-steps", type=int, default=None)
    parser.add_argument("--train-steps", type=int, default=None, help="the dense model's training steps")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "llm_quality.json")
    args = parser.parse_args()
    settings = dict(llm_corpus.QUICK if args.quick else llm_corpus.FULL)
    settings["steps"] = args.train_steps or settings["steps"]
    args.seq_len = settings["seq_len"]
    args.calib_samples = args.calib_samples or (16 if args.quick else 64)
    args.recover_steps = args.recover_steps or (10 if args.quick else 100)
    dense, paths = llm_corpus.build(args.work_dir, settings, log=lambda m: print(m, file=sys.stderr))
    runs = args.work_dir / f"runs_{dense.name}"  # one model's factorizations; a rerun starts them afresh
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir()
    doc = {"settings": settings | {"calib_samples": args.calib_samples, "recover_steps": args.recover_steps,
                                   "quick": args.quick},
           "dense": perplexity(str(dense), paths["test"], dense, args.seq_len), "perplexity": {r: {} for r in ROWS}}
    for ratio in RATIOS:
        for row in ROWS[:3]:
            out = factorized(dense, runs / f"{ROWS.index(row)}_{ratio:g}.safetensors", row, ratio, paths, args)
            doc["perplexity"][row][f"{ratio:g}"] = perplexity(str(out), paths["test"], dense, args.seq_len)
        rec = recovered(out, dense, runs / f"rec_{ratio:g}.safetensors", paths, args)
        doc["perplexity"][ROWS[3]][f"{ratio:g}"] = (None if rec is None else
                                                    perplexity(str(rec), paths["test"], dense, args.seq_len))
        print(f"ratio {ratio:g} done", file=sys.stderr)
    print(table(doc))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
