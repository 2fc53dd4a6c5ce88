"""MODEL argument -> nn.Module + everything needed to rebuild it.

Accepted sources (one string):
    deit_base, deit_base_patch16_224.fb_in1k   a timm name; weights from its Hub repo (cache, HF_HUB_OFFLINE honoured)
    hf-hub:org/repo                            a repo in timm's Hub layout (config.json + model.safetensors)
    local-dir:PATH, or an existing folder      the same layout on disk (timm's save_for_hf)
    hf-hub:, local-dir:, a folder with lrc_config.json   an lrc checkpoint folder or repo (models.lrc_folder)
    file.safetensors|.pth|.pt|.bin + --arch    bare weights; pickles are never unpickled (weights_only=True)
    an lrc checkpoint (.safetensors with lrc metadata)
    bert-base-uncased, org/repo                a Hub repo (a name that is not a timm model, or has a slash)

A folder or Hub repo whose config.json is a transformers config (model_type) is a Hugging Face transformers
model (transformers_models.py); `library=` forces the reading.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

from lowrank_cli.errors import InputError, UsageError
from lowrank_cli.models.build import build
from lowrank_cli.models.hub import NotOnHub, hub_download, hub_transformers_files, hub_weights, snapshot_revision
from lowrank_cli.models.inputs import record_input_size
from lowrank_cli.models.loaded import LoadedModel
from lowrank_cli.models.lrc_folder import LrcFiles, folder_files, hub_files, is_lrc_folder, split_hub_source
from lowrank_cli.models.spec import ModelSpec, json_safe
from lowrank_cli.models.timm_names import UnknownName, default_pretrained_cfg, resolve_timm_name
from lowrank_cli.models.weights import PICKLE_WEIGHTS, SAFE_WEIGHTS, WEIGHT_SUFFIXES, read_state_dict, sha256_later

CONFIG_NAME = "config.json"


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


# ---------------------------------------------------------------------------------------------- timm names


def looks_like_path(text: str) -> bool:
    return text.endswith(WEIGHT_SUFFIXES) or text.startswith((".", "/", "~"))


# ---------------------------------------------------------------------------------------------- the Hub


# ---------------------------------------------------------------------------------------------- weights


LIBRARIES = ("auto", "timm", "transformers")


def check_library(library: str | None) -> str | None:
    if library in (None, "auto"):
        return None
    if library not in LIBRARIES:
        raise UsageError(f"`library` '{library}' is not one of {', '.join(LIBRARIES)}")
    return library


def read_config_json(folder: Path) -> dict:
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise InputError(
            f"folder '{folder}' has no {CONFIG_NAME}: expected timm's Hub layout (config.json + model.safetensors, "
            "as written by timm.models.save_for_hf), a transformers model folder (save_pretrained) or an lrc "
            "checkpoint folder (lrc_config.json, as lrc push writes it), or pass a weights file with `arch`"
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"'{cfg_path}' is not valid JSON ({e}): fix or re-export the folder") from None
    if not isinstance(cfg, dict):
        raise InputError(f"'{cfg_path}' is not a JSON object: not a model config")
    return cfg


def folder_library(folder: Path, library: str | None) -> str:
    """timm or transformers: what wrote the folder's config.json, unless `library` says."""
    from lowrank_cli.models.transformers_models import config_library

    found = config_library(read_config_json(folder))
    if library is not None:
        if found is not None and found != library:
            raise UsageError(f"`library` {library}, but '{folder / CONFIG_NAME}' is a {found} config: leave out "
                             "`library` or fix it")
        return library
    if found is None:
        raise InputError(f"'{folder / CONFIG_NAME}' is neither a timm config (architecture) nor a transformers "
                         "config (model_type): pass `library` timm or `library` transformers")
    return found


def read_folder_config(folder: Path) -> tuple[str, dict, dict]:
    """(architecture, model_args, pretrained_cfg) of a folder in timm's Hub layout."""
    cfg_path = folder / CONFIG_NAME
    cfg = read_config_json(folder)
    if "pretrained_cfg" in cfg:
        pretrained_cfg = dict(cfg["pretrained_cfg"])
        arch = cfg.get("architecture")
    else:  # timm's older single-dict layout
        pretrained_cfg = dict(cfg)
        arch = pretrained_cfg.pop("architecture", None)
    if not arch:
        if "model_type" in cfg or "architectures" in cfg:
            raise InputError(f"'{cfg_path}' is a Hugging Face transformers config, not a timm one: leave out "
                             "`library` timm")
        raise InputError(f"'{cfg_path}' names no 'architecture': not a timm model config")
    model_args = dict(cfg.get("model_args") or {})
    if "num_classes" in cfg:
        model_args.setdefault("num_classes", cfg["num_classes"])
    if "global_pool" in cfg:
        model_args.setdefault("global_pool", cfg["global_pool"])
    for key in ("file", "source", "hf_hub_id", "url"):
        pretrained_cfg.pop(key, None)
    return arch, model_args, pretrained_cfg


def folder_weights(folder: Path) -> Path:
    for name in (SAFE_WEIGHTS, PICKLE_WEIGHTS, "pytorch_model.pth"):
        if (folder / name).is_file():
            return folder / name
    raise InputError(f"folder '{folder}' has no {SAFE_WEIGHTS} (or {PICKLE_WEIGHTS}): re-export it with timm's save_for_hf")


# ---------------------------------------------------------------------------------------------- entry point


def load_model(source: str, *, arch: str | None = None, model_args: dict[str, Any] | None = None,
               revision: str | None = None, library: str | None = None, log=None, first_task: bool = True
               ) -> LoadedModel:
    """Load any MODEL source (see the module docstring). `log(msg)` receives what was chosen. `library`
    ("timm" / "transformers" / None for auto) forces how a folder or Hub repo is read. A multi-task checkpoint
    is its first task's model (`as_first_task`), unless `first_task` is False (then the file as stored, for
    `checkpoint.tasks.model_for_task` to pick a task)."""
    loaded = read_model(source, arch=arch, model_args=model_args, revision=revision, library=library, log=log)
    return as_first_task(loaded) if first_task else loaded


def read_model(source: str, *, arch: str | None = None, model_args: dict[str, Any] | None = None,
               revision: str | None = None, library: str | None = None, log=None) -> LoadedModel:
    """`load_model` without the choice of a multi-task checkpoint's task."""
    model_args = dict(model_args or {})
    log = log or (lambda msg: None)
    library = check_library(library)
    if source.startswith("hf-hub:"):
        repo, revision = split_hub_source(source, revision)
        return _load_hub(repo, revision, arch, model_args, library)
    if source.startswith("local-dir:"):
        folder = Path(source[len("local-dir:"):]).expanduser()
        if not folder.is_dir():
            raise InputError(f"local-dir:{folder} is not a folder: check the path")
        return _load_folder(folder, model_args, library, arch)
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_folder(path, model_args, library, arch)
    if path.is_file():
        if library == "transformers" and not source.endswith(".safetensors"):
            raise UsageError(f"'{path}' is a bare weights file: a transformers model is read from its folder "
                             "(config.json + model.safetensors, as save_pretrained writes it)")
        return _load_file(path, arch, model_args)
    if looks_like_path(source):
        raise InputError(f"'{source}' does not exist: check the path (a Hub repo is written hf-hub:ORG/REPO)")
    if "/" in source:  # org/repo: the Hub (a folder would have been found above)
        try:
            return _load_hub(source, revision, arch, model_args, library)
        except InputError as e:
            raise InputError(f"'{source}' is not a file or folder here (check the path), and as a Hub repo: {e}") from None
    if library == "transformers":
        return _load_hub(source, revision, arch, model_args, library)
    try:
        return _load_timm_name(source, model_args, log)
    except UnknownName as timm_error:
        if library == "timm" or timm_error.typo:
            raise
        # Not a timm name: perhaps a Hub repo with a legacy short name (bert-base-uncased).
        try:
            return _load_hub(source, revision, arch, model_args, library)
        except NotOnHub as hub_error:
            raise InputError(f"{timm_error}; as a Hub repo, {hub_error.reason}") from None


def _load_hub(repo: str, revision: str | None, arch: str | None, model_args: dict, library: str | None) -> LoadedModel:
    lrc = hub_files(repo, revision)
    if lrc is not None:
        return _load_lrc(lrc)
    config = hub_download(repo, CONFIG_NAME, revision)
    if folder_library(config.parent, library) == "transformers":
        return _load_transformers(repo, config.parent, revision, arch, model_args, f"hf-hub:{repo}",
                                  {"kind": "hf-hub", "id": repo, "revision": snapshot_revision(config) or revision})
    weights = hub_weights(repo, revision)
    loaded = _load_folder_files(config.parent, weights, model_args, f"hf-hub:{repo}")
    loaded.source = {"kind": "hf-hub", "id": repo, "revision": snapshot_revision(weights) or revision}
    return loaded


def _load_folder(folder: Path, model_args: dict, library: str | None = None, arch: str | None = None) -> LoadedModel:
    if is_lrc_folder(folder):
        return _load_lrc(folder_files(folder))
    if folder_library(folder, library) == "transformers":
        weights = next((folder / n for n in (SAFE_WEIGHTS, PICKLE_WEIGHTS) if (folder / n).is_file()), None)
        source = {"kind": "local-dir", "id": str(folder.resolve()), "library": "transformers",
                  **({"sha256": sha256_later(weights)} if weights else {})}
        return _load_transformers(str(folder), folder, None, arch, model_args, f"'{folder}'", source)
    loaded = _load_folder_files(folder, None, model_args, f"'{folder}'")
    weights = folder_weights(folder)
    loaded.source = {"kind": "local-dir", "id": str(folder.resolve()), "sha256": sha256_later(weights)}
    return loaded


def as_first_task(loaded: LoadedModel) -> LoadedModel:
    """A multi-task checkpoint read as a MODEL is its first task's model (`load(path)`): in experts mode the
    stored backbone lacks that task's adapters, which every command that reads a MODEL should see merged."""
    if getattr(loaded.checkpoint, "multitask", None) is not None:
        from lowrank_cli.checkpoint.tasks import model_for_task

        model_for_task(loaded)
    return loaded


def _load_lrc(files: LrcFiles) -> LoadedModel:
    """An lrc checkpoint folder or Hub repo: the checkpoint, its source named as given, the tokenizer next to it."""
    from lowrank_cli.checkpoint.io import read_checkpoint

    loaded = read_checkpoint(files.checkpoint)
    loaded.source = dict(files.source)
    if files.tokenizer:
        loaded.files, loaded.revision = str(files.folder), files.source.get("revision")
    return loaded


def _load_transformers(where: str, folder: Path, revision: str | None, arch: str | None, model_args: dict,
                       what: str, source: dict) -> LoadedModel:
    from lowrank_cli.models import transformers_models as tm

    if model_args:
        raise UsageError(f"`model_args` is for timm models; {what} is a transformers model, built from its "
                         "config.json: edit the config instead")
    if source["kind"] == "hf-hub":
        folder = hub_transformers_files(where, revision)
    model, spec = tm.load_pretrained(str(folder), what=what, arch=arch,
                                     preprocessor=tm.read_json(folder / tm.PREPROCESSOR))
    return LoadedModel(model, spec, source, files=where, revision=revision)


def _load_folder_files(folder: Path, weights: Path | None, model_args: dict, what: str) -> LoadedModel:
    arch, args, pretrained_cfg = read_folder_config(folder)
    args.update(model_args)
    weights = weights or folder_weights(folder)
    spec = ModelSpec(arch, args, json_safe(pretrained_cfg))
    model = build(spec, read_state_dict(weights), what)
    return LoadedModel(model, spec)


def _load_file(path: Path, arch: str | None, model_args: dict) -> LoadedModel:
    if path.suffix == ".safetensors":
        from lowrank_cli.checkpoint.format import is_lrc_checkpoint
        from lowrank_cli.checkpoint.io import read_checkpoint

        if is_lrc_checkpoint(path):
            return read_checkpoint(path)
    elif path.suffix not in WEIGHT_SUFFIXES:
        raise InputError(
            f"'{path}' is not a weights file lrc reads ({', '.join(WEIGHT_SUFFIXES)}): pass a timm folder, "
            "a weights file with `arch`, or an lrc checkpoint"
        )
    if not arch:
        raise UsageError(
            f"'{path}' is a bare weights file: say which architecture it is for with `arch` NAME "
            "(e.g. `arch` vit_small_patch16_224, plus `model_args` num_classes=10 if needed)"
        )
    import timm

    arch_name = arch.partition(".")[0]
    if arch_name not in timm.list_models():
        close = difflib.get_close_matches(arch_name, timm.list_models(), n=5)
        raise InputError(f"`arch` '{arch}' is not a timm architecture (closest: {', '.join(close) or 'none'})")
    spec = ModelSpec(arch_name, dict(model_args), default_pretrained_cfg(arch))
    model = build(spec, read_state_dict(path), f"'{path}'")
    record_input_size(model, spec)
    return LoadedModel(model, spec, {"kind": "file", "id": str(path.resolve()), "sha256": sha256_later(path), "arch": arch})


def _load_timm_name(name: str, model_args: dict, log) -> LoadedModel:
    import timm

    resolved = resolve_timm_name(name)
    if resolved != name:
        log(f"{name} -> {resolved}")
    arch = resolved.partition(".")[0]
    pretrained_cfg = default_pretrained_cfg(resolved)
    repo = pretrained_cfg.get("hf_hub_id")
    if repo:
        weights = hub_weights(repo, None)
        state_dict = read_state_dict(weights)
        for key in ("hf_hub_id", "url", "file", "source"):
            pretrained_cfg.pop(key, None)
        spec = ModelSpec(arch, dict(model_args), pretrained_cfg)
        model = build(spec, state_dict, resolved)
        return LoadedModel(model, spec, {"kind": "timm", "id": resolved, "hub": repo, "revision": snapshot_revision(weights)})
    # Weights only at a URL (no Hub repo): timm's own loader knows how to convert them.
    try:
        model = timm.create_model(resolved, pretrained=True, **model_args).eval()
    except Exception as e:
        raise InputError(f"timm could not load the pretrained weights of {resolved} ({e}): check the network or the name") from None
    spec = ModelSpec(arch, dict(model_args), json_safe(dict(model.pretrained_cfg)))
    return LoadedModel(model, spec, {"kind": "timm", "id": resolved})
