"""Labelled texts for fine-tuning (data/labelled_texts.py, data/task_data.py): classes from strings or whole numbers,
scores, pairs, .jsonl and .csv alike, a validation file read with the training file's classes, and every malformed
file refused with the line that is wrong."""

from __future__ import annotations

import json

import pytest

from lowrank_cli.data.labelled_texts import LabelledCollate, read_labelled_texts
from lowrank_cli.data.task_data import LabelledTextData, task_modality_for, task_of
from lowrank_cli.errors import InputError, UsageError


def _jsonl(path, rows):
    path.write_text("".join((json.dumps(r) if isinstance(r, dict) else r) + "\n" for r in rows))
    return path


def test_string_and_number_classes(tmp_path):
    texts = read_labelled_texts(_jsonl(tmp_path / "a.jsonl", [{"text": "x", "label": "pos"}, "",
                                                              {"text": "y", "label": "neg"}, "not json"]))
    assert texts.classes == ["neg", "pos"] and [r[2] for r in texts.records] == [1, 0] and texts.skipped == 1
    numbers = read_labelled_texts(_jsonl(tmp_path / "b.jsonl", [{"text": "x", "label": 10}, {"text": "y", "label": 2}]))
    assert numbers.classes == ["2", "10"] and [r[2] for r in numbers.records] == [1, 0]  # by value, not as text
    (tmp_path / "c.csv").write_text("label,text\n10,x\n2,y\n")
    assert read_labelled_texts(tmp_path / "c.csv").classes == ["2", "10"]


def test_scores_and_pairs(tmp_path):
    (tmp_path / "sts.csv").write_text('text,text_pair,score\n"a, b",c,0.5\nd,e,4\n')
    texts = read_labelled_texts(tmp_path / "sts.csv")
    assert texts.regression and texts.pairs and texts.records == [("a, b", "c", 0.5), ("d", "e", 4.0)]
    assert task_of(texts) == (None, True)


def test_validation_uses_the_training_classes(tmp_path):
    train = read_labelled_texts(_jsonl(tmp_path / "t.jsonl", [{"text": "x", "label": "a"}, {"text": "y", "label": "b"},
                                                              {"text": "z", "label": "c"}]))
    val = read_labelled_texts(_jsonl(tmp_path / "v.jsonl", [{"text": "x", "label": "c"}]), like=train)
    assert val.classes == ["a", "b", "c"] and val.records[0][2] == 2
    with pytest.raises(InputError, match="label\\(s\\) d that the task's classes"):
        read_labelled_texts(_jsonl(tmp_path / "w.jsonl", [{"text": "x", "label": "d"}]), like=train)
    with pytest.raises(InputError, match="holds scores, but the task has classes"):
        read_labelled_texts(_jsonl(tmp_path / "s.jsonl", [{"text": "x", "score": 1}]), like=train)


@pytest.mark.parametrize("rows,match", [
    ([{"text": "x"}, {"text": "y", "label": 1}], "line 1 has no 'label'"),
    ([{"text": "x", "label": 1}, {"text": "y", "label": "b"}], "mixed type: line 1 has the number 1, line 2"),
    ([{"text": "x", "label": True}, {"text": "y", "label": 0}], "is a bool"),
    ([{"text": "x", "label": 1.5}, {"text": "y", "label": 0}], "a number to regress on is a 'score'"),
    ([{"text": "x", "label": 1}, {"text": "y", "score": 0.3}], "mixes 'label' .line 1. and 'score' .line 2."),
    ([{"text": "x", "score": "high"}], "'score' \"high\" is not a finite number"),
    ([{"text": "x", "label": "a"}, {"text": "y", "label": "a"}], "a single class"),
    ([{"text": "x", "text_pair": "p", "label": "a"}, {"text": "y", "label": "b"}], "some records have a 'text_pair'"),
    (["[1, 2]", {"label": "a"}], "no usable record"),
])
def test_malformed_files(rows, match, tmp_path):
    with pytest.raises(InputError, match=match):
        read_labelled_texts(_jsonl(tmp_path / "bad.jsonl", rows))


def test_csv_needs_a_text_column_and_utf8(tmp_path):
    (tmp_path / "a.csv").write_text("sentence,label\nx,1\n")
    with pytest.raises(InputError, match="no 'text' column"):
        read_labelled_texts(tmp_path / "a.csv")
    (tmp_path / "b.csv").write_bytes(b"text,label\n\xff\xfe,1\n")
    with pytest.raises(InputError, match="not valid UTF-8"):
        read_labelled_texts(tmp_path / "b.csv")
    (tmp_path / "c.csv").write_text("text,label\nx,1\ny,pos\n")
    with pytest.raises(InputError, match="mixed type"):
        read_labelled_texts(tmp_path / "c.csv")


def test_modality_for_fine_tuning_data(tmp_path):
    assert isinstance(task_modality_for(tmp_path / "data.jsonl"), LabelledTextData)
    (tmp_path / "corpus.txt").write_text("x\n")
    with pytest.raises(InputError, match="not labelled data for fine-tuning"):
        task_modality_for(tmp_path / "corpus.txt")


def test_collate_pairs_and_scores():
    import tempfile
    from pathlib import Path

    from hf_fixtures import bert_tokenizer, write_bert_vocab

    tokenizer = bert_tokenizer(write_bert_vocab(Path(tempfile.mkdtemp()) / "vocab.txt"))
    batch = LabelledCollate(tokenizer, 8, regression=True)([("the word", "a new day", 0.5), ("the", "day", 2.0)])
    ids, labels, mask = batch.parts()
    assert labels.tolist() == [0.5, 2.0] and ids.shape == mask.shape and ids.shape[1] <= 8
    assert (ids == tokenizer.sep_token_id).sum(1).tolist() == [2, 2]  # text [SEP] pair [SEP]


def test_score_target_reads_the_score_else_the_label_as_a_number(tmp_path):
    rows = [{"text": "a", "text_pair": "b", "label": 3.8}, {"text": "c", "text_pair": "d", "label": "1"},
            {"text": "e", "text_pair": "f", "label": "x", "score": 0.25}]
    texts = read_labelled_texts(_jsonl(tmp_path / "stsb.jsonl", rows), target="score")
    assert texts.regression and [r[2] for r in texts.records] == [3.8, 1.0, 0.25]
    (tmp_path / "stsb.csv").write_text("text,text_pair,label\na,b,4.2\nc,d,0\n")
    assert [r[2] for r in read_labelled_texts(tmp_path / "stsb.csv", target="score").records] == [4.2, 0.0]
    with pytest.raises(InputError, match="holds class labels"):  # without the target, as before: classes
        read_labelled_texts(tmp_path / "stsb.csv", like=texts)
    assert read_labelled_texts(tmp_path / "stsb.csv", like=texts, target="score").records[0][2] == 4.2


@pytest.mark.parametrize("rows,match", [
    ([{"text": "x", "label": 1}, {"text": "y", "label": "pos"}],
     r"line 2: 'label' \"pos\" is not a finite number, and the task was asked as :score .*drop :score"),
    ([{"text": "x", "score": "nan"}], r"line 1: 'score' \"nan\" is not a finite number.*asked as :score"),
    ([{"text": "x", "label": True}], r"'label' true is not a finite number"),
])
def test_score_target_refuses_what_is_not_a_number(rows, match, tmp_path):
    with pytest.raises(InputError, match=match):
        read_labelled_texts(_jsonl(tmp_path / "bad.jsonl", rows), target="score")


def test_label_target_takes_classes_and_refuses_a_file_of_scores(tmp_path):
    both = [{"text": "x", "label": "a", "score": 1}, {"text": "y", "label": "b", "score": 2}]
    assert read_labelled_texts(_jsonl(tmp_path / "both.jsonl", both), target="label").classes == ["a", "b"]
    with pytest.raises(InputError, match=r"task asked for classes \(:label\) but '.*scores.jsonl' holds scores"):
        read_labelled_texts(_jsonl(tmp_path / "scores.jsonl", [{"text": "x", "score": 1}]), target="label")
    with pytest.raises(InputError, match="line 2 has a 'score' but no 'label'"):
        read_labelled_texts(_jsonl(tmp_path / "mixed.jsonl", [both[0], {"text": "y", "score": 2}]), target="label")
    with pytest.raises(InputError, match=r"is a float, not a class name.*or ask the task as :score"):
        read_labelled_texts(_jsonl(tmp_path / "sts.jsonl", [{"text": "x", "label": 3.5}]), target="label")
    with pytest.raises(UsageError, match="target 'scores' is not one of"):
        read_labelled_texts(tmp_path / "both.jsonl", target="scores")
