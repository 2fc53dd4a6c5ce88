"""Memory of data-aware calibration on a causal LM: sequential (one decoder layer at a time) vs parallel (one pass).

    OMP_NUM_THREADS=2 python benchmarks/calibration_memory.py                 # 8 layers, hidden 512
    OMP_NUM_THREADS=2 python benchmarks/calibration_memory.py --layers 16     # depth: sequential stays flat

A random Llama (GQA) is written with save_pretrained next to a byte-level BPE tokenizer trained on the standard
library's documentation (pydoc_data), then `lrc factorize --ratio 0.4 --calib ... --calib-mode M` runs in a fresh
process per mode. Reported per mode: the peak RSS of the factorize call above the process's peak after loading
(ru_maxrss), and the tensors calibration holds by construction:
- parallel keeps every target linear's input second moment (d_in x d_in, float64) until the SVDs, so it grows with
  depth; its activations are one batch's forward, freed batch by batch;
- sequential keeps the hidden states entering the current decoder layer (windows x seq_len x hidden, the model's
  dtype: `held_bytes` in the record) and that one layer's second moments.
Figures measured on a shared machine are indicative of memory only (memory does not depend on the load).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def write_model(folder: Path, layers: int, hidden: int, text: Path) -> None:
    import torch
    import transformers
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = list(topics.values())
    text.write_text("\n\n".join(corpus), encoding="utf-8")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=1023, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.add_special_tokens(["<|endoftext|>"])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    config = transformers.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8,
                                      num_key_value_heads=4, intermediate_size=int(hidden * 2.75) // 64 * 64,
                                      vocab_size=len(tok), max_position_embeddings=512)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)


def measure(folder: str, text: str, mode: str, samples: int, seq_len: int) -> dict:
    """In this (fresh) process: load, then factorize with calibration; peak RSS above the loaded model's."""
    import lowrank_cli

    def peak() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux

    loaded = lowrank_cli.load_model(folder)
    before = peak()
    result = lowrank_cli.factorize(loaded.model, ratio=0.4, calib=text, calib_samples=samples, calib_mode=mode,
                                   tokenizer=folder, input_size=(seq_len,))
    stats = sum(m.in_features ** 2 * 8 for n, m in loaded.model.named_modules() if type(m).__name__ == "LowRankLinear")
    per_layer = stats // loaded.model.config.num_hidden_layers
    cal = result.extra["calibration"]
    held = {"parallel": stats, "sequential": per_layer + cal.get("held_bytes", 0)}[mode]
    return {"mode": mode, "peak_rss_above_loaded_mib": round((peak() - before) / 2**20, 1),
            "held_by_construction_mib": round(held / 2**20, 1), "second_moments_all_layers_mib": round(stats / 2**20, 1),
            "hidden_states_mib": round(cal.get("held_bytes", 0) / 2**20, 1), "seconds": cal["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--measure", nargs=2, metavar=("FOLDER", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        folder, mode = args.measure
        print(json.dumps(measure(folder, str(Path(folder) / "calib.txt"), mode, args.samples, args.seq_len)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llama"
        write_model(folder, args.layers, args.hidden, folder.parent / "calib.txt")
        (folder / "calib.txt").write_text((folder.parent / "calib.txt").read_text())
        print(f"random Llama: {args.layers} layers, hidden {args.hidden}; {args.samples} windows of {args.seq_len} "
              "tokens; --ratio 0.4")
        for mode in ("parallel", "sequential"):
            out = subprocess.run([sys.executable, __file__, "--measure", str(folder), mode, "--samples",
                                  str(args.samples), "--seq-len", str(args.seq_len)], capture_output=True, text=True,
                                 env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if out.returncode:
                sys.exit(out.stderr)
            print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
