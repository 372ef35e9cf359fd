"""The reference rows of every report: the original study's published numbers (kept in conf/report/default.yaml)
and the always-NORMAL baseline on the official test split, by the project's own metric definitions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from pneumo_exp.classify.metrics import confusion_metrics
from pneumo_exp.labels import CLASSES

PUBLISHED_FILE = Path(__file__).resolve().parents[2] / "conf" / "report" / "default.yaml"


def load_published(path: Path = PUBLISHED_FILE) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.load(path).published, resolve=True)


PUBLISHED = load_published()
OFFICIAL_TEST_COUNTS: dict[str, int] = PUBLISHED["official_test_counts"]


def always_normal_metrics(counts: dict[str, int] = OFFICIAL_TEST_COUNTS) -> dict[str, float]:
    """Test metrics of always answering NORMAL on a test split of `counts` images per class (default: the official
    one), by the project's own definitions."""
    confusion = np.zeros((len(CLASSES), len(CLASSES)))
    confusion[:, CLASSES.index("NORMAL")] = [counts[name] for name in CLASSES]
    return {f"test/{name}": float(value) for name, value in confusion_metrics(confusion).items()}


ALWAYS_NORMAL = {"name": "always NORMAL, 3 classes (official test split)", "test": always_normal_metrics()}


def always_normal_row(counts: dict[str, int]) -> dict[str, Any]:
    """The always-NORMAL row of a test split other than the official one."""
    split = ", ".join(f"{counts[name]} {name}" for name in CLASSES)
    return {"name": f"always NORMAL, 3 classes (this test split: {split})", "test": always_normal_metrics(counts)}
ORIGINAL_STUDY: dict[str, Any] = PUBLISHED["original_study"] | {
    "note": ("The published test recall {recall_2:g} and F1 {f1_2:g} are two-class means. On the official test split "
             "({NORMAL} NORMAL, {BACTERIA} BACTERIA, {VIRUS} VIRUS images) always predicting NORMAL gives "
             "accuracy {acc:.3f}, macro recall {recall:.3f} and macro F1 {f1:.3f} over the three classes (the "
             "always-NORMAL row), and exactly recall {recall_2:g} and F1 {f1_2:g} when averaged over two classes "
             "(NORMAL, PNEUMONIA).").format(
        **OFFICIAL_TEST_COUNTS, acc=ALWAYS_NORMAL["test"]["test/acc"],
        recall=ALWAYS_NORMAL["test"]["test/recall_macro"], f1=ALWAYS_NORMAL["test"]["test/f1_macro"],
        recall_2=PUBLISHED["original_study"]["test"]["test/recall_macro"],
        f1_2=PUBLISHED["original_study"]["test"]["test/f1_macro"]),
}
