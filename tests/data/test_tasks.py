"""--task NAME=PATH[:label|:score]: parsing and the refusals."""

from __future__ import annotations

import pytest

from lowrank_cli.data.tasks import TaskSpec, parse_task, parse_tasks
from lowrank_cli.errors import InputError, UsageError
from lowrank_cli.evaluation.task_scores import overall_score, task_score


def test_names_paths_and_targets(tmp_path):
    (tmp_path / "a.jsonl").write_text("")
    (tmp_path / "b:c.jsonl").write_text("")  # a colon inside a file name is the path's, not a target
    specs = parse_tasks([f"sst={tmp_path}/a.jsonl", f"sts={tmp_path}/a.jsonl:score",
                         f"para={tmp_path}/a.jsonl:label", f"odd={tmp_path}/b:c.jsonl"])
    assert [(s.name, s.path.name, s.target) for s in specs] == [
        ("sst", "a.jsonl", None), ("sts", "a.jsonl", "score"), ("para", "a.jsonl", "label"), ("odd", "b:c.jsonl", None)]
    assert str(specs[1]) == f"sts={tmp_path}/a.jsonl:score"


@pytest.mark.parametrize("text,message", [
    ("sst", "has no path"), ("sst=", "has no path"), ("s t=x.jsonl", "must be a word"),
    ("=x.jsonl", "must be a word"), ("a.b=x.jsonl", "must be a word"), ("sts=x.jsonl:scores", "':scores' is not a target")])
def test_malformed_tasks_are_usage_errors(text, message):
    with pytest.raises(UsageError, match=message):
        parse_task(text)


def test_two_tasks_with_one_name_and_a_missing_file(tmp_path):
    (tmp_path / "a.jsonl").write_text("")
    with pytest.raises(UsageError, match=r"names task 'sst' twice .*give each task its own name"):
        parse_tasks([f"sst={tmp_path}/a.jsonl", f"sst={tmp_path}/a.jsonl:score"])
    with pytest.raises(InputError, match=r"task 'para': '.*missing.jsonl' does not exist"):
        parse_tasks([f"sst={tmp_path}/a.jsonl", f"para={tmp_path}/missing.jsonl"])
    assert parse_tasks([TaskSpec("x", tmp_path / "nope")], check_files=False)[0].name == "x"


def test_overall_score_is_the_mean_of_accuracies_and_shifted_correlations():
    assert task_score({"val_accuracy": 0.8, "val_loss": 3.0}) == ("accuracy", 0.8)
    assert task_score({"pearson": 0.1, "spearman": 0.5}) == ("spearman", 0.75)
    assert task_score({"top1": 0.9, "top5": 1.0}) == ("top1", 0.9)
    assert overall_score({"a": {"accuracy": 0.8}, "b": {"spearman": -0.2}, "c": {"top1": 0.5}}) == pytest.approx(
        (0.8 + 0.4 + 0.5) / 3)
    with pytest.raises(ValueError, match="no accuracy or correlation"):
        task_score({"loss": 1.0})
