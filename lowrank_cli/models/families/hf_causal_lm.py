"""Hugging Face transformers decoder-only language models (`AutoModelForCausalLM`: GPT-2, Llama, Mistral, Qwen2 /
Qwen3, Phi-3, GPT-NeoX, OPT, ...), read from a folder or Hub repo in transformers' layout.

What sets them apart from the encoders (hf_encoder, which shares the transformers toolbox models.transformers_models):

- GPT-2's projections are `transformers.pytorch_utils.Conv1D`, a linear whose weight is stored transposed (in x out);
  `prepare` swaps each for the nn.Linear it is (weight transposed once), so every later step (plan, calibration,
  SVD, adapters, counting) sees plain linears and a factorized c_attn is a LowRankLinear whose product is W^T.
- A forward returns a KV cache object by default (transformers 5: DynamicCache), which fvcore and torch.jit reject:
  lrc runs them with `config.use_cache` off (`generate()` still caches: it asks for the cache itself). The
  source's generation settings travel in the spec (pretrained_cfg["generation_config"]) and come back on loading.
- Tied embeddings (GPT-2, OPT; a Llama with tie_word_embeddings): `lm_head.weight` is the embedding's tensor, stored
  once in a checkpoint and tied again on loading.
- Text is a token stream: calibration and perplexity cut it into windows (data.token_windows); the decoder layers
  form a stack that sequential calibration walks one layer at a time (`layer_stack`).

A config is claimed when its architectures name a causal-LM class (transformers' causal-LM mapping; any
`*ForCausalLM`, so that a remote-code model gets the remote-code refusal), or, with no architectures, when its
model type is decoder-only (in the causal-LM mapping but not the masked-LM or sequence-to-sequence ones: a BERT
config stays the encoders'). transformers is imported only for configs that look like transformers'.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowrank_cli.models.families.base import TEXT, Family, InputSpec

if TYPE_CHECKING:
    from torch import nn

    from lowrank_cli.models.spec import ModelSpec

LIBRARY = "transformers"
AUTO_CLASS = "AutoModelForCausalLM"
# Causal LMs count prefill MACs and calibrate at this many tokens by default (`seq_len`).
DEFAULT_SEQ_LEN = 128
# Linears of one decoder layer that read the very same hidden states (Llama, Mistral, Qwen, OPT: q/k/v of the
# attention and gate/up of a gated MLP; GPT-2, GPT-NeoX and Phi-3 fuse them into one linear already).
# Where a checkpoint keeps the source's generation settings (generation_config.json: eos ids, sampling defaults,
# max_new_tokens), so that `lowrank_cli.load(file).generate()` generates as the source did.
GENERATION_KEY = "generation_config"
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@functools.cache
def causal_lm_classes() -> frozenset[str]:
    """The class names of transformers' causal-LM mapping (what AutoModelForCausalLM builds)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return frozenset(_names(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()))


@functools.cache
def decoder_only_types() -> frozenset[str]:
    """Model types that are decoders only: in the causal-LM mapping, not in the masked-LM or seq2seq ones."""
    from transformers.models.auto import modeling_auto as auto

    others = set(auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES) | set(auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)
    return frozenset(t for t in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if t not in others)


def _names(values: Any) -> Iterator[str]:
    for value in values:
        yield from ((value,) if isinstance(value, str) else value)


class HfCausalLM(Family):
    name = "hf_causal_lm"
    library = LIBRARY
    builds_on_meta = False  # rotary frequencies and other computed buffers are only real when built for real
    targets_rule = "nn.Linear (GPT-2's Conv1D included) inside the decoder layers"
    metric = "perplexity"
    text_data = "stream"
    calib_mode = "sequential"

    def claims_config(self, cfg: dict[str, Any]) -> bool:
        if "model_type" not in cfg and "architectures" not in cfg:
            return False  # not a transformers config: no transformers import for a timm folder
        auto_map = cfg.get("auto_map")
        if isinstance(auto_map, dict) and AUTO_CLASS in auto_map:
            return True
        architectures = [str(a) for a in cfg.get("architectures") or []]
        if architectures:
            return any(a in causal_lm_classes() or a.endswith("ForCausalLM") for a in architectures)
        return cfg.get("model_type") in decoder_only_types()

    def claims_model(self, model: nn.Module) -> bool:
        from lowrank_cli.models.transformers_models import is_transformers_model

        return is_transformers_model(model) and type(model).__name__ in causal_lm_classes()

    def claims_spec(self, spec: ModelSpec) -> bool:
        return spec.library == LIBRARY and spec.architecture in causal_lm_classes()

    # ---- sources

    def load_folder(self, folder: Path, *, what: str, arch: str | None, model_args: dict[str, Any]) -> Any:
        from lowrank_cli.models.families.transformers_sources import open_folder

        loaded = open_folder(folder, what=what, arch=arch, model_args=model_args, family=self.name, auto=AUTO_CLASS)
        self.prepare(loaded.model)
        return loaded

    def open_skeleton(self, folder: Path, *, what: str, arch: str | None, model_args: dict[str, Any]) -> Any:
        from lowrank_cli.models.families.transformers_sources import folder_skeleton

        loaded = folder_skeleton(folder, what=what, arch=arch, model_args=model_args, family=self.name,
                                 auto=AUTO_CLASS)
        self.prepare(loaded.model)
        return loaded

    def load_hub(self, repo: str, revision: str | None, config: Path, *, arch: str | None,
                 model_args: dict[str, Any]) -> Any:
        from lowrank_cli.models.families.transformers_sources import open_hub

        loaded = open_hub(repo, revision, config, arch=arch, model_args=model_args, family=self.name, auto=AUTO_CLASS)
        self.prepare(loaded.model)
        return loaded

    # ---- building

    def construct(self, spec: ModelSpec) -> nn.Module:
        from lowrank_cli.models.transformers_models import empty_model

        model = empty_model(spec)
        self.prepare(model)
        stored = (spec.pretrained_cfg or {}).get(GENERATION_KEY)
        if isinstance(stored, dict) and getattr(model, "generation_config", None) is not None:
            from transformers import GenerationConfig

            with contextlib.suppress(ValueError, TypeError):  # a setting this transformers refuses: its defaults
                model.generation_config = GenerationConfig.from_dict(stored)
        return model

    def finish(self, model: nn.Module) -> None:
        """Tie what the config ties (lm_head and the token embeddings: one tensor, stored once)."""
        model.tie_weights()

    def prepare(self, model: nn.Module) -> None:
        linears_for_conv1d(model)
        model.config.use_cache = False

    def plain_outputs(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return _no_cache(model)

    def tied_copies(self, model: nn.Module) -> dict[str, str]:
        """transformers' own list of the tied tensors (`all_tied_weights_keys`: {copy: original})."""
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        return {str(k): str(v) for k, v in dict(tied).items()}

    def spec_of(self, model: nn.Module) -> ModelSpec:
        """The model's spec, its config as transformers would save it (use_cache is lrc's own setting)."""
        from lowrank_cli.models.spec import json_safe
        from lowrank_cli.models.transformers_models import transformers_spec

        spec = transformers_spec(model, self.name)
        spec.model_args.pop("use_cache", None)
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            stored = generation.to_diff_dict()
            stored.pop("transformers_version", None)
            spec.pretrained_cfg = {**spec.pretrained_cfg, GENERATION_KEY: json_safe(stored)}
        return spec

    def describe(self, model: nn.Module) -> tuple[str | None, str | None]:
        return type(model).__name__, LIBRARY

    # ---- structure

    def layer_stack(self, model: nn.Module) -> str | None:
        """The decoder layers: the one ModuleList of the model's repeated blocks (model.layers, transformer.h)."""
        blocks = self.block_names(model)
        parents = list(dict.fromkeys(name.rpartition(".")[0] for name in blocks))
        return parents[0] if len(parents) == 1 and parents[0] else None

    def shared_input_groups(self, model: nn.Module) -> list[list[str]]:
        """Llama-style layers: q/k/v read the attention's input, gate/up the MLP's (k/v may be smaller: GQA)."""
        groups = []
        for name, module in model.named_modules():
            for group in SHARED_INPUTS:
                parts = [getattr(module, a, None) for a in group]
                if all(hasattr(p, "in_features") and hasattr(p, "out_features") for p in parts):
                    groups.append([f"{name}.{a}" if name else a for a in group])
        return groups

    # ---- inputs

    def input_spec(self, model: nn.Module) -> InputSpec:
        from lowrank_cli.models.transformers_models import position_limit

        positions = position_limit(model)
        vocab = getattr(model.config, "vocab_size", 2) or 2
        return InputSpec(TEXT, (min(DEFAULT_SEQ_LEN, positions or DEFAULT_SEQ_LEN),), positions, int(vocab))

    def spec_modality(self, spec: ModelSpec) -> str:
        return TEXT

    def kv_cache_bytes_per_token(self, model: nn.Module) -> int | None:
        """layers x 2 (keys and values) x key/value heads x head size x bytes per element, from the config: what a
        cache keeps per token is the k/v projections' outputs, whatever their rank."""
        config = model.config
        layers, heads = config.num_hidden_layers, config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        element = next((p.element_size() for p in model.parameters() if p.is_floating_point()), 4)
        return int(layers * 2 * kv_heads * head_dim * element)

    # ---- the model card

    def pipeline_tag(self, spec: ModelSpec) -> str | None:
        return "text-generation"

    def card_usage(self, load_line: str, repo: str, text: bool, tokenizer: list[str] | None) -> tuple[str, list[str]]:
        if tokenizer == []:
            return "[transformers]", ["import lowrank_cli", "", load_line]
        return "[transformers]", [
            "import lowrank_cli", "from transformers import AutoTokenizer", "", load_line,
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
            'ids = tokenizer("Low-rank factorization", return_tensors="pt").input_ids',
            "print(tokenizer.decode(model.generate(ids, max_new_tokens=20)[0]))"]


@contextlib.contextmanager
def _no_cache(model: nn.Module) -> Iterator[None]:
    config = model.config
    before = config.use_cache
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = before


def linears_for_conv1d(model: nn.Module) -> list[str]:
    """Swap every transformers Conv1D of `model` (GPT-2's attention and MLP projections, weight in x out) for the
    nn.Linear it computes (weight out x in), in place, on the same device and dtype; returns their names."""
    import torch
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    names = [name for name, module in model.named_modules() if isinstance(module, Conv1D)]
    for name in names:
        conv = model.get_submodule(name)
        linear = nn.Linear(conv.nx, conv.nf, bias=conv.bias is not None, device=conv.weight.device,
                           dtype=conv.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(conv.weight.t())
            if conv.bias is not None:
                linear.bias.copy_(conv.bias)
        linear.weight.requires_grad_(conv.weight.requires_grad)
        linear.train(conv.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
    return names
