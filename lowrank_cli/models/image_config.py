"""timm's data config (input size, interpolation, mean, std, crop) of an image model, given the pretrained_cfg its
family says it follows: what the image transforms, the input size and the PIL mode of images come from."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lowrank_cli.errors import InputError


def data_config(model_or_config: torch.nn.Module | Mapping[str, Any],
                pretrained_cfg: Mapping[str, Any] | None = None, *, check_mode: bool = True) -> dict[str, Any]:
    """timm's data config (input_size, interpolation, mean, std, crop_pct, crop_mode) for a model.

    A model's pretrained_cfg describes the checkpoint it was published with, not the model as built:
    `create_model(..., img_size=32, in_chans=1)` still reports (3, 224, 224). The channel count and,
    for models with a fixed input size (ViT patch embedding), the image size are read from the model.
    `pretrained_cfg` stands for the model's own (a transformers vision model has none). A mapping (a
    pretrained_cfg or a data config, e.g. from checkpoint metadata) is taken as it is. `check_mode`: refuse
    channel counts that images cannot provide (not for the input size alone: a made-up batch has any).
    """
    import timm.data

    if isinstance(model_or_config, torch.nn.Module):
        model = model_or_config
        cfg = dict(timm.data.resolve_data_config({}, pretrained_cfg=pretrained_cfg, model=model))
        chans, size = cfg["input_size"][0], tuple(cfg["input_size"][1:])
        chans = int(getattr(model, "in_chans", 0) or _first_conv_channels(model) or chans)
        img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if img_size is not None:
            size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        cfg["input_size"] = (chans, *size)
    else:
        cfg = dict(timm.data.resolve_data_config({}, pretrained_cfg=dict(model_or_config)))
    chans = cfg["input_size"][0]
    for key in ("mean", "std"):
        value = tuple(float(v) for v in cfg[key])
        # timm adapts 3-channel weights to 1 channel by summing the filters, so a grey image normalised
        # with the averaged statistics matches what the RGB filters saw.
        if chans == 1 and len(value) == 3:
            value = (sum(value) / 3,)
        cfg[key] = value
    cfg["input_size"] = tuple(int(v) for v in cfg["input_size"])
    if check_mode:
        config_mode(cfg)  # fail early on channel counts that images cannot provide
    return cfg


def _first_conv_channels(model: torch.nn.Module) -> int | None:
    name = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    if isinstance(name, (list, tuple)):
        name = name[0] if name else None
    if not name:
        return None
    try:
        return getattr(model.get_submodule(name), "in_channels", None)
    except AttributeError:
        return None


def config_mode(cfg: Mapping[str, Any]) -> str:
    """The PIL mode images must be decoded to for a data config: 'L' for 1 channel, 'RGB' for 3."""
    chans = int(cfg["input_size"][0])
    if chans not in (1, 3):
        raise InputError(f"the model expects {chans} input channels, but images give 1 (grey) or 3 (RGB):"
                         " use a model built with in_chans=1 or 3")
    return "L" if chans == 1 else "RGB"
