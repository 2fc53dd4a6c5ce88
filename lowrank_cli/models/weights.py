"""Weights files: safetensors or torch files read with weights_only=True (never unpickled), their hashes, and
filling a model with them (names and shapes checked first)."""

from __future__ import annotations

import hashlib
import pickle
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from lowrank_cli.atomic import utf8_path
from lowrank_cli.errors import InputError

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
SAFE_WEIGHTS = "model.safetensors"
PICKLE_WEIGHTS = "pytorch_model.bin"

_HASHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lrc-sha256")


def sha256_later(path: Path) -> Future:
    """hashlib and file reads release the GIL: hashing in a thread overlaps the caller's SVDs or training."""
    return _HASHER.submit(file_sha256, path)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _unsafe_globals(path: Path) -> list[str]:
    """The classes and functions a torch file's pickle would import (what weights_only refuses to run)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return _legacy_pickle_globals(path)
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # not a readable torch file at all: the caller says so
        return []


def _legacy_pickle_globals(path: Path) -> list[str]:
    """The same for a file in torch's legacy (non-zip) format: a few pickles in a row (magic number, protocol, system
    info, the object), read opcode by opcode with pickletools, which imports and runs nothing. A well-formed stream
    that weights_only refused names what it would import (the globals outside torch, if any); a broken one names
    nothing (the caller then says truncated or corrupt)."""
    import pickletools

    found: list[str] = []
    try:
        with open(path, "rb") as f:
            for _ in range(4):
                strings: list[str] = []
                for op, arg, _pos in pickletools.genops(f):
                    if op.name == "GLOBAL":
                        found.append(str(arg).replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.append(f"{strings[-2]}.{strings[-1]}")
                    elif isinstance(arg, str):
                        strings.append(arg)
    except Exception:  # truncated, or not a pickle at all
        return []
    outside = sorted({name for name in found if not name.startswith(("torch.", "collections."))})
    return outside or sorted(set(found))


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: safetensors, or a torch file read with weights_only=True (never unpickled).

    Unwraps a `state_dict` / `model` / `state_dict_ema` wrapper key and strips DDP's `module.` prefix.
    """
    if not path.is_file():
        raise InputError(f"weights file '{path}' does not exist: check the path")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            with utf8_path(path) as name:
                sd = load_file(name)
        except Exception as e:  # safetensors raises its own error types for every kind of corruption
            raise InputError(f"'{path}' is not a readable safetensors file ({e}): is it truncated or corrupt?") from None
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's notes on pickle protocols; the error below says it all
                sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            unsafe = _unsafe_globals(path) if isinstance(e, pickle.UnpicklingError) else []
            if unsafe:  # a class or function in the pickle: refused, not run
                raise InputError(
                    f"'{path}' holds pickled Python objects, which lrc never unpickles ({', '.join(unsafe[:3])}): "
                    "re-save it as torch.save(model.state_dict(), ...) or as safetensors"
                ) from None
            raise InputError(
                f"'{path}' is not a readable PyTorch weights file ({type(e).__name__}): is it truncated or corrupt?"
            ) from None
        for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
            if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
                sd = sd[key]
                break
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise InputError(f"'{path}' does not hold a state dict (name -> tensor): save model.state_dict()")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


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


def check_finite(model: nn.Module, what: str, fix: str = "the file is corrupt or a run diverged: use an earlier "
                 "checkpoint, or write it again") -> None:
    """Refuse a model whose weights hold NaN or inf, naming the first such tensor (InputError, exit 3): before
    training or evaluation, not as a NaN loss at step 1 or a chance-level score with exit 0."""
    from lowrank_cli.errors import InputError

    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise InputError(f"{what}: tensor '{name}' holds {bad:,} NaN or infinite value(s) of "
                                 f"{tensor.numel():,}: {fix}")
