"""`lrc report` of a multi-task checkpoint: the model as the file rebuilds it (the backbone with the first task's
head), plus its tasks (kind, metric and held-out value, trainable parameters), the mode and the overall score, in
the table, the markdown and the JSON."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli
from multitask import DIGITS, PARITY, write_vit_tasks

from lowrank_cli.evaluation.report import build_report, held_out_score

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "experts.safetensors"
    write_vit_tasks(path, mode="experts")
    return path


def test_json_lists_the_tasks_and_the_mode(experts, capsys):
    code, out, err = run_cli(["report", experts, "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["multitask"] == {"schema": 1, "mode": "experts", "method": "lora", "overall": {"before": 0.5,
                                                                                             "after": 0.8},
                                "schedule": "round-robin"}
    digits, parity = doc["tasks"]
    assert (digits["name"], digits["classes"], digits["metric"], digits["held_out"]) == ("digits", DIGITS, "top1", 0.9)
    assert (parity["name"], parity["classes"], parity["held_out"]) == ("parity", PARITY, pytest.approx(0.7))
    # the trainable parameters recorded: the head (32 x outputs + outputs) and LoRA rank 4 on both factors of the 8
    # low-rank layers of the 2 blocks (each factor: 4 x (d_in + d_out))
    rank = {"qkv": 8, "proj": 8, "fc1": 8, "fc2": 8}
    dims = {"qkv": (32, 96), "proj": (32, 32), "fc1": (32, 128), "fc2": (128, 32)}
    lora = 2 * sum(4 * (d_in + rank[n]) + 4 * (rank[n] + d_out) for n, (d_in, d_out) in dims.items())
    assert digits["trainable_parameters"] == 32 * 10 + 10 + lora
    assert parity["trainable_parameters"] == 32 * 2 + 2 + lora
    assert doc["params"]["total"] == build_report(str(experts)).document["params"]["total"]
    assert doc["model"]["model_args"]["num_classes"] == 10  # the first task's head


def test_table_and_markdown(experts, capsys):
    code, out, err = run_cli(["report", experts], capsys)
    assert code == 0, err
    assert "2 tasks (digits, parity), experts mode (lora), overall held-out score 0.8" in out
    rows = [line for line in out.splitlines() if line.strip("│ ").startswith(("digits", "parity"))]
    assert len(rows) == 2 and "classes 10" in rows[0] and "0.9" in rows[0] and "classes 2" in rows[1]
    code, out, err = run_cli(["report", experts, "--markdown"], capsys)
    assert code == 0, err
    assert "| task | kind | metric | held-out | trainable |" in out
    assert "| parity | classes 2 | top1 | 0.7 |" in out


def test_held_out_score_reads_the_recorded_forms():
    assert held_out_score({"val_top1": 0.5}, "top1") == 0.5
    assert held_out_score({"spearman": 0.25}, "spearman") == 0.25
    assert held_out_score({"after": {"val_accuracy": 0.75}, "metric": "val_accuracy"}, "accuracy") == 0.75
    assert held_out_score({"val_top1": 0.5}, "accuracy") is None and held_out_score(None, "top1") is None
