"""`lowrank_cli.sentence_transformer(path)`: a compressed sentence-transformers model back inside the library its
users work with: a `sentence_transformers.SentenceTransformer` whose transformer is the lrc file's low-rank model,
followed by the Pooling and Normalize modules a modules.json names, with the prompts, default prompt and
similarity function of its config_sentence_transformers.json.

    st = lowrank_cli.sentence_transformer("hf-hub:org/minilm-lr2")            # a folder or repo lrc push wrote
    st = lowrank_cli.sentence_transformer("minilm_lr.safetensors")            # the source folder the file records
    st = lowrank_cli.sentence_transformer("minilm_lr.safetensors", source="path/to/all-MiniLM-L6-v2")
    vectors = st.encode(["a sentence to encode"])

Where the modules.json, its configs and the tokenizer come from: `source` when given; else the lrc folder or Hub
repo itself (`lrc push` stages them beside the checkpoint, models.sentence.staged_files); else the source the file
records. sentence-transformers' own loader is not used: since 6.0 it refuses any module type outside its package
(the folder's low-rank transformer) unless told to trust remote code, which lrc never does. So the pipeline is
built here, each module type checked against models.sentence's fixed list (Transformer: the low-rank model,
Pooling, Normalize; anything else is refused with its name), and nothing from the folder is imported or run.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from lowrank_cli.errors import EnvironmentProblem, InputError, UsageError


def sentence_transformer(path: str | Path, *, source: str | Path | None = None, device: str = "cpu") -> Any:
    """The lrc checkpoint at `path` (a file, an lrc folder, hf-hub:REPO) as a SentenceTransformer with the
    tokenizer, pooling and normalize of `source`, else of the folder or repo itself, else of the recorded source."""
    from lowrank_cli.adapters.loading import load
    from lowrank_cli.models.lrc_folder import lrc_files
    from lowrank_cli.models.sentence import embedding_of, read_embedding

    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        raise EnvironmentProblem("sentence-transformers is not installed: pip install "
                                 "'lowrank-cli[sentence-transformers]'") from None
    files = lrc_files(path) if source is None else None
    model = load(files.checkpoint if files is not None else str(path), device=device)
    if source is not None:
        folder = Path(source)
    elif files is not None and (staged := _staged_folder(files)) is not None:
        folder = staged
    elif embedding_of(model) is None:
        raise UsageError(f"'{path}' was not made from a sentence-transformers folder (it records no embedding): "
                         "pass `source` a sentence-transformers folder of the same model")
    else:
        folder = _source_folder(model, path)
    embedding = read_embedding(folder)  # every module type checked before anything is built
    if embedding is None:
        raise InputError(f"'{folder}' has no modules.json: pass `source` a sentence-transformers folder")
    return assemble(model, folder, embedding, device)


def assemble(model: Any, folder: Path, embedding: dict[str, Any], device: str = "cpu") -> Any:
    """A SentenceTransformer of the low-rank `model`, with the tokenizer in `folder` and the modules its vetted
    modules.json names (read_embedding has refused any other type)."""
    from sentence_transformers import SentenceTransformer

    from lowrank_cli.models.sentence import MODEL_CONFIG_KEYS, read_modules

    _, Pooling, Normalize = _module_classes()

    if not _tokenizer_names(folder):
        raise InputError(f"'{folder}' has no tokenizer files (tokenizer.json, vocab.txt, ...), which the "
                         "sentence-transformers model needs: push it with its tokenizer, or pass `source` the "
                         "original folder")
    modules = [_transformer(model, folder, embedding)]
    for kind, where in (read_modules(folder) or [])[1:]:
        if kind == "pooling":
            modules.append(Pooling.load(str(folder / where)))  # its config.json only: read_pooling checked it
        else:
            modules.append(Normalize())
    # the folder's config_sentence_transformers.json (read_model_config checked it): encode(prompt_name=...) and
    # similarity() as the original model; passed only when set, so a folder without the file builds as before
    config = {key: embedding[key] for key in MODEL_CONFIG_KEYS if embedding.get(key) is not None}
    if "prompts" in config:
        config["prompts"] = dict(config["prompts"])  # sentence-transformers edits its own copy
    return SentenceTransformer(modules=modules, device=device, **config).eval()


def _transformer(model: Any, folder: Path, embedding: dict[str, Any]) -> Any:
    """sentence-transformers' Transformer module around the low-rank `model`: built on a scratch folder holding
    the model's config.json and `folder`'s tokenizer files, with the model handed over in place of the one it
    would load (it never reads the weights of a folder)."""
    Transformer, _, _ = _module_classes()

    class LowRankTransformer(Transformer):
        def _load_model(self, *args: Any, **kwargs: Any) -> Any:
            if isinstance(getattr(type(self), "auto_model", None), property):
                return model  # sentence-transformers 5+: the returned model becomes .model
            self.auto_model = model  # 3.x / 4.x set it here
            return None

    with tempfile.TemporaryDirectory(prefix="lrc-st-") as scratch:
        model.config.save_pretrained(scratch)
        for name in _tokenizer_names(folder):
            shutil.copyfile(folder / name, Path(scratch) / name)  # small files; a Hub cache file is a symlink
        kwargs: dict[str, Any] = {"max_seq_length": embedding.get("max_seq_length"),
                                  "do_lower_case": bool(embedding.get("do_lower_case"))}
        return LowRankTransformer(scratch, **kwargs)


def _module_classes() -> tuple[Any, Any, Any]:
    """(Transformer, Pooling, Normalize) where this sentence-transformers keeps them (6.x moved them)."""
    try:
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    except ImportError:
        from sentence_transformers.models import Normalize, Pooling, Transformer
    return Transformer, Pooling, Normalize


def _tokenizer_names(folder: Path) -> list[str]:
    from lowrank_cli.models.transformers_models import TOKENIZER_FILES

    return [n for n in TOKENIZER_FILES if (folder / n).is_file()]


def _staged_folder(files: Any) -> Path | None:
    """The folder with the sentence-transformers files `lrc push` staged beside the checkpoint (a Hub repo's come
    through the cache, from the commit of its checkpoint); None when it has no modules.json."""
    from lowrank_cli.models.sentence import MODULES_FILE

    if files.source.get("kind") != "hf-hub":
        return files.folder if (files.folder / MODULES_FILE).is_file() else None
    # offline, a repo cached before lrc staged these files (or pushed before it did) has no modules.json in the
    # cache: the source the checkpoint records serves, as it did then
    return _hub_sentence_files(files.source["id"], files.source.get("revision"), uncached_ok=True)


def _hub_sentence_files(repo: str, revision: str | None, *, uncached_ok: bool = False) -> Path | None:
    """The cache snapshot of a Hub repo with its modules.json and the configs it names (never its weights: the
    low-rank model is the lrc file's); None when the repo has no modules.json (with `uncached_ok`, also when,
    offline, the cache has none)."""
    from huggingface_hub import errors as hf_errors

    from lowrank_cli.models.hub import NotCached, hub_download
    from lowrank_cli.models.sentence import MODEL_CONFIG, MODULES_FILE, ST_CONFIG, read_modules

    try:
        folder = hub_download(repo, MODULES_FILE, revision).parent
    except hf_errors.EntryNotFoundError:
        return None
    except NotCached:
        if uncached_ok:
            return None
        raise
    for name in [ST_CONFIG, *(f"{where}/config.json" for kind, where in read_modules(folder)[1:] if kind == "pooling")]:
        try:
            hub_download(repo, name, revision)
        except hf_errors.EntryNotFoundError:
            continue  # read_embedding says what is missing and whether it matters
    try:
        hub_download(repo, MODEL_CONFIG, revision)
    except (hf_errors.EntryNotFoundError, NotCached):
        pass  # no prompts (a cache filled before lrc read them, offline: the model loads as it did then)
    return folder


def _source_folder(model: Any, path: str | Path) -> Path:
    """The local folder of the source the file records (a Hub repo's modules.json, configs and tokenizer come
    through the cache)."""
    from lowrank_cli.checkpoint.format import info_of

    recorded = info_of(model).provenance.get("source") or {}
    if recorded.get("kind") == "local-dir" and Path(recorded["id"]).is_dir():
        return Path(recorded["id"])
    if recorded.get("kind") == "hf-hub":
        from lowrank_cli.models.hub import hub_tokenizer_folder

        repo, revision = recorded["id"], recorded.get("revision")
        folder = _hub_sentence_files(repo, revision)
        if folder is None:
            raise InputError(f"hf-hub:{repo}, the source '{path}' records, has no modules.json: pass `source` the "
                             "sentence-transformers folder it was made from")
        hub_tokenizer_folder(repo, revision)  # into the same snapshot
        return folder
    raise InputError(f"'{path}' records its source as {recorded.get('id', 'unknown')!r}, which is not here: pass "
                     "`source` the sentence-transformers folder it was made from")
