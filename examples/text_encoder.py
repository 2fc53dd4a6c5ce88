"""The lrc flow on a Hugging Face transformers text model, offline: a small BERT classifier trained here.

    python examples/text_encoder.py [--workdir DIR] [--train-steps 400] [--recover-steps 200] [--kappa 24]

1. collects real English sentences from the docstrings of Python's standard library (always on disk, no
   download), labelled by the module they document (the 8 modules with the most sentences), and splits them
   into training and held-out sentences;
2. trains a WordPiece tokenizer (the `tokenizers` library) and a small BertForSequenceClassification that
   tells the module from the sentence, and saves both with save_pretrained (a folder, like a Hub repo);
3. runs the CLI as a user would, on the training sentences as plain unlabelled text (corpus.txt):
       lrc factorize  (--calib on the corpus, --save-tokenizer)
       lrc report     (params / MACs at 64 tokens)
       lrc recover    (hidden-state distillation + logit KD; no labels)
4. measures the held-out accuracy of the teacher, the factorized and the recovered model.
A small model trained from scratch on a thousand sentences is very forgiving (at kappa 6 it loses nothing), so
the default kappa is 24: two runs here gave teacher 77.1 / 80.4%, factorized 59.2 / 58.8%, recovered
73.3 / 74.2% (the teacher's training is not bit-reproducible across runs). About 3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import pkgutil
import random
import re
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch


def lrc(*args: object) -> None:
    cmd = [sys.executable, "-m", "lowrank_cli", *map(str, args)]
    print("\n$ lrc " + " ".join(map(str, args)), flush=True)
    subprocess.run(cmd, check=True)


def stdlib_sentences(classes: int = 8) -> list[tuple[str, int]]:
    """(sentence, module index) for sentences of 6 to 40 words in the docstrings of the standard library's
    pure-Python modules, from the `classes` modules that have the most."""
    import sysconfig

    stdlib = sysconfig.get_paths()["stdlib"]
    found: dict[str, str] = {}
    names = sorted(m.name for m in pkgutil.iter_modules([stdlib]) if not m.name.startswith("_"))
    with warnings.catch_warnings():  # importing every module wakes deprecation notices (typing.io, ...)
        warnings.simplefilter("ignore")
        for name in names:
            _collect(name, found)
    top = [name for name, _ in collections.Counter(found.values()).most_common(classes)]
    return sorted((s, top.index(m)) for s, m in found.items() if m in top)


def _collect(name: str, found: dict[str, str]) -> None:
    if name in ("antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"):  # side effects, GUIs
        return
    try:
        module = importlib.import_module(name)
    except Exception:
        return
    docs = [module.__doc__] + [getattr(v, "__doc__", None) for v in vars(module).values()
                               if callable(v) and getattr(v, "__module__", None) == name]
    for doc in docs:
        if not isinstance(doc, str):
            continue
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
            if 6 <= len(sentence.split()) <= 40 and sentence not in found:
                found[sentence] = name


def build_teacher(folder: Path, train: list[tuple[str, int]], classes: int, steps: int) -> None:
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    transformers.utils.logging.disable_progress_bar()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator([t for t, _ in train], trainers.WordPieceTrainer(vocab_size=3000, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=64)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=512, max_position_embeddings=64,
                                     num_labels=classes)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    rng = random.Random(0)
    model.train()
    for step in range(steps):
        texts, labels = zip(*rng.sample(train, 32))
        batch = tokenizer(list(texts), padding=True, truncation=True, max_length=64, return_tensors="pt")
        loss = model(**batch, labels=torch.tensor(labels)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        if (step + 1) % 100 == 0:
            print(f"  teacher step {step + 1}/{steps}: cross-entropy {loss.item():.3f}", flush=True)
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def accuracy(model, tokenizer, data: list[tuple[str, int]]) -> float:
    right = 0
    with torch.no_grad():
        for i in range(0, len(data), 64):
            texts, labels = zip(*data[i:i + 64])
            batch = tokenizer(list(texts), padding=True, truncation=True, max_length=64, return_tensors="pt")
            right += int((model(**batch).logits.argmax(-1) == torch.tensor(labels)).sum())
    return right / len(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--recover-steps", type=int, default=200)
    parser.add_argument("--kappa", type=float, default=24.0)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lrc-text-"))
    work.mkdir(parents=True, exist_ok=True)

    data = stdlib_sentences()
    random.Random(0).shuffle(data)
    held_out, train = data[: len(data) // 5], data[len(data) // 5:]
    corpus = work / "corpus.txt"  # the training sentences, without their labels
    corpus.write_text("\n".join(t for t, _ in train) + "\n")
    print(f"{len(train)} training and {len(held_out)} held-out sentences of 8 standard-library modules")
    teacher = work / "bert-small"
    build_teacher(teacher, train, 8, args.train_steps)

    lowrank = work / "bert_lr.safetensors"
    recovered = work / "bert_lr_rec.safetensors"
    lrc("factorize", teacher, "--kappa", args.kappa, "--rank-multiple", 1, "--calib", corpus, "--calib-samples", 512,
        "--save-tokenizer", work / "bert_lr_tokenizer", "-o", lowrank, "--force")
    lrc("report", lowrank, "--seq-len", 64)
    lrc("recover", lowrank, "--teacher", teacher, "--data", corpus, "--steps", args.recover_steps,
        "--batch-size", 32, "--lr", "5e-4", "--gamma", 1, "-o", recovered, "--force")

    import lowrank_cli
    from lowrank_cli.data.texts import load_tokenizer

    tokenizer = load_tokenizer(work / "bert_lr_tokenizer")
    print(f"\nheld-out accuracy ({len(held_out)} sentences, 8 classes):")
    for label, model in (("teacher", lowrank_cli.load_model(str(teacher)).model),
                         (f"factorized, kappa {args.kappa:g}", lowrank_cli.load(lowrank)),
                         ("recovered", lowrank_cli.load(recovered))):
        print(f"  {label:22s} {100 * accuracy(model, tokenizer, held_out):.2f}%")


if __name__ == "__main__":
    main()
