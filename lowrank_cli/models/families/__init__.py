"""Model families: one module per kind of model lrc reads, behind one registry that asks each "is this yours?".

    FAMILIES                      # in the order they are asked: timm_vision, hf_causal_lm, hf_encoder
    family_of(model)              # the family of a model (timm_vision's rules for a model no family claims)
    family_of_spec(spec)          # of a checkpoint's spec: by its lrc.family, else by its library
    family_of_config(cfg)         # of a folder's or Hub repo's config.json (None: no family's)
    input_spec(model)             # what it takes (image C,H,W or token ids), worked out once per model

A new family is one module with a `Family` subclass (families/base.py) and one line here, or, from outside the
package (a plug-in, a test), `register(MyFamily())`, which puts it first (`unregister` takes it out again). Nothing
outside `models/` asks which library a model comes from: it asks its family.

Importing the registry imports neither torch nor any model library (`lrc --help` lists `libraries()`).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from lowrank_cli.errors import InputError
from lowrank_cli.models.families.base import IMAGE, TEXT, Family, Head, InputSpec, in_head
from lowrank_cli.models.families.hf_causal_lm import HfCausalLM
from lowrank_cli.models.families.hf_encoder import HfEncoder
from lowrank_cli.models.families.timm_vision import TimmVision

if TYPE_CHECKING:
    from torch import nn

    from lowrank_cli.models.spec import ModelSpec

__all__ = ["FAMILIES", "IMAGE", "TEXT", "Family", "Head", "InputSpec", "family_named", "family_of",
           "family_of_config", "family_of_spec", "in_head", "input_spec", "libraries", "modality_of", "register",
           "source_label", "unregister"]

TIMM_VISION = TimmVision()
# hf_causal_lm before hf_encoder: both read transformers configs, the encoders take what is not a causal LM.
FAMILIES: list[Family] = [TIMM_VISION, HfCausalLM(), HfEncoder()]
# A model no family claims (a plain nn.Module of image layers) is read by timm's rules, as lrc always did.
FALLBACK = TIMM_VISION


def register(family: Family) -> Family:
    """Add `family` to the registry, asked before the others; returns it."""
    if any(f.name == family.name for f in FAMILIES):
        raise ValueError(f"a model family named '{family.name}' is registered already")
    FAMILIES.insert(0, family)
    return family


def unregister(family: Family) -> None:
    FAMILIES.remove(family)


def libraries() -> tuple[str, ...]:
    """The libraries the families read (`library` of load_model), each once, in registry order."""
    return tuple(dict.fromkeys(f.library for f in FAMILIES))


def family_named(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise InputError(f"model family '{name}' is not supported by this version of lrc: upgrade lrc")


def family_of(model: nn.Module) -> Family:
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    return next((f for f in FAMILIES if f.claims_model(model)), FALLBACK)


def family_of_spec(spec: ModelSpec) -> Family:
    """The family that rebuilds `spec`: the one it names, else (a file written before lrc.family) the first that
    claims its library and architecture."""
    if spec.family:
        return family_named(spec.family)
    for family in FAMILIES:
        if family.claims_spec(spec):
            return family
    raise InputError(f"library '{spec.library}' is not supported by this version of lrc: upgrade lrc")


def family_of_config(cfg: dict[str, Any], library: str | None = None) -> Family | None:
    """The family whose config.json `cfg` is (among those of `library`, when given); None when none claims it."""
    return next((f for f in FAMILIES if (library is None or f.library == library) and f.claims_config(cfg)), None)


def source_label(source: dict[str, Any]) -> str | None:
    """How a model card names a source of a kind some family has (a timm name); None for the generic kinds."""
    return next((label for f in FAMILIES if (label := f.source_label(source)) is not None), None)


def families_of(library: str) -> list[Family]:
    return [f for f in FAMILIES if f.library == library]


_INPUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def input_spec(model: nn.Module) -> InputSpec:
    """What `model` takes (models.families.base.InputSpec), asked of its family once and kept with the model for
    every later caller (the call check, counting, calibration, speed plans, benchmarks, tracing)."""
    model = getattr(model, "_orig_mod", model)
    found = _INPUTS.get(model)
    if found is None:
        found = _INPUTS[model] = family_of(model).input_spec(model)
    return found


def modality_of(model: nn.Module) -> str:
    """IMAGE or TEXT: the kind of data the model reads."""
    return input_spec(model).modality
