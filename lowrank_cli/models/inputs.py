"""The input a model takes: image tensors for timm and transformers vision models, token ids for text models.

Every place that runs a model on a made-up batch (the call check, MAC counts, speed plans, benchmarks) asks here,
so that an "input size" means (C, H, W) for an image model and (seq_len,) for a text model everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lowrank_cli.errors import InputError, UsageError
from lowrank_cli.models.spec import ModelSpec
from lowrank_cli.models.transformers_models import DEFAULT_SEQ_LEN, is_text_model


def default_input_size(model: nn.Module, seq_len: int | None = None) -> tuple[int, ...]:
    """(C, H, W) from the model's data config, or (seq_len,) for a text model (DEFAULT_SEQ_LEN, at most the
    model's positions)."""
    if is_text_model(model):


        positions = position_limit(model)  # RoBERTa-style models lose 2 of max_position_embeddings
        if seq_len is not None:
            if seq_len < 1:
                raise UsageError(f"`seq_len` must be at least 1, got {seq_len}")
            if positions and seq_len > positions:
                raise UsageError(f"`seq_len` {seq_len} is above the {positions} positions the model has: lower it")
            return (int(seq_len),)
        return (min(DEFAULT_SEQ_LEN, positions or DEFAULT_SEQ_LEN),)
    if seq_len is not None:
        raise UsageError("`seq_len` is for text models; an image model takes `input_size` C,H,W")


    return tuple(int(v) for v in data_config(model)["input_size"])


def forward_failed(error: Exception, model: nn.Module, input_size: tuple[int, ...], consequence: str = "") -> InputError:
    """The InputError for a test forward pass at `input_size` that raised `error`, naming the option that sets the
    size for this kind of model. A device failure (out of memory, a CUDA error) is the device's, not the input
    size's: it is raised as it is."""
    from lowrank_cli.devices import is_device_failure

    if is_device_failure(error):
        raise error
    option = "`seq_len` N" if is_text_model(model) else "`input_size` C,H,W"
    return InputError(f"a test forward pass at input size {tuple(input_size)} failed ({type(error).__name__}: "
                      f"{str(error)[:120]}){consequence}: pass the right {option}")


def check_input_size(model: nn.Module, input_size: tuple[int, ...] | None) -> None:
    """An --input-size given to a text model is a mistake of kind, not of numbers: say which option it needs."""
    if input_size is not None and is_text_model(model) and len(input_size) != 1:
        raise UsageError("`input_size` is C,H,W for image models; a text model takes `seq_len` N")


def example_input(model: nn.Module, size: tuple[int, ...], batch: int = 1, *, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None, generator: torch.Generator | None = None,
                  zeros: bool = False) -> torch.Tensor:
    """A batch for `model(x)`: token ids (batch, seq_len) for a text model, else floats (batch, *size) in `dtype`.

    `zeros` gives a blank batch (shape checks, meta-device runs); otherwise values come from `generator`.
    """
    device = torch.device(device or "cpu")
    if is_text_model(model):
        shape = (batch, int(size[-1]))
        if zeros:
            return torch.zeros(shape, dtype=torch.long, device=device)
        vocab = int(getattr(model.config, "vocab_size", 2) or 2)
        low = min(vocab - 1, 5)  # ids above BERT's special tokens ([PAD] 0 would look like padding)
        return torch.randint(low, vocab, shape, generator=generator).to(device)
    dtype = dtype or torch.float32
    if zeros:
        return torch.zeros((batch, *size), dtype=dtype, device=device)
    return torch.randn((batch, *size), generator=generator).to(device=device, dtype=dtype)


def output_tensor(output: object) -> torch.Tensor:
    """The main tensor of a forward pass: a timm model's logits, a transformers output's logits, else its last
    hidden state, else the first tensor of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):  # transformers' ModelOutput is an OrderedDict
        for key in ("logits", "last_hidden_state", "pooler_output"):
            if isinstance(output.get(key), torch.Tensor):
                return output[key]
        output = tuple(v for v in output.values() if isinstance(v, torch.Tensor))
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"the model returned {type(output).__name__}, not a tensor")


def record_input_size(model: nn.Module, spec: ModelSpec) -> None:
    """A model built with another img_size (--model-arg img_size=64) keeps the default pretrained_cfg of its
    architecture (224): record the size the weights really take, so that transforms, MAC counts and the saved
    checkpoint agree with the model."""


    size = list(data_config(model)["input_size"])
    if list(spec.pretrained_cfg.get("input_size") or []) != size:
        spec.pretrained_cfg["input_size"] = size
        spec.pretrained_cfg.pop("test_input_size", None)
        model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}), "input_size": tuple(size)}


def data_config(model_or_config: torch.nn.Module | Mapping[str, Any]) -> dict[str, Any]:
    """timm's data config (input_size, interpolation, mean, std, crop_pct, crop_mode) for a model.

    A model's pretrained_cfg describes the checkpoint it was published with, not the model as built:
    `create_model(..., img_size=32, in_chans=1)` still reports (3, 224, 224). The channel count and,
    for models with a fixed input size (ViT patch embedding), the image size are read from the model.
    A mapping (a pretrained_cfg or a data config, e.g. from checkpoint metadata) is taken as it is.
    """
    import timm.data

    if isinstance(model_or_config, torch.nn.Module):
        model = model_or_config
        from lowrank_cli.models.transformers_models import image_pretrained_cfg

        cfg = dict(timm.data.resolve_data_config({}, pretrained_cfg=image_pretrained_cfg(model), model=model))
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
    image_mode(cfg)  # fail early on channel counts that images cannot provide
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


def image_mode(model_or_config: torch.nn.Module | Mapping[str, Any]) -> str:
    """The PIL mode images must be decoded to: 'L' for 1-channel models, 'RGB' for 3."""
    cfg = model_or_config if isinstance(model_or_config, Mapping) else data_config(model_or_config)
    chans = int(cfg["input_size"][0])
    if chans not in (1, 3):
        raise InputError(f"the model expects {chans} input channels, but images give 1 (grey) or 3 (RGB):"
                         " use a model built with in_chans=1 or 3")
    return "L" if chans == 1 else "RGB"


DEFAULT_MAX_LENGTH = 512


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


def default_max_length(model_or_config: Any, tokenizer: Any = None) -> int:
    """The longest input to tokenize for a model: 512, or less when the model's learned positions
    (max_position_embeddings, minus the 2 unusable slots of RoBERTa-style models) or the tokenizer's
    model_max_length say so. `model_or_config`: a transformers model, its config, or a config dict."""
    limits = [DEFAULT_MAX_LENGTH]
    positions = position_limit(model_or_config)
    if positions is not None:
        limits.append(positions)
    tok_max = getattr(tokenizer, "model_max_length", None) if tokenizer is not None else None
    # transformers reports "no limit" as int(1e30).
    if isinstance(tok_max, (int, float)) and 0 < tok_max < 1e6:
        limits.append(int(tok_max))
    return max(min(limits), 1)
