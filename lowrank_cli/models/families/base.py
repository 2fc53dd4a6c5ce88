"""The protocol of a model family (models.families): one object per kind of model lrc reads, asked "is this yours?"
for a config.json, a model or a checkpoint's spec, and then everything lrc needs of that kind of model.

A family subclasses `Family` and overrides what differs from the defaults: the defaults are the generic rules
(blocks are the elements of a ModuleList / Sequential holding two containers of one class, their nn.Linear are the
targets, no layers share an input, no head lrc can replace, an image input of timm's default data config).

Nothing here assumes that a text model is an encoder: a decoder family (GPT-2's Conv1D, Llama) gives its own
blocks and targets, its own InputSpec (a subclass with its own `example`, no KV cache: tracers reject cache
objects, so it loads its models with `use_cache` off), its own head rules and card fields, and goes before
hf_encoder in the registry, since both claim transformers configs.

Importing this module imports neither torch nor any model library: `lrc --help` lists the families' libraries.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowrank_cli.errors import InputError, UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lowrank_cli.models.spec import ModelSpec

IMAGE, TEXT = "image", "text"  # InputSpec.modality: what the data of a model is
CONFIG_NAME = "config.json"  # what a folder or Hub repo says about its model: what a family claims


@dataclass(frozen=True)
class InputSpec:
    """What a model takes, worked out once per model by its family (`models.families.input_spec`): used by the
    call check, MAC counts, calibration, speed plans, benchmarks and tracing alike.

    `modality` "image": float tensors (batch, C, H, W), `size` (C, H, W); "text": token ids (batch, seq_len),
    `size` (seq_len,) by default, at most `positions` (the model's learned positions), ids below `vocab_size`.
    """

    modality: str
    size: tuple[int, ...]
    positions: int | None = None
    vocab_size: int | None = None

    @property
    def tokens(self) -> bool:
        return self.modality == TEXT

    @property
    def option(self) -> str:
        """The option that sets the size, as messages name it."""
        return "`seq_len` N" if self.tokens else "`input_size` C,H,W"

    def sized(self, seq_len: int | None = None) -> tuple[int, ...]:
        """The size to run at: (C, H, W), or (`seq_len`,) for a token model (its default when None)."""
        if not self.tokens:
            if seq_len is not None:
                raise UsageError("`seq_len` is for text models; an image model takes `input_size` C,H,W")
            return self.size
        if seq_len is None:
            return self.size
        if seq_len < 1:
            raise UsageError(f"`seq_len` must be at least 1, got {seq_len}")
        if self.positions and seq_len > self.positions:
            raise UsageError(f"`seq_len` {seq_len} is above the {self.positions} positions the model has: lower it")
        return (int(seq_len),)

    def check(self, input_size: tuple[int, ...] | None) -> None:
        """An `input_size` C,H,W given to a token model is a mistake of kind, not of numbers."""
        if input_size is not None and self.tokens and len(input_size) != 1:
            raise UsageError("`input_size` is C,H,W for image models; a text model takes `seq_len` N")

    def example(self, size: tuple[int, ...], batch: int = 1, *, device: Any = None, dtype: Any = None,
                generator: Any = None, zeros: bool = False) -> torch.Tensor:
        """A batch for `model(x)`: token ids (batch, seq_len), else floats (batch, *size) in `dtype`; `zeros` gives
        a blank batch (shape checks, meta-device runs), otherwise values come from `generator`."""
        import torch

        device = torch.device(device or "cpu")
        if self.tokens:
            shape = (batch, int(size[-1]))
            if zeros:
                return torch.zeros(shape, dtype=torch.long, device=device)
            vocab = int(self.vocab_size or 2)
            low = min(vocab - 1, 5)  # ids above BERT's special tokens ([PAD] 0 would look like padding)
            return torch.randint(low, vocab, shape, generator=generator).to(device)
        dtype = dtype or torch.float32
        if zeros:
            return torch.zeros((batch, *size), dtype=dtype, device=device)
        return torch.randn((batch, *size), generator=generator).to(device=device, dtype=dtype)


def in_head(name: str, head: list[str]) -> bool:
    """Whether the module or tensor `name` belongs to one of the `head` modules."""
    return any(name == h or name.startswith(h + ".") for h in head)


@dataclass
class Head:
    """A head sized to a task (`models.heads.replace_head`)."""

    modules: list[str]  # module names of the new head (they train in full, whatever the method)
    outputs: int  # classes, or 1 for a regression score
    renamed: dict[str, str] = field(default_factory=dict)  # old module name -> new (transformers task classes)

    def record(self) -> dict[str, Any]:
        return {"modules": self.modules, "outputs": self.outputs}


# What a model constructor raises for arguments it cannot take (timm asserts, transformers raises ValueError, ...).
REJECTED = (TypeError, ValueError, AssertionError, KeyError, IndexError, ZeroDivisionError, OverflowError)


class Family:
    """One kind of model. `name` is recorded in checkpoints (lrc.family), `library` is lrc.library."""

    name = "generic"
    library = ""
    config_hint = ""  # how this family's config.json reads, for messages: "a timm config (architecture)"
    loads_names = False  # a bare MODEL name may be this family's (`load_name`)
    reads_weights_files = False  # a bare weights file with `arch` may be this family's (`load_weights_file`)
    builds_on_meta = True  # False: built for real after the meta count (buffers the file does not hold)
    # How `target_linears` finds the layers to factorize, for the error that says none was found.
    targets_rule = ("nn.Linear inside repeated blocks (the elements of a ModuleList / Sequential holding two "
                    "containers of one class)")
    metric = "accuracy"  # what `lrc eval` measures: "accuracy" (labelled images or texts) or "perplexity" (text)
    text_data = "texts"  # text data: "texts" (one input each, padded) or "stream" (one token stream in windows)
    calib_mode = "parallel"  # the default calibration: "parallel" (one pass) or "sequential" (layer by layer)

    # ---- claims: "is this yours?"

    def claims_config(self, cfg: dict[str, Any]) -> bool:
        """Whether a folder's or Hub repo's config.json describes one of this family's models."""
        return False

    def claims_model(self, model: nn.Module) -> bool:
        return False

    def claims_spec(self, spec: ModelSpec) -> bool:
        """Whether a spec without a family (a file written before lrc.family) is this family's."""
        return spec.library == self.library

    # ---- sources (each returns a LoadedModel with its source described)

    def load_folder(self, folder: Path, *, what: str, arch: str | None, model_args: dict[str, Any]) -> Any:
        raise UsageError(f"{what} is a {self.library} model, which lrc cannot read from a folder")

    def load_hub(self, repo: str, revision: str | None, config: Path, *, arch: str | None,
                 model_args: dict[str, Any]) -> Any:
        raise UsageError(f"hf-hub:{repo} is a {self.library} model, which lrc cannot read from the Hub")

    def load_name(self, name: str, model_args: dict[str, Any], log: Callable[[str], None]) -> Any:
        raise UsageError(f"{self.library} models have no names lrc knows")

    def open_skeleton(self, folder: Path, *, what: str, arch: str | None, model_args: dict[str, Any]) -> Any:
        """A LoadedModel of a local folder whose parameters are on the meta device (models.skeleton), its weights
        left unread, for streaming factorize; None: this family cannot build one (the folder is read whole)."""
        return None

    def load_weights_file(self, path: Path, arch: str, model_args: dict[str, Any]) -> Any:
        raise UsageError(f"'{path}' is a bare weights file: a {self.library} model is read from its folder")

    # ---- building from a spec

    def construct(self, spec: ModelSpec) -> nn.Module:
        """The architecture of `spec`, in eval mode, on the device of the caller's context (meta for a count)."""
        raise NotImplementedError

    def build_empty(self, spec: ModelSpec, *, what: str = "the model", fix: str = "fix the `model_args` values",
                    max_params: int | None = None) -> nn.Module:
        """The architecture with its parameters on the meta device (no memory, no random init).

        Random initialisation of a ViT-B costs ~2 s on 2 cores; every weight is overwritten by the state dict
        anyway. Models with non-persistent buffers (computed, not stored: relative position indices...) and
        families that say so (`builds_on_meta` False) are built for real, because those buffers would otherwise
        stay empty; `max_params` refuses, before that allocation, arguments that describe a far larger model than
        the weights at hand. A constructor that rejects the arguments is an InputError that says `fix`.
        """
        meta = self._construct(spec, meta=True, what=what, fix=fix)
        count = sum(p.numel() for p in meta.parameters())
        if max_params is not None and count > max_params:
            raise InputError(f"{what} describes a model of {count:,} parameters, far more than its weights hold: {fix}")
        persistent = set(meta.state_dict().keys())
        if not self.builds_on_meta or any(name not in persistent for name, _ in meta.named_buffers()):
            return self._construct(spec, meta=False, what=what, fix=fix)
        return meta

    def _construct(self, spec: ModelSpec, *, meta: bool, what: str, fix: str) -> nn.Module:
        import torch

        try:
            with torch.device("meta") if meta else contextlib.nullcontext():
                return self.construct(spec)
        except REJECTED as e:
            raise InputError(f"{what}: {spec.library} cannot build '{spec.architecture}' with model args "
                             f"{_short(spec.model_args)} ({type(e).__name__}: {str(e)[:160]}): {fix}") from None

    def finish(self, model: nn.Module) -> None:
        """After the weights are assigned (ties that the state dict writes twice)."""

    def prepare(self, model: nn.Module) -> None:
        """Make a model of this family the way lrc runs it, in place (GPT-2's Conv1D as the nn.Linear it is, no KV
        cache out of a forward): done when lrc loads or builds one, and by `factorize` for a model made elsewhere.
        Doing it twice changes nothing."""

    def plain_outputs(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """While lrc traces or counts a model made elsewhere: a forward returns tensors only (no cache objects,
        which tracers reject); the model's own settings come back afterwards."""
        return contextlib.nullcontext()

    def tied_copies(self, model: nn.Module) -> dict[str, str]:
        """{state-dict name: the name it is a copy of} for the tensors that `finish` ties again after loading: a
        checkpoint stores them once (as transformers does)."""
        return {}

    def spec_of(self, model: nn.Module) -> ModelSpec:
        """How to rebuild `model` without its source."""
        raise UsageError(f"lrc cannot describe a {type(model).__name__} for saving: build it with "
                         "timm.create_model or lowrank_cli.load")

    def describe(self, model: nn.Module) -> tuple[str | None, str | None]:
        """(architecture, library) of a model known by itself only (no spec), as a report names it."""
        return None, None

    # ---- structure

    def block_names(self, model: nn.Module) -> list[str]:
        """The repeated blocks, outermost first, in model order (the generic rule: models.blocks)."""
        from lowrank_cli.models.blocks import repeated_blocks

        return repeated_blocks(model)

    def target_linears(self, model: nn.Module) -> list[str]:
        """The linears to factorize by default: those inside the blocks."""
        from lowrank_cli.models.blocks import linears_in

        return linears_in(model, self.block_names(model))

    def shared_input_groups(self, model: nn.Module) -> list[list[str]]:
        """Groups of linears (module names) that read the very same input tensor, to run as one launch."""
        return []

    def layer_stack(self, model: nn.Module) -> str | None:
        """The ModuleList of layers that run one after another, each on the hidden states of the one before (a
        causal LM's decoder layers): what sequential calibration walks. None: the model has none."""
        return None

    def kv_cache_bytes_per_token(self, model: nn.Module) -> int | None:
        """Bytes of KV cache one generated token adds (a decoder); None for models that do not generate."""
        return None

    # ---- inputs, data

    def input_spec(self, model: nn.Module) -> InputSpec:
        """What the model takes; called once per model (`models.families.input_spec` keeps it)."""
        from lowrank_cli.models.image_config import data_config

        cfg = data_config(model, self.image_pretrained_cfg(model), check_mode=False)
        return InputSpec(IMAGE, tuple(cfg["input_size"]))

    def image_pretrained_cfg(self, model: nn.Module) -> dict[str, Any] | None:
        """The timm-style pretrained_cfg (input size, mean, std, crop) that the image transforms of `model` follow;
        None: the model's own `pretrained_cfg`, as timm reads it."""
        return None

    def spec_modality(self, spec: ModelSpec) -> str:
        """What a checkpoint's model takes, from its spec alone (a card is written without building it)."""
        return IMAGE

    # ---- head

    def num_classes(self, model: nn.Module) -> int | None:
        """Outputs of the model's image classifier (None when it says nothing or has no head)."""
        n = getattr(model, "num_classes", None)
        return int(n) if isinstance(n, int) and n > 0 else None

    def replace_head(self, loaded: Any, outputs: int, classes: list[str] | None, regression: bool) -> Head:
        raise UsageError(f"{type(loaded.model).__name__} has no head lrc can replace: use a timm or transformers "
                         "model")

    # ---- the model card

    def pipeline_tag(self, spec: ModelSpec) -> str | None:
        return None

    def card_usage(self, load_line: str, repo: str, text: bool, tokenizer: list[str] | None) -> tuple[str, list[str]]:
        """(the pip extra to install, the lines of Python) of the card's "How to use"."""
        return "", ["import lowrank_cli", "", load_line]

    def source_label(self, source: dict[str, Any]) -> str | None:
        """How a card names a source of this family's own kind (a timm name); None: not one of its kinds."""
        return None

    def __repr__(self) -> str:
        return f"<family {self.name} ({self.library})>"


def read_config_json(folder: Path) -> dict[str, Any]:
    """The folder's config.json, as a JSON object."""
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise InputError(
            f"folder '{folder}' has no {CONFIG_NAME}: expected timm's Hub layout (config.json + model.safetensors, "
            "as written by timm.models.save_for_hf), a transformers model folder (save_pretrained) or an lrc "
            "checkpoint folder (lrc_config.json, as lrc push writes it), or pass a weights file with `arch`"
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"'{cfg_path}' is not valid JSON ({e}): fix or re-export the folder") from None
    if not isinstance(cfg, dict):
        raise InputError(f"'{cfg_path}' is not a JSON object: not a model config")
    return cfg


def _short(args: dict[str, Any]) -> str:
    text = json.dumps(args, default=str)
    return text if len(text) <= 200 else text[:200] + "...}"
