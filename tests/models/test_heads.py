"""A new head sized to a task (models/heads.py): timm's reset_classifier with the spec updated; transformers task
classes built around the loaded encoder, its modules (low-rank layers included) taken over, not copied."""

from __future__ import annotations

import pytest
import torch
from helpers import make_tiny_vit
from hf_fixtures import write_tiny_bert

import lowrank_cli
from lowrank_cli.models.build import build_empty
from lowrank_cli.models.heads import replace_head
from lowrank_cli.models.loaded import LoadedModel
from lowrank_cli.models.spec import ModelSpec


def test_timm_head_and_spec():
    model = make_tiny_vit(depth=2)
    loaded = LoadedModel(model, ModelSpec("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "num_classes": 10,
                                                                   "depth": 2}))
    blocks = model.blocks
    head = replace_head(loaded, 3)
    assert head.modules == ["head"] and model.head.out_features == 3 and model.blocks is blocks
    assert loaded.spec.model_args["num_classes"] == 3
    assert build_empty(loaded.spec).head.out_features == 3  # the checkpoint rebuilds the new head


@pytest.mark.parametrize("source_head,new_parts", [(None, ["classifier"]), ("masked-lm", ["classifier", "bert.pooler"]),
                                                    ("sequence-classification", ["classifier"])])
def test_transformers_text_head(source_head, new_parts, tmp_path):
    loaded = lowrank_cli.load_model(str(write_tiny_bert(tmp_path / "bert", head=source_head)))
    lowrank_cli.factorize(loaded.model, kappa=2, device="cpu")
    layer = loaded.model.base_model.encoder.layer[0].attention.self.query
    head = replace_head(loaded, 2, classes=["neg", "pos"])
    model = loaded.model
    assert type(model).__name__ == "BertForSequenceClassification" and head.modules == new_parts
    assert model.bert.encoder.layer[0].attention.self.query is layer  # taken over, low-rank as it was
    assert model.config.id2label == {0: "neg", 1: "pos"} and loaded.spec.architecture == model.__class__.__name__
    assert head.renamed.get("encoder.layer.0.attention.self.query") == (
        "bert.encoder.layer.0.attention.self.query" if source_head is None else None)
    out = model(torch.tensor([[2, 10, 11, 3]]), attention_mask=torch.ones(1, 4, dtype=torch.long))
    assert out.logits.shape == (1, 2)


def test_transformers_regression_head(tmp_path):
    loaded = lowrank_cli.load_model(str(write_tiny_bert(tmp_path / "bert", head=None)))
    replace_head(loaded, 1, regression=True)
    assert loaded.model.config.problem_type == "regression" and loaded.model.config.num_labels == 1


def test_transformers_vision_head(tmp_path):
    from hf_fixtures import write_tiny_vit

    loaded = lowrank_cli.load_model(str(write_tiny_vit(tmp_path / "vit", head=False)))
    size = loaded.model.pretrained_cfg["input_size"]
    head = replace_head(loaded, 2, classes=["even", "odd"])
    assert type(loaded.model).__name__ == "ViTForImageClassification" and head.modules == ["classifier"]
    assert loaded.model.pretrained_cfg["input_size"] == size  # the image settings travel with the encoder
    assert loaded.model(torch.zeros(1, 3, 32, 32)).logits.shape == (1, 2)
