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
