"""`finetune_tasks` on real data: the digits under two label sets (the digit, its parity) for a tiny compressed
ViT, and labelled sentences (classes, and a score) for a tiny BERT. Every mode writes one checkpoint that loads
each task with its own head; the scores it records are the ones the loaded models give; an interrupted run
resumes to the same result; bad input fails before training."""

from __future__ import annotations

import json

import pytest
import torch
from digits import relabel_imagefolder
from helpers import make_tiny_vit
from hf_fixtures import write_labelled_texts

import lowrank_cli
from lowrank_cli.checkpoint.format import read_info, record_source
from lowrank_cli.errors import InputError, Interrupted, OutputError, UsageError
from lowrank_cli.layers.lowrank_linear import LowRankLinear
from lowrank_cli.training.metrics import metrics_path
from lowrank_cli.training.multitask import finetune_tasks, work_folder

VIT = dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
FAST = dict(num_workers=0, device="cpu", log_every=1, batch_size=8, val_fraction=None)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digit_tasks(digits_folder, tmp_path_factory):
    """The same digits images under two label sets: the digit (10 classes) and its parity (2)."""
    digits = digits_folder(16, 12)
    parity = relabel_imagefolder(digits, tmp_path_factory.mktemp("parity"),
                                 lambda digit: "even" if int(digit) % 2 == 0 else "odd")
    return [f"digit={digits}", f"parity={parity}"]


@pytest.fixture(scope="module")
def vit_lr(tmp_path_factory):
    from timm.models import save_for_hf

    root = tmp_path_factory.mktemp("vit")
    save_for_hf(make_tiny_vit(**VIT), str(root / "dense"), safe_serialization=True)
    loaded = lowrank_cli.load_model(str(root / "dense"))
    lowrank_cli.factorize(loaded.model, kappa=2, device="cpu")
    record_source(loaded.model, loaded.source)
    return str(lowrank_cli.save(loaded.model, root / "lr.safetensors"))


def _ranks(model) -> dict[str, int]:
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def _top1(model, folder) -> float:
    from lowrank_cli.evaluation.accuracy import evaluate

    return evaluate(model, folder, batch_size=16, device="cpu", num_workers=0)["top1"]


@pytest.mark.parametrize("mode,extra", [("experts", {}), ("shared", {"schedule": "interleaved"}),
                                        ("merge", {"merge_rule": "svd", "merge_rank": 2}),
                                        ("orthogonal", {"adapter_rank": 2})])
def test_every_mode_writes_one_checkpoint_that_loads_each_task(mode, extra, vit_lr, digit_tasks, tmp_path):
    out = tmp_path / "multi.safetensors"
    result = finetune_tasks(vit_lr, digit_tasks, output=out, mode=mode, steps=4, lr=5e-3, **FAST, **extra)
    record = read_info(out)[0].multitask
    assert record["mode"] == mode and [t["name"] for t in record["tasks"]] == ["digit", "parity"]
    assert [t["head"]["outputs"] for t in record["tasks"]] == [10, 2]
    source = lowrank_cli.load(vit_lr)
    for task, folder in zip(("digit", "parity"), (d.split("=", 1)[1] for d in digit_tasks)):
        model = lowrank_cli.load(out, task=task)
        assert model.num_classes == (10 if task == "digit" else 2)
        assert _ranks(model) == _ranks(source)  # the backbone keeps its layers and ranks, adapters merged away
        assert not any("lora" in n for n, _ in model.named_parameters())
        recorded = result.scores[task]["val_top1"]
        assert recorded == pytest.approx(_top1(model, f"{folder}/val"), abs=1e-6)  # what it says is what it does
    assert len(result.scores) == 2 and 0 <= result.overall <= 1
    first = read_info(out)[0].finetune  # what `lrc report` shows of the model load(out) gives: its merged scores
    assert first["scores"]["after"] == record["tasks"][0]["scores"]["after"] and first["task_name"] == "digit"
    assert result.overall == pytest.approx(sum(s["val_top1"] for s in result.scores.values()) / 2)
    assert not work_folder(out).exists()
    lines = [json.loads(line) for line in metrics_path(out).read_text().splitlines()]
    assert lines and (("task" in lines[0]) != (mode == "shared"))


def test_experts_keep_each_tasks_adapters_apart(vit_lr, digit_tasks, tmp_path):
    """Loading one task merges only its adapters: the other task's backbone output does not move."""
    out = tmp_path / "experts.safetensors"
    finetune_tasks(vit_lr, digit_tasks, output=out, mode="experts", steps=3, lr=5e-2, **FAST)
    base, digit, parity = (lowrank_cli.load(p, **kw) for p, kw in
                           ((vit_lr, {}), (out, {"task": "digit"}), (out, {"task": "parity"})))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        f_base, f_digit, f_parity = (m.forward_head(m.forward_features(x), pre_logits=True)
                                     for m in (base, digit, parity))
    assert not torch.allclose(f_digit, f_base, atol=1e-4) and not torch.allclose(f_parity, f_digit, atol=1e-4)
    assert lowrank_cli.load(out).num_classes == 10  # no task: the first
    as_model = lowrank_cli.load_model(str(out)).model  # what every command reads: the first task, adapters merged
    with torch.no_grad():
        assert torch.allclose(as_model(x), digit(x), atol=1e-6)


def test_an_interrupted_run_resumes_to_the_same_checkpoint(vit_lr, digit_tasks, tmp_path):
    straight = tmp_path / "straight.safetensors"
    finetune_tasks(vit_lr, digit_tasks, output=straight, mode="merge", steps=4, save_every=1, **FAST)
    out = tmp_path / "cut.safetensors"
    stops = iter([False, False, False, False, False, True])  # the second task's 2nd step
    with pytest.raises(Interrupted, match=r"resume=True"):
        finetune_tasks(vit_lr, digit_tasks, output=out, mode="merge", steps=4, save_every=1,
                       on_step=lambda step, model: next(stops), **FAST)
    assert (work_folder(out) / "digit.safetensors").exists() and not out.exists()
    with pytest.raises(OutputError, match="resume=True"):
        finetune_tasks(vit_lr, digit_tasks, output=out, mode="merge", steps=4, **FAST)
    with pytest.raises(UsageError, match="task 'digit' was trained earlier in this run with block None; now block is 0"):
        finetune_tasks(vit_lr, digit_tasks, output=out, mode="orthogonal", adapter_rank=2, steps=4, save_every=1,
                       resume=True, **FAST)  # the finished task is not reused for another construction
    finetune_tasks(vit_lr, digit_tasks, output=out, mode="merge", steps=4, save_every=1, resume=True, **FAST)
    from safetensors.torch import load_file

    a, b = load_file(straight), load_file(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_shared_resumes_exactly(vit_lr, digit_tasks, tmp_path):
    straight = tmp_path / "straight.safetensors"
    finetune_tasks(vit_lr, digit_tasks, output=straight, mode="shared", steps=6, save_every=1, **FAST)
    out = tmp_path / "cut.safetensors"
    with pytest.raises(Interrupted):
        finetune_tasks(vit_lr, digit_tasks, output=out, mode="shared", steps=6, save_every=1,
                       on_step=lambda step, model: step == 3, **FAST)
    finetune_tasks(vit_lr, digit_tasks, output=out, mode="shared", steps=6, save_every=1, resume=True, **FAST)
    from safetensors.torch import load_file

    a, b = load_file(straight), load_file(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def bert_lr(bert_folder, tmp_path_factory):
    loaded = lowrank_cli.load_model(str(bert_folder))
    lowrank_cli.factorize(loaded.model, kappa=2, device="cpu")
    record_source(loaded.model, loaded.source)
    return str(lowrank_cli.save(loaded.model, tmp_path_factory.mktemp("bert") / "bert_lr.safetensors"))


@pytest.mark.parametrize("mode", ["shared", "experts"])
def test_text_tasks_classes_and_a_score(mode, bert_lr, tmp_path):
    length = write_labelled_texts(tmp_path / "length.jsonl", 60)
    ratio = write_labelled_texts(tmp_path / "ratio.csv", 60, task="score")
    out = tmp_path / "multi.safetensors"
    result = finetune_tasks(bert_lr, [f"length={length}", f"ratio={ratio}:score"], output=out, mode=mode, steps=3,
                            **{**FAST, "val_fraction": 0.25})
    length_model, ratio_model = lowrank_cli.load(out, task="length"), lowrank_cli.load(out, task="ratio")
    assert length_model.config.id2label == {0: "long", 1: "short"} and ratio_model.config.num_labels == 1
    assert set(result.scores["length"]) >= {"val_accuracy"} and set(result.scores["ratio"]) >= {"val_spearman"}
    tasks = {t["name"]: t for t in read_info(out)[0].multitask["tasks"]}
    assert tasks["ratio"]["task"] == "regression" and tasks["ratio"]["pairs"] and tasks["ratio"]["metric"] == "pearson"
    assert result.model.config.id2label == {0: "long", 1: "short"}  # the returned model is the first task's


def test_a_loaded_model_as_the_source_gives_what_its_file_gives(vit_lr, digit_tasks, tmp_path):
    """Each task trains its own copy: the second task must not start from the first one's adapters."""
    by_path, by_object = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    finetune_tasks(vit_lr, digit_tasks, output=by_path, mode="merge", steps=2, **FAST)
    finetune_tasks(lowrank_cli.load_model(vit_lr), digit_tasks, output=by_object, mode="merge", steps=2, **FAST)
    from safetensors.torch import load_file

    a, b = load_file(by_path), load_file(by_object)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input_fails_before_training(vit_lr, digit_tasks, tmp_path, bert_lr):
    out = tmp_path / "x.safetensors"
    digit = digit_tasks[0].split("=", 1)[1]
    cases = [
        (UsageError, "names task 'digit' twice", [digit_tasks[0], digit_tasks[0]], {}),
        (InputError, "task 'parity': '.*nope' does not exist", [digit_tasks[0], f"parity={tmp_path}/nope"], {}),
        (UsageError, "two tasks or more", digit_tasks[:1], {}),
        (UsageError, r"method dora does not go with mode orthogonal", digit_tasks, {"mode": "orthogonal",
                                                                                       "method": "dora"}),
        (UsageError, "schedule orders the tasks' batches of mode shared", digit_tasks, {"schedule": "sequential"}),
        (UsageError, "give merge_rank", digit_tasks, {"mode": "merge", "merge_rule": "svd"}),
        (UsageError, "task_weights names other", digit_tasks, {"mode": "merge", "merge_rule": "weighted",
                                                                "task_weights": {"other": 1.0}}),
        (UsageError, "images carry classes", [digit_tasks[0], f"p={digit}:score"], {}),
        (UsageError, "task_weights weigh the tasks' updates when mode merge", digit_tasks,
         {"mode": "orthogonal", "adapter_rank": 2, "task_weights": {"digit": 1.0, "parity": 2.0}}),
    ]
    for error, message, tasks, kw in cases:
        with pytest.raises(error, match=message):
            finetune_tasks(vit_lr, tasks, output=out, steps=1, **{**FAST, **kw})
    assert not out.exists() and not work_folder(out).exists()
    texts = tmp_path / "t.jsonl"
    texts.write_text(json.dumps({"text": "a b c", "label": "x"}) + "\n" + json.dumps({"text": "d e", "label": "y"}))
    with pytest.raises(UsageError, match="images.*texts|texts.*images"):
        finetune_tasks(bert_lr, [digit_tasks[0], f"t={texts}"], output=out, mode="shared", steps=1, **FAST)
