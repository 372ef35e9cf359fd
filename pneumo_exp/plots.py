"""PNG figures: confusion matrices and per-epoch curves."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pneumo_exp.core.files import atomic_file  # noqa: E402
from pneumo_exp.labels import CLASSES  # noqa: E402


def _save(figure, path: str | os.PathLike, crop: bool = True) -> Path:
    """`crop`: trim the margins (one more layout pass; a figure laid out by tight_layout needs none)."""
    try:
        with atomic_file(path, "wb") as handle:
            figure.savefig(handle, format="png", dpi=110, bbox_inches="tight" if crop else None)
    finally:
        plt.close(figure)
    return Path(path)


def confusion_matrix_png(matrix: list[list[int]], path: str | os.PathLike, title: str) -> Path:
    figure, axis = plt.subplots(figsize=(4.2, 3.8))
    axis.imshow(matrix, cmap="Blues")
    top = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            axis.text(j, i, str(value), ha="center", va="center", color="white" if value > top / 2 else "black")
    axis.set_xticks(range(len(CLASSES)), CLASSES)
    axis.set_yticks(range(len(CLASSES)), CLASSES)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title)
    return _save(figure, path)


def curves_png(history: list[dict], path: str | os.PathLike,
               metrics: tuple[str, ...] = ("loss", "acc", "recall_macro", "f1_macro")) -> Path:
    figure, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.0))
    epochs = [row["epoch"] for row in history]
    for axis, metric in zip(axes, metrics):
        for split in ("train", "val"):
            values = [row.get(f"{split}/{metric}") for row in history]
            if any(v is not None for v in values):
                axis.plot(epochs, values, marker="o", label=split)
        axis.set_title(metric)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    return _save(figure, path, crop=False)
