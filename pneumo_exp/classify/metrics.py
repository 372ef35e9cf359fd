"""Classification metrics under one naming scheme (`acc`, `recall_macro`, `f1_macro`, ...), plus bootstrap CIs.

One definition of the confusion-matrix metrics (`confusion_metrics`) serves the epoch metrics, the test metrics and
every bootstrap resample: per-class recall and F1, then their mean over all three classes, an undefined per-class
value (a class with no targets, or no predictions) counting as 0, like scikit-learn's `zero_division=0`.
torchmetrics' own macro average would drop a class that has neither targets nor predictions. AUROC and calibration
come from torchmetrics.
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics.functional.classification import (
    multiclass_auroc,
    multiclass_calibration_error,
    multiclass_confusion_matrix,
)

from pneumo_exp.labels import CLASSES

NUM_CLASSES = len(CLASSES)
HEADLINE = ("acc", "recall_macro", "f1_macro", "auroc_macro", "ece")


def classification_metrics(probabilities: torch.Tensor, targets: torch.Tensor) -> dict:
    """probabilities (N, C) summing to 1, targets (N,) class indices -> a flat dict of floats and lists."""
    probabilities = probabilities.float()
    targets = targets.long()
    args = dict(num_classes=NUM_CLASSES)
    confusion = multiclass_confusion_matrix(probabilities, targets, **args)
    metrics = {name: float(value) for name, value in confusion_metrics(confusion.numpy()).items()}
    metrics["ece"] = multiclass_calibration_error(probabilities, targets, n_bins=15, norm="l1", **args).item()
    present = torch.bincount(targets, minlength=NUM_CLASSES) > 0
    metrics["absent_classes"] = [name for name, here in zip(CLASSES, present.tolist()) if not here]
    if bool(present.all()) and len(targets) > 1:
        auroc_per_class = multiclass_auroc(probabilities, targets, average="none", **args)
        metrics["auroc_macro"] = auroc_per_class.mean().item()
    else:  # AUROC is undefined when a class is missing from the targets
        auroc_per_class = torch.full((NUM_CLASSES,), float("nan"))
        metrics["auroc_macro"] = float("nan")
    for index, name in enumerate(CLASSES):
        metrics[f"auroc_{name}"] = auroc_per_class[index].item()
    metrics["confusion_matrix"] = confusion.tolist()  # rows: true class, columns: predicted class
    return metrics


def confusion_metrics(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """confusion (..., C, C) with rows true, columns predicted -> metrics over the leading axes."""
    true_positive = np.diagonal(confusion, axis1=-2, axis2=-1).astype(float)
    actual = confusion.sum(-1)
    predicted = confusion.sum(-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(actual > 0, true_positive / actual, 0.0)
        precision = np.where(predicted > 0, true_positive / predicted, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    result = {"acc": true_positive.sum(-1) / confusion.sum((-2, -1)), "recall_macro": recall.mean(-1),
              "f1_macro": f1.mean(-1)}
    for index, name in enumerate(CLASSES):
        result[f"recall_{name}"] = recall[..., index]
        result[f"f1_{name}"] = f1[..., index]
    return result


def bootstrap_intervals(predictions: np.ndarray, targets: np.ndarray, samples: int = 1000, seed: int = 0,
                        level: float = 0.95, groups: np.ndarray | None = None) -> dict[str, list[float]]:
    """Percentile bootstrap CIs of the confusion-matrix metrics: {name: [low, high]}.

    With `groups` (patient ids) whole patients are resampled with all their images (a cluster bootstrap): images
    of one patient are not independent, and resampling them one by one makes the intervals too narrow.
    """
    rng = np.random.default_rng(seed)
    groups = np.arange(len(targets)) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    count = groups.max() + 1
    draws = patient_draws(count, samples, rng)
    confusion = resampled_confusion(draws, group_confusions(predictions, targets, groups, count))
    return {name: percentile_interval(values, level) for name, values in confusion_metrics(confusion).items()}


def paired_bootstrap_intervals(seeds: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
                               samples: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, dict]:
    """Difference a - b of each confusion-matrix metric, averaged over seeds, with a paired percentile bootstrap CI:
    {name: {"difference": value, "ci": [low, high]}}.

    `seeds` holds per seed (targets, predictions_a, predictions_b, patients) over one set of test images. Each draw
    of test patients (with all their images) is applied to both arms and to every seed, so the interval measures
    which patients happened to be tested, the uncertainty both arms share, not independent noise per arm.
    """
    patient_ids = [np.asarray(patients).astype(str) for *_, patients in seeds]
    _, index = np.unique(np.concatenate(patient_ids), return_inverse=True)
    count = index.max() + 1
    per_seed_groups = np.split(index, np.cumsum([len(ids) for ids in patient_ids])[:-1])
    draws = patient_draws(count, samples, np.random.default_rng(seed))

    def mean_difference(weights: np.ndarray) -> dict[str, np.ndarray]:
        total: dict[str, np.ndarray] = {}
        for (targets, predictions_a, predictions_b, _), groups in zip(seeds, per_seed_groups):
            arm_a, arm_b = (confusion_metrics(resampled_confusion(weights, group_confusions(
                predictions, targets, groups, count))) for predictions in (predictions_a, predictions_b))
            for name in arm_a:
                total[name] = total.get(name, 0.0) + (arm_a[name] - arm_b[name]) / len(seeds)
        return total

    point, resampled = mean_difference(np.ones((1, count))), mean_difference(draws)
    return {name: {"difference": float(point[name][0]), "ci": percentile_interval(resampled[name], level)}
            for name in point}


def group_confusions(predictions: np.ndarray, targets: np.ndarray, groups: np.ndarray, count: int) -> np.ndarray:
    """Each group's (patient's) confusion counts, flattened: (count, C * C)."""
    per_group = np.zeros((count, NUM_CLASSES * NUM_CLASSES))
    np.add.at(per_group, (groups, np.asarray(targets) * NUM_CLASSES + np.asarray(predictions)), 1)
    return per_group


def patient_draws(count: int, samples: int, rng: np.random.Generator) -> np.ndarray:
    """(samples, count): how often each patient is drawn in each bootstrap resample of `count` patients."""
    return rng.multinomial(count, np.full(count, 1 / count), size=samples)


def resampled_confusion(draws: np.ndarray, per_group: np.ndarray) -> np.ndarray:
    return (draws @ per_group).reshape(len(draws), NUM_CLASSES, NUM_CLASSES)


def percentile_interval(values: np.ndarray, level: float) -> list[float]:
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]
