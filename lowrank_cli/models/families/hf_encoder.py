"""Hugging Face transformers encoders: BERT-style text models (token ids in) and ViT-style image models (pixel
values in), read from a folder or Hub repo in transformers' layout (config.json with `model_type`).

The transformers toolbox (building from a config, `from_pretrained`, the image preprocessing as a timm-style
pretrained_cfg) is models.transformers_models, which a decoder family shares. transformers is an optional extra:
nothing here imports it before a transformers model is asked for.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowrank_cli.errors import UsageError
from lowrank_cli.models.families.base import IMAGE, TEXT, Family, Head, InputSpec

if TYPE_CHECKING:
    from torch import nn

    from lowrank_cli.models.spec import ModelSpec

LIBRARY = "transformers"
# transformers class name ending -> the Hub's pipeline_tag
TASKS = (
    ("ForImageClassification", "image-classification"), ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"), ("ForQuestionAnswering", "question-answering"),
    ("ForMaskedLM", "fill-mask"), ("ForMultipleChoice", "multiple-choice"),
)  # fmt: skip
# Text models count MACs at this many tokens by default (`lrc report --seq-len`).
DEFAULT_SEQ_LEN = 128
# The linears of BERT-style self-attention that read the one hidden-states tensor.
ATTENTION_INPUTS = ("query", "key", "value")


class HfEncoder(Family):
    name = "hf_encoder"
    library = LIBRARY
    config_hint = "a transformers config (model_type)"
    builds_on_meta = False  # position ids and other computed buffers are only real when built for real

    def claims_config(self, cfg: dict[str, Any]) -> bool:
        return "model_type" in cfg or "architectures" in cfg

    def claims_model(self, model: nn.Module) -> bool:
        from lowrank_cli.models.transformers_models import is_transformers_model

        return is_transformers_model(model)

    # ---- sources

    def load_folder(self, folder: Path, *, what: str, arch: str | None, model_args: dict[str, Any]) -> Any:
        from lowrank_cli.models.families.transformers_sources import open_folder

        return open_folder(folder, what=what, arch=arch, model_args=model_args, family=self.name)

    def open_skeleton(self, folder: Path, *, what: str, arch: str | None, model_args: dict[str, Any]) -> Any:
        from lowrank_cli.models.families.transformers_sources import folder_skeleton

        return folder_skeleton(folder, what=what, arch=arch, model_args=model_args, family=self.name)

    def load_hub(self, repo: str, revision: str | None, config: Path, *, arch: str | None,
                 model_args: dict[str, Any]) -> Any:
        from lowrank_cli.models.families.transformers_sources import open_hub

        return open_hub(repo, revision, config, arch=arch, model_args=model_args, family=self.name)

    # ---- building

    def construct(self, spec: ModelSpec) -> nn.Module:
        from lowrank_cli.models.transformers_models import empty_model

        return empty_model(spec)

    def finish(self, model: nn.Module) -> None:
        """Tie the weights the config ties (a masked-LM decoder and the word embeddings are one tensor, written
        twice in the file)."""
        model.tie_weights()

    def spec_of(self, model: nn.Module) -> ModelSpec:
        from lowrank_cli.models.transformers_models import transformers_spec

        return transformers_spec(model, self.name)

    # ---- structure

    def shared_input_groups(self, model: nn.Module) -> list[list[str]]:
        """BERT-style self-attention: query, key and value read the same hidden states, one group per layer."""
        groups = []
        for name, module in model.named_modules():
            parts = [getattr(module, a, None) for a in ATTENTION_INPUTS]
            if all(hasattr(p, "in_features") and hasattr(p, "out_features") for p in parts):
                groups.append([f"{name}.{a}" if name else a for a in ATTENTION_INPUTS])
        return groups

    # ---- inputs, data

    def input_spec(self, model: nn.Module) -> InputSpec:
        from lowrank_cli.models.transformers_models import is_text_model, position_limit

        if not is_text_model(model):
            return super().input_spec(model)
        positions = position_limit(model)  # RoBERTa-style models lose 2 of max_position_embeddings
        vocab = getattr(model.config, "vocab_size", 2) or 2
        return InputSpec(TEXT, (min(DEFAULT_SEQ_LEN, positions or DEFAULT_SEQ_LEN),), positions, int(vocab))

    def image_pretrained_cfg(self, model: nn.Module) -> dict[str, Any] | None:
        from lowrank_cli.models.transformers_models import image_pretrained_cfg

        return image_pretrained_cfg(model)

    def spec_modality(self, spec: ModelSpec) -> str:
        """A vision model always has image settings; a text model has none."""
        return IMAGE if spec.pretrained_cfg else TEXT

    # ---- head

    def num_classes(self, model: nn.Module) -> int | None:
        labels = getattr(model.config, "num_labels", 0)
        return int(labels) if type(model).__name__.endswith("ForImageClassification") and labels else None

    def replace_head(self, loaded: Any, outputs: int, classes: list[str] | None, regression: bool) -> Head:
        """The task class of the model's config (BertForSequenceClassification, ViTForImageClassification), its
        encoder modules taken over from the loaded model (low-rank layers included); the parts the loaded model
        lacks (the classifier, and a pooler when the source had none) are new and make up the head."""
        from lowrank_cli.models.transformers_models import quiet

        old = loaded.model
        config = copy.deepcopy(old.config)
        config.num_labels = outputs
        config.problem_type = "regression" if regression else "single_label_classification"
        if classes:
            config.id2label = dict(enumerate(classes))
            config.label2id = {name: i for i, name in enumerate(classes)}
        cls = _task_class(old, config)
        config.architectures = [cls.__name__]
        with quiet():
            new = cls._from_config(config)
        old_base, new_base = old.base_model, getattr(new, new.base_model_prefix)
        taken = set()
        for name, child in old_base.named_children():
            if child is not None and getattr(new_base, name, None) is not None:
                setattr(new_base, name, child)
                taken.add(name)
        param = next(old.parameters())
        new.to(device=param.device, dtype=param.dtype).eval()
        prefix = new.base_model_prefix
        head = [n for n, c in new.named_children() if n != prefix and any(True for _ in c.parameters())]
        head += [f"{prefix}.{n}" for n, c in new_base.named_children()
                 if n not in taken and c is not None and any(True for _ in c.parameters())]
        old_names = {id(m): n for n, m in old.named_modules()}
        renamed = {old_names[id(m)]: n for n, m in new.named_modules() if id(m) in old_names and old_names[id(m)] != n}
        if hasattr(old, "pretrained_cfg"):
            new.pretrained_cfg = old.pretrained_cfg
        loaded.model, loaded.spec = new, self.spec_of(new)
        return Head(head, outputs, renamed)

    # ---- the model card

    def pipeline_tag(self, spec: ModelSpec) -> str | None:
        """transformers classes say their task in their name; a bare encoder extracts features."""
        for ending, task in TASKS:
            if spec.architecture.endswith(ending):
                return task
        return "feature-extraction" if self.spec_modality(spec) == TEXT else "image-feature-extraction"

    def card_usage(self, load_line: str, repo: str, text: bool, tokenizer: list[str] | None) -> tuple[str, list[str]]:
        if text and tokenizer != []:
            return "[transformers]", [
                "import lowrank_cli", "from transformers import AutoTokenizer", "", load_line,
                f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
                'outputs = model(**tokenizer(["a sentence to encode"], return_tensors="pt"))']
        return "[transformers]", ["import lowrank_cli", "", load_line]


def _task_class(old: nn.Module, config: Any) -> type:
    from lowrank_cli.models.transformers_models import is_text_model, require

    transformers = require()
    auto, task = ((transformers.AutoModelForSequenceClassification, "sequence classification") if is_text_model(old)
                  else (transformers.AutoModelForImageClassification, "image classification"))
    try:
        return auto._model_mapping[type(config)]
    except KeyError:
        raise UsageError(f"transformers has no {task} class for model_type '{config.model_type}', so lrc cannot give "
                         "this model a task head") from None
