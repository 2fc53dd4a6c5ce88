"""A MODEL argument that is not an lrc checkpoint -> nn.Module + everything needed to rebuild it, read by the
model's family (models.families). lrc checkpoints (files, folders, Hub repos) are read one package up, by
`adapters.loading.load_model`, which asks `lrc_source` first and hands every other source to `open_pretrained`.

Accepted sources (one string):
    deit_base, deit_base_patch16_224.fb_in1k   a timm name; weights from its Hub repo (cache, HF_HUB_OFFLINE honoured)
    hf-hub:org/repo                            a repo whose config.json a family claims (timm's or transformers'
                                               layout), weights through the cache
    local-dir:PATH, or an existing folder      the same layouts on disk (timm's save_for_hf, save_pretrained)
    file.safetensors|.pth|.pt|.bin + --arch    bare weights; pickles are never unpickled (weights_only=True)
    bert-base-uncased, org/repo                a Hub repo (a name that is not a timm model, or has a slash)

`library=` forces which library's families read a folder or Hub repo.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lowrank_cli.errors import InputError, UsageError
from lowrank_cli.models.families import FAMILIES, Family, families_of, family_of_config, libraries
from lowrank_cli.models.families.base import CONFIG_NAME, read_config_json
from lowrank_cli.models.hub import NotOnHub, hub_download
from lowrank_cli.models.loaded import LoadedModel
from lowrank_cli.models.lrc_folder import HUB_PREFIX, LOCAL_PREFIX, split_hub_source
from lowrank_cli.models.timm_names import UnknownName
from lowrank_cli.models.weights import WEIGHT_SUFFIXES

LIBRARIES = ("auto", *libraries())  # the built-in families' (library_choices() also lists registered ones)


def library_choices() -> tuple[str, ...]:
    return ("auto", *libraries())


def parse_model_args(items: list[str] | None) -> dict[str, Any]:
    """`key=value` pairs; values are JSON when they parse (10, 0.1, true, [1,2]) and strings otherwise."""
    args: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"`model_args` '{item}' is not KEY=VALUE: write e.g. `model_args` num_classes=10")
        try:
            args[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            args[key.strip()] = value
    return args


def looks_like_path(text: str) -> bool:
    return text.endswith(WEIGHT_SUFFIXES) or text.startswith((".", "/", "~"))


def check_library(library: str | None) -> str | None:
    if library in (None, "auto"):
        return None
    if library not in library_choices():
        raise UsageError(f"`library` '{library}' is not one of {', '.join(library_choices())}")
    return library


def local_folder(source: str) -> Path | None:
    """The folder a source names (`local-dir:PATH`, or an existing folder); None when it names none."""
    if source.startswith(LOCAL_PREFIX):
        folder = Path(source[len(LOCAL_PREFIX):]).expanduser()
        if not folder.is_dir():
            raise InputError(f"local-dir:{folder} is not a folder: check the path")
        return folder
    path = Path(source).expanduser()
    return path if path.is_dir() else None


def is_hub_name(source: str) -> bool:
    """org/repo written without hf-hub: (and not a path here)."""
    return "/" in source and not looks_like_path(source) and not Path(source).expanduser().exists()


@contextlib.contextmanager
def as_hub_repo(source: str) -> Iterator[None]:
    """Reading `source` (org/repo, not a path here) as a Hub repo: its failure says both readings."""
    try:
        yield
    except InputError as e:
        raise InputError(f"'{source}' is not a file or folder here (check the path), and as a Hub repo: {e}") from None


def open_pretrained(source: str, *, arch: str | None = None, model_args: dict[str, Any] | None = None,
                    revision: str | None = None, library: str | None = None, log=None) -> LoadedModel:
    """Load a MODEL source that is not an lrc checkpoint (see the module docstring). `log(msg)` receives what was
    chosen. `library` ("timm" / "transformers" / None for auto) forces how a folder or Hub repo is read."""
    model_args = dict(model_args or {})
    log = log or (lambda msg: None)
    library = check_library(library)
    if source.startswith(HUB_PREFIX):
        repo, revision = split_hub_source(source, revision)
        return load_hub(repo, revision, arch, model_args, library)
    folder = local_folder(source)
    if folder is not None:
        return folder_family(folder, library).load_folder(folder, what=f"'{folder}'", arch=arch,
                                                          model_args=model_args)
    path = Path(source).expanduser()
    if path.is_file():
        return load_weights_file(path, arch, model_args, library)
    if looks_like_path(source):
        raise InputError(f"'{source}' does not exist: check the path (a Hub repo is written hf-hub:ORG/REPO)")
    if "/" in source:  # org/repo: the Hub (a folder would have been found above)
        with as_hub_repo(source):
            return load_hub(source, revision, arch, model_args, library)
    return _load_name(source, revision, arch, model_args, library, log)


def _load_name(name: str, revision: str | None, arch: str | None, model_args: dict[str, Any], library: str | None,
               log) -> LoadedModel:
    """A bare name: the first family of `library` that has names (timm's), else a Hub repo with a legacy short
    name (bert-base-uncased)."""
    namer = next((f for f in FAMILIES if f.loads_names and library in (None, f.library)), None)
    if namer is None:
        return load_hub(name, revision, arch, model_args, library)
    try:
        return namer.load_name(name, model_args, log)
    except UnknownName as name_error:
        if library is not None or name_error.typo:
            raise
        try:
            return load_hub(name, revision, arch, model_args, library)
        except NotOnHub as hub_error:
            raise InputError(f"{name_error}; as a Hub repo, {hub_error.reason}") from None


def load_hub(repo: str, revision: str | None, arch: str | None, model_args: dict[str, Any],
             library: str | None) -> LoadedModel:
    config = hub_download(repo, CONFIG_NAME, revision)
    family = folder_family(config.parent, library)
    return family.load_hub(repo, revision, config, arch=arch, model_args=model_args)


def folder_family(folder: Path, library: str | None) -> Family:
    """The family whose config.json the folder has, among `library`'s when given."""
    cfg = read_config_json(folder)
    found = family_of_config(cfg)
    if library is not None:
        if found is not None and found.library != library:
            raise UsageError(f"`library` {library}, but '{folder / CONFIG_NAME}' is a {found.library} config: leave "
                             "out `library` or fix it")
        # a config no family claims, read as `library` says: its first family tells what is missing
        return found or families_of(library)[0]
    if found is None:
        hints = " nor ".join(f.config_hint for f in FAMILIES if f.config_hint)
        forced = " or ".join(f"`library` {name}" for name in libraries())
        raise InputError(f"'{folder / CONFIG_NAME}' is neither {hints}: pass {forced}")
    return found


def load_weights_file(path: Path, arch: str | None, model_args: dict[str, Any], library: str | None) -> LoadedModel:
    """A bare weights file with `arch`, read by the first family that reads weights files (of `library`)."""
    forced = families_of(library)[0] if library is not None else None
    if forced is not None and not forced.reads_weights_files and path.suffix != ".safetensors":
        raise UsageError(f"'{path}' is a bare weights file: a {library} model is read from its folder "
                         "(config.json + model.safetensors, as save_pretrained writes it)")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise InputError(
            f"'{path}' is not a weights file lrc reads ({', '.join(WEIGHT_SUFFIXES)}): pass a timm folder, "
            "a weights file with `arch`, or an lrc checkpoint"
        )
    if not arch:
        raise UsageError(
            f"'{path}' is a bare weights file: say which architecture it is for with `arch` NAME "
            "(e.g. `arch` vit_small_patch16_224, plus `model_args` num_classes=10 if needed)"
        )
    reader = next(f for f in FAMILIES if f.reads_weights_files)
    return reader.load_weights_file(path, arch, model_args)
