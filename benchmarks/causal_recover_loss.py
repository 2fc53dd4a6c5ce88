"""Which recovery loss for a causal LM: hidden-state MSE + token-level KL (lrc's default), KL only, MSE only.

    OMP_NUM_THREADS=2 python benchmarks/causal_recover_loss.py                    # a few minutes on a CPU
    OMP_NUM_THREADS=2 python benchmarks/causal_recover_loss.py --steps 400 --out benchmarks/results/x.json

A small Llama (GQA) is trained from scratch (`lrc finetune --method full`, next-token) on the standard library's
documentation (pydoc_data, which ships with Python; a byte-level BPE tokenizer trained on it with `tokenizers`),
factorized at `--ratio` (plain SVD), then recovered for `--steps` steps with each loss; every model is scored by
perplexity on held-out topics that no run trained on (`lrc eval`'s protocol: disjoint windows of `--seq-len`).
Quality only: timings on a shared machine mean nothing.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

LOSSES = {"mse+kl (default)": {"alpha": 1.0}, "kl only": {"alpha": 0.0, "gamma": 1.0},
          "mse only": {"alpha": 1.0, "gamma": 0.0}}


def write_corpus(root: Path) -> tuple[Path, Path]:
    """The pydoc topics, shuffled with a fixed seed: 90 % to train on, 10 % held out for the perplexity."""
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)]
    random.Random(0).shuffle(texts)
    cut = len(texts) // 10
    train, test = root / "train.txt", root / "test.txt"
    train.write_text("\n\n".join(texts[cut:]), encoding="utf-8")
    test.write_text("\n\n".join(texts[:cut]), encoding="utf-8")
    return train, test


def write_model(folder: Path, train: Path, hidden: int, layers: int) -> None:
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(train.read_text().split("\n\n"), trainers.BpeTrainer(
        vocab_size=1023, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.add_special_tokens(["<|endoftext|>"])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    config = transformers.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=hidden * 2, vocab_size=len(tok),
                                      max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)


def perplexity(model: str, test: Path, tokenizer: Path, seq_len: int) -> float:
    import lowrank_cli
    from lowrank_cli.evaluation.perplexity import evaluate_perplexity

    loaded = lowrank_cli.load_model(model).model
    return evaluate_perplexity(loaded, test, str(tokenizer), seq_len=seq_len)["perplexity"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import lowrank_cli
    from lowrank_cli.compress.factorize_source import factorize_file

    quiet = dict(device="cpu", warn=lambda m: None)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train, test = write_corpus(root)
        write_model(root / "init", train, args.hidden, args.layers)
        lowrank_cli.finetune(str(root / "init"), str(train), output=root / "dense.safetensors", method="full",
                             lr=3e-3, steps=args.pretrain_steps, batch_size=16, seq_len=args.seq_len, keep="last",
                             **quiet)
        dense = lowrank_cli.load_model(str(root / "dense.safetensors"))
        dense.model.save_pretrained(root / "dense")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (root / "dense" / name).write_bytes((root / "init" / name).read_bytes())
        factorize_file(str(root / "dense"), str(root / "lr.safetensors"), ratio=args.ratio, rank_multiple=1)
        rows = {"dense": perplexity(str(root / "dense"), test, root / "dense", args.seq_len),
                f"factorized (ratio {args.ratio:g}, plain SVD)": perplexity(str(root / "lr.safetensors"), test,
                                                                            root / "dense", args.seq_len)}
        for label, weights in LOSSES.items():
            out = root / f"rec_{len(rows)}.safetensors"
            lowrank_cli.recover(str(root / "lr.safetensors"), str(root / "dense"), str(train), output=out,
                                steps=args.steps, batch_size=16, lr=1e-3, seq_len=args.seq_len, keep="last",
                                **weights, **quiet)
            rows[f"recovered, {label}"] = perplexity(str(out), test, root / "dense", args.seq_len)
    doc = {"settings": vars(args) | {"out": str(args.out)}, "perplexity": {k: round(v, 3) for k, v in rows.items()}}
    print(json.dumps(doc, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
