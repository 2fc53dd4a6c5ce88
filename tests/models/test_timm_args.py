"""Saving a timm model whose timm does not keep its build arguments (timm < 1.0.31, as GPU images ship)."""

from __future__ import annotations

import pytest
import timm
import torch
from helpers import make_tiny_vit

import lowrank_cli
from lowrank_cli.errors import UsageError
from lowrank_cli.models.build import spec_of
from lowrank_cli.models.timm_args import timm_model_args


def as_older_timm(model):
    vars(model).pop("_model_args", None)  # what timm 1.0.9 to 1.0.30 build: no record of the arguments
    return model


@pytest.mark.parametrize("overrides", [{}, {"img_size": 48, "num_classes": 7, "depth": 3, "embed_dim": 96, "num_heads": 3}])
def test_a_factorized_vit_without_recorded_args_loads_back_identical(tmp_path, overrides):
    model = as_older_timm(make_tiny_vit(**overrides))
    lowrank_cli.factorize(model, kappa=2, device="cpu")
    path = lowrank_cli.save(model, tmp_path / "lr.safetensors")
    side = overrides.get("img_size", 32)
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        assert torch.equal(lowrank_cli.load(path)(x), model(x))


def test_only_the_arguments_that_differ_from_the_defaults_are_kept():
    model = as_older_timm(make_tiny_vit(depth=3))
    assert timm_model_args(model, "vit_tiny_patch16_224") == {"img_size": 32, "patch_size": 8, "num_classes": 10,
                                                             "depth": 3}
    resnet = as_older_timm(timm.create_model("resnet18", pretrained=False, num_classes=5))
    assert spec_of(resnet).model_args == {"num_classes": 5}
    default = as_older_timm(timm.create_model("resnet18", pretrained=False))
    assert spec_of(default).model_args == {}


def test_timms_own_record_wins():
    model = make_tiny_vit()
    if not hasattr(model, "_model_args"):
        pytest.skip(f"timm {timm.__version__} keeps no record")
    assert timm_model_args(model, "vit_tiny_patch16_224") == model._model_args


def test_arguments_that_cannot_be_read_off_the_model_say_how_to_fix_it():
    model = as_older_timm(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, qkv_bias=False))
    with pytest.raises(UsageError, match=r"not the default vit_tiny_patch16_224.*upgrade timm to 1\.0\.31"):
        spec_of(model)
