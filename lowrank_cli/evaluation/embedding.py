"""`lrc eval` of a sentence-transformers model on a text file: its embeddings as the model defines them
(models.sentence: pooling over the real tokens, then normalize), scored

- against the dense model (`against`): the mean cosine of each text's embedding to the dense model's;
- on sentence pairs ({"text", "text_pair"} records of a .jsonl): retrieval top-1, the share of texts whose own pair
  is the most similar (cosine) of all the pairs in the file.

The texts are encoded as the file gives them: no prompt of the model's config_sentence_transformers.json is added
(not even its default_prompt_name), for the low-rank model and the dense one alike, so both see the same tokens.
Data meant for a prompted model carries its prompt in the text ("query: ...").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lowrank_cli.errors import UsageError


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """The (text, text_pair) records of a .jsonl file (none for a .txt file or records without a pair)."""
    if Path(path).suffix.lower() != ".jsonl":
        return []
    pairs = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and all(isinstance(record.get(k), str) and record[k].strip()
                                            for k in ("text", "text_pair")):
            pairs.append((record["text"], record["text_pair"]))
    return pairs


def has_labels(path: Path) -> bool:
    """Whether a text file holds labelled records (a task to score), not texts or pairs to embed."""
    from lowrank_cli.data.labelled_texts import is_labelled_text_file

    if Path(path).suffix.lower() != ".jsonl":
        return Path(path).is_file() and is_labelled_text_file(path) and Path(path).suffix.lower() == ".csv"
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        record = json.loads(first)
    except ValueError:
        return False
    return isinstance(record, dict) and ("label" in record or "score" in record)


@torch.no_grad()
def embeddings(model: Any, texts: list[str], tokenizer: Any, embedding: dict[str, Any], *, max_length: int | None,
               batch_size: int, device: torch.device) -> torch.Tensor:
    """The (texts, dim) embeddings of `texts`, in float32 on the CPU."""
    from lowrank_cli.models.sentence import embed

    model.to(device).float().eval()
    length = max_length or embedding.get("max_seq_length") or 512
    if embedding.get("do_lower_case"):  # as sentence-transformers' Transformer does before tokenizing
        texts = [t.lower() for t in texts]
    out = []
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=length,
                          return_tensors="pt").to(device)
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        out.append(embed(hidden, batch["attention_mask"], embedding).cpu())
    return torch.cat(out)


def evaluate_embeddings(model: Any, data: Path, tokenizer: Any, embedding: dict[str, Any], *, against: Any = None,
                        max_length: int | None = None, batch_size: int = 64,
                        device: torch.device | None = None) -> dict[str, Any]:
    """{"texts", "cosine" (with `against`, the dense model), "pairs", "top1" (on pair data)}."""
    from lowrank_cli.data.texts import find_texts

    device = device or torch.device("cpu")
    texts, pairs = find_texts(data).texts, read_pairs(data)
    if against is None and not pairs:
        raise UsageError(f"'{data}' holds texts without pairs: give `against` the dense model to compare the "
                         "embeddings with, or data of {\"text\", \"text_pair\"} records for retrieval top-1")
    result: dict[str, Any] = {"texts": len(texts)}
    kw = {"max_length": max_length, "batch_size": batch_size, "device": device}
    if against is not None:
        mine, dense = embeddings(model, texts, tokenizer, embedding, **kw), embeddings(against, texts, tokenizer,
                                                                                       embedding, **kw)
        result["cosine"] = torch.nn.functional.cosine_similarity(mine, dense, dim=-1).mean().item()
    if pairs:
        left = torch.nn.functional.normalize(embeddings(model, [a for a, _ in pairs], tokenizer, embedding, **kw), dim=-1)
        right = torch.nn.functional.normalize(embeddings(model, [b for _, b in pairs], tokenizer, embedding, **kw),
                                              dim=-1)
        top = (left @ right.T).argmax(-1)
        result.update(pairs=len(pairs), top1=(top == torch.arange(len(pairs))).float().mean().item())
    return result
