"""Device and dtype options, resolved once and the same way for every command."""

from __future__ import annotations

import torch

from lowrank_cli.errors import EnvironmentProblem, UsageError

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EnvironmentProblem("--device cuda was asked for but no CUDA device is available here: use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise EnvironmentProblem(f"--device {device} was asked for but this machine has {torch.cuda.device_count()} "
                                 f"CUDA device(s): use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


# Messages of failures that are the device's, not the input's (a test forward that hits one must not blame
# --input-size).
_DEVICE_FAILURE = ("CUDA error", "CUBLAS_STATUS", "cuDNN error", "CUDA driver", "device-side assert")


def is_out_of_memory(error: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA), or the CPU allocator's RuntimeError for the same thing."""
    text = str(error)
    return (type(error).__name__ == "OutOfMemoryError" or "out of memory" in text
            or "can't allocate memory" in text)


def is_device_failure(error: BaseException) -> bool:
    """An out-of-memory or a CUDA runtime error: the device failed, whatever the input."""
    return is_out_of_memory(error) or any(k in str(error) for k in _DEVICE_FAILURE)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UsageError(f"--dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]
