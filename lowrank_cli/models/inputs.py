"""The input a model takes: image tensors for timm and transformers vision models, token ids for text models.

Every place that runs a model on a made-up batch (the call check, MAC counts, speed plans, benchmarks) asks here,
so that an "input size" means (C, H, W) for an image model and (seq_len,) for a text model everywhere.
"""

from __future__ import annotations

import torch
from torch import nn

from lowrank_cli.errors import InputError, UsageError
from lowrank_cli.models.transformers_models import DEFAULT_SEQ_LEN, is_text_model


def default_input_size(model: nn.Module, seq_len: int | None = None) -> tuple[int, ...]:
    """(C, H, W) from the model's data config, or (seq_len,) for a text model (DEFAULT_SEQ_LEN, at most the
    model's positions)."""
    if is_text_model(model):
        from lowrank_cli.data.texts import position_limit

        positions = position_limit(model)  # RoBERTa-style models lose 2 of max_position_embeddings
        if seq_len is not None:
            if seq_len < 1:
                raise UsageError(f"--seq-len must be at least 1, got {seq_len}")
            if positions and seq_len > positions:
                raise UsageError(f"--seq-len {seq_len} is above the {positions} positions the model has: lower it")
            return (int(seq_len),)
        return (min(DEFAULT_SEQ_LEN, positions or DEFAULT_SEQ_LEN),)
    if seq_len is not None:
        raise UsageError("--seq-len is for text models; an image model takes --input-size C,H,W")
    from lowrank_cli.data.images import data_config

    return tuple(int(v) for v in data_config(model)["input_size"])


def forward_failed(error: Exception, model: nn.Module, input_size: tuple[int, ...], consequence: str = "") -> InputError:
    """The InputError for a test forward pass at `input_size` that raised `error`, naming the option that sets the
    size for this kind of model. A device failure (out of memory, a CUDA error) is the device's, not the input
    size's: it is raised as it is."""
    from lowrank_cli.devices import is_device_failure

    if is_device_failure(error):
        raise error
    option = "--seq-len N" if is_text_model(model) else "--input-size C,H,W"
    return InputError(f"a test forward pass at input size {tuple(input_size)} failed ({type(error).__name__}: "
                      f"{str(error)[:120]}){consequence}: pass the right {option}")


def check_input_size(model: nn.Module, input_size: tuple[int, ...] | None) -> None:
    """An --input-size given to a text model is a mistake of kind, not of numbers: say which option it needs."""
    if input_size is not None and is_text_model(model) and len(input_size) != 1:
        raise UsageError("--input-size is C,H,W for image models; a text model takes --seq-len N")


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
