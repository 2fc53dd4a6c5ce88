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
    assert task_score({"pearson": 0.5, "spearman": 0.1}) == ("pearson", 0.75)
    assert task_score({"spearman": 0.5}) == ("spearman", 0.75)
    assert task_score({"top1": 0.9, "top5": 1.0}) == ("top1", 0.9)
    assert overall_score({"a": {"accuracy": 0.8}, "b": {"spearman": -0.2}, "c": {"top1": 0.5}}) == pytest.approx(
        (0.8 + 0.4 + 0.5) / 3)
    with pytest.raises(ValueError, match="no accuracy or correlation"):
        task_score({"loss": 1.0})


def test_task_sets_read_each_task_as_asked(tmp_path, digits_folder):
    import json

    from hf_fixtures import write_labelled_texts

    from lowrank_cli.data.task_data import LabelledTextData, check_same_modality, task_sets

    sst = write_labelled_texts(tmp_path / "sst.jsonl", 40)
    rows = [json.loads(line) for line in write_labelled_texts(tmp_path / "s.jsonl", 40, task="score").open()]
    stsb = tmp_path / "stsb.jsonl"  # as STS-B keeps it: the similarity in `label`
    stsb.write_text("".join(json.dumps({"text": r["text"], "text_pair": r["text_pair"], "label": r["score"]}) + "\n"
                            for r in rows))
    modality, train, val, val_from = task_sets(TaskSpec("sts", stsb, "score"), evaluate=True, seed=0,
                                               val_fraction=0.25)
    assert isinstance(modality, LabelledTextData) and train.regression and val.regression
    assert (len(train), len(val)) == (30, 10) and "10 of the 40 training samples" in val_from
    assert sorted(r[2] for r in train.records + val.records) == sorted(r["score"] for r in rows)
    _, train, val, _ = task_sets(TaskSpec("sst", sst), evaluate=False, seed=0, val_fraction=None)
    assert train.classes == ["long", "short"] and val is None
    digits = digits_folder(8, 5)
    images, train, val, val_from = task_sets(TaskSpec("digits", digits, "label"), evaluate=True, seed=0,
                                             val_fraction=None)
    assert train.classes == [str(d) for d in range(10)] and val_from == str(digits / "val")
    check_same_modality([TaskSpec("sst", sst), TaskSpec("sts", stsb)], [LabelledTextData(), modality])
    with pytest.raises(UsageError, match="task 'sst' holds texts and task 'digits' images.*every task texts"):
        check_same_modality([TaskSpec("sst", sst), TaskSpec("sts", stsb), TaskSpec("digits", digits)],
                            [LabelledTextData(), modality, images])


def test_task_sets_name_the_task_in_their_errors(tmp_path, digits_folder):
    from hf_fixtures import write_labelled_texts

    from lowrank_cli.data.task_data import task_sets

    sst = write_labelled_texts(tmp_path / "sst.jsonl", 8)
    with pytest.raises(InputError, match=r"task 'sst': '.*sst.jsonl' line 1: 'label' \"(long|short)\" is not a "
                                         r"finite number, and the task was asked as :score"):
        task_sets(TaskSpec("sst", sst, "score"), evaluate=True, seed=0, val_fraction=None)
    with pytest.raises(UsageError, match="task 'digits': '.*' is an image folder, whose images carry classes"):
        task_sets(TaskSpec("digits", digits_folder(8, 5), "score"), evaluate=True, seed=0, val_fraction=None)
    with pytest.raises(UsageError, match="task 'sst': val_fraction 1 of 8 training samples would leave none"):
        task_sets(TaskSpec("sst", sst), evaluate=True, seed=0, val_fraction=1.0)
