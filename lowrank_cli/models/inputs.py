"""The input a model takes, as its family says once per model (models.families.input_spec): image tensors
(C, H, W) for image models, token ids (seq_len,) for text models.

Every place that runs a model on a made-up batch (the call check, MAC counts, speed plans, benchmarks) asks here,
so that an "input size" means (C, H, W) for an image model and (seq_len,) for a text model everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lowrank_cli.errors import InputError
from lowrank_cli.models.families import family_of, input_spec
from lowrank_cli.models.families.timm_vision import record_input_size  # its old home (lowrank_cli.model_inputs)
from lowrank_cli.models.image_config import config_mode
from lowrank_cli.models.image_config import data_config as resolve_data_config
from lowrank_cli.models.transformers_models import position_limit

__all__ = ["DEFAULT_MAX_LENGTH", "check_input_size", "data_config", "default_input_size", "default_max_length",
           "example_input", "forward_failed", "image_mode", "input_spec", "output_tensor", "position_limit",
           "record_input_size"]


def default_input_size(model: nn.Module, seq_len: int | None = None) -> tuple[int, ...]:
    """(C, H, W) from the model's data config, or (seq_len,) for a text model (its default, at most the model's
    positions)."""
    return input_spec(model).sized(seq_len)


def forward_failed(error: Exception, model: nn.Module, input_size: tuple[int, ...], consequence: str = "") -> InputError:
    """The InputError for a test forward pass at `input_size` that raised `error`, naming the option that sets the
    size for this kind of model. A device failure (out of memory, a CUDA error) is the device's, not the input
    size's: it is raised as it is."""
    from lowrank_cli.devices import is_device_failure

    if is_device_failure(error):
        raise error
    return InputError(f"a test forward pass at input size {tuple(input_size)} failed ({type(error).__name__}: "
                      f"{str(error)[:120]}){consequence}: pass the right {input_spec(model).option}")


def check_input_size(model: nn.Module, input_size: tuple[int, ...] | None) -> None:
    """An --input-size given to a text model is a mistake of kind, not of numbers: say which option it needs."""
    input_spec(model).check(input_size)


def example_input(model: nn.Module, size: tuple[int, ...], batch: int = 1, *, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None, generator: torch.Generator | None = None,
                  zeros: bool = False) -> torch.Tensor:
    """A batch for `model(x)`: token ids (batch, seq_len) for a text model, else floats (batch, *size) in `dtype`.

    `zeros` gives a blank batch (shape checks, meta-device runs); otherwise values come from `generator`.
    """
    return input_spec(model).example(size, batch, device=device, dtype=dtype, generator=generator, zeros=zeros)


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


def data_config(model_or_config: nn.Module | Mapping[str, Any]) -> dict[str, Any]:
    """timm's data config (input_size, interpolation, mean, std, crop_pct, crop_mode) for a model, following the
    pretrained_cfg its family gives it (models.image_config.data_config), or for a pretrained_cfg / data config."""
    if isinstance(model_or_config, nn.Module):
        return resolve_data_config(model_or_config, family_of(model_or_config).image_pretrained_cfg(model_or_config))
    return resolve_data_config(model_or_config)


def image_mode(model_or_config: nn.Module | Mapping[str, Any]) -> str:
    """The PIL mode images must be decoded to: 'L' for 1-channel models, 'RGB' for 3."""
    return config_mode(model_or_config if isinstance(model_or_config, Mapping) else data_config(model_or_config))


DEFAULT_MAX_LENGTH = 512


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
