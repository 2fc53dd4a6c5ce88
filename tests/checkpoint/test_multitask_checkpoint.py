"""The multi-task checkpoint (checkpoint.tasks): each task loads as the model built for it by hand (its head, its
expert adapters merged into plain layers), the file reads as an ordinary checkpoint of its first task, and a
damaged `lrc.multitask` or a wrong task name is one clear error."""

from __future__ import annotations

import json

import pytest
import torch
from multitask import DIGITS, PARITY, VIT, write_vit_tasks
from safetensors.torch import load_file, save_file

import lowrank_cli
from lowrank_cli.checkpoint.format import read_info
from lowrank_cli.checkpoint.io import read_checkpoint
from lowrank_cli.adapters.task_models import model_for_task
from lowrank_cli.checkpoint.tasks import task_names, write_multitask
from lowrank_cli.errors import InputError, UsageError
from lowrank_cli.evaluation.task_scores import model_classes
from lowrank_cli.layers.lowrank_linear import LowRankLinear

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(4, 3, VIT["img_size"], VIT["img_size"], generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{mode: (path, {task: model built by hand})} for a shared and an experts checkpoint."""
    root = tmp_path_factory.mktemp("multitask")
    return {mode: (root / f"{mode}.safetensors", write_vit_tasks(root / f"{mode}.safetensors", mode=mode))
            for mode in ("shared", "experts")}


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["shared", "experts"])
def test_each_task_loads_as_its_own_model(files, mode):
    path, built = files[mode]
    with torch.no_grad():
        first, parity = lowrank_cli.load(path), lowrank_cli.load(path, task="parity")
        assert close(first(X), built["digits"](X)) and first(X).shape == (4, 10)
        assert close(lowrank_cli.load(path, task="digits")(X), built["digits"](X))
        assert close(parity(X), built["parity"](X)) and parity(X).shape == (4, 2)
    for model in (first, parity):  # merged: plain layers only, the low-rank layers kept at their ranks
        assert not any(type(m).__module__.startswith("peft.") for m in model.modules())
        assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == 8
    assert set(parity.state_dict()) == set(built["parity"].state_dict())
    assert parity.lrc_info.finetune["task_name"] == "parity" and model_classes(parity) == PARITY
    assert model_classes(first) == DIGITS and first.lrc_info.finetune["multitask"] == mode


def test_experts_adapters_matter_and_the_file_reads_as_the_unmerged_backbone(files):
    path, built = files["experts"]
    loaded = read_checkpoint(path)  # what report, bench and card read: the backbone with the first head
    assert not any(k.startswith("tasks/") for k in loaded.model.state_dict())
    with torch.no_grad():
        base = loaded.model(X)
        assert base.shape == (4, 10) and (base - built["digits"](X)).abs().max() > 1e-3
        assert close(model_for_task(loaded, "parity")(X), built["parity"](X))
    with pytest.raises(UsageError, match="already holds the model of task 'parity': read the checkpoint again"):
        model_for_task(loaded, "digits")


def test_a_task_model_saves_and_loads_as_a_plain_checkpoint(files, tmp_path):
    path, built = files["experts"]
    out = lowrank_cli.save(lowrank_cli.load(path, task="parity"), tmp_path / "parity.safetensors")
    info, _ = read_info(out)
    assert info.multitask is None and info.spec.model_args["num_classes"] == 2
    with torch.no_grad():
        assert close(lowrank_cli.load(out)(X), built["parity"](X))


def test_task_names_and_the_record(files, tmp_path):
    path, _ = files["experts"]
    assert task_names(path) == task_names(read_info(path)[0]) == ["digits", "parity"]
    record = read_info(path)[0].multitask
    assert record["schema"] == 1 and record["mode"] == "experts" and record["overall"] == {"before": 0.5, "after": 0.8}
    assert record["tasks"][1]["adapters"]["method"] == "lora" and record["tasks"][1]["head"]["outputs"] == 2
    plain = lowrank_cli.save(lowrank_cli.load(path), tmp_path / "plain.safetensors")
    assert task_names(plain) == []


def test_unknown_task_lists_the_known_ones(files):
    path, _ = files["shared"]
    with pytest.raises(UsageError) as info:
        lowrank_cli.load(path, task="sts")
    assert str(info.value) == f"'sts' is not a task of '{path}': its tasks are digits, parity"


def test_task_needs_a_multitask_checkpoint_and_no_adapter_file(files, tmp_path):
    path, _ = files["shared"]
    plain = lowrank_cli.save(lowrank_cli.load(path), tmp_path / "plain.safetensors")
    with pytest.raises(UsageError, match=r"holds one task \(it is not a multi-task checkpoint\): leave task out"):
        lowrank_cli.load(plain, task="digits")
    with pytest.raises(UsageError, match="give one of them"):
        lowrank_cli.load(plain, task="digits", adapters=tmp_path / "a.safetensors")


def _rewrite(src, dst, change):
    """A copy of the checkpoint with its metadata (and tensors) changed by `change(meta, tensors)`."""
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(src))
    change(meta, tensors)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _record(meta):
    return json.loads(meta["lrc.multitask"])


def _set(meta, record):
    meta["lrc.multitask"] = json.dumps(record)


def _duplicate(meta, tensors):
    record = _record(meta)
    record["tasks"][1]["name"] = "digits"
    _set(meta, record)


def _newer(meta, tensors):
    _set(meta, {**_record(meta), "schema": 2})


def _headless(meta, tensors):
    for key in [k for k in tensors if k.startswith("tasks/parity/head/")]:
        del tensors[key]


def _no_adapters(meta, tensors):
    record = _record(meta)
    record["tasks"][0]["adapters"] = None
    _set(meta, record)


@pytest.mark.parametrize("change,message", [
    (lambda meta, tensors: meta.update({"lrc.multitask": "{tasks: ["}), "metadata 'lrc.multitask' is not valid JSON"),
    (_duplicate, "metadata 'lrc.multitask' names the task 'digits' twice: the file is corrupt; write it again"),
    (lambda meta, tensors: _set(meta, {**_record(meta), "tasks": []}), "has no tasks (a non-empty list of objects)"),
    (_newer, "(multi-task schema 2); this lrc"),
    (_headless, "names the task 'parity', whose head has no tensors in the file"),
    (_no_adapters, "gives the task 'digits' no adapters, which experts mode needs"),
], ids=["not-json", "duplicate", "no-tasks", "newer", "headless", "no-adapters"])
def test_a_damaged_record_is_one_input_error_at_read(files, tmp_path, change, message):
    path = _rewrite(files["experts"][0], tmp_path / "bad.safetensors", change)
    with pytest.raises(InputError) as info:
        read_info(path)
    assert message in str(info.value)
    if "newer" in message or "schema 2" in message:
        assert str(info.value).endswith("upgrade lrc")
    with pytest.raises(InputError):
        lowrank_cli.load(path, task="parity")


def test_write_refuses_incomplete_task_tensors(tmp_path):
    from helpers import make_tiny_vit
    from multitask import entry

    from lowrank_cli.adapters.files import head_tensors

    model = make_tiny_vit(**VIT)
    heads = head_tensors(model, ["head"])
    record = {"mode": "shared", "tasks": [entry("a", DIGITS, ["head"]), entry("b", DIGITS, ["head"])]}
    with pytest.raises(UsageError, match="no tensor of the head of task 'b'"):
        write_multitask(tmp_path / "x.safetensors", model, record, {"a": heads})
    with pytest.raises(UsageError, match="'c', which is not a task of the record"):
        write_multitask(tmp_path / "x.safetensors", model, record, {"a": heads, "b": heads, "c": heads})
    adapted = {**heads, "blocks.0.attn.qkv.lora_A.default.weight": torch.zeros(4, 32)}
    with pytest.raises(UsageError, match="only experts mode keeps adapters per task"):
        write_multitask(tmp_path / "x.safetensors", model, record, {"a": adapted, "b": heads})
    with pytest.raises(UsageError, match="names the task 'a' twice"):
        write_multitask(tmp_path / "x.safetensors", model, {**record, "tasks": [record["tasks"][0]] * 2},
                        {"a": heads})
    assert not (tmp_path / "x.safetensors").exists()
    path = write_multitask(tmp_path / "x.safetensors", model, record, {"a": heads, "b": heads}, dtype=torch.bfloat16)
    assert load_file(str(path))["tasks/b/head/head.weight"].dtype == torch.bfloat16
    assert getattr(model, "lrc_info", None) is None or model.lrc_info.multitask is None  # the model's record unchanged
