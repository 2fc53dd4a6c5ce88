"""Hugging Face transformers models (BERT-style text encoders, ViT-style image encoders) as lrc sources.

transformers is an optional extra: nothing here imports it before a transformers model is asked for, and its
absence is one clear error. Models are built by transformers' own classes (the architecture the config names,
or AutoModel), never with trust_remote_code, and loaded by `from_pretrained` (safetensors first), which knows
each architecture's renamed and tied weights. A model is described for an lrc checkpoint by a ModelSpec with
library "transformers": the class name, the whole config as model_args, and for vision models the image
preprocessing as a timm-style pretrained_cfg, so that timm.data's transforms and every image code path of lrc
serve them unchanged.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowrank_cli.errors import EnvironmentProblem, InputError, UsageError
from lowrank_cli.models.spec import ModelSpec, json_safe

if TYPE_CHECKING:
    from torch import nn

LIBRARY = "transformers"
PREPROCESSOR = "preprocessor_config.json"
# What `--save-tokenizer` copies: every tokenizer format transformers reads (fast, WordPiece, BPE, SentencePiece).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model",
)  # fmt: skip


def require() -> Any:
    try:
        import transformers
    except ImportError:
        raise EnvironmentProblem(
            "this is a Hugging Face transformers model and transformers is not installed: "
            "pip install 'lowrank-cli[transformers]'"
        ) from None
    return transformers


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """transformers' load reports and progress bars would drown lrc's one-line output; the caller's settings
    come back afterwards (a notebook keeps its own)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def is_transformers_model(model: nn.Module) -> bool:
    # By module name, so that a timm-only run never imports transformers (a 2 s import).
    return any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel" for c in type(model).__mro__)


def is_text_model(model: nn.Module) -> bool:
    return is_transformers_model(model) and getattr(model, "main_input_name", None) == "input_ids"


# ---------------------------------------------------------------------------------------------- classes


def model_class(config: Any, arch: str | None = None, auto: str = "AutoModel") -> type:
    """The class to build: `arch` (--arch BertModel), else the first architecture the config names that this
    transformers has, else the `auto` class (AutoModel: a bare encoder; AutoModelForCausalLM) of its model type."""
    transformers = require()
    names = [arch] if arch else list(getattr(config, "architectures", None) or [])
    for name in names:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
        if arch:
            raise InputError(f"`arch` '{arch}' is not a transformers model class (e.g. BertModel, "
                             "BertForSequenceClassification): fix the name or upgrade transformers")
    try:
        return getattr(transformers, auto)._model_mapping[type(config)]
    except KeyError:
        raise InputError(
            f"transformers {transformers.__version__} has no model class for model_type '{config.model_type}'"
            f"{' (config names ' + ', '.join(names) + ')' if names else ''}: upgrade transformers; lrc never runs "
            "remote code (trust_remote_code)"
        ) from None


def check_remote_code(cfg: dict[str, Any], what: str) -> None:
    """A config.json that names remote code (`auto_map`) is refused when transformers cannot build the model with
    its own classes: the repository's code would be needed, and lrc never runs it. One that transformers knows
    natively (many Hub repos keep an auto_map from before transformers had the architecture) is built with
    transformers' own class; the code files are never imported."""
    auto_map = cfg.get("auto_map")
    if not auto_map:
        return
    transformers = require()
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = cfg.get("model_type")
    missing = [a for a in cfg.get("architectures") or [] if not isinstance(getattr(transformers, str(a), None), type)]
    code = ", ".join(f"{k} -> {v}" for k, v in auto_map.items()) if isinstance(auto_map, dict) else str(auto_map)
    if model_type not in CONFIG_MAPPING_NAMES or missing:
        lacks = f"model_type '{model_type}'" if model_type not in CONFIG_MAPPING_NAMES else ", ".join(missing)
        raise InputError(
            f"{what} needs remote code (its config.json names auto_map: {code[:160]}), and transformers "
            f"{transformers.__version__} has no {lacks} of its own: lrc never runs a repository's code "
            "(trust_remote_code); use a model that transformers supports"
        )


def config_from_dict(args: dict[str, Any]) -> Any:
    transformers = require()
    args = dict(args)
    model_type = args.pop("model_type", None)
    if not model_type:
        raise InputError("the transformers config has no model_type: the file is corrupt; write it again")
    try:
        return transformers.AutoConfig.for_model(model_type, **args)
    except ValueError as e:
        raise InputError(f"transformers {transformers.__version__} does not know model_type '{model_type}' ({e}): "
                         "upgrade transformers") from None


@contextlib.contextmanager
def no_init() -> Iterator[None]:
    """Skip random initialisation: every weight is loaded right after (2.3 s -> 0.03 s for BERT-base)."""
    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        yield


def empty_model(spec: ModelSpec) -> nn.Module:
    """The architecture of `spec`, uninitialised (non-persistent buffers such as position ids are real)."""
    config = config_from_dict(spec.model_args)
    cls = model_class(config, spec.architecture)
    with no_init(), quiet():
        model = cls._from_config(config)
    attach_pretrained_cfg(model, spec.pretrained_cfg)
    return model.eval()


# ---------------------------------------------------------------------------------------------- specs


def vision_pretrained_cfg(config: Any, preprocessor: dict[str, Any] | None) -> dict[str, Any]:
    """timm-style pretrained_cfg (input_size, mean, std, crop) of a transformers vision model, from its
    image processor's settings when the source has them (ViT's defaults otherwise)."""
    pre = preprocessor or {}
    size = pre.get("size") or {}
    image_size = getattr(config, "image_size", 224)
    if isinstance(image_size, (list, tuple)):
        height, width = image_size
    else:
        height = width = image_size
    if isinstance(size, dict):
        height, width = size.get("height", size.get("shortest_edge", height)), size.get("width", size.get("shortest_edge", width))
    elif isinstance(size, int):
        height = width = size
    return {
        "input_size": [int(getattr(config, "num_channels", 3)), int(height), int(width)],
        "mean": list(pre.get("image_mean") or (0.5, 0.5, 0.5)),
        "std": list(pre.get("image_std") or (0.5, 0.5, 0.5)),
        "interpolation": "bilinear" if pre.get("resample", 2) == 2 else "bicubic",
        "crop_pct": 1.0,  # ViTImageProcessor resizes to the input size, no centre crop
        "crop_mode": "center",
        "num_classes": int(getattr(config, "num_labels", 0) or 0),
    }


def attach_pretrained_cfg(model: nn.Module, pretrained_cfg: dict[str, Any]) -> None:
    """timm.data reads `model.pretrained_cfg`: giving a vision model one makes lrc's image paths serve it."""
    if pretrained_cfg and not is_text_model(model):
        model.pretrained_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in pretrained_cfg.items()}


def image_pretrained_cfg(model: nn.Module) -> dict[str, Any] | None:
    """The pretrained_cfg of a transformers vision model: the one lrc attached when it loaded it, else one derived
    from its config (a model built in a notebook with from_pretrained has none), so that its input size is its
    own and not timm's default 224. None for text models and for other libraries' models. The model is not
    changed."""
    if not is_transformers_model(model) or is_text_model(model):
        return None
    return getattr(model, "pretrained_cfg", None) or vision_pretrained_cfg(model.config, None)


def transformers_spec(model: nn.Module, family: str | None = None) -> ModelSpec:
    """How to rebuild `model`: its class, its whole config and (vision) its preprocessing; `family` the
    models.families name that reads it."""
    config = model.config.to_dict()
    config.pop("transformers_version", None)
    pretrained_cfg = dict(image_pretrained_cfg(model) or {})
    return ModelSpec(type(model).__name__, json_safe(config), json_safe(pretrained_cfg), library=LIBRARY,
                     family=family)


# Models whose learned positions start at padding_idx + 1 (fairseq's convention): max_position_embeddings
# counts padding_idx + 1 = 2 slots that no token can use (514 for a 512-token RoBERTa).
_POSITIONS_AFTER_PAD = (
    "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "roberta-prelayernorm", "data2vec-text",
)  # fmt: skip


def _config_value(config: Any, key: str) -> Any:
    if isinstance(config, Mapping):
        return config.get(key)
    return getattr(config, key, None)


def position_limit(model_or_config: Any) -> int | None:
    """The most tokens the model's learned positions take (max_position_embeddings, minus the 2 unusable slots
    of RoBERTa-style models), or None when the config does not say."""
    config = getattr(model_or_config, "config", model_or_config)
    positions = _config_value(config, "max_position_embeddings")
    if not (isinstance(positions, int) and positions > 0):
        return None
    return positions - 2 if _config_value(config, "model_type") in _POSITIONS_AFTER_PAD else positions


def read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"'{path}' is not valid JSON ({e}): fix or re-export the folder") from None


# ---------------------------------------------------------------------------------------------- loading


def load_pretrained(folder: str, *, what: str, arch: str | None = None, preprocessor: dict[str, Any] | None = None,
                    family: str | None = None, auto: str = "AutoModel") -> tuple[nn.Module, ModelSpec]:
    """A local folder in transformers' layout (a Hub repo's files are fetched by the family first), through
    `from_pretrained` (safetensors first, no remote code; `auto` the class family of a config that names no
    architecture). Weights that do not fit the architecture are an error, not a silently re-initialised layer."""
    transformers = require()
    check_remote_code(read_json(Path(folder) / "config.json") or {}, what)
    try:
        with quiet():
            config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"transformers cannot read the config of {what} ({str(e).splitlines()[0][:200]}): "
                         "upgrade transformers, or check the folder") from None
    cls = model_class(config, arch, auto)
    try:
        with quiet():
            model, info = cls.from_pretrained(folder, config=config, trust_remote_code=False,
                                              output_loading_info=True)
    except Exception as e:  # OSError for missing files; safetensors' own error for a truncated or corrupt one
        first = (str(e).splitlines() or [""])[0][:200]
        raise InputError(f"transformers cannot load the weights of {what} ({type(e).__name__}: {first}): check that "
                         "the folder has a complete model.safetensors (or pytorch_model.bin); re-export it if it "
                         "is truncated or corrupt") from None
    bad = list(info.get("missing_keys") or []) + [str(k) for k in info.get("mismatched_keys") or []]
    if bad:
        raise InputError(
            f"the weights of {what} do not fit {cls.__name__}: {len(bad)} missing or mismatched tensor(s) "
            f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); pick the class that matches with `arch` "
            "(e.g. `arch` BertModel for an encoder without a head)"
        )
    model.eval()
    if getattr(model, "main_input_name", None) == "pixel_values":
        attach_pretrained_cfg(model, vision_pretrained_cfg(config, preprocessor))
    return model, transformers_spec(model, family)


def copy_tokenizer(folder: Path, destination: str | Path) -> list[str]:
    """Copy the tokenizer files of a source folder (or Hub snapshot) into `destination`; returns their names."""
    names = [n for n in TOKENIZER_FILES if (folder / n).is_file()]
    if not names:
        raise InputError(f"'{folder}' has no tokenizer files ({', '.join(TOKENIZER_FILES[:5])}, ...): leave out "
                         "`save_tokenizer`, or factorize from the folder or repo that has them")
    destination = Path(destination).expanduser()
    if destination.exists() and not destination.is_dir():
        raise UsageError(f"`save_tokenizer` '{destination}' is a file: give a folder")
    destination.mkdir(parents=True, exist_ok=True)
    from lowrank_cli.atomic import atomic_path

    for name in names:
        with atomic_path(destination / name) as tmp:
            shutil.copyfile(folder / name, tmp)
    return names
