"""Tiny Hugging Face transformers models and text for tests, built offline in a second (nothing is downloaded).

The models are random-weight BERT / ViT with the real transformers classes, saved with `save_pretrained`
(config.json + model.safetensors) exactly as a Hub repo or a fine-tuning run lays them out, next to a real
WordPiece tokenizer over a fixed ~200-word vocabulary, so every token of `write_corpus`'s text is known.
"""

from __future__ import annotations

import inspect
import json
import random
from pathlib import Path

import torch

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
WORDS = tuple(
    """
    the of and to a in is it you that he was for on are with as his they be at one have this from or had by
    word but what some we can out other were all there when up use your how said an each she which do their
    time if will way about many then them write would like so these her long make thing see him two has look
    more day could go come did number sound no most people my over know water than call first who may down
    side been now find any new work part take get place made live where after back little only round man
    year came show every good me give our under name very through just form sentence great think say help
    low line differ turn cause much mean before move right boy old too same tell does set three want air well
    also play small end put home read hand port large spell add even land here must big high such follow act
    why ask men change went light kind off need house picture try us again animal point mother world near
    build self earth father head stand own page should country found answer school grow study still learn
    plant cover food sun four between state keep eye never last let thought city tree cross farm hard start
    """.split()
) + tuple(str(d) for d in range(10))


def write_bert_vocab(path: str | Path) -> Path:
    """A WordPiece vocab.txt: the 5 BERT special tokens, then WORDS (lowercase words and the digits 0-9)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens = list(dict.fromkeys((*SPECIAL_TOKENS, *WORDS)))  # unique, in order
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return path


def vocab_size() -> int:
    return len(dict.fromkeys((*SPECIAL_TOKENS, *WORDS)))


def bert_tokenizer(vocab_file: str | Path):
    """A fast BERT tokenizer over `vocab_file`, on transformers 4 and 5 alike.

    transformers 5 made BertTokenizerFast an alias of BertTokenizer, whose constructor takes `vocab=` (a dict or
    a vocab.txt path) and silently ignores `vocab_file=`, which leaves only the 5 special tokens.
    """
    import transformers

    cls = transformers.BertTokenizerFast
    key = "vocab" if "vocab" in inspect.signature(cls.__init__).parameters else "vocab_file"
    tokenizer = cls(**{key: str(vocab_file)})
    assert len(tokenizer) == vocab_size(), f"tokenizer has {len(tokenizer)} tokens, vocab.txt {vocab_size()}"
    return tokenizer


def _quiet(transformers) -> None:
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def write_tiny_bert(folder: str | Path, *, head: str | None = "sequence-classification", num_labels: int = 3,
                    tokenizer: bool = True, seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 4,
                    intermediate: int = 64, dropout: float = 0.1, initializer_range: float = 0.02) -> Path:
    """A random BERT saved with save_pretrained into `folder` (and its tokenizer unless tokenizer=False).

    head: None (BertModel), "sequence-classification" (BertForSequenceClassification, num_labels) or
    "masked-lm" (BertForMaskedLM). max_position_embeddings is 64. A larger `initializer_range` makes the layers
    matter next to the embeddings (random BERT weights at 0.02 barely change the hidden states).
    """
    import transformers

    _quiet(transformers)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    classes = {
        None: transformers.BertModel,
        "sequence-classification": transformers.BertForSequenceClassification,
        "masked-lm": transformers.BertForMaskedLM,
    }
    if head not in classes:
        raise ValueError(f"head must be one of {list(classes)}, got {head!r}")
    config = transformers.BertConfig(
        vocab_size=vocab_size(), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate, max_position_embeddings=64, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout, initializer_range=initializer_range,
        **({"num_labels": num_labels} if head == "sequence-classification" else {}),
    )
    torch.manual_seed(seed)
    model = classes[head](config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer:
        vocab = write_bert_vocab(folder / "vocab.txt")
        bert_tokenizer(vocab).save_pretrained(folder)
    return folder


def write_sentence_transformers(folder: str | Path, *, pooling_mode: str = "mean", normalize: bool = False,
                                max_seq_length: int = 64, **kw) -> Path:
    """A sentence-transformers model folder: a BertModel (write_tiny_bert, head=None) at the root, a pooling
    module in 1_Pooling/ (`pooling_mode`: mean, cls, max, mean_sqrt_len_tokens; "" sets none), a 2_Normalize
    module when `normalize`, and modules.json / config_sentence_transformers.json / sentence_bert_config.json as
    sentence-transformers saves them."""
    import transformers

    kw["head"] = None
    folder = write_tiny_bert(folder, **kw)
    hidden = kw.get("hidden", 32)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    st_config = {
        "__version__": {"sentence_transformers": "3.0.1", "transformers": transformers.__version__,
                        "pytorch": torch.__version__},
        "prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine",
    }
    modes = {"cls": "cls_token", "mean": "mean_tokens", "max": "max_tokens", "mean_sqrt_len": "mean_sqrt_len_tokens"}
    pooling = {"word_embedding_dimension": hidden, "include_prompt": True,
               **{f"pooling_mode_{key}": mode == pooling_mode for mode, key in modes.items()},
               "pooling_mode_weightedmean_tokens": False, "pooling_mode_lasttoken": False}
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (folder / "2_Normalize").mkdir(exist_ok=True)
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "config_sentence_transformers.json").write_text(json.dumps(st_config, indent=2))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length,
                                                                               "do_lower_case": False}))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
    return folder


def write_tiny_vit(folder: str | Path, *, num_labels: int = 10, image_size: int = 32, patch_size: int = 8,
                   hidden: int = 32, layers: int = 2, heads: int = 4, intermediate: int = 64, seed: int = 0,
                   head: bool = True) -> Path:
    """A random transformers ViT (ViTForImageClassification, or ViTModel with head=False) saved with
    save_pretrained, and its preprocessor_config.json (resize to image_size, mean = std = 0.5)."""
    import transformers

    _quiet(transformers)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = transformers.ViTConfig(
        image_size=image_size, patch_size=patch_size, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=intermediate,
        **({"num_labels": num_labels} if head else {}),
    )
    torch.manual_seed(seed)
    cls = transformers.ViTForImageClassification if head else transformers.ViTModel
    cls(config).eval().save_pretrained(folder, safe_serialization=True)
    transformers.ViTImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
    ).save_pretrained(folder)
    return folder


def corpus_sentences(n: int = 64, seed: int = 0) -> list[str]:
    """The sentences `write_corpus` writes: n sentences of 5 to 20 words of WORDS."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20))) for _ in range(n)]


def write_corpus(path: str | Path, n: int = 64, seed: int = 0, jsonl: bool = False) -> Path:
    """n short sentences, one per line (.txt) or one {"text": ...} object per line (jsonl=True)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = corpus_sentences(n, seed)
    if jsonl:
        lines = [json.dumps({"text": line}) for line in lines]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_labelled_texts(path: str | Path, n: int = 96, seed: int = 0, *, task: str = "length") -> Path:
    """n sentences of `corpus_sentences` with a label a small model can learn: `length` labels them "long" (more
    than 12 words) or "short"; `score` gives each pair of sentences the ratio of their lengths as a `score`. .jsonl,
    or .csv when `path` ends so."""
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sentences = corpus_sentences(2 * n, seed)
    if task == "length":
        rows = [{"text": s, "label": "long" if len(s.split()) > 12 else "short"} for s in sentences[:n]]
    elif task == "score":
        rows = [{"text": a, "text_pair": b, "score": round(len(a.split()) / len(b.split()), 3)}
                for a, b in zip(sentences[:n], sentences[n:])]
    else:
        raise ValueError(f"task must be 'length' or 'score', got {task!r}")
    if path.suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path
