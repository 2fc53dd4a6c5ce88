"""`lrc finetune` as a user runs it: the digits relabelled as parity on a compressed tiny ViT, then `lrc eval` and
`lrc report` on the output; labelled sentences on a compressed tiny BERT; and every expected failure as one
`Error:` line with its exit code, nothing written."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest
from digits import relabel_imagefolder
from helpers import error_lines, make_tiny_vit, run_cli
from hf_fixtures import write_labelled_texts

import lowrank_cli
from lowrank_cli.checkpoint.format import record_source

VIT = dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
FAST = ["--steps", "3", "--batch-size", "8", "--workers", "0", "--device", "cpu"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def parity(digits_folder, tmp_path_factory):
    return relabel_imagefolder(digits_folder(16, 8), tmp_path_factory.mktemp("parity"),
                               lambda digit: "even" if int(digit) % 2 == 0 else "odd")


@pytest.fixture(scope="module")
def vit_lr(tmp_path_factory):
    model = make_tiny_vit(**VIT)
    lowrank_cli.factorize(model, kappa=2, device="cpu")
    return lowrank_cli.save(model, tmp_path_factory.mktemp("vit") / "vit_lr.safetensors")


def test_finetune_then_eval_and_report(vit_lr, parity, tmp_path, capsys):
    out = tmp_path / "parity_lr.safetensors"
    code, stdout, err = run_cli(["finetune", vit_lr, "--data", parity, "--method", "lora", "--adapter-rank", "4",
                                 *FAST, "-o", out], capsys)
    assert code == 0, err
    assert "Method lora:" in err and "trainable parameters" in err
    assert "trainable" in stdout and "val_top1" in stdout
    code, stdout, err = run_cli(["eval", out, "--data", parity, "--workers", "0", "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["images"] == 20
    code, stdout, err = run_cli(["report", out, "--json"], capsys)
    assert code == 0, err
    before = sum(p.numel() for p in lowrank_cli.load(vit_lr).parameters())
    report = json.loads(stdout)
    assert report["params"]["total"] == before - (32 * 10 + 10) + (32 * 2 + 2)
    assert report["finetune"]["method"] == "lora" and report["finetune"]["classes"] == ["even", "odd"]
    code, stdout, err = run_cli(["report", out], capsys)
    assert code == 0 and "lora, 2 classes ([even, odd])" in stdout, err


def test_json_summary_and_no_merge(vit_lr, parity, tmp_path, capsys):
    out = tmp_path / "adapters.safetensors"
    code, stdout, err = run_cli(["finetune", vit_lr, "--data", parity, "--method", "rlrr", "--no-merge", *FAST,
                                 "--json", "-o", out], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["settings"]["merged"] is False and 0 < summary["trainable_share"] < 1
    assert lowrank_cli.load(vit_lr, adapters=out).num_classes == 2
    code, stdout, err = run_cli(["eval", out, "--data", parity, "--workers", "0", "--json"], capsys)  # self-describing
    assert code == 0 and json.loads(stdout)["images"] == 20 and "is an adapter file: applying it to its base" in err
    moved = tmp_path / "moved"
    moved.mkdir()
    base_gone = out.rename(moved / out.name)
    Path(vit_lr).rename(moved / "base_elsewhere.safetensors")
    try:
        code, _, err = run_cli(["eval", base_gone, "--data", parity, "--workers", "0"], capsys)
        assert code == 3 and error_lines(err) == [error_lines(err)[0]] and "whose base" in err and "cannot be found" in err
    finally:
        (moved / "base_elsewhere.safetensors").rename(vit_lr)


def _no_peft(monkeypatch):
    real = builtins.__import__

    def blocked(name, *args, **kwargs):
        if name == "peft" or name.startswith("peft."):
            raise ImportError("No module named 'peft'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", blocked)


@pytest.mark.parametrize("args,code,message", [
    (["--method", "lora", "--adapter-rank", "0"], 2, "--adapter-rank"),
    (["--method", "lora", "--targets", r"blocks\.9\..*"], 2, r"--targets 'blocks\.9\..*' matches no linear layer"),
    (["--method", "rlrr", "--adapter-rank", "4"], 2, "--adapter-rank is for --method lora or dora"),
    (["--method", "full", "--no-merge"], 2, "--no-merge writes the adapters alone"),
    (["--gamma", "1"], 2, "--gamma weighs the logit distillation from a --teacher"),
    (["--method", "prefix"], 2, "--method 'prefix' is not one of head, full, lora, dora, rlrr"),
    (["--teacher", "PLACEHOLDER_VIT"], 3, "has 10 outputs and the task 2"),
])
def test_bad_options(args, code, message, vit_lr, parity, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    args = [str(vit_lr) if a == "PLACEHOLDER_VIT" else a for a in args]
    got, _, err = run_cli(["finetune", vit_lr, "--data", parity, *FAST, *args, "-o", out], capsys)
    assert got == code and len(error_lines(err)) == 1, err
    assert message in error_lines(err)[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_dora_without_the_extra(vit_lr, parity, tmp_path, capsys, monkeypatch):
    _no_peft(monkeypatch)
    code, _, err = run_cli(["finetune", vit_lr, "--data", parity, "--method", "dora", *FAST, "-o",
                            tmp_path / "out.safetensors"], capsys)
    assert code == 6 and error_lines(err) == [
        "Error: --method dora uses Hugging Face peft, which is not installed: pip install 'lowrank-cli[finetune]'"]


def test_bad_data(vit_lr, bert_folder, tmp_path, capsys):
    cases = {
        "no_labels.jsonl": '{"text": "the word"}\n{"text": "a new day"}\n',
        "mixed.jsonl": '{"text": "the word", "label": 1}\n{"text": "a new day", "label": "two"}\n',
    }
    for name, content in cases.items():
        (tmp_path / name).write_text(content)
        code, _, err = run_cli(["finetune", bert_folder, "--data", tmp_path / name, *FAST, "-o",
                                tmp_path / "out.safetensors"], capsys)
        assert code == 3 and len(error_lines(err)) == 1, err
    _, _, err = run_cli(["finetune", bert_folder, "--data", tmp_path / "no_labels.jsonl", *FAST, "-o",
                         tmp_path / "o.safetensors"], capsys)
    assert "no 'label' (a class) or 'score'" in err
    assert not (tmp_path / "out.safetensors").exists()


def test_eval_refuses_other_classes(vit_lr, parity, digits_folder, tmp_path, capsys):
    out = tmp_path / "parity.safetensors"
    assert run_cli(["finetune", vit_lr, "--data", parity, "--method", "head", *FAST, "-o", out], capsys)[0] == 0
    swapped = relabel_imagefolder(digits_folder(16, 8), tmp_path / "swapped",
                                  lambda digit: "a_odd" if int(digit) % 2 else "b_even")
    code, _, err = run_cli(["eval", out, "--data", swapped, "--workers", "0"], capsys)
    assert code == 3 and "not the classes the model was fine-tuned on (even, odd" in err


def test_text_classifier_then_eval(bert_folder, tmp_path, capsys):
    loaded = lowrank_cli.load_model(str(bert_folder))
    lowrank_cli.factorize(loaded.model, kappa=2, device="cpu")
    record_source(loaded.model, loaded.source)
    bert_lr = lowrank_cli.save(loaded.model, tmp_path / "bert_lr.safetensors")
    train = write_labelled_texts(tmp_path / "train.csv", 48)
    dev = write_labelled_texts(tmp_path / "dev.jsonl", 16, seed=1)
    out = tmp_path / "sst_lr.safetensors"
    code, stdout, err = run_cli(["finetune", bert_lr, "--data", train, "--val-data", dev, "--method", "dora", *FAST,
                                 "-o", out], capsys)
    assert code == 0, err
    assert "val_accuracy" in stdout
    code, stdout, err = run_cli(["eval", out, "--data", dev, "--json"], capsys)
    assert code == 0, err
    result = json.loads(stdout)
    assert result["texts"] == 16 and 0 <= result["accuracy"] <= 1


def test_two_gloo_processes_write_one_output(vit_lr, parity, tmp_path):
    """Under torchrun: peft's adapters in DDP, the data sharded, one output and one JSON document."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lowrank_cli",
           "finetune", str(vit_lr), "--data", str(parity), "--method", "dora", *FAST, "--batch-size", "4",
           "-o", str(out), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["settings"]["processes"] == 2 and summary["samples_seen"] == 3 * 8
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".safetensors") == ["ddp.safetensors"]
    assert lowrank_cli.load(out).num_classes == 2


# ------------------------------------------------------------------------------------------------ several tasks


@pytest.fixture(scope="module")
def two_tasks(digits_folder, parity):
    return ["--task", f"digit={digits_folder(16, 8)}", "--task", f"parity={parity}"]


def test_multitask_finetune_then_eval_report_and_load(vit_lr, two_tasks, tmp_path, capsys):
    out = tmp_path / "multi.safetensors"
    code, stdout, err = run_cli(["finetune", vit_lr, *two_tasks, "--multitask", "merge", "--merge", "svd",
                                 "--merge-rank", "2", "--adapter-rank", "4", *FAST, "-o", out], capsys)
    assert code == 0, err
    assert "parity: Method lora:" in err and "overall" in stdout and "merge" in stdout
    code, stdout, err = run_cli(["eval", out, *two_tasks, "--workers", "0", "--json"], capsys)
    assert code == 0, err
    scores = json.loads(stdout)
    recorded = lowrank_cli.checkpoint.format.read_info(out)[0].multitask
    assert scores["overall"] == pytest.approx(recorded["overall"]["after"])  # the record says what eval measures
    code, stdout, err = run_cli(["report", out], capsys)
    assert code == 0 and "parity" in stdout and "merge" in stdout, err
    assert lowrank_cli.load(out, task="parity").num_classes == 2


def test_multitask_json_summary(vit_lr, two_tasks, tmp_path, capsys):
    out = tmp_path / "shared.safetensors"
    code, stdout, err = run_cli(["finetune", vit_lr, *two_tasks, "--multitask", "shared", "--schedule", "sequential",
                                 "--method", "head", *FAST, "--json", "-o", out], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["mode"] == "shared" and summary["settings"]["schedule"] == "sequential"
    assert [t["name"] for t in summary["tasks"]] == ["digit", "parity"]
    assert set(summary["scores"]) == {"digit", "parity"} and 0 <= summary["overall"]["after"] <= 1


@pytest.mark.parametrize("args,code,message", [
    (["--task", "a=x", "--task", "a=y"], 3, "x' does not exist"),
    (["--task", "d={d}", "--task", "d={d}"], 2, "names task 'd' twice"),
    (["--task", "d={d}", "--data", "{d}"], 2, "--data is one task and --task one of several"),
    (["--data", "{d}", "--merge", "svd"], 2, "--merge belongs to a multi-task run"),
    (["--task", "d={d}", "--task", "e={d}", "--schedule", "sequential"], 2,
     "--schedule orders the tasks' batches of --multitask shared"),
    (["--task", "d={d}", "--task", "e={d}", "--multitask", "orthogonal", "--method", "rlrr"], 2,
     "--method rlrr does not go with --multitask orthogonal"),
    (["--task", "d={d}", "--task", "e={d}", "--multitask", "merge", "--task-weight", "d"], 2,
     "--task-weight 'd' is not NAME=W"),
    (["--task", "d={d}", "--task", "e={d}:score"], 2, "task 'e'.*images carry classes"),
    (["--task", "d={d}", "--task", "e={d}", "--no-merge"], 2, "leave out --no-merge"),
    (["--task", "d={d}"], 2, "two tasks or more"),
    ([], 2, "no training data: give --data PATH"),
])
def test_multitask_bad_input_is_one_error_line(vit_lr, parity, args, code, message, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    args = [a.replace("{d}", str(parity)) for a in args]
    found, stdout, err = run_cli(["finetune", vit_lr, *args, *FAST, "-o", out], capsys)
    lines = error_lines(err)
    assert found == code and len(lines) == 1, err
    import re

    assert re.search(message, lines[0]), lines[0]
    assert not out.exists() and not any(p.name.startswith(".x.safetensors") for p in tmp_path.iterdir())


@pytest.mark.parametrize("mode", ["shared", "experts"])
def test_multitask_under_two_gloo_processes(mode, vit_lr, two_tasks, tmp_path):
    """shared: every task's head in DDP (a step uses one); experts: one process group per task, one after the
    other. One checkpoint, one JSON document, the work folder gone."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lowrank_cli",
           "finetune", str(vit_lr), *two_tasks, "--multitask", mode, *FAST, "--batch-size", "4", "-o", str(out),
           "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["mode"] == mode and set(summary["scores"]) == {"digit", "parity"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp.metrics.jsonl", "ddp.safetensors"]
    assert lowrank_cli.load(out, task="parity").num_classes == 2
