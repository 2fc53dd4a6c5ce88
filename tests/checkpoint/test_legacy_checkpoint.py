"""Checkpoints written by earlier versions of lrc load, report and evaluate exactly as those versions did: a ViT
written before the packages-per-stage layout (main at cd6f041; tests/data/legacy_vit.expected.json), and a
fine-tuned BERT and a two-task ViT (experts) written before the model families (main at 3e9849a;
legacy_bert.expected.json, legacy_multitask.expected.json, made by tests/data/write_legacy_files.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from helpers import run_cli

import lowrank_cli
from lowrank_cli.data.images import find_images
from lowrank_cli.evaluation.accuracy import evaluate

DATA = Path(__file__).resolve().parents[1] / "data"
LEGACY = DATA / "legacy_vit.safetensors"
EXPECTED = json.loads((DATA / "legacy_vit.expected.json").read_text())


def test_loads_and_computes_the_same_logits():
    model = lowrank_cli.load(LEGACY)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(x)
    # Bit-exact on the host that wrote it; other CPUs' kernels round differently in the last bits.
    torch.testing.assert_close(logits, torch.tensor(EXPECTED["logits"]), rtol=1e-5, atol=1e-5)  # the reference came from another CPU: BLAS differs in the last bits


def test_reports_the_same_document(capsys, monkeypatch):
    monkeypatch.chdir(DATA)
    code, out, err = run_cli(["report", LEGACY.name, "--json", "--per-layer"], capsys)
    assert code == 0, err
    report, expected = json.loads(out), EXPECTED["report"]
    # Where the file lies here differs from where it was written; everything else is the same.
    report["source"]["id"] = expected["source"]["id"]
    assert set(report) - set(expected) == {"ratio"}  # added since (adding a key keeps the report schema)
    assert {k: report[k] for k in expected} == expected


def test_evaluates_to_the_same_accuracy(digits_folder):
    images = find_images(digits_folder(32, 12), split="val")
    result = evaluate(lowrank_cli.load(LEGACY), images, batch_size=8, num_workers=0)
    assert (result["top1"], result["top5"], result["images"]) == (
        EXPECTED["eval"]["top1"], EXPECTED["eval"]["top5"], EXPECTED["eval"]["images"])


BERT = DATA / "legacy_bert.safetensors"
BERT_EXPECTED = json.loads((DATA / "legacy_bert.expected.json").read_text())
MULTI = DATA / "legacy_multitask.safetensors"
MULTI_EXPECTED = json.loads((DATA / "legacy_multitask.expected.json").read_text())


def _same_report(capsys, monkeypatch, path: Path, expected: dict) -> None:
    monkeypatch.chdir(DATA)
    code, out, err = run_cli(["report", path.name, "--json", "--per-layer"], capsys)
    assert code == 0, err
    report = json.loads(out)
    report["source"]["id"] = expected["source"]["id"]
    # Keys added to the report since (docs/report_schema.md: adding a key keeps the schema) are additions only.
    assert set(report) - set(expected) == {"ratio"}
    assert {k: report[k] for k in expected} == expected


def test_text_checkpoint_computes_the_same_logits():
    model = lowrank_cli.load(BERT)
    ids = torch.randint(5, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits, torch.tensor(BERT_EXPECTED["logits"]), rtol=1e-5, atol=1e-5)  # the reference came from another CPU: BLAS differs in the last bits


def test_text_checkpoint_reports_the_same_document(capsys, monkeypatch):
    _same_report(capsys, monkeypatch, BERT, BERT_EXPECTED["report"])


def test_text_checkpoint_evaluates_to_the_same_accuracy(tmp_path, capsys):
    from hf_fixtures import write_labelled_texts, write_tiny_bert

    tokenizer = write_tiny_bert(tmp_path / "bert", num_labels=2)  # the same WordPiece vocabulary it was tuned with
    val = write_labelled_texts(tmp_path / "val.jsonl", n=32, seed=1)
    code, out, err = run_cli(["eval", str(BERT), "--data", str(val), "--tokenizer", str(tokenizer), "--json",
                              "--workers", "0"], capsys)
    assert code == 0, err
    result, expected = json.loads(out), BERT_EXPECTED["eval"]
    assert (result["accuracy"], result["texts"]) == (expected["accuracy"], expected["texts"])


def test_multitask_checkpoint_computes_the_same_logits_per_task():
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for task, expected in MULTI_EXPECTED["logits"].items():
        with torch.no_grad():
            logits = lowrank_cli.load(MULTI, task=task)(x)
        torch.testing.assert_close(logits, torch.tensor(expected), rtol=1e-5, atol=1e-5)  # the reference came from another CPU: BLAS differs in the last bits


def test_multitask_checkpoint_reports_the_same_document(capsys, monkeypatch):
    _same_report(capsys, monkeypatch, MULTI, MULTI_EXPECTED["report"])


def test_multitask_checkpoint_evaluates_to_the_same_accuracy_per_task(digits_folder):
    images = find_images(digits_folder(16, 12), split="val")
    for task, expected in MULTI_EXPECTED["eval"].items():
        result = evaluate(lowrank_cli.load(MULTI, task=task), images, batch_size=8, num_workers=0)
        assert result["top1"] == expected, task
