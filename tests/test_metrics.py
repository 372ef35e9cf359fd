"""Metric definitions: known values, agreement of the bootstrap arithmetic with torchmetrics, sane CIs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pneumo_exp.classify.metrics import bootstrap_intervals, classification_metrics, confusion_metrics


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


def test_confusion_arithmetic_equals_torchmetrics_per_class_values():
    """The one definition agrees with torchmetrics wherever torchmetrics is defined: every class present."""
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score, multiclass_recall

    rng = np.random.default_rng(1)
    targets = torch.tensor(rng.integers(0, 3, 300))
    predictions = torch.where(torch.rand(300, generator=torch.Generator().manual_seed(1)) < 0.6, targets,
                              torch.tensor(rng.integers(0, 3, 300)))
    metrics = classification_metrics(one_hot_probabilities(predictions.tolist()), targets)
    recall = multiclass_recall(predictions, targets, num_classes=3, average="none")
    f1 = multiclass_f1_score(predictions, targets, num_classes=3, average="none")
    assert metrics["acc"] == pytest.approx(multiclass_accuracy(predictions, targets, 3, average="micro").item())
    assert metrics["recall_macro"] == pytest.approx(recall.mean().item())
    assert metrics["f1_macro"] == pytest.approx(f1.mean().item())
    for index, name in enumerate(("NORMAL", "BACTERIA", "VIRUS")):
        assert metrics[f"recall_{name}"] == pytest.approx(recall[index].item())
        assert metrics[f"f1_{name}"] == pytest.approx(f1[index].item())
    confusion = np.array(metrics["confusion_matrix"])
    for name, value in confusion_metrics(confusion).items():
        assert float(value) == pytest.approx(metrics[name], abs=1e-12), name


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


def test_macro_metrics_average_all_three_classes_when_one_is_absent():
    """No VIRUS target and no VIRUS prediction: torchmetrics' macro would drop VIRUS and average two classes."""
    targets = [0, 0, 0, 1, 1, 1]
    predictions = [0, 0, 1, 1, 1, 1]
    metrics = classification_metrics(one_hot_probabilities(predictions), torch.tensor(targets))
    recall_normal, f1_normal, f1_bacteria = 2 / 3, 2 * (2 / 3) / (1 + 2 / 3), 2 * 0.75 / 1.75
    assert metrics["recall_VIRUS"] == 0.0 and metrics["f1_VIRUS"] == 0.0  # undefined counts as 0
    assert metrics["recall_macro"] == pytest.approx((recall_normal + 1.0 + 0.0) / 3)
    assert metrics["f1_macro"] == pytest.approx((f1_normal + f1_bacteria + 0.0) / 3)
    assert metrics["absent_classes"] == ["VIRUS"]
    one_patient = np.zeros(len(targets))  # every resample is the sample itself: the bootstrap's point estimate
    intervals = bootstrap_intervals(np.array(predictions), np.array(targets), samples=20, groups=one_patient)
    for name in ("acc", "recall_macro", "f1_macro"):
        assert intervals[name] == pytest.approx([metrics[name]] * 2), name


def test_one_name_for_the_mean_of_per_class_recalls():
    targets = [0, 1, 2, 2]
    metrics = classification_metrics(one_hot_probabilities([0, 1, 1, 2]), torch.tensor(targets))
    assert "balanced_acc" not in metrics and metrics["absent_classes"] == []
    assert "balanced_acc" not in bootstrap_intervals(np.array([0, 1, 1, 2]), np.array(targets), samples=10)


def test_printed_metrics_are_the_headline_names():
    from pneumo_exp.classify.metrics import HEADLINE
    from pneumo_exp.pipeline import format_metrics

    header, val, test = format_metrics({"val/acc": 0.5, "test/recall_macro": 0.25}).splitlines()
    assert header.split() == ["split", *HEADLINE] and "balanced_acc" not in header
    assert test.split()[:3] == ["test", "nan", "0.2500"]


def test_paired_bootstrap_draws_one_patient_resample_for_both_arms_and_all_seeds():
    """Identical arms: every resample's difference is exactly 0. Independent resamples per arm would spread."""
    from pneumo_exp.classify.metrics import paired_bootstrap_intervals

    rng = np.random.default_rng(4)
    patients = np.repeat(np.arange(40), 3)
    seeds = []
    for _ in range(3):
        targets = rng.integers(0, 3, 120)
        predictions = np.where(rng.random(120) < 0.7, targets, (targets + 1) % 3)
        seeds.append((targets, predictions, predictions.copy(), patients))
    for name, result in paired_bootstrap_intervals(seeds, samples=300).items():
        assert result == {"difference": 0.0, "ci": [0.0, 0.0]}, name


def test_paired_bootstrap_resamples_patients_not_images():
    """B misses all 5 images of one of 20 patients, A gets everything right: a resample's accuracy difference is
    (times that patient is drawn) / 20, Binomial(20, 1/20) / 20, whose 2.5 % and 97.5 % points are 0 and 0.15."""
    from pneumo_exp.classify.metrics import paired_bootstrap_intervals

    patients = np.repeat(np.arange(20), 5)
    targets = np.repeat(np.arange(20) % 3, 5)
    wrong = np.where(patients == 7, (targets + 1) % 3, targets)
    result = paired_bootstrap_intervals([(targets, targets, wrong, patients)], samples=4000)["acc"]
    assert result["difference"] == pytest.approx(5 / 100)
    assert result["ci"] == pytest.approx([0.0, 0.15])
