"""Build an architecture from its ModelSpec (on the meta device) and fill it with weights, shapes checked first: the
model's family (models.families) does the building; this is the one entry point the rest of lrc calls."""

from __future__ import annotations

import torch
from torch import nn

from lowrank_cli.models.families import family_of, family_of_spec
from lowrank_cli.models.spec import ModelSpec
from lowrank_cli.models.weights import check_fits, fill

__all__ = ["build", "build_empty", "check_fits", "fill", "finish", "spec_of"]


def build_empty(spec: ModelSpec, *, what: str = "the model", fix: str = "fix the `model_args` values",
                max_params: int | None = None) -> nn.Module:
    """The architecture with its parameters on the meta device where its family can (see
    models.families.base.Family.build_empty); `max_params` refuses arguments that describe a far larger model
    than the weights at hand, before any allocation; a constructor that rejects the arguments is an InputError
    that says `fix`."""
    return family_of_spec(spec).build_empty(spec, what=what, fix=fix, max_params=max_params)


def build(spec: ModelSpec, state_dict: dict[str, torch.Tensor], what: str) -> nn.Module:
    return fill(build_empty(spec), state_dict, what)


def finish(model: nn.Module, spec: ModelSpec | None = None) -> nn.Module:
    """After the weights are assigned: what the family of `spec` (default: the model's) does then (transformers
    ties the tensors a file holds twice)."""
    (family_of_spec(spec) if spec is not None else family_of(model)).finish(model)
    return model


def spec_of(model: nn.Module) -> ModelSpec:
    """How to rebuild a model without its source (its lrc record, if any, knows better)."""
    return family_of(model).spec_of(model)
