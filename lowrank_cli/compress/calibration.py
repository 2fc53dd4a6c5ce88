"""Calibration: the input statistics of the linears that will be factorized, and the data-aware truncation on them.

Data-aware truncation (whitened_svd.py) needs, per layer, the second moment C = sum_t x_t x_t^T of the layer's
inputs over every token of some calibration images (or texts). It is accumulated while streaming, so memory per
layer is O(d_in^2) whatever the number of images.

- `collect_second_moments`: the statistics of named linears over any stream of batches, through forward hooks.
- `calibrate`: the same over a few hundred images of a folder (the model's own eval transforms) or the first
  texts of a text file, on the device the SVDs run on.
- `data_aware_factor_fn`: truncation in the whitened space, so the kept rank minimises the output error on
  those inputs; the factors are stored exactly like plain ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowrank_cli.compress.svd import Factors, compute_dtype
from lowrank_cli.compress.whitened_svd import data_aware_factors
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


def linears_named(model: nn.Module, names: list[str]) -> dict[str, nn.Linear]:
    """The named modules, each checked to be an nn.Linear of the model."""
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules:
            raise UsageError(f"no module named {name!r} in the model: pick names from its nn.Linear layers")
        if not isinstance(modules[name], nn.Linear):
            raise UsageError(f"module {name!r} is a {type(modules[name]).__name__}, not an nn.Linear: leave it out")
    return {name: modules[name] for name in names}


class MomentHooks:
    """Forward pre-hooks that add each linear's inputs x x^T (float64, on `device`) while the model runs."""

    def __init__(self, linears: dict[str, nn.Linear], device: torch.device):
        self.device = device
        self.sums = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=device)
                     for n, m in linears.items()}
        self.tokens = dict.fromkeys(linears, 0)
        self.padding: torch.Tensor | None = None  # text: the batch's attention mask, so that padding is left out
        self.handles = [m.register_forward_pre_hook(self.hook_for(n)) for n, m in linears.items()]

    def hook_for(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            mask = self.padding
            if mask is not None and x.shape[:2] == mask.shape:
                x = x[mask]
            x = x.reshape(-1, module.in_features).to(device=self.device, dtype=torch.float64)
            self.sums[name].addmm_(x.T, x)
            self.tokens[name] += x.shape[0]
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _run_batches(model: nn.Module, batches: Iterable[object], moments: MomentHooks, *, model_device: torch.device,
                 max_samples: int | None, progress: Callable[[int], None] | None) -> tuple[int, int]:
    """Forward every batch (cut at `max_samples` images in all) through the hooked model; (images done,
    unreadable images skipped)."""
    done = skipped = 0
    for batch in batches:
        skipped += getattr(batch, "skipped", 0)
        images, _, mask = batch.parts() if hasattr(batch, "parts") else (_images(batch), None, None)
        if max_samples is not None:
            images = images[: max_samples - done]
            mask = mask[: max_samples - done] if mask is not None else None
        if len(images) == 0:  # every file of the batch was unreadable: the next batch may be fine
            continue
        if mask is not None:
            mask = mask.to(model_device)
            moments.padding = mask.bool()
            model(images.to(model_device), attention_mask=mask)
        else:
            model(images.to(model_device))
        done += len(images)
        if progress is not None:
            progress(done)
        if max_samples is not None and done >= max_samples:
            break
    return done, skipped


def collect_second_moments(
    model: nn.Module,
    module_names: Iterable[str],
    batches: Iterable[object],
    *,
    device: torch.device | str,
    max_samples: int | None = None,
    progress: Callable[[int], None] | None = None,
    unreadable: Callable[[], tuple[str, str]] | None = None,
) -> dict[str, InputStats]:
    """Run `model` (eval, no grad) over `batches` and return the input statistics of each named nn.Linear.

    Images go to the device of the model's parameters; the statistics are accumulated in float64 on `device`.
    At most `max_samples` images are used (the last batch is cut). `progress(n_images_done)` is called after
    each batch. The model's train/eval mode is restored and the hooks removed, also on error. `unreadable()` says
    why the samples could not be read, and what to do, when none could.
    """
    names = list(dict.fromkeys(module_names))
    linears = linears_named(model, names)
    if max_samples is not None and max_samples < 1:
        raise UsageError(f"`max_samples` must be at least 1, got {max_samples}")
    device = torch.device(device)
    param = next((p for p in model.parameters() if p.device.type != "meta"), None)  # meta: a skeleton's, see on_device
    model_device = param.device if param is not None else device
    was_training = model.training
    moments = MomentHooks(linears, device)
    try:
        model.eval()
        with torch.no_grad():
            done, skipped = _run_batches(model, batches, moments, model_device=model_device,
                                         max_samples=max_samples, progress=progress)
    finally:
        moments.remove()
        model.train(was_training)
    if done == 0 and skipped:
        cause, fix = unreadable() if unreadable else ("corrupt, truncated or not images", None)
        raise InputError(f"none of the {skipped} calibration images could be read ({cause}): "
                         f"{fix or 'check the files of `calib`'}")
    if done == 0:
        raise InputError("no calibration images: the data is empty; point it at a folder with images")
    for name in names:
        if moments.tokens[name] == 0:
            raise InputError(
                f"module {name!r} saw no input during calibration: it is not on the model's forward path; "
                "leave it out of the factorized layers"
            )
    return {n: InputStats(moments.sums[n], moments.tokens[n], done) for n in names}


# ------------------------------------------------------------------------------------------------ from data


def calibrate(
    model: nn.Module,
    names: list[str],
    data: str | Path,
    *,
    samples: int = 256,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    tokenizer: object = None,
    seq_len: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, InputStats]:
    """Input second moments of the named linears over `samples` images of `data` (ImageFolder or flat), or for
    a text model over its first `samples` texts (.txt / .jsonl, tokenised by `tokenizer`; padding left out), or
    for a model whose text is a token stream (a causal LM) over `samples` windows of `seq_len` tokens of it.

    Errors name `factorize`'s parameters: `data` is its `calib`, `samples` its `calib_samples`."""
    from lowrank_cli.models.families import TEXT, family_of, modality_of

    if samples < 1:
        raise UsageError(f"`calib_samples` must be at least 1, got {samples}")
    if family_of(model).text_data == "stream":
        windows = calibration_windows(model, data, samples=samples, seq_len=seq_len, tokenizer=tokenizer)
        batches = (windows[i:i + batch_size] for i in range(0, len(windows), batch_size))
        with on_device(model, torch.device(device)), family_of(model).plain_outputs(model):
            return collect_second_moments(model, names, batches, device=device, progress=progress)
    with on_device(model, torch.device(device)):  # the forward passes run where the SVDs do (`device`), then back
        if modality_of(model) == TEXT:
            return _calibrate_text(model, names, data, samples=samples, batch_size=batch_size, device=device,
                                   tokenizer=tokenizer, progress=progress)
        return _calibrate_images(model, names, data, samples=samples, batch_size=batch_size, device=device,
                                 progress=progress)


@contextlib.contextmanager
def on_device(model: nn.Module, device: torch.device) -> Iterator[None]:
    # a skeleton's parameters on meta (streaming factorize) are read where they are needed: they do not count
    param = next((p for p in model.parameters() if p.device.type != "meta"), None)
    home = param.device if param is not None else device
    if home == device:
        yield
        return
    model.to(device)
    try:
        yield
    finally:
        model.to(home)


def _calibrate_images(model, names, data, *, samples, batch_size, device, progress):
    from lowrank_cli.data.images import find_images, make_loader, make_transform
    from lowrank_cli.data.pillow_limits import read_problem
    from lowrank_cli.models.inputs import image_mode

    images = find_images(data, parameter="calib")
    batch_size = max(1, min(batch_size, samples, len(images)))
    # shuffle: a class-sorted folder would otherwise calibrate on the first classes only
    loader, _ = make_loader(images, make_transform(model, training=False), batch_size, shuffle=True, seed=0,
                            drop_last=False, mode=image_mode(model))
    return collect_second_moments(model, names, loader, device=device, max_samples=samples, progress=progress,
                                  unreadable=lambda: read_problem(images.samples[0][0]))


def _calibrate_text(model, names, data, *, samples, batch_size, device, tokenizer, progress):
    from lowrank_cli.data.texts import TextCollate, find_texts, load_tokenizer
    from lowrank_cli.models.inputs import default_max_length

    if tokenizer is None:
        raise UsageError("calibrating a text model needs its tokenizer: factorize from the folder or Hub repo that "
                         "has the tokenizer files")
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    texts = find_texts(data, limit=samples)
    collate = TextCollate(tokenizer, default_max_length(model, tokenizer))
    batch_size = max(1, min(batch_size, samples))
    # The first `samples` texts in file order: a text file has no classes to balance, and the choice is repeatable.
    batches = (collate(texts.texts[i:i + batch_size]) for i in range(0, len(texts), batch_size))
    return collect_second_moments(model, names, batches, device=device, max_samples=samples, progress=progress)


def calibration_windows(model: nn.Module, data: str | Path, *, samples: int, seq_len: int | None,
                        tokenizer: object) -> torch.Tensor:
    """`samples` windows (samples, seq_len) of the token stream of `data`, at seeded offsets (data.token_windows);
    `seq_len` defaults to the model's. Ids the model's vocabulary lacks are refused."""
    from lowrank_cli.data.texts import load_tokenizer
    from lowrank_cli.data.token_windows import sample_windows, token_stream
    from lowrank_cli.models.families import input_spec

    if tokenizer is None:
        raise UsageError("calibrating a text model needs its tokenizer: factorize from the folder or Hub repo that "
                         "has the tokenizer files, or pass `tokenizer`")
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    spec = input_spec(model)
    ids = token_stream(data, tokenizer, vocab_size=spec.vocab_size)
    return sample_windows(ids, count=samples, length=spec.sized(seq_len)[0], seed=0,
                          what=f"the calibration text '{data}'")


def data_aware_factor_fn(stats: dict[str, InputStats]) -> Callable[[str, torch.Tensor, int], Factors]:
    """`factor_fn` for `factorize`: each layer's factors from the whitened SVD on its calibration inputs."""
    def factor(name: str, weight: torch.Tensor, rank: int) -> Factors:
        first, second, info = data_aware_factors(weight, stats[name].second_moment, rank)
        dtype = compute_dtype(weight.dtype)
        return Factors(first.to(dtype), second.to(dtype), info["singular_values"], float(info["kept_energy"]),
                       float(info["output_rel_error"]), f"whitened/{info['method']}")

    return factor
