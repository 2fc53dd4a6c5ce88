"""Tiny decoder-only LMs of the families lrc reads, saved with save_pretrained next to a real byte-level BPE
tokenizer, built offline in a second (a stop-gap until tests/lm_fixtures.py lands: the same function names).

    write_tiny_causal_lm(folder, "llama")    # LlamaForCausalLM (GQA: 4 heads, 2 key/value heads), tokenizer
    write_token_text(path, tokens=200)       # a text file of about that many tokens
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import torch
from hf_fixtures import WORDS, corpus_sentences

VOCAB = 320  # the BPE's entries (bytes and merges) and one <|endoftext|>
EOT = "<|endoftext|>"
CAUSAL_LM_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "phi3", "gpt_neox", "opt")


@functools.lru_cache(maxsize=1)
def _bpe_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(corpus_sentences(256, seed=0) + [" ".join(WORDS)], trainer)
    bpe.add_special_tokens([EOT])
    return bpe.to_str()


def tokenizer(max_length: int = 128):
    import transformers
    from tokenizers import Tokenizer

    return transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_bpe_json()), eos_token=EOT,
                                                bos_token=EOT, model_max_length=max_length)


def _config(model_type: str, *, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int,
            positions: int, tie: bool | None):
    import transformers as t

    llama = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                 num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=vocab,
                 max_position_embeddings=positions, initializer_range=0.1, bos_token_id=vocab - 1,
                 eos_token_id=vocab - 1)
    plain = {k: v for k, v in llama.items() if k != "num_key_value_heads"}
    configs = {
        "gpt2": lambda: t.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_inner=intermediate,
                                     vocab_size=vocab, n_positions=positions, initializer_range=0.1,
                                     bos_token_id=vocab - 1, eos_token_id=vocab - 1),
        "llama": lambda: t.LlamaConfig(**llama),
        "mistral": lambda: t.MistralConfig(**llama),
        "qwen2": lambda: t.Qwen2Config(**llama),
        "qwen3": lambda: t.Qwen3Config(**llama, head_dim=hidden // heads),
        "phi3": lambda: t.Phi3Config(**llama, original_max_position_embeddings=positions, pad_token_id=vocab - 1),
        "gpt_neox": lambda: t.GPTNeoXConfig(**plain),
        "opt": lambda: t.OPTConfig(**{k: v for k, v in plain.items() if k not in ("intermediate_size",
                                                                                   "initializer_range")},
                                   ffn_dim=intermediate, word_embed_proj_dim=hidden, init_std=0.1,
                                   pad_token_id=vocab - 1),
    }
    config = configs[model_type]()
    if tie is not None:
        config.tie_word_embeddings = tie
    return config


def write_tiny_causal_lm(folder: str | Path, model_type: str = "llama", *, seed: int = 0, hidden: int = 32,
                         layers: int = 2, heads: int = 4, kv_heads: int = 2, intermediate: int = 64,
                         vocab: int | None = None, tie: bool | None = None, tokenizer_files: bool = True,
                         max_positions: int = 128) -> Path:
    """A random causal LM of `model_type` saved with save_pretrained, and the tokenizer (ids below VOCAB); a
    `vocab` below VOCAB makes a model that the tokenizer's ids overflow."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    config = _config(model_type, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
                     intermediate=intermediate, vocab=vocab or VOCAB, positions=max_positions, tie=tie)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer_files:
        tokenizer(max_positions).save_pretrained(folder)
    return folder


def write_token_text(path: str | Path, tokens: int, *, seed: int = 0) -> Path:
    """A text file that the fixture tokenizer encodes as exactly `tokens` tokens (one-token words fill the end)."""
    tok, rng = tokenizer(), random.Random(seed)
    count = functools.lru_cache(maxsize=None)(lambda piece: len(tok(piece)["input_ids"]))
    words = [w for w in WORDS if w.isalpha()]
    pieces, left = [], tokens
    while left > 0:
        prefix = "" if not pieces else " "
        piece = prefix + rng.choice(words)
        if count(piece) > left:
            piece = next(prefix + w for w in words if count(prefix + w) == 1)
        pieces.append(piece)
        left -= count(piece)
    text = "".join(pieces)
    assert len(tok(text)["input_ids"]) == tokens
    path = Path(path)
    path.write_text(text, encoding="utf-8")
    return path


def write_remote_code_lm(folder: str | Path, *, known_type: bool = False) -> Path:
    """A tiny Llama whose config.json names remote code (auto_map); the code files, if ever imported, write a
    REMOTE_CODE_RAN file next to them. known_type=False also renames model_type (transformers cannot build it)."""
    folder = write_tiny_causal_lm(folder, "llama")
    sentinel = (folder / "REMOTE_CODE_RAN").resolve()
    for name in ("configuration_remote.py", "modeling_remote.py"):
        (folder / name).write_text(f"import pathlib\npathlib.Path({str(sentinel)!r}).write_text('ran')\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_remote.RemoteConfig",
                          "AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM"}
    if not known_type:
        config.update(model_type="tiny_remote", architectures=["RemoteForCausalLM"])
    (folder / "config.json").write_text(json.dumps(config))
    return folder
