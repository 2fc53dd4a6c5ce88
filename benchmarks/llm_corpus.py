"""A corpus, tokenizer and small trained causal LM built only from what ships with Python (issue 24's evidence).

    OMP_NUM_THREADS=2 python benchmarks/llm_corpus.py --work-dir /tmp/llm      # a few minutes on a CPU, cached

Text: the standard library's own source files (code, comments and docstrings; its test suites left out) plus the
pydoc_data topics. Split by module, so no module is in two splits: ~80 % train, ~10 % calibration, ~10 % held-out
(the pydoc topics go to train). A byte-level BPE tokenizer (~4k vocabulary, `tokenizers`) is trained on the train
split, and a Llama-style model with grouped-query attention is trained next-token on it with a plain AdamW loop. The
model folder (save_pretrained + tokenizer) is a Hub-layout folder lrc reads; it is cached under --work-dir, keyed by
its settings, so later runs reuse it.
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import time
import zlib
from pathlib import Path

SPLITS = ("train", "calib", "test")


def split_of(module: str) -> str:
    """A fixed split per module name: 1 in 10 held out, 1 in 10 for calibration, the rest train."""
    bucket = zlib.crc32(module.encode()) % 10
    return "test" if bucket == 0 else "calib" if bucket == 1 else "train"


def source_files() -> dict[str, Path]:
    """The standard library's own Python files by dotted module name, without its test suites and site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in ("site-packages", "dist-packages") or {"test", "tests", "idle_test"} & set(rel.parts):
            continue
        files[".".join(rel.with_suffix("").parts)] = path
    return files


def write_corpus(root: Path) -> dict[str, Path]:
    """train.txt / calib.txt / test.txt under `root`; which module went where is in splits.json.

    The docstrings alone are ~2 MB, which a model of a few million parameters learns by heart in a few hundred steps
    (held-out perplexity ~150 however long it trains): the sources themselves (~12 MB) give it something to learn.
    A module's file (its code, comments and docstrings) goes whole to one split: no module is in two."""
    from pydoc_data.topics import topics

    texts: dict[str, list[str]] = {s: [] for s in SPLITS}
    where: dict[str, list[str]] = {s: [] for s in SPLITS}
    for name, path in source_files().items():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if len(text) > 200:
            texts[split_of(name)].append(text)
            where[split_of(name)].append(name)
    texts["train"] += [topics[k] for k in sorted(topics)]
    paths = {s: root / f"{s}.txt" for s in SPLITS}
    for split, path in paths.items():
        path.write_text("\n\n".join(texts[split]), encoding="utf-8")
    (root / "splits.json").write_text(json.dumps(where, indent=1) + "\n")
    return paths


def write_tokenizer(folder: Path, train: Path, vocab: int):
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(train.read_text(encoding="utf-8").split("\n\n"), trainers.BpeTrainer(
        vocab_size=vocab - 1, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.add_special_tokens(["<|endoftext|>"])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    tok.save_pretrained(folder)
    return tok


def train_model(folder: Path, train: Path, settings: dict, log=print) -> None:
    """Llama (GQA) from scratch, next-token on random windows of the train split, plain AdamW; saved to `folder`."""
    import torch
    import transformers

    tok = write_tokenizer(folder, train, settings["vocab"])
    ids = torch.tensor(tok(train.read_text(encoding="utf-8"))["input_ids"])
    config = transformers.LlamaConfig(
        hidden_size=settings["hidden"], num_hidden_layers=settings["layers"], num_attention_heads=settings["heads"],
        num_key_value_heads=settings["kv_heads"], intermediate_size=settings["intermediate"], vocab_size=len(tok),
        max_position_embeddings=max(256, settings["seq_len"]), tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=0.01)
    steps, L, start = settings["steps"], settings["seq_len"], time.monotonic()
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, settings["lr"], total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        at = torch.randint(0, len(ids) - L - 1, (settings["batch"],), generator=gen)
        batch = torch.stack([ids[i:i + L + 1] for i in at.tolist()])
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"step {step}/{steps} loss {loss.item():.3f} ({time.monotonic() - start:.0f}s)")
    model.eval().save_pretrained(folder)


FULL = dict(vocab=2048, hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384, seq_len=128, batch=16, steps=800,
            lr=3e-3)
QUICK = dict(vocab=1024, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, seq_len=64, batch=8, steps=40,
             lr=3e-3)


def build(work_dir: Path, settings: dict, log=print) -> tuple[Path, dict[str, Path]]:
    """The corpus splits and the trained model folder under `work_dir`, reused when already there."""
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    corpus = work_dir / "corpus_source"  # named for its text: an older docstring-only corpus is not reused
    corpus.mkdir(parents=True, exist_ok=True)
    paths = {s: corpus / f"{s}.txt" for s in SPLITS}
    if not all(p.exists() for p in paths.values()):
        paths = write_corpus(corpus)
    key = zlib.crc32(json.dumps(settings, sort_keys=True).encode())
    folder = work_dir / f"llama_{key:08x}"
    if not (folder / "model.safetensors").exists():
        tmp = work_dir / f".{folder.name}.tmp"
        tmp.mkdir(exist_ok=True)
        train_model(tmp, paths["train"], settings, log)
        (tmp / "settings.json").write_text(json.dumps(settings, indent=1) + "\n")
        tmp.rename(folder)  # the folder appears whole or not at all
    return folder, paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="a tiny model trained for a few steps (smoke run)")
    args = parser.parse_args()
    folder, paths = build(args.work_dir, QUICK if args.quick else FULL)
    print(folder, {s: p.stat().st_size for s, p in paths.items()})


if __name__ == "__main__":
    main()
