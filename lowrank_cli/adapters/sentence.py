"""`lowrank_cli.sentence_transformer(path)`: a compressed sentence-transformers model back inside the library its
users work with: a `sentence_transformers.SentenceTransformer` built from the source folder's own modules.json
(Transformer, Pooling, Normalize: models.sentence has vetted them, no remote code), whose transformer is the lrc
file's low-rank model.

    st = lowrank_cli.sentence_transformer("minilm_lr.safetensors")     # the source folder recorded in the file
    st = lowrank_cli.sentence_transformer("minilm_lr.safetensors", source="path/to/all-MiniLM-L6-v2")
    vectors = st.encode(["a sentence to encode"])

The source (its tokenizer, pooling and normalize configs) is the folder or Hub repo the file records, or `source`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowrank_cli.errors import EnvironmentProblem, InputError, UsageError


def sentence_transformer(path: str | Path, *, source: str | Path | None = None, device: str = "cpu") -> Any:
    """The lrc file at `path` as a SentenceTransformer with its source's tokenizer, pooling and normalize."""
    from lowrank_cli.adapters.loading import load
    from lowrank_cli.models.sentence import embedding_of, read_embedding

    try:
        import sentence_transformers
    except ImportError:
        raise EnvironmentProblem("sentence-transformers is not installed: pip install "
                                 "'lowrank-cli[sentence-transformers]'") from None
    model = load(str(path), device=device)
    if embedding_of(model) is None and source is None:
        raise UsageError(f"'{path}' was not made from a sentence-transformers folder (it records no embedding): "
                         "pass `source` a sentence-transformers folder of the same model")
    folder = _source_folder(model, path) if source is None else Path(source)
    if read_embedding(folder) is None:  # refuses unknown modules before sentence-transformers runs any
        raise InputError(f"'{folder}' has no modules.json: pass `source` a sentence-transformers folder")
    st = sentence_transformers.SentenceTransformer(str(folder), device=device, trust_remote_code=False)
    transformer = st[0]
    if isinstance(getattr(type(transformer), "auto_model", None), property):
        transformer.model = model  # sentence-transformers 5+: auto_model reads .model
    else:
        transformer.auto_model = model
    return st.to(device).eval()


def _source_folder(model: Any, path: str | Path) -> Path:
    """The local folder of the source the file records (a Hub repo's files come through the cache)."""
    from lowrank_cli.checkpoint.format import info_of

    recorded = info_of(model).provenance.get("source") or {}
    if recorded.get("kind") == "local-dir" and Path(recorded["id"]).is_dir():
        return Path(recorded["id"])
    if recorded.get("kind") == "hf-hub":
        from lowrank_cli.models.hub import hub_tokenizer_folder, hub_transformers_files

        folder = hub_transformers_files(recorded["id"], recorded.get("revision"))
        hub_tokenizer_folder(recorded["id"], recorded.get("revision"))
        return folder
    raise InputError(f"'{path}' records its source as {recorded.get('id', 'unknown')!r}, which is not here: pass "
                     "`source` the sentence-transformers folder it was made from")
