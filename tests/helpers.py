"""What tests share besides fixtures: tiny models and the in-process CLI runner. Import it as `helpers`
(conftest puts tests/ on sys.path); fixtures live in conftest.py, which is never imported."""

from __future__ import annotations

import json

import pytest
import torch

TINY_VIT = dict(img_size=32, patch_size=8, num_classes=10, depth=4)


def make_tiny_vit(seed: int = 0, **overrides):
    import timm

    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TINY_VIT, **overrides}).eval()


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run `lrc ARGS` in-process through the real entry point; returns (exit code, stdout, stderr)."""
    from lowrank_cli.cli.app import main

    capsys.readouterr()  # only this command's output
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    code = exit_info.value.code
    return (0 if code is None else code), out, err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("Error:")]


def read_json(text: str):
    return json.loads(text)


def write_lowrank_vit(path, *, kappa: float = 2.0, seed: int = 0, **overrides):
    """A tiny ViT factorized at `kappa` by `lowrank_cli.factorize` and saved as an lrc checkpoint at `path`."""
    import lowrank_cli

    model = make_tiny_vit(seed, **overrides)
    lowrank_cli.factorize(model, kappa=kappa, device="cpu")
    return lowrank_cli.save(model, path)


def hub_http_error(cls, status: int, message: str = "refused"):
    """A Hub error as huggingface_hub raises it (`cls`: HfHubHTTPError or a subclass), with a response of the HTTP
    library this huggingface_hub uses."""
    import importlib

    from huggingface_hub import errors as hf_errors

    response_cls = hf_errors.Response
    lib = importlib.import_module(response_cls.__module__.split(".")[0])
    request = lib.Request("POST", "https://huggingface.co/api/repos/create")
    return cls(message, response=response_cls(status, request=request))


def network_down():
    """The connection error of huggingface_hub's HTTP library, as when the network is unreachable."""
    import importlib

    from huggingface_hub import errors as hf_errors

    lib = importlib.import_module(hf_errors.Response.__module__.split(".")[0])
    cls = getattr(lib, "ConnectError", None) or lib.ConnectionError
    return cls("[Errno 101] Network is unreachable")
