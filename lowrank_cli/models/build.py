"""Build an architecture from its ModelSpec (on the meta device) and fill it with weights, shapes checked first."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import torch
from torch import nn

from lowrank_cli.errors import InputError, UsageError
from lowrank_cli.models.inputs import record_input_size
from lowrank_cli.models.spec import ModelSpec, json_safe
from lowrank_cli.models.transformers_models import is_transformers_model


def _non_persistent_buffers(model: nn.Module) -> bool:
    persistent = set(model.state_dict().keys())
    return any(name not in persistent for name, _ in model.named_buffers())


# What a model constructor raises for arguments it cannot take (timm asserts, transformers raises ValueError, ...).
_REJECTED = (TypeError, ValueError, AssertionError, KeyError, IndexError, ZeroDivisionError, OverflowError)


def build_empty(spec: ModelSpec, *, what: str = "the model", fix: str = "fix the `model_args` values",
                max_params: int | None = None) -> nn.Module:
    """The architecture with its parameters on the meta device (no memory, no random init).

    Random initialisation of a ViT-B costs ~2 s on 2 cores; every weight is overwritten by the state dict
    anyway. Models with non-persistent buffers (computed, not stored: relative position indices...) and
    transformers models are built for real, because those buffers would otherwise stay empty; `max_params`
    refuses, before that allocation, arguments that describe a far larger model than the weights at hand.
    A constructor that rejects the arguments is an InputError that says `fix`.
    """
    if spec.library not in ("timm", "transformers"):
        raise InputError(f"library '{spec.library}' is not supported by this version of lrc: upgrade lrc")
    meta = _construct(spec, meta=True, what=what, fix=fix)
    count = sum(p.numel() for p in meta.parameters())
    if max_params is not None and count > max_params:
        raise InputError(f"{what} describes a model of {count:,} parameters, far more than its weights hold: {fix}")
    if spec.library == "transformers" or _non_persistent_buffers(meta):
        return _construct(spec, meta=False, what=what, fix=fix)
    return meta


def _construct(spec: ModelSpec, *, meta: bool, what: str, fix: str) -> nn.Module:
    device = torch.device("meta") if meta else contextlib.nullcontext()
    try:
        with device:
            if spec.library == "transformers":
                from lowrank_cli.models.transformers_models import empty_model

                return empty_model(spec)
            import timm

            return timm.create_model(spec.architecture, pretrained=False,
                                     pretrained_cfg=dict(spec.pretrained_cfg) or None, **spec.model_args).eval()
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise InputError(f"timm has no architecture '{spec.architecture}': upgrade timm or fix the name") from None
        raise
    except _REJECTED as e:
        raise InputError(f"{what}: {spec.library} cannot build '{spec.architecture}' with model args "
                         f"{_short(spec.model_args)} ({type(e).__name__}: {str(e)[:160]}): {fix}") from None


def _short(args: dict[str, Any]) -> str:
    text = json.dumps(args, default=str)
    return text if len(text) <= 200 else text[:200] + "...}"


def check_fits(model: nn.Module, shapes: dict[str, tuple[int, ...]], what: str) -> None:
    """Compare the names and shapes of the tensors to load with the model's, before anything is allocated,
    so that the error says which keys do not fit."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    wrong = [f"{k} {tuple(shapes[k])} vs {v}" for k, v in expected.items() if k in shapes and tuple(shapes[k]) != v]
    if not (missing or unexpected or wrong):
        return

    def some(items: list[str], sep: str = ", ") -> str:
        return sep.join(items[:3]) + (f"{sep}..." if len(items) > 3 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) ({some(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) ({some(unexpected)})")
    if wrong:
        parts.append(f"{len(wrong)} shape mismatch(es) (file vs model: {some(wrong, '; ')})")
    raise InputError(
        f"the weights of {what} do not fit the architecture: {', '.join(parts)}; check `arch` and `model_args` "
        "(e.g. num_classes=...)"
    )


def fill(model: nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> nn.Module:
    """Strictly load `state_dict` into `model` (possibly on meta)."""
    check_fits(model, {k: tuple(v.shape) for k, v in state_dict.items()}, what)
    # assign=True keeps the loaded tensors (and their dtype) instead of copying into meta placeholders.
    model.load_state_dict(state_dict, strict=True, assign=True)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise InputError(f"{what}: tensor {name} was not filled by the weights: the file does not fit the model")
    return model


def build(spec: ModelSpec, state_dict: dict[str, torch.Tensor], what: str) -> nn.Module:
    return fill(build_empty(spec), state_dict, what)


def spec_of(model: nn.Module) -> ModelSpec:
    """How to rebuild a timm or transformers model without its source (its lrc record, if any, knows better)."""
    if is_transformers_model(model):
        from lowrank_cli.models.transformers_models import transformers_spec

        return transformers_spec(model)
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    arch = cfg.get("architecture")
    if not arch:
        raise UsageError(
            "lrc can only save timm models (the model has no pretrained_cfg['architecture']): build it with "
            "timm.create_model or lowrank_cli.load"
        )
    for key in ("hf_hub_id", "url", "file", "source", "state_dict"):
        cfg.pop(key, None)
    from lowrank_cli.models.timm_args import timm_model_args

    spec = ModelSpec(arch, json_safe(timm_model_args(model, arch, cfg)), json_safe(cfg))
    record_input_size(model, spec)
    return spec
