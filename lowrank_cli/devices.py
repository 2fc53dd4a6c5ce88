"""Device and dtype options, resolved once and the same way for every command; what a device is called."""

from __future__ import annotations

import contextlib

import torch

from lowrank_cli.errors import EnvironmentProblem, UsageError

# Every spelling of a floating dtype that lrc accepts (the CLI documents the short ones).
DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp64": torch.float64, "float64": torch.float64,
}  # fmt: skip
SHORT_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
DTYPE_CHOICES = ("fp32", "bf16", "fp16", "fp64")


def resolve_dtype(dtype: str | torch.dtype | None, default: torch.dtype | None = None, *,
                  parameter: str = "dtype") -> torch.dtype | None:
    """fp32 / bf16 / fp16 / fp64 (or float32, bfloat16, ..., a torch.dtype) -> torch.dtype; None -> `default`."""
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        if dtype not in SHORT_DTYPE:
            raise UsageError(f"`{parameter}` {dtype} is not a floating type lrc runs: use one of {', '.join(DTYPE_CHOICES)}")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise UsageError(f"`{parameter}` '{dtype}' is not one of {', '.join(DTYPE_CHOICES)} (or float32, bfloat16, "
                         "float16, float64)")
    return DTYPES[key]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"`device` '{device}' is not a device torch knows: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EnvironmentProblem("`device=cuda` was asked for but no CUDA device is available here: use `device=cpu` or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise EnvironmentProblem(f"`device` {device} was asked for but this machine has {torch.cuda.device_count()} "
                                 f"CUDA device(s): use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"cpu ({cpu}, {torch.get_num_threads()} threads)"


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA (training and evaluation alike), nothing elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# Messages of failures that are the device's, not the input's (a test forward that hits one must not blame
# the input size).
_DEVICE_FAILURE = ("CUDA error", "CUBLAS_STATUS", "cuDNN error", "CUDA driver", "device-side assert")


def is_out_of_memory(error: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA), or the CPU allocator's RuntimeError for the same thing."""
    text = str(error)
    return (type(error).__name__ == "OutOfMemoryError" or "out of memory" in text
            or "can't allocate memory" in text)


def is_device_failure(error: BaseException) -> bool:
    """An out-of-memory or a CUDA runtime error: the device failed, whatever the input."""
    return is_out_of_memory(error) or any(k in str(error) for k in _DEVICE_FAILURE)
