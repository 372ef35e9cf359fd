"""Metric definitions: known values, agreement of the bootstrap arithmetic with torchmetrics, sane CIs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pneumo_exp.classify.metrics import _confusion_metrics, bootstrap_intervals, classification_metrics


def one_hot_probabilities(predictions: list[int]) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(predictions), 3).float() * 0.9 + 0.1 / 3


def test_constant_prediction_matches_the_original_study():
    """Always NORMAL on the official test split: accuracy 0.375, macro recall 1/3 (the broken study's number)."""
    targets = torch.tensor([0] * 234 + [1] * 242 + [2] * 148)
    metrics = classification_metrics(one_hot_probabilities([0] * 624), targets)
    assert metrics["acc"] == pytest.approx(234 / 624)
    assert metrics["recall_macro"] == pytest.approx(1 / 3)
    assert metrics["f1_macro"] == pytest.approx((2 * 0.375 / 1.375) / 3, abs=1e-6)
    assert metrics["recall_NORMAL"] == 1.0 and metrics["recall_VIRUS"] == 0.0
    assert metrics["confusion_matrix"][0] == [234, 0, 0]


def test_perfect_predictions():
    targets = [0, 1, 2, 2, 1, 0]
    metrics = classification_metrics(one_hot_probabilities(targets), torch.tensor(targets))
    assert metrics["acc"] == metrics["f1_macro"] == metrics["auroc_macro"] == 1.0


def test_numpy_confusion_arithmetic_equals_torchmetrics():
    rng = np.random.default_rng(1)
    targets = rng.integers(0, 3, 300)
    predictions = np.where(rng.random(300) < 0.6, targets, rng.integers(0, 3, 300))
    expected = classification_metrics(one_hot_probabilities(predictions.tolist()), torch.tensor(targets))
    confusion = np.array(expected["confusion_matrix"])
    for name, value in _confusion_metrics(confusion).items():
        assert float(value) == pytest.approx(expected[name], abs=1e-6), name


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_more_images():
    rng = np.random.default_rng(0)

    def interval(n):
        targets = rng.integers(0, 3, n)
        predictions = np.where(rng.random(n) < 0.85, targets, (targets + 1) % 3)
        point = (predictions == targets).mean()
        low, high = bootstrap_intervals(predictions, targets, samples=500)["acc"]
        assert low <= point <= high
        return high - low

    small, large = interval(150), interval(2400)
    assert large < small / 2.5  # width shrinks about as 1/sqrt(n)
    assert 0.02 < small < 0.2


def test_auroc_is_nan_not_a_crash_when_a_class_is_absent():
    metrics = classification_metrics(one_hot_probabilities([0, 1]), torch.tensor([0, 1]))
    assert np.isnan(metrics["auroc_macro"])


def test_patient_bootstrap_is_wider_when_a_patients_images_agree():
    rng = np.random.default_rng(3)
    patients = np.repeat(np.arange(60), 5)  # 60 patients, 5 images each, all judged alike
    targets = np.repeat(rng.integers(0, 3, 60), 5)
    right = np.repeat(rng.random(60) < 0.8, 5)
    predictions = np.where(right, targets, (targets + 1) % 3)
    by_image = bootstrap_intervals(predictions, targets, samples=2000)["acc"]
    by_patient = bootstrap_intervals(predictions, targets, samples=2000, groups=patients)["acc"]
    assert by_patient[0] <= (predictions == targets).mean() <= by_patient[1]
    assert (by_patient[1] - by_patient[0]) > 1.7 * (by_image[1] - by_image[0])  # about sqrt(5) wider
