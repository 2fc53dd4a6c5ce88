"""`lrc eval MODEL --task NAME=PATH ...` on multi-task checkpoints built by hand: each task scored by its own model
(the same numbers as evaluating the hand-built models directly), the overall score, images and texts, and every
expected failure as one `Error:` line with its exit code."""

from __future__ import annotations

import json

import pytest
from digits import relabel_imagefolder
from helpers import error_lines, run_cli
from hf_fixtures import bert_tokenizer, write_labelled_texts
from multitask import write_bert_tasks, write_vit_tasks

import lowrank_cli
from lowrank_cli.evaluation.accuracy import evaluate
from lowrank_cli.evaluation.multitask import evaluate_tasks
from lowrank_cli.evaluation.task_scores import evaluate_texts

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = ["--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(digits_folder, tmp_path_factory):
    digits = digits_folder(16, 8)
    parity = relabel_imagefolder(digits, tmp_path_factory.mktemp("parity"),
                                 lambda digit: "even" if int(digit) % 2 == 0 else "odd")
    return {"digits": digits, "parity": parity}


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    path = tmp_path_factory.mktemp("experts") / "experts.safetensors"
    return path, write_vit_tasks(path, mode="experts")


def test_each_task_on_its_data_then_the_overall(experts, data, capsys):
    path, built = experts
    code, out, err = run_cli(["eval", path, "--task", f"digits={data['digits']}", "--task", f"parity={data['parity']}",
                              "--json", *CPU], capsys)
    assert code == 0, err
    doc = json.loads(out)
    expected = {name: evaluate(built[name], data[name], num_workers=0) for name in ("digits", "parity")}
    assert list(doc["tasks"]) == ["digits", "parity"]
    for name in expected:
        assert doc["tasks"][name]["top1"] == expected[name]["top1"]
        assert doc["tasks"][name]["images"] == 20 and doc["tasks"][name]["data"] == str(data[name])
    assert doc["overall"] == pytest.approx((expected["digits"]["top1"] + expected["parity"]["top1"]) / 2)
    assert doc["model"] == str(path)
    code, out, err = run_cli(["eval", path, "--task", f"parity={data['parity']}", *CPU], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"parity   top-1 {100 * expected['parity']['top1']:.2f}%")
    assert lines[1].startswith(f"overall  {expected['parity']['top1']:.4f}") and "parity top1" in lines[1]


def test_the_python_api_gives_the_same_and_data_alone_scores_the_first_task(experts, data, capsys):
    path, built = experts
    result = evaluate_tasks(path, [f"parity={data['parity']}"], device="cpu")
    assert result["tasks"]["parity"]["top1"] == evaluate(built["parity"], data["parity"], num_workers=0)["top1"]
    code, out, err = run_cli(["eval", path, "--data", data["digits"], "--json", *CPU], capsys)
    assert code == 0, err
    assert json.loads(out)["top1"] == evaluate(built["digits"], data["digits"], num_workers=0)["top1"]
    assert "a multi-task checkpoint; scoring its first task 'digits'" in err


@pytest.mark.parametrize("args,code,message", [
    (["--task", "sts={digits}"], 2, "'sts' is not a task of '{path}': its tasks are digits, parity"),
    (["--task", "digits={missing}"], 3, "task 'digits': '{missing}' does not exist: check the path"),
    (["--task", "digits={digits}", "--task", "digits={digits}"], 2, "--task names task 'digits' twice"),
    (["--task", "digits={digits}:score"], 2, "task 'digits' of the checkpoint predicts classes (0, 1, 2"),
    (["--task", "digits={digits}", "--data", "{digits}"], 2, "--data and --task both say what to score"),
    ([], 2, "say what to score the model on: --data DIR|FILE"),
], ids=["unknown", "missing", "twice", "score-for-classes", "data-and-task", "neither"])
def test_refusals(experts, data, tmp_path, capsys, args, code, message):
    path, _ = experts
    fields = {"digits": data["digits"], "missing": tmp_path / "missing", "path": path}
    got, out, err = run_cli(["eval", path, *[a.format(**fields) for a in args], *CPU], capsys)
    assert got == code, err
    assert len(error_lines(err)) == 1 and message.format(**fields) in error_lines(err)[0], err
    assert out == "" and "Traceback" not in err


def test_task_on_a_single_task_checkpoint_points_at_data(experts, data, tmp_path, capsys):
    plain = lowrank_cli.save(lowrank_cli.load(experts[0], task="parity"), tmp_path / "parity.safetensors")
    code, out, err = run_cli(["eval", plain, "--task", f"parity={data['parity']}", *CPU], capsys)
    assert code == 2 and out == ""
    expected = (f"Error: '{plain}' holds one task (it is not a multi-task checkpoint): --task picks the tasks of a "
                "multi-task checkpoint; evaluate this model on its labelled data alone (--data)")
    assert error_lines(err) == [expected]


def test_text_tasks_a_class_and_a_score(bert_folder, tmp_path, capsys):
    path = tmp_path / "bert_tasks.safetensors"
    built = write_bert_tasks(path, bert_folder)
    length = write_labelled_texts(tmp_path / "length.jsonl", 24, seed=1)
    sts = write_labelled_texts(tmp_path / "sts.jsonl", 24, seed=2, task="score")
    code, out, err = run_cli(["eval", path, "--task", f"length={length}", "--task", f"sts={sts}:score", "--json",
                              "--device", "cpu"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    tokenizer = bert_tokenizer(bert_folder / "vocab.txt")
    expected = {"length": evaluate_texts(built["length"], length, tokenizer),
                "sts": evaluate_texts(built["sts"], sts, tokenizer)}
    assert doc["tasks"]["length"]["accuracy"] == pytest.approx(expected["length"]["accuracy"], abs=1e-9)
    assert doc["tasks"]["sts"]["spearman"] == pytest.approx(expected["sts"]["spearman"], abs=1e-6)
    assert doc["tasks"]["sts"]["texts"] == 24 and "accuracy" not in doc["tasks"]["sts"]
    assert doc["overall"] == pytest.approx((expected["length"]["accuracy"] + (expected["sts"]["pearson"] + 1) / 2) / 2,
                                           abs=1e-6)
    code, out, err = run_cli(["eval", path, "--task", f"sts={length}:label", "--device", "cpu"], capsys)
    assert code == 2 and "task 'sts' of the checkpoint predicts a score, not a class label" in err


def test_a_score_kept_in_label_trains_and_evaluates(bert_folder, tmp_path, capsys):
    """STS-B keeps the similarity in `label`: `:score` reads it as a number when training and evaluating."""
    import json as _json

    rows = [{"text": f"w{i} a b", "text_pair": f"a b w{i % 3}", "label": round(i / 7, 3)} for i in range(40)]
    sts = tmp_path / "sts.jsonl"
    sts.write_text("".join(_json.dumps(r) + "\n" for r in rows))
    cls = tmp_path / "cls.jsonl"
    cls.write_text("".join(_json.dumps({"text": f"w{i} a", "label": "x" if i % 2 else "y"}) + "\n" for i in range(40)))
    out = tmp_path / "multi.safetensors"
    code, stdout, err = run_cli(["finetune", bert_folder, "--task", f"c={cls}", "--task", f"s={sts}:score", "--steps",
                                 "2", "--batch-size", "8", "--workers", "0", "--device", "cpu", "-o", out], capsys)
    assert code == 0, err
    for given in (f"s={sts}:score", f"s={sts}"):  # the task's recorded kind is enough
        code, stdout, err = run_cli(["eval", out, "--task", given, "--device", "cpu", "--json"], capsys)
        assert code == 0, err
        assert set(_json.loads(stdout)["tasks"]["s"]) >= {"pearson", "spearman"}
