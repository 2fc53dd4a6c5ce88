"""A checkpoint written by lrc before the packages-per-stage layout (main at cd6f041) loads, reports and
evaluates exactly as that version did (its outputs are in tests/data/legacy_vit.expected.json)."""

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
    assert torch.equal(logits, torch.tensor(EXPECTED["logits"]))


def test_reports_the_same_document(capsys, monkeypatch):
    monkeypatch.chdir(DATA)
    code, out, err = run_cli(["report", LEGACY.name, "--json", "--per-layer"], capsys)
    assert code == 0, err
    report, expected = json.loads(out), EXPECTED["report"]
    # Where the file lies here differs from where it was written; everything else is the same.
    report["source"]["id"] = expected["source"]["id"]
    assert report == expected


def test_evaluates_to_the_same_accuracy(digits_folder):
    images = find_images(digits_folder(32, 12), split="val")
    result = evaluate(lowrank_cli.load(LEGACY), images, batch_size=8, num_workers=0)
    assert (result["top1"], result["top5"], result["images"]) == (
        EXPECTED["eval"]["top1"], EXPECTED["eval"]["top5"], EXPECTED["eval"]["images"])
