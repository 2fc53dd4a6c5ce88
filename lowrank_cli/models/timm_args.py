"""The arguments a timm model was built with, also where timm did not keep them.

timm 1.0.31 keeps `create_model`'s keyword arguments on the model (`model._model_args`); older releases (1.0.9 to
1.0.30, which lrc supports and GPU images ship) keep nothing, so a ViT built with `img_size=32, depth=4` would be
saved as the default `deit_base` and not load back. Here they are read off the model (the class count, the patch
embedding, the blocks) and kept only where they differ from the architecture's defaults; the result is checked by
building the architecture with them on the meta device and comparing every state-dict shape.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowrank_cli.errors import UsageError


def _pair_or_int(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        value = tuple(int(v) for v in value)
        return value[0] if len(set(value)) == 1 else list(value)
    return value


def _readable(model: nn.Module) -> dict[str, Any]:
    """What the common timm constructors take that the built model shows (absent ones are left out)."""
    found: dict[str, Any] = {}
    if isinstance(getattr(model, "num_classes", None), int):
        found["num_classes"] = model.num_classes
    embed = getattr(model, "patch_embed", None)
    if embed is not None:
        for key in ("img_size", "patch_size"):
            if getattr(embed, key, None) is not None:
                found[key] = _pair_or_int(getattr(embed, key))
        proj = getattr(embed, "proj", None)
        if isinstance(proj, nn.Conv2d):
            found["in_chans"] = proj.in_channels
            found["embed_dim"] = proj.out_channels
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks):
        found["depth"] = len(blocks)
        heads = getattr(getattr(blocks[0], "attn", None), "num_heads", None)
        if isinstance(heads, int):
            found["num_heads"] = heads
        fc1 = getattr(getattr(blocks[0], "mlp", None), "fc1", None)
        if isinstance(fc1, nn.Linear) and found.get("embed_dim"):
            found["mlp_ratio"] = fc1.out_features / found["embed_dim"]
    return found


def _meta_model(arch: str, pretrained_cfg: dict | None, args: dict) -> nn.Module:
    import timm

    with torch.device("meta"):
        return timm.create_model(arch, pretrained=False, pretrained_cfg=pretrained_cfg or None, **args)


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of the dense model: a replaced linear (low-rank, progressive, fused: anything with
    in_features / out_features that is not an nn.Linear) counts as the nn.Linear it stands for."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or not hasattr(module, "in_features") or not hasattr(module, "out_features"):
            continue
        prefix = f"{name}." if name else ""
        has_bias = any(k.startswith(prefix) and k.endswith(".bias") for k in shapes)
        shapes = {k: v for k, v in shapes.items() if not k.startswith(prefix)}
        shapes[prefix + "weight"] = (module.out_features, module.in_features)
        if has_bias:
            shapes[prefix + "bias"] = (module.out_features,)
    return shapes


def timm_model_args(model: nn.Module, arch: str, pretrained_cfg: dict | None = None) -> dict[str, Any]:
    """The keyword arguments that rebuild `model` with `timm.create_model(arch, **args)`: timm's own record when
    it keeps one, else the ones read off the model and checked against the rebuilt architecture's shapes."""
    kept = getattr(model, "_model_args", None)
    if kept is not None:
        return dict(kept)
    wanted = _shapes(model)
    default = _meta_model(arch, pretrained_cfg, {})
    if _shapes(default) == wanted:
        return {}
    theirs, ours = _readable(default), _readable(model)
    args = {k: v for k, v in ours.items() if k in theirs and theirs[k] != v}
    try:
        rebuilt = _meta_model(arch, pretrained_cfg, args)
    except Exception:  # noqa: BLE001 - a constructor that does not take what was read: the error below says so
        rebuilt = None
    if rebuilt is not None and _shapes(rebuilt) == wanted:
        return args
    import timm

    raise UsageError(
        f"this model is not the default {arch}, and timm {timm.__version__} does not keep the arguments it was "
        "built with: upgrade timm to 1.0.31 or newer (`pip install -U timm`), which keeps them, then build the "
        "model again"
    )
