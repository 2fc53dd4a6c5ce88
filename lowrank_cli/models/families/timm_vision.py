"""timm models: image models by name (`deit_base`), in timm's Hub layout (config.json with `architecture` +
model.safetensors, as save_for_hf writes it), or as a bare weights file with `arch`.

A model is described by a ModelSpec of library "timm": the architecture, the constructor arguments that differ
from its defaults (models.timm_args) and its pretrained_cfg (input size, mean, std, crop), with the input size the
model really takes. timm fuses q, k and v into one linear already: no layers share an input.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowrank_cli.errors import InputError, UsageError
from lowrank_cli.models.families.base import CONFIG_NAME, Family, Head, read_config_json

if TYPE_CHECKING:
    from torch import nn

    from lowrank_cli.models.spec import ModelSpec

LIBRARY = "timm"
# pretrained_cfg keys that say where the source's weights were, not how to rebuild the model.
SOURCE_KEYS = ("file", "source", "hf_hub_id", "url")


class TimmVision(Family):
    name = "timm_vision"
    library = LIBRARY
    config_hint = "a timm config (architecture)"
    loads_names = True
    reads_weights_files = True

    def claims_config(self, cfg: dict[str, Any]) -> bool:
        return "architecture" in cfg or "pretrained_cfg" in cfg

    def claims_model(self, model: nn.Module) -> bool:
        return type(model).__module__.startswith("timm.")

    def target_linears(self, model: nn.Module) -> list[str]:
        """The blocks' linears less those of a stage's patch merging (Swin's `layers.N.downsample.reduction`): the
        repeated stages hold it, but it is a transition between stages like the patch embedding, not part of a
        transformer block, and PELA factorizes the blocks. `--include` still reaches it."""
        merging = tuple(n + "." for n, m in model.named_modules() if type(m).__name__ == "PatchMerging")
        return [n for n in super().target_linears(model) if not n.startswith(merging)]

    # ---- sources

    def load_folder(self, folder: Path, *, what: str, arch: str | None, model_args: dict[str, Any]) -> Any:
        from lowrank_cli.models.weights import sha256_later

        loaded = self._from_folder(folder, None, model_args, what)
        weights = folder_weights(folder)
        loaded.source = {"kind": "local-dir", "id": str(folder.resolve()), "sha256": sha256_later(weights)}
        return loaded

    def load_hub(self, repo: str, revision: str | None, config: Path, *, arch: str | None,
                 model_args: dict[str, Any]) -> Any:
        from lowrank_cli.models.hub import hub_weights, snapshot_revision

        weights = hub_weights(repo, revision)
        loaded = self._from_folder(config.parent, weights, model_args, f"hf-hub:{repo}")
        loaded.source = {"kind": "hf-hub", "id": repo, "revision": snapshot_revision(weights) or revision}
        return loaded

    def _from_folder(self, folder: Path, weights: Path | None, model_args: dict[str, Any], what: str) -> Any:
        from lowrank_cli.models.loaded import LoadedModel
        from lowrank_cli.models.spec import json_safe
        from lowrank_cli.models.weights import fill, read_state_dict

        arch, args, pretrained_cfg = read_folder_config(folder)
        args.update(model_args)
        weights = weights or folder_weights(folder)
        spec = self._spec(arch, args, json_safe(pretrained_cfg))
        return LoadedModel(fill(self.build_empty(spec), read_state_dict(weights), what), spec)

    def open_skeleton(self, folder: Path, *, what: str, arch: str | None, model_args: dict[str, Any]) -> Any:
        from lowrank_cli.models.loaded import LoadedModel
        from lowrank_cli.models.skeleton import parameters_on_meta
        from lowrank_cli.models.spec import json_safe
        from lowrank_cli.models.weights import sha256_later

        sharded = (folder / "model.safetensors.index.json").is_file()
        weights = None if sharded else folder_weights(folder)
        if weights is not None and weights.suffix != ".safetensors":
            return None
        name, args, pretrained_cfg = read_folder_config(folder)
        args.update(model_args)
        spec = self._spec(name, args, json_safe(pretrained_cfg))
        with parameters_on_meta():
            model = self._construct(spec, meta=False, what=what, fix="fix the `model_args` values")
        source = {"kind": "local-dir", "id": str(folder.resolve()), **({"sha256": sha256_later(weights)} if weights else {})}
        return LoadedModel(model, spec, source)

    def load_name(self, name: str, model_args: dict[str, Any], log: Callable[[str], None]) -> Any:
        """A timm name (`deit_base` -> its registered default); weights from its Hub repo, else timm's own loader."""
        import timm

        from lowrank_cli.models.hub import hub_weights, snapshot_revision
        from lowrank_cli.models.loaded import LoadedModel
        from lowrank_cli.models.spec import json_safe
        from lowrank_cli.models.timm_names import default_pretrained_cfg, resolve_timm_name
        from lowrank_cli.models.weights import fill, read_state_dict

        resolved = resolve_timm_name(name)
        if resolved != name:
            log(f"{name} -> {resolved}")
        arch = resolved.partition(".")[0]
        pretrained_cfg = default_pretrained_cfg(resolved)
        repo = pretrained_cfg.get("hf_hub_id")
        if repo:
            weights = hub_weights(repo, None)
            state_dict = read_state_dict(weights)
            spec = self._spec(arch, dict(model_args), _without_source(pretrained_cfg))
            model = fill(self.build_empty(spec), state_dict, resolved)
            return LoadedModel(model, spec, {"kind": "timm", "id": resolved, "hub": repo,
                                             "revision": snapshot_revision(weights)})
        # Weights only at a URL (no Hub repo): timm's own loader knows how to convert them.
        try:
            model = timm.create_model(resolved, pretrained=True, **model_args).eval()
        except Exception as e:
            raise InputError(f"timm could not load the pretrained weights of {resolved} ({e}): check the network or "
                             "the name") from None
        spec = self._spec(arch, dict(model_args), json_safe(dict(model.pretrained_cfg)))
        return LoadedModel(model, spec, {"kind": "timm", "id": resolved})

    def load_weights_file(self, path: Path, arch: str, model_args: dict[str, Any]) -> Any:
        import difflib

        import timm

        from lowrank_cli.models.loaded import LoadedModel
        from lowrank_cli.models.timm_names import default_pretrained_cfg
        from lowrank_cli.models.weights import fill, read_state_dict, sha256_later

        arch_name = arch.partition(".")[0]
        if arch_name not in timm.list_models():
            close = difflib.get_close_matches(arch_name, timm.list_models(), n=5)
            raise InputError(f"`arch` '{arch}' is not a timm architecture (closest: {', '.join(close) or 'none'})")
        spec = self._spec(arch_name, dict(model_args), default_pretrained_cfg(arch))
        model = fill(self.build_empty(spec), read_state_dict(path), f"'{path}'")
        record_input_size(model, spec)
        return LoadedModel(model, spec, {"kind": "file", "id": str(path.resolve()), "sha256": sha256_later(path),
                                         "arch": arch})

    # ---- building

    def _spec(self, arch: str, model_args: dict[str, Any], pretrained_cfg: dict[str, Any]) -> ModelSpec:
        from lowrank_cli.models.spec import ModelSpec

        return ModelSpec(arch, model_args, pretrained_cfg, library=LIBRARY, family=self.name)

    def construct(self, spec: ModelSpec) -> nn.Module:
        import timm

        try:
            return timm.create_model(spec.architecture, pretrained=False,
                                     pretrained_cfg=dict(spec.pretrained_cfg) or None, **spec.model_args).eval()
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise InputError(f"timm has no architecture '{spec.architecture}': upgrade timm or fix the "
                                 "name") from None
            raise

    def spec_of(self, model: nn.Module) -> ModelSpec:
        from lowrank_cli.models.spec import json_safe
        from lowrank_cli.models.timm_args import timm_model_args

        cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        arch = cfg.get("architecture")
        if not arch:
            raise UsageError(
                "lrc can only save timm models (the model has no pretrained_cfg['architecture']): build it with "
                "timm.create_model or lowrank_cli.load"
            )
        for key in (*SOURCE_KEYS, "state_dict"):
            cfg.pop(key, None)
        spec = self._spec(arch, json_safe(timm_model_args(model, arch, cfg)), json_safe(cfg))
        record_input_size(model, spec)
        return spec

    def describe(self, model: nn.Module) -> tuple[str | None, str | None]:
        arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
        return arch, (LIBRARY if arch else None)

    # ---- head

    def replace_head(self, loaded: Any, outputs: int, classes: list[str] | None, regression: bool) -> Head:
        """timm's `reset_classifier`, in place."""
        model = loaded.model
        if not hasattr(model, "reset_classifier"):
            raise UsageError(f"{type(model).__name__} has no reset_classifier(), so lrc cannot give it a new head: "
                             "use a timm or transformers model")
        param = next(model.parameters())
        model.reset_classifier(outputs)
        model.to(device=param.device, dtype=param.dtype)
        loaded.spec.model_args["num_classes"] = outputs
        loaded.spec.pretrained_cfg["num_classes"] = outputs
        return Head(head_modules(model), outputs)

    # ---- the model card

    def pipeline_tag(self, spec: ModelSpec) -> str | None:
        """timm models classify images (or embed them without a head)."""
        return "image-classification" if spec.model_args.get("num_classes", 1) else "image-feature-extraction"

    def card_usage(self, load_line: str, repo: str, text: bool, tokenizer: list[str] | None) -> tuple[str, list[str]]:
        return "", ["import lowrank_cli", "import timm", "", load_line,
                    "transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))"]

    def source_label(self, source: dict[str, Any]) -> str | None:
        if source.get("kind") != "timm":
            return None
        hub = source.get("hub")
        return f"timm `{source.get('id') or '?'}`" + (f" ([{hub}](https://huggingface.co/{hub}))" if hub else "")


def head_modules(model: nn.Module) -> list[str]:
    """The module names of a timm model's classifier (a distilled model has two heads)."""
    classifier = model.get_classifier()
    chosen = {id(m) for m in (classifier if isinstance(classifier, (tuple, list)) else [classifier])}
    return [n for n, m in model.named_modules() if id(m) in chosen and n]


def record_input_size(model: nn.Module, spec: ModelSpec) -> None:
    """A model built with another img_size (--model-arg img_size=64) keeps the default pretrained_cfg of its
    architecture (224): record the size the weights really take, so that transforms, MAC counts and the saved
    checkpoint agree with the model."""
    from lowrank_cli.models.image_config import data_config

    size = list(data_config(model)["input_size"])
    if list(spec.pretrained_cfg.get("input_size") or []) != size:
        spec.pretrained_cfg["input_size"] = size
        spec.pretrained_cfg.pop("test_input_size", None)
        model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}), "input_size": tuple(size)}


def _without_source(pretrained_cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in pretrained_cfg.items() if k not in SOURCE_KEYS}


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
    for key in ("num_classes", "global_pool"):
        if key in cfg:
            model_args.setdefault(key, cfg[key])
    return arch, model_args, _without_source(pretrained_cfg)


def folder_weights(folder: Path) -> Path:
    from lowrank_cli.models.weights import PICKLE_WEIGHTS, SAFE_WEIGHTS

    for name in (SAFE_WEIGHTS, PICKLE_WEIGHTS, "pytorch_model.pth"):
        if (folder / name).is_file():
            return folder / name
    raise InputError(f"folder '{folder}' has no {SAFE_WEIGHTS} (or {PICKLE_WEIGHTS}): re-export it with timm's "
                     "save_for_hf")
