"""Sentence-transformers folders: the embedding a model defines (modules.json: the transformer, then 1_Pooling,
then 2_Normalize), read once when lrc opens the folder and recorded with the source (`source["embedding"]`, so
the checkpoint's provenance says it), and computed here for recovery, held-out scoring and `lrc eval`.

    read_embedding(folder)        # {"pooling": ["mean"], "normalize": True, "max_seq_length": 256, ...} or None
    embed(hidden, mask, emb)      # (batch, dim) embeddings from a last hidden state and its attention mask
    embedding_of(loaded)          # the record of a LoadedModel (a dense folder or an lrc file); None: a plain model

Only the module types sentence-transformers ships for this (Transformer, Pooling, Normalize) and lrc's own
low-rank transformer (what `lrc push` stages, LOWRANK_TRANSFORMER) are read; any other (Dense, a custom code
module) is refused with its name: lrc never runs code from a model folder. Files written before this record keep
behaving as before (no embedding: the pooler or the mean of the last hidden state).

    staged_files(emb, dim)        # {"modules.json": [...], "sentence_bert_config.json": {...}, "1_Pooling/config.json": {...}}

is the sentence-transformers layout `lrc push` writes beside the checkpoint, from the record alone.

A folder's config_sentence_transformers.json adds its `prompts`, `default_prompt_name` and `similarity_fn_name`
to the record (read_model_config: those keys only, each checked; `__version__` and the rest are not kept), and the
pooling config's `include_prompt: false` is kept too: `lrc push` stages them and `lowrank_cli.sentence_transformer`
hands them to SentenceTransformer, so `encode(texts, prompt_name="query")` does what the original model does.
lrc's own embedding path (`embed`, `lrc eval`, recovery's texts) never adds a prompt: it encodes the texts as given,
the dense model and the low-rank one alike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowrank_cli.errors import InputError

if TYPE_CHECKING:
    import torch

MODULES_FILE = "modules.json"
ST_CONFIG = "sentence_bert_config.json"
MODEL_CONFIG = "config_sentence_transformers.json"
# The keys of config_sentence_transformers.json lrc records and stages (the rest, `__version__` included, is not
# kept), and the similarity functions sentence-transformers' SentenceTransformer accepts (SimilarityFunction).
MODEL_CONFIG_KEYS = ("prompts", "default_prompt_name", "similarity_fn_name")
SIMILARITY_FUNCTIONS = ("cosine", "dot", "euclidean", "manhattan")
# The module type of the transformer in a folder `lrc push` wrote: its weights are the lrc checkpoint's, which
# sentence-transformers' own Transformer cannot read (and it imports no type outside its package unless told to
# trust remote code, which lrc never does): `lowrank_cli.sentence_transformer` builds it.
LOWRANK_TRANSFORMER = "lowrank_cli.LowRankTransformer"
KNOWN = {"sentence_transformers.models.Transformer": "transformer",
         LOWRANK_TRANSFORMER: "transformer",
         "sentence_transformers.models.Pooling": "pooling",
         "sentence_transformers.models.Normalize": "normalize",
         # the same three as sentence-transformers 6 saves them (where 6.x moved them)
         "sentence_transformers.base.modules.transformer.Transformer": "transformer",
         "sentence_transformers.sentence_transformer.modules.pooling.Pooling": "pooling",
         "sentence_transformers.base.modules.normalize.Normalize": "normalize"}
POOLING_DIR = "1_Pooling"
# Pooling config keys -> lrc's mode names, in the order sentence-transformers concatenates them.
POOLING_MODES = (("pooling_mode_cls_token", "cls"), ("pooling_mode_max_tokens", "max"),
                 ("pooling_mode_mean_tokens", "mean"), ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len"))
UNSUPPORTED_MODES = ("pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")
# sentence-transformers 6's `pooling_mode` (one name, or a list in concatenation order) -> lrc's mode names
POOLING_MODE_NAMES = {"cls": "cls", "max": "max", "mean": "mean", "mean_sqrt_len_tokens": "mean_sqrt_len"}


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"'{path}' is not valid JSON ({e}): fix or re-export the sentence-transformers folder") from None


def read_modules(folder: Path) -> list[tuple[str, str]] | None:
    """The (kind, path) of each module of a sentence-transformers folder's modules.json, each type checked
    against KNOWN (an unknown one is refused with its name); None when the folder has no modules.json."""
    path = Path(folder) / MODULES_FILE
    if not path.is_file():
        return None
    modules = _json(path)
    if not isinstance(modules, list) or not all(isinstance(m, dict) and "type" in m for m in modules):
        raise InputError(f"'{path}' is not a list of modules with a `type` each: fix or re-export the folder")
    kinds = []
    for m in modules:
        kind = KNOWN.get(str(m["type"]))
        if kind is None:
            raise InputError(f"'{path}' names module type '{m['type']}', which lrc does not know (it reads "
                             "Transformer, Pooling and Normalize only, never code from a model folder): use a model "
                             "without it")
        where = str(m.get("path", "") or "")
        if Path(where).is_absolute() or where.startswith(("/", "\\")) or ".." in Path(where).parts:
            raise InputError(f"'{path}' places module '{m['type']}' at '{where}', outside the folder: refusing it")
        kinds.append((kind, where))
    if not kinds or kinds[0] != ("transformer", "") or [k for k, _ in kinds].count("transformer") != 1:
        raise InputError(f"'{path}' must start with the one Transformer module at the folder's root: fix the folder")
    return kinds


def read_embedding(folder: Path) -> dict[str, Any] | None:
    """The embedding a sentence-transformers folder defines; None when it has no modules.json (a plain
    transformers folder)."""
    modules = read_modules(folder)
    if modules is None:
        return None
    kinds = [k for k, _ in modules]
    pooling = [where for k, where in modules if k == "pooling"]
    modes = read_pooling(Path(folder) / pooling[0] / "config.json") if pooling else []
    config = Path(folder) / ST_CONFIG
    st = _json(config) if config.is_file() else {}
    st = st if isinstance(st, dict) else {}
    max_len = st.get("max_seq_length")
    record = {"modules": kinds, "pooling": modes, "normalize": "normalize" in kinds,
              "max_seq_length": int(max_len) if isinstance(max_len, int) and max_len > 0 else None}
    if st.get("do_lower_case") is True:  # recorded only when set: records of files written before read the same
        record["do_lower_case"] = True
    if pooling and _json(Path(folder) / pooling[0] / "config.json").get("include_prompt") is False:
        record["include_prompt"] = False  # prompt tokens left out of the pooling (sentence-transformers' encode)
    record.update(read_model_config(folder))
    return record


def read_model_config(folder: Path) -> dict[str, Any]:
    """The prompts, default prompt name and similarity function of a folder's config_sentence_transformers.json,
    each checked (a malformed one is refused with its key); only those set, so none for a folder without the file."""
    path = Path(folder) / MODEL_CONFIG
    if not path.is_file():
        return {}
    cfg = _json(path)
    if not isinstance(cfg, dict):
        raise InputError(f"'{path}' is not a JSON object: fix or re-export the sentence-transformers folder")
    prompts = cfg.get("prompts")
    if prompts is not None and not (isinstance(prompts, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in prompts.items())):
        raise InputError(f"'{path}' key 'prompts' is {_short(prompts)}, not an object of prompt names to prompt "
                         'texts (such as {"query": "query: "}): fix the file')
    default = cfg.get("default_prompt_name")
    if default is not None and not (isinstance(default, str) and default in (prompts or {})):
        raise InputError(f"'{path}' key 'default_prompt_name' is {_short(default)}, which is not one of its 'prompts' "
                         f"({', '.join(map(repr, prompts or {})) or 'none'}): set it to one of them, or null")
    similarity = cfg.get("similarity_fn_name")
    if similarity is not None and similarity not in SIMILARITY_FUNCTIONS:
        raise InputError(f"'{path}' key 'similarity_fn_name' is {_short(similarity)}, not one of "
                         f"{', '.join(SIMILARITY_FUNCTIONS)}: fix the file")
    found = {"prompts": dict(prompts) if prompts else None, "default_prompt_name": default,
             "similarity_fn_name": similarity}
    return {k: v for k, v in found.items() if v is not None}


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def staged_files(embedding: dict[str, Any], dimension: int) -> dict[str, Any]:
    """The sentence-transformers files of an embedding record, as `lrc push` writes them beside the checkpoint
    (relative path -> JSON document): modules.json (the low-rank transformer at the root, then Pooling and
    Normalize as the source had them), sentence_bert_config.json and 1_Pooling/config.json (the pooling keys every
    sentence-transformers version reads), and config_sentence_transformers.json when the record has prompts or a
    similarity function (those keys only). Normalize has no config: its entry in modules.json is all it needs."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": LOWRANK_TRANSFORMER}]
    pooling = list(embedding.get("pooling") or [])
    if pooling:
        modules.append({"idx": 1, "name": "1", "path": POOLING_DIR, "type": "sentence_transformers.models.Pooling"})
    if embedding.get("normalize"):
        n = len(modules)
        modules.append({"idx": n, "name": str(n), "path": f"{n}_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    files: dict[str, Any] = {MODULES_FILE: modules,
                             ST_CONFIG: {"max_seq_length": embedding.get("max_seq_length"),
                                         "do_lower_case": bool(embedding.get("do_lower_case"))}}
    if pooling:
        flags = {key: mode in pooling for key, mode in POOLING_MODES}
        files[f"{POOLING_DIR}/config.json"] = {"word_embedding_dimension": int(dimension), **flags,
                                               **{key: False for key in UNSUPPORTED_MODES},
                                               "include_prompt": embedding.get("include_prompt", True) is not False}
    if any(key in embedding for key in MODEL_CONFIG_KEYS):
        files[MODEL_CONFIG] = {"prompts": dict(embedding.get("prompts") or {}),
                               "default_prompt_name": embedding.get("default_prompt_name"),
                               "similarity_fn_name": embedding.get("similarity_fn_name")}
    return files


def recorded_embedding(info: Any) -> dict[str, Any] | None:
    """The embedding record a checkpoint's provenance holds (a CheckpointInfo); None for other models."""
    recorded = ((getattr(info, "provenance", None) or {}).get("source") or {}) if info is not None else {}
    found = recorded.get("embedding") if isinstance(recorded, dict) else None
    return found if isinstance(found, dict) else None


def read_pooling(path: Path) -> list[str]:
    """The pooling modes a 1_Pooling/config.json sets, in sentence-transformers' order of concatenation."""
    if not path.is_file():
        raise InputError(f"the Pooling module has no '{path}': fix or re-export the sentence-transformers folder")
    cfg = _json(path)
    if not isinstance(cfg, dict):
        raise InputError(f"'{path}' is not a JSON object: fix the pooling config")
    if "pooling_mode" in cfg:  # sentence-transformers 6 writes the modes by name (and no pooling_mode_* keys)
        named = cfg["pooling_mode"]
        named = [named] if isinstance(named, str) else named
        if not isinstance(named, list) or not all(isinstance(n, str) for n in named):
            raise InputError(f"'{path}' key 'pooling_mode' is {_short(named)}, not a pooling mode name or a list of "
                             "them: fix the pooling config")
        for name in named:
            if name not in POOLING_MODE_NAMES:
                raise InputError(f"'{path}' sets pooling_mode {name!r}, a pooling lrc does not compute: use a model "
                                 "with cls, mean, max or mean_sqrt_len_tokens pooling")
        modes = [POOLING_MODE_NAMES[n] for n in named]
    else:
        for key in UNSUPPORTED_MODES:
            if cfg.get(key):
                raise InputError(f"'{path}' sets {key}, a pooling lrc does not compute: use a model with cls, mean, "
                                 "max or mean_sqrt_len pooling")
        modes = [mode for key, mode in POOLING_MODES if cfg.get(key)]
    if not modes:
        raise InputError(f"'{path}' sets no pooling mode (pooling_mode_mean_tokens, pooling_mode_cls_token, ...): "
                         "set the one the model was trained with")
    return modes


def embed(hidden: torch.Tensor, mask: torch.Tensor | None, embedding: dict[str, Any]) -> torch.Tensor:
    """The embeddings of a batch as sentence-transformers computes them: each pooling over the real tokens
    (`mask`), concatenated, then L2-normalised when the model normalizes."""
    import torch
    import torch.nn.functional as F

    h = hidden.float()
    m = (torch.ones(h.shape[:2], device=h.device) if mask is None else mask.to(h.device)).float().unsqueeze(-1)
    count = m.sum(1).clamp_min(1e-9)
    parts = []
    for mode in embedding["pooling"] or ["mean"]:
        if mode == "cls":
            parts.append(h[:, 0])
        elif mode == "max":
            parts.append(h.masked_fill(m == 0, -1e9).amax(1))
        elif mode == "mean":
            parts.append((h * m).sum(1) / count)
        else:  # mean_sqrt_len
            parts.append((h * m).sum(1) / count.sqrt())
    out = torch.cat(parts, dim=-1)
    return F.normalize(out, p=2, dim=-1) if embedding.get("normalize") else out


def embedding_of(loaded: Any) -> dict[str, Any] | None:
    """The embedding record of a LoadedModel: its source's (a dense folder), else its checkpoint's provenance."""
    source = getattr(loaded, "source", None) or {}
    if isinstance(source.get("embedding"), dict):
        return source["embedding"]
    return recorded_embedding(getattr(getattr(loaded, "model", loaded), "lrc_info", None))
