"""`finetune` on real data: the digits relabelled as a new task (parity) for a tiny ViT, dense and compressed, and
labelled sentences for a tiny BERT. Every method writes a model that reloads with its new head and the input's
layers and ranks, records what was done, and scores on held-out data; adapters alone apply to their base only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from digits import relabel_imagefolder, write_flat_images
from helpers import make_tiny_vit
from hf_fixtures import write_labelled_texts

import lowrank_cli
from lowrank_cli.adapters.base import METHODS
from lowrank_cli.checkpoint.format import read_info, record_source
from lowrank_cli.errors import InputError, Interrupted, UsageError
from lowrank_cli.layers.lowrank_linear import LowRankLinear
from lowrank_cli.training.finetune import finetune
from lowrank_cli.training.metrics import metrics_path

VIT = dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
FAST = dict(num_workers=0, device="cpu", log_every=1, batch_size=8)

pytestmark = pytest.mark.usefixtures("one_thread")


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _ranks(model) -> dict[str, int]:
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


@pytest.fixture(scope="module")
def parity(digits_folder, tmp_path_factory):
    """The digits as a two-class task: even / odd (90 training, 30 validation images)."""
    return relabel_imagefolder(digits_folder(16, 12), tmp_path_factory.mktemp("parity"),
                               lambda digit: "even" if int(digit) % 2 == 0 else "odd")


@pytest.fixture(scope="module")
def vits(tmp_path_factory):
    """{"dense": a timm folder, "compressed": its factorization at kappa 2 as an lrc checkpoint}."""
    from timm.models import save_for_hf

    root = tmp_path_factory.mktemp("vits")
    save_for_hf(make_tiny_vit(**VIT), str(root / "dense"), safe_serialization=True)
    loaded = lowrank_cli.load_model(str(root / "dense"))
    lowrank_cli.factorize(loaded.model, kappa=2, device="cpu")
    record_source(loaded.model, loaded.source)
    lowrank_cli.save(loaded.model, root / "lr.safetensors")
    return {"dense": str(root / "dense"), "compressed": str(root / "lr.safetensors")}


@pytest.mark.parametrize("kind", ["dense", "compressed"])
@pytest.mark.parametrize("method", METHODS)
def test_each_method_writes_the_input_plus_a_new_head(method, kind, vits, parity, tmp_path):
    source = lowrank_cli.load_model(vits[kind]).model
    result = finetune(vits[kind], parity, output=tmp_path / "out.safetensors", method=method, steps=3, **FAST)
    back = lowrank_cli.load(result.output)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(back(x), result.model(x), atol=1e-5)
    assert back.num_classes == 2 and _ranks(back) == _ranks(source)
    assert _count(back) == _count(source) - (32 * 10 + 10) + (32 * 2 + 2)
    record = read_info(result.output)[0].finetune
    assert record["method"] == method and record["classes"] == ["even", "odd"] and record["merged"]
    assert 0 < record["trainable_share"] <= 1 and record["trainable_parameters"] == result.trainable
    assert record["scores"]["metric"] == "val_top1" and record["scores"]["samples"] == 30
    assert set(record["scores"]["after"]) == {"val_top1", "val_top5"}
    if method == "full":
        assert result.trainable == result.parameters
    elif method == "head":
        assert result.trainable == 32 * 2 + 2
    else:
        assert result.parameters > _count(back)  # the adapters were there while training, and are merged away
        assert record["adapters"]["targets"] and ("first" in record["adapters"]["targets"][0]) == (kind != "dense")


def test_adapters_alone_apply_to_their_base_only(vits, parity, tmp_path):
    result = finetune(vits["compressed"], parity, output=tmp_path / "adapters.safetensors", method="dora",
                      merge=False, steps=3, **FAST)
    assert result.output.stat().st_size < Path(vits["compressed"]).stat().st_size
    model = lowrank_cli.load(vits["compressed"], adapters=result.output)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), result.model(x), atol=1e-5)
    assert _ranks(model) == _ranks(lowrank_cli.load(vits["compressed"])) and model.num_classes == 2
    unmerged = lowrank_cli.load(vits["compressed"], adapters=result.output, merge=False)
    assert any("lora_" in n for n, _ in unmerged.named_parameters())
    with pytest.raises(InputError, match="trained on another base"):
        lowrank_cli.load(vits["dense"], adapters=result.output)
    with pytest.raises(InputError, match="not an lrc adapter file"):
        lowrank_cli.load(vits["dense"], adapters=vits["compressed"])


def test_resume_continues_to_the_same_weights(vits, parity, tmp_path):
    kw = dict(method="lora", steps=4, save_every=1, **FAST)
    whole = finetune(vits["compressed"], parity, output=tmp_path / "whole.safetensors", **kw)
    with pytest.raises(Interrupted):
        finetune(vits["compressed"], parity, output=tmp_path / "cut.safetensors", on_step=lambda step, m: step == 2,
                 **kw)
    resumed = finetune(vits["compressed"], parity, output=tmp_path / "cut.safetensors", resume=True, **kw)
    assert resumed.resumed_from == 2
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.scores["before"] == whole.scores["before"]


def test_teacher_adds_logit_distillation(vits, parity, tmp_path):
    teacher = finetune(vits["dense"], parity, output=tmp_path / "teacher.safetensors", method="full", steps=3, **FAST)
    student = finetune(vits["compressed"], parity, output=tmp_path / "student.safetensors", method="rlrr",
                       teacher=str(teacher.output), gamma=0.5, steps=3, **FAST)
    assert set(student.losses) == {"loss", "ce", "kd"}
    assert read_info(student.output)[0].finetune["gamma"] == 0.5
    with pytest.raises(InputError, match="has 10 outputs and the task 2"):
        finetune(vits["compressed"], parity, output=tmp_path / "x.safetensors", method="head",
                 teacher=vits["dense"], steps=1, **FAST)
    assert not (tmp_path / "x.safetensors").exists() and not metrics_path(tmp_path / "x.safetensors").exists()


def test_data_without_labels_is_refused_and_nothing_is_written(vits, tmp_path):
    flat = write_flat_images(tmp_path / "flat", 20, image_size=16)
    with pytest.raises(InputError, match="no class folders"):
        finetune(vits["dense"], flat, output=tmp_path / "out.safetensors", steps=1, **FAST)
    text = tmp_path / "corpus.txt"
    text.write_text("a sentence\nanother one\n")
    with pytest.raises(InputError, match="not labelled data"):
        finetune(vits["dense"], text, output=tmp_path / "out.safetensors", steps=1, **FAST)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "flat"]


def test_options_that_cannot_work(vits, parity, tmp_path):
    out = tmp_path / "out.safetensors"
    for kwargs, match in [(dict(method="lora", adapter_rank=0), "adapter_rank must be at least 1"),
                          (dict(method="rlrr", adapter_rank=4), "is for method lora or dora"),
                          (dict(method="full", merge=False), "has none"),
                          (dict(method="head", targets=["blocks.*"]), "has none"),
                          (dict(gamma=1.0), "from a teacher")]:
        with pytest.raises(UsageError, match=match):
            finetune(vits["dense"], parity, output=out, steps=1, **kwargs, **FAST)
    with pytest.raises(UsageError, match="matches no linear layer"):
        finetune(vits["compressed"], parity, output=out, targets=[r"blocks\.7\..*"], steps=1, **FAST)


# ---------------------------------------------------------------------------------------------- texts


@pytest.fixture(scope="module")
def berts(bert_folder, tmp_path_factory):
    """{"dense": the tiny BERT classifier folder (3 labels), "compressed": its kappa-2 factorization}."""
    loaded = lowrank_cli.load_model(str(bert_folder))
    lowrank_cli.factorize(loaded.model, kappa=2, device="cpu")
    record_source(loaded.model, loaded.source)
    path = tmp_path_factory.mktemp("bert_lr") / "bert_lr.safetensors"
    lowrank_cli.save(loaded.model, path)
    return {"dense": str(bert_folder), "compressed": str(path)}


@pytest.fixture(scope="module")
def sentences(tmp_path_factory):
    root = tmp_path_factory.mktemp("sentences")
    return {"train": write_labelled_texts(root / "train.jsonl", 64), "dev": write_labelled_texts(root / "dev.jsonl",
            24, seed=1), "sts": write_labelled_texts(root / "sts.csv", 48, task="score")}


@pytest.mark.parametrize("kind,method", [("dense", "lora"), ("compressed", "dora"), ("compressed", "rlrr")])
def test_text_classifier(kind, method, berts, sentences, tmp_path):
    source = lowrank_cli.load_model(berts[kind]).model
    result = finetune(berts[kind], sentences["train"], val_data=sentences["dev"], output=tmp_path / "out.safetensors",
                      method=method, steps=3, **FAST)
    back = lowrank_cli.load(result.output)
    assert type(back).__name__ == "BertForSequenceClassification" and back.config.id2label == {0: "long", 1: "short"}
    assert _ranks(back) == _ranks(source) and _count(back) == _count(source) - 3 * 32 - 3 + 2 * 32 + 2
    ids, mask = torch.tensor([[2, 10, 11, 12, 3]]), torch.ones(1, 5, dtype=torch.long)
    with torch.no_grad():
        assert torch.allclose(back(ids, attention_mask=mask).logits, result.model(ids, attention_mask=mask).logits,
                              atol=1e-5)
    record = read_info(result.output)[0].finetune
    assert record["scores"]["metric"] == "val_accuracy" and record["tokenizer"] == berts["dense"]


def test_text_pairs_with_scores(berts, sentences, tmp_path):
    result = finetune(berts["compressed"], sentences["sts"], output=tmp_path / "sts.safetensors", method="lora",
                      val_fraction=0.25, steps=3, **FAST)
    back = lowrank_cli.load(result.output)
    assert back.config.num_labels == 1 and back.config.problem_type == "regression"
    assert set(result.losses) == {"loss", "mse"}
    lines = [json.loads(line) for line in metrics_path(result.output).read_text().splitlines()]
    assert [line["texts"] for line in lines] == [8, 16, 24]  # a text run counts texts, not images
    assert all(line["texts_per_s"] > 0 and not {"images_per_s", "images"} & set(line) for line in lines)
    assert set(result.scores["after"]) == {"val_pearson", "val_spearman"} and result.scores["samples"] == 12
    from lowrank_cli.data.texts import load_tokenizer
    from lowrank_cli.evaluation.task_scores import evaluate_texts

    scored = evaluate_texts(back, sentences["sts"], load_tokenizer(berts["dense"]))
    assert set(scored) == {"pearson", "spearman", "texts", "precision"} and scored["texts"] == 48
    with pytest.raises(InputError, match="holds class labels; the model regresses a score"):
        evaluate_texts(back, sentences["dev"], load_tokenizer(berts["dense"]))


def test_text_adapters_alone(berts, sentences, tmp_path):
    """A transformers base takes its task class and adapters back from an adapter file."""
    result = finetune(berts["dense"], sentences["train"], output=tmp_path / "adapters.safetensors", method="rlrr",
                      merge=False, steps=2, **FAST)
    model = lowrank_cli.load(berts["dense"], adapters=result.output)
    ids, mask = torch.tensor([[2, 10, 11, 12, 3]]), torch.ones(1, 5, dtype=torch.long)
    with torch.no_grad():
        assert torch.allclose(model(ids, attention_mask=mask).logits, result.model(ids, attention_mask=mask).logits,
                              atol=1e-5)
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.num_labels == 2


def test_bad_text_data(berts, tmp_path):
    cases = {
        "no_labels.jsonl": ('{"text": "a b"}\n{"text": "c d"}\n', "no 'label'"),
        "mixed.jsonl": ('{"text": "a b", "label": 1}\n{"text": "c d", "label": "pos"}\n', "labels of mixed type"),
        "float.jsonl": ('{"text": "a b", "label": 0.5}\n{"text": "c d", "label": 1}\n', "is a float"),
        "both.jsonl": ('{"text": "a b", "label": 1, "score": 2}\n', "both a 'label' and a 'score'"),
        "mixed.csv": ("text,label\na b,1\nc d,pos\n", "labels of mixed type"),
    }
    for name, (content, match) in cases.items():
        path = tmp_path / name
        path.write_text(content)
        with pytest.raises(InputError, match=match):
            finetune(berts["dense"], path, output=tmp_path / "out.safetensors", steps=1, **FAST)
    assert not (tmp_path / "out.safetensors").exists()


def test_metrics_lines_and_kept_state(vits, parity, tmp_path):
    result = finetune(vits["compressed"], parity, output=tmp_path / "out.safetensors", method="rlrr", steps=4,
                      eval_every=2, **FAST)
    lines = [json.loads(line) for line in metrics_path(result.output).read_text().splitlines()]
    assert [line["step"] for line in lines if "val_top1" in line] == [2, 4]
    assert result.scores["kept"]["which"] == "best" and result.scores["kept"]["step"] in (2, 4)


def test_a_fully_fine_tuned_dense_model_factorizes_and_keeps_its_tokenizer(berts, sentences, tmp_path):
    """A dense model fine-tuned in full is an lrc file without low-rank layers: factorize takes it, and the
    compressed file still finds the tokenizer through the file it was made from."""
    from lowrank_cli.compress.factorize_source import factorize_file
    from lowrank_cli.data.task_data import recorded_tokenizer

    dense = finetune(berts["dense"], sentences["train"], output=tmp_path / "full.safetensors", method="full", steps=1,
                     **FAST).output
    factorize_file(str(dense), tmp_path / "lr.safetensors", kappa=2, device="cpu")
    info = read_info(tmp_path / "lr.safetensors")[0]
    assert info.ranks and recorded_tokenizer(info) == str(Path(berts["dense"]).resolve())
    with pytest.raises(UsageError, match="already factorized"):
        factorize_file(str(tmp_path / "lr.safetensors"), tmp_path / "again.safetensors", kappa=2, device="cpu")
