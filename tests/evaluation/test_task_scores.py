"""Scores of fine-tuned models (evaluation/task_scores.py): accuracy, and Pearson / Spearman as scipy computes them."""

from __future__ import annotations

import pytest
import torch

from lowrank_cli.evaluation.task_scores import pearson, ranks, scores, spearman


def test_correlations_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    torch.manual_seed(0)
    x = torch.randn(50)
    y = 0.5 * x + torch.randn(50)
    y[3] = y[4]  # ties
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x.numpy(), y.numpy())[0], abs=1e-6)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x.numpy(), y.numpy())[0], abs=1e-6)
    assert ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert pearson(torch.ones(4), torch.arange(4.0)) == 0.0  # a constant prediction correlates with nothing


def test_accuracy_and_regression_scores():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert scores(logits, torch.tensor([0, 1, 1]), regression=False) == {"accuracy": pytest.approx(2 / 3)}
    result = scores(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([1.0, 2.0, 4.0]), regression=True)
    assert result["spearman"] == pytest.approx(1.0) and result["pearson"] < 1.0
