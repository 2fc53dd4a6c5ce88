"""Calibration: the input statistics of the linears that will be factorized.

Data-aware truncation (data_aware_svd.py) needs, per layer, the second moment C = sum_t x_t x_t^T of the
layer's inputs over every token of some calibration images. It is accumulated while streaming, so memory per
layer is O(d_in^2) whatever the number of images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from lowrank_cli.errors import InputError, UsageError


@dataclass
class InputStats:
    second_moment: torch.Tensor  # d_in x d_in, float64: sum over tokens of x x^T (not centred: the bias is kept)
    tokens: int  # rows that went into second_moment (images x tokens per image)
    samples: int  # images that went through the model


def _images(batch: object) -> torch.Tensor:
    """The image tensor of a batch: a tensor, an object with `.images` (or `.input_ids`, text), or an
    (images, labels) pair."""
    if hasattr(batch, "input_ids"):
        return batch.input_ids
    if isinstance(batch, torch.Tensor):
        return batch
    if hasattr(batch, "images"):
        return batch.images
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise InputError(
        f"a calibration batch is a {type(batch).__name__}, not images: pass tensors, (images, labels) pairs "
        "or objects with an `.images` attribute"
    )


def collect_second_moments(
    model: nn.Module,
    module_names: Iterable[str],
    batches: Iterable[object],
    *,
    device: torch.device | str,
    max_samples: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, InputStats]:
    """Run `model` (eval, no grad) over `batches` and return the input statistics of each named nn.Linear.

    Images go to the device of the model's parameters; the statistics are accumulated in float64 on `device`.
    At most `max_samples` images are used (the last batch is cut). `progress(n_images_done)` is called after
    each batch. The model's train/eval mode is restored and the hooks removed, also on error.
    """
    names = list(dict.fromkeys(module_names))
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules:
            raise UsageError(f"no module named {name!r} in the model: pick names from its nn.Linear layers")
        if not isinstance(modules[name], nn.Linear):
            raise UsageError(f"module {name!r} is a {type(modules[name]).__name__}, not an nn.Linear: leave it out")
    if max_samples is not None and max_samples < 1:
        raise UsageError(f"max_samples must be at least 1, got {max_samples}")

    device = torch.device(device)
    sums = {n: torch.zeros(modules[n].in_features, modules[n].in_features, dtype=torch.float64, device=device)
            for n in names}
    tokens = dict.fromkeys(names, 0)
    padding: list[torch.Tensor | None] = [None]  # text: the batch's attention mask, so that padding is left out

    def hook_for(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            mask = padding[0]
            if mask is not None and x.shape[:2] == mask.shape:
                x = x[mask]
            x = x.reshape(-1, module.in_features).to(device=device, dtype=torch.float64)
            sums[name].addmm_(x.T, x)
            tokens[name] += x.shape[0]
        return hook

    param = next(model.parameters(), None)
    model_device = param.device if param is not None else device
    was_training = model.training
    handles = [modules[n].register_forward_pre_hook(hook_for(n)) for n in names]
    done = 0
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                images = _images(batch)
                mask = getattr(batch, "attention_mask", None)
                if max_samples is not None:
                    images = images[: max_samples - done]
                    mask = mask[: max_samples - done] if mask is not None else None
                if len(images) == 0:
                    break
                if mask is not None:
                    mask = mask.to(model_device)
                    padding[0] = mask.bool()
                    model(images.to(model_device), attention_mask=mask)
                else:
                    model(images.to(model_device))
                done += len(images)
                if progress is not None:
                    progress(done)
                if max_samples is not None and done >= max_samples:
                    break
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    if done == 0:
        raise InputError("no calibration images: the data is empty; point it at a folder with images")
    for name in names:
        if tokens[name] == 0:
            raise InputError(
                f"module {name!r} saw no input during calibration: it is not on the model's forward path; "
                "leave it out of the factorized layers"
            )
    return {n: InputStats(sums[n], tokens[n], done) for n in names}
