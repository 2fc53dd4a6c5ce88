"""MODEL argument -> nn.Module + everything needed to rebuild it.

Accepted sources (one string):
    deit_base, deit_base_patch16_224.fb_in1k   a timm name; weights from its Hub repo (cache, HF_HUB_OFFLINE honoured)
    hf-hub:org/repo                            a repo in timm's Hub layout (config.json + model.safetensors)
    local-dir:PATH, or an existing folder      the same layout on disk (timm's save_for_hf)
    file.safetensors|.pth|.pt|.bin + --arch    bare weights; pickles are never unpickled (weights_only=True)
    an lrc checkpoint (.safetensors with lrc metadata)
    bert-base-uncased, org/repo                a Hub repo (a name that is not a timm model, or has a slash)

A folder or Hub repo whose config.json is a transformers config (model_type) is a Hugging Face transformers
model (transformers_models.py); `library=` forces the reading.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_cli.errors import InputError, UsageError
from lowrank_cli.models.spec import ModelSpec, build_empty, fill, json_safe, record_input_size

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
CONFIG_NAME = "config.json"
SAFE_WEIGHTS = "model.safetensors"
PICKLE_WEIGHTS = "pytorch_model.bin"


@dataclass
class LoadedModel:
    model: nn.Module
    spec: ModelSpec
    pending_source: dict[str, Any] = field(default_factory=dict)  # values may still be computing (Future)
    checkpoint: Any = None  # CheckpointInfo when the source is an lrc checkpoint
    files: str | None = None  # transformers: the folder or Hub repo with the tokenizer (`--save-tokenizer`, text data)
    revision: str | None = None

    @property
    def source(self) -> dict[str, Any]:
        """Provenance: kind, id, revision / sha256. The file hash is computed in the background while the
        caller works (0.3 s for a ViT-B) and waited for here, on first use."""
        for key, value in self.pending_source.items():
            if isinstance(value, Future):
                self.pending_source[key] = value.result()
        return self.pending_source

    @source.setter
    def source(self, value: dict[str, Any]) -> None:
        self.pending_source = value


class UnknownName(InputError):
    """A bare MODEL name that timm does not know (it may still be a Hub repo)."""


class NotOnHub(InputError):
    """A Hub repo that is not there: absent, or not in the cache while the Hub cannot be reached."""

    def __init__(self, message: str, *, reason: str):
        super().__init__(message)
        self.reason = reason  # what to say about the repo in a combined message


def parse_model_args(items: list[str] | None) -> dict[str, Any]:
    """`key=value` pairs; values are JSON when they parse (10, 0.1, true, [1,2]) and strings otherwise."""
    args: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--model-arg '{item}' is not KEY=VALUE: write e.g. --model-arg num_classes=10")
        try:
            args[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            args[key.strip()] = value
    return args


_HASHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lrc-sha256")


def sha256_later(path: Path) -> Future:
    """hashlib and file reads release the GIL: hashing in a thread overlaps the caller's SVDs or training."""
    return _HASHER.submit(file_sha256, path)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- timm names


def resolve_timm_name(name: str) -> str:
    """`deit_base` -> `deit_base_patch16_224.fb_in1k`: the registered default of a short name.

    A full architecture name keeps its default pretrained tag. A short name is the prefix of architectures
    whose rest is only patch size / resolution (`_patch16_224`); the lowest resolution wins (the standard
    one); several left (`vit_base`: patch 8, 16, 32) is ambiguous and the candidates are listed.
    """
    import timm

    arch, _, tag = name.partition(".")
    archs = set(timm.list_models())
    if arch in archs:
        if tag and name not in timm.list_pretrained(arch + ".*") and name not in timm.list_pretrained(name):
            tags = timm.list_pretrained(arch + ".*")
            raise InputError(f"timm has no weights '{name}'; {arch} has: {', '.join(tags) or 'none'}")
        if tag:
            return name
        tags = timm.list_pretrained(arch + ".*")
        return tags[0] if tags else arch
    if not tag:
        variant = re.compile(re.escape(arch) + r"((_patch\d+)?(_\d+)?)")
        matches = [a for a in sorted(archs) if variant.fullmatch(a) and variant.fullmatch(a).group(1)]
        if matches:

            def resolution(a: str) -> int:
                m = re.search(r"_(\d+)$", a)
                return int(m.group(1)) if m else 0

            low = min(resolution(a) for a in matches)
            best = [a for a in matches if resolution(a) == low]
            if len(best) == 1:
                return resolve_timm_name(best[0])
            raise InputError(
                f"'{name}' is ambiguous in timm: {', '.join(best)}: give the full name"
            )
    # Compare with short family_size prefixes too (deit_bse ~ deit_base), then show the full names.
    short = {"_".join(a.split("_")[:2]): a for a in sorted(archs, key=lambda a: (len(a), a), reverse=True)}
    close = [short[c] for c in difflib.get_close_matches(arch, list(short), n=3, cutoff=0.7)]
    close += difflib.get_close_matches(name, sorted(archs), n=5, cutoff=0.6)
    hint = ", ".join(list(dict.fromkeys(close))[:5]) or "none"
    raise UnknownName(
        f"'{name}' is not a file, a folder or a timm model name (closest timm names: {hint}); "
        "for a Hub repo write hf-hub:ORG/REPO, for a folder local-dir:PATH"
    )


def looks_like_path(text: str) -> bool:
    return text.endswith(WEIGHT_SUFFIXES) or text.startswith((".", "/", "~"))


# ---------------------------------------------------------------------------------------------- the Hub


def hub_download(repo: str, filename: str, revision: str | None) -> Path:
    """One file from the Hub through huggingface_hub: its cache, HF_TOKEN and HF_HUB_OFFLINE apply."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub import errors as hf_errors

    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename, revision=revision))
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
        raise NotOnHub(
            f"{filename} of hf-hub:{repo}{'@' + revision if revision else ''} is not in the Hugging Face cache "
            f"and {why}: run once with network access (or unset HF_HUB_OFFLINE), or point at a local folder",
            reason=f"it is not in the Hugging Face cache and {why}",
        ) from e
    except hf_errors.EntryNotFoundError:  # the repo has no such file: the caller may try another name
        raise
    except hf_errors.RevisionNotFoundError:
        raise InputError(f"hf-hub:{repo} has no revision '{revision}': check --revision") from None
    except hf_errors.GatedRepoError:
        raise InputError(f"hf-hub:{repo} is gated: accept its terms on the Hub and set HF_TOKEN") from None
    except hf_errors.RepositoryNotFoundError:
        raise NotOnHub(
            f"hf-hub:{repo} does not exist or is private: check the name, or set HF_TOKEN for a private repo",
            reason="it does not exist or is private",
        ) from None
    except hf_errors.HfHubHTTPError as e:
        raise InputError(f"downloading {filename} of hf-hub:{repo} failed ({e}): try again later") from None


def hub_weights(repo: str, revision: str | None) -> Path:
    from huggingface_hub import errors as hf_errors

    try:
        return hub_download(repo, SAFE_WEIGHTS, revision)
    except hf_errors.EntryNotFoundError:
        pass
    try:
        return hub_download(repo, PICKLE_WEIGHTS, revision)
    except hf_errors.EntryNotFoundError:
        raise InputError(f"hf-hub:{repo} has neither {SAFE_WEIGHTS} nor {PICKLE_WEIGHTS}: it is not a timm model repo") from None


def snapshot_revision(path: Path) -> str | None:
    """The commit a cached Hub file belongs to (…/snapshots/<commit>/file)."""
    parts = path.parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else None


# ---------------------------------------------------------------------------------------------- weights


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: safetensors, or a torch file read with weights_only=True (never unpickled).

    Unwraps a `state_dict` / `model` / `state_dict_ema` wrapper key and strips DDP's `module.` prefix.
    """
    if not path.is_file():
        raise InputError(f"weights file '{path}' does not exist: check the path")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for every kind of corruption
            raise InputError(f"'{path}' is not a readable safetensors file ({e}): is it truncated or corrupt?") from None
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's notes on pickle protocols; the error below says it all
                sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            if "Unsupported global" in str(e):  # a class or function in the pickle: refused, not run
                raise InputError(
                    f"'{path}' holds pickled Python objects, which lrc never unpickles: re-save it as "
                    "torch.save(model.state_dict(), ...) or as safetensors"
                ) from None
            raise InputError(
                f"'{path}' is not a readable PyTorch weights file ({type(e).__name__}): is it truncated or corrupt?"
            ) from None
        for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
            if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
                sd = sd[key]
                break
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise InputError(f"'{path}' does not hold a state dict (name -> tensor): save model.state_dict()")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


LIBRARIES = ("auto", "timm", "transformers")


def check_library(library: str | None) -> str | None:
    if library in (None, "auto"):
        return None
    if library not in LIBRARIES:
        raise UsageError(f"--library '{library}' is not one of {', '.join(LIBRARIES)}")
    return library


def read_config_json(folder: Path) -> dict:
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise InputError(
            f"folder '{folder}' has no {CONFIG_NAME}: expected timm's Hub layout (config.json + model.safetensors, "
            "as written by timm.models.save_for_hf) or a transformers model folder (save_pretrained), or pass a "
            "weights file with --arch"
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
            raise UsageError(f"--library {library}, but '{folder / CONFIG_NAME}' is a {found} config: leave out "
                             "--library or fix it")
        return library
    if found is None:
        raise InputError(f"'{folder / CONFIG_NAME}' is neither a timm config (architecture) nor a transformers "
                         "config (model_type): pass --library timm or --library transformers")
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
                             "--library timm")
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


def default_pretrained_cfg(arch_or_name: str) -> dict:
    import timm

    cfg = timm.models.get_pretrained_cfg(arch_or_name)
    return json_safe(cfg.to_dict()) if cfg is not None else {}


def build(spec: ModelSpec, state_dict: dict[str, torch.Tensor], what: str) -> nn.Module:
    return fill(build_empty(spec), state_dict, what)


# ---------------------------------------------------------------------------------------------- entry point


def load_model(
    source: str,
    *,
    arch: str | None = None,
    model_args: dict[str, Any] | None = None,
    revision: str | None = None,
    library: str | None = None,
    log=None,
) -> LoadedModel:
    """Load any MODEL source (see the module docstring). `log(msg)` receives what was chosen. `library`
    ("timm" / "transformers" / None for auto) forces how a folder or Hub repo is read."""
    model_args = dict(model_args or {})
    log = log or (lambda msg: None)
    library = check_library(library)
    if source.startswith("hf-hub:"):
        repo = source[len("hf-hub:"):]
        repo, _, at = repo.partition("@")
        return _load_hub(repo, revision or at or None, arch, model_args, library)
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
        if library == "timm":
            raise
        # Not a timm name: perhaps a Hub repo with a legacy short name (bert-base-uncased).
        try:
            return _load_hub(source, revision, arch, model_args, library)
        except NotOnHub as hub_error:
            raise InputError(f"{timm_error}; as a Hub repo, {hub_error.reason}") from None


def _load_hub(repo: str, revision: str | None, arch: str | None, model_args: dict, library: str | None) -> LoadedModel:
    config = hub_download(repo, CONFIG_NAME, revision)
    if folder_library(config.parent, library) == "transformers":
        return _load_transformers(repo, config.parent, revision, arch, model_args, f"hf-hub:{repo}",
                                  {"kind": "hf-hub", "id": repo, "revision": snapshot_revision(config) or revision})
    weights = hub_weights(repo, revision)
    loaded = _load_folder_files(config.parent, weights, model_args, f"hf-hub:{repo}")
    loaded.source = {"kind": "hf-hub", "id": repo, "revision": snapshot_revision(weights) or revision}
    return loaded


def _load_folder(folder: Path, model_args: dict, library: str | None = None, arch: str | None = None) -> LoadedModel:
    if folder_library(folder, library) == "transformers":
        weights = next((folder / n for n in (SAFE_WEIGHTS, PICKLE_WEIGHTS) if (folder / n).is_file()), None)
        source = {"kind": "local-dir", "id": str(folder.resolve()), "library": "transformers",
                  **({"sha256": sha256_later(weights)} if weights else {})}
        return _load_transformers(str(folder), folder, None, arch, model_args, f"'{folder}'", source)
    loaded = _load_folder_files(folder, None, model_args, f"'{folder}'")
    weights = folder_weights(folder)
    loaded.source = {"kind": "local-dir", "id": str(folder.resolve()), "sha256": sha256_later(weights)}
    return loaded


def _load_transformers(where: str, folder: Path, revision: str | None, arch: str | None, model_args: dict,
                       what: str, source: dict) -> LoadedModel:
    from lowrank_cli.models import transformers_models as tm

    if model_args:
        raise UsageError(f"--model-arg is for timm models; {what} is a transformers model, built from its "
                         "config.json: edit the config instead")
    if source["kind"] == "hf-hub":
        folder = hub_transformers_files(where, revision)
    model, spec = tm.load_pretrained(str(folder), what=what, arch=arch,
                                     preprocessor=tm.read_json(folder / tm.PREPROCESSOR))
    return LoadedModel(model, spec, source, files=where, revision=revision)


def hub_transformers_files(repo: str, revision: str | None) -> Path:
    """Fetch what transformers needs of a Hub repo (weights, shards, image preprocessing) through hub_download,
    so that the cache, HF_TOKEN, HF_HUB_OFFLINE and the error messages are lrc's everywhere; returns the local
    snapshot folder that `from_pretrained` then reads."""
    from huggingface_hub import errors as hf_errors

    from lowrank_cli.models.transformers_models import PREPROCESSOR

    def optional(name: str) -> Path | None:
        try:
            return hub_download(repo, name, revision)
        except hf_errors.EntryNotFoundError:
            return None

    folder = None
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          (PICKLE_WEIGHTS, "pytorch_model.bin.index.json")):
        path = optional(single)
        if path is None and (index_path := optional(index)) is not None:
            try:
                shards = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as e:
                raise InputError(f"{index} of hf-hub:{repo} is unreadable ({e}): the repo is broken") from None
            path = [hub_download(repo, shard, revision) for shard in shards][0]
        if path is not None:
            folder = path.parent
            break
    if folder is None:
        raise InputError(f"hf-hub:{repo} has no model.safetensors or {PICKLE_WEIGHTS} (nor sharded ones): it is "
                         "not a transformers model repo")
    try:  # vision models keep their mean / std / size there; text models have none
        optional(PREPROCESSOR)
    except InputError:  # offline, and never downloaded
        pass
    return folder


def tokenizer_folder(loaded: LoadedModel) -> Path:
    """The local folder with the tokenizer files of a transformers source (Hub files are fetched to the cache)."""
    from lowrank_cli.models.transformers_models import TOKENIZER_FILES

    if loaded.files is None:
        raise InputError("the source has no tokenizer files (only transformers folders and Hub repos have them): "
                         "leave out --save-tokenizer, or pass --tokenizer DIR_OR_REPO")
    folder = Path(loaded.files)
    if folder.is_dir():
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            raise InputError(f"'{folder}' has no tokenizer files ({', '.join(TOKENIZER_FILES[:5])}, ...): leave out "
                             "--save-tokenizer, or pass --tokenizer DIR_OR_REPO")
        return folder
    from huggingface_hub import errors as hf_errors

    found = None
    for name in TOKENIZER_FILES:
        try:
            found = hub_download(loaded.files, name, loaded.revision).parent
        except (hf_errors.EntryNotFoundError, InputError):  # absent, or not cached while offline
            continue
    if found is None:
        raise InputError(f"hf-hub:{loaded.files} has no tokenizer files (or, offline, none in the cache): leave out "
                         "--save-tokenizer, or pass --tokenizer DIR_OR_REPO")
    return found


def _load_folder_files(folder: Path, weights: Path | None, model_args: dict, what: str) -> LoadedModel:
    arch, args, pretrained_cfg = read_folder_config(folder)
    args.update(model_args)
    weights = weights or folder_weights(folder)
    spec = ModelSpec(arch, args, json_safe(pretrained_cfg))
    model = build(spec, read_state_dict(weights), what)
    return LoadedModel(model, spec)


def _load_file(path: Path, arch: str | None, model_args: dict) -> LoadedModel:
    if path.suffix == ".safetensors":
        from lowrank_cli.checkpoint.io import is_lrc_checkpoint, read_checkpoint

        if is_lrc_checkpoint(path):
            return read_checkpoint(path)
    elif path.suffix not in WEIGHT_SUFFIXES:
        raise InputError(
            f"'{path}' is not a weights file lrc reads ({', '.join(WEIGHT_SUFFIXES)}): pass a timm folder, "
            "a weights file with --arch, or an lrc checkpoint"
        )
    if not arch:
        raise UsageError(
            f"'{path}' is a bare weights file: say which architecture it is for with --arch NAME "
            "(e.g. --arch vit_small_patch16_224, plus --model-arg num_classes=10 if needed)"
        )
    import timm

    arch_name = arch.partition(".")[0]
    if arch_name not in timm.list_models():
        close = difflib.get_close_matches(arch_name, timm.list_models(), n=5)
        raise InputError(f"--arch '{arch}' is not a timm architecture (closest: {', '.join(close) or 'none'})")
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
