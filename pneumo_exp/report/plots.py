"""Report figures across configurations, rendered to PNG bytes (the caller writes them atomically): training
curves, test confusion matrices, metric bars and, for an augmentation study, the gain against the real fraction.

Figures are built with `matplotlib.figure.Figure` and the Agg canvas directly: no pyplot state, no global backend
switch, nothing left open between calls.
"""

from __future__ import annotations

import io
import math
import textwrap

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pneumo_exp.labels import CLASSES


def to_png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def wrap(label: str, width: int = 40) -> str:
    return "\n".join(textwrap.wrap(label.replace(",", ", "), width)) or label


def nothing_to_show(message: str) -> bytes:
    figure = Figure(figsize=(4, 1.5))
    figure.text(0.5, 0.5, message, ha="center", va="center")
    return to_png(figure)


def curves_png(epochs_by_label: dict[str, list[dict]], metrics: tuple[str, ...]) -> bytes:
    """One panel per metric, one line per configuration: the per-epoch mean over seeds."""
    if not any(epochs_by_label.values()):
        return nothing_to_show("no completed runs with per-epoch metrics")
    figure = Figure(figsize=(4.2 * len(metrics), 3.4))
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    for axis, metric in zip(axes, metrics):
        for label, rows in epochs_by_label.items():
            points = [(row["epoch"], row.get(metric)) for row in rows if row.get(metric) is not None]
            if points:
                axis.plot(*zip(*points), marker="o", markersize=3, label=wrap(label))
        axis.set_title(f"{metric} (mean over seeds)")
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize=7,
                      ncol=max(1, min(3, len(labels))), frameon=False)
    return to_png(figure)


def confusion_grid_png(matrices: dict[str, list[list[int]]]) -> bytes:
    """Test confusion matrices summed over seeds: colour = row-normalised (recall), text = count and share."""
    if not matrices:
        return nothing_to_show("no completed runs with a test confusion matrix")
    columns = min(3, len(matrices))
    rows = math.ceil(len(matrices) / columns)
    figure = Figure(figsize=(3.6 * columns, 3.6 * rows))
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for axis, (label, matrix) in zip(axes, matrices.items()):
        counts = np.asarray(matrix, dtype=float)
        shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        for i in range(counts.shape[0]):
            for j in range(counts.shape[1]):
                axis.text(j, i, f"{int(counts[i, j])}\n{shares[i, j]:.0%}", ha="center", va="center", fontsize=8,
                          color="white" if shares[i, j] > 0.5 else "black")
        axis.set_xticks(range(len(CLASSES)), CLASSES, fontsize=7)
        axis.set_yticks(range(len(CLASSES)), CLASSES, fontsize=7)
        axis.set_xlabel("predicted", fontsize=8)
        axis.set_ylabel("true", fontsize=8)
        axis.set_title(wrap(label, 36), fontsize=8)
    for axis in axes[len(matrices):]:
        axis.set_visible(False)
    figure.tight_layout()
    return to_png(figure)


def bars_png(stats_by_label: dict[str, dict[str, dict]], reference: dict[str, float] | None = None,
             baseline: dict[str, float] | None = None, caption: str = "") -> bytes:
    labels = [label for label, stats in stats_by_label.items() if any(s["mean"] is not None for s in stats.values())]
    if not labels:
        return nothing_to_show("no completed runs")
    return to_png(bars_figure(stats_by_label, labels, reference or {}, baseline or {}, caption))


def bars_figure(stats_by_label: dict[str, dict[str, dict]], labels: list[str], reference: dict[str, float],
                baseline: dict[str, float], caption: str) -> Figure:
    """Horizontal bars: mean over seeds with the 95 % CI of the mean; dashed lines: the published numbers;
    dotted lines: a baseline (always NORMAL); the caption under the axis says what the lines are."""
    metrics = list(dict.fromkeys(m for label in labels for m in stats_by_label[label]))
    height = 0.8 / len(metrics)
    figure = Figure(figsize=(7, 1.0 + 0.45 * len(labels) * len(metrics)))
    axis = figure.subplots()
    positions = np.arange(len(labels))
    for index, metric in enumerate(metrics):
        stats = [stats_by_label[label].get(metric, {}) for label in labels]
        means = np.array([s["mean"] if s.get("mean") is not None else np.nan for s in stats])
        colour = f"C{index}"
        axis.barh(positions + index * height, means, height=height, color=colour, alpha=0.8, label=metric)
        with_ci = [i for i, s in enumerate(stats) if s.get("ci_low") is not None]  # n >= 2
        if with_ci:
            errors = np.array([[stats[i]["mean"] - stats[i]["ci_low"], stats[i]["ci_high"] - stats[i]["mean"]]
                               for i in with_ci]).T
            axis.errorbar(means[with_ci], positions[with_ci] + index * height, xerr=errors, fmt="none",
                          ecolor="black", capsize=3, linewidth=1)
        if metric in reference:
            axis.axvline(reference[metric], color=colour, linestyle="--", linewidth=1,
                         label=f"original study {metric} {reference[metric]:.4g}")
        if metric in baseline:
            axis.axvline(baseline[metric], color=colour, linestyle=":", linewidth=1,
                         label=f"always NORMAL {metric} {baseline[metric]:.3f}")
    axis.set_yticks(positions + height * (len(metrics) - 1) / 2, [wrap(label) for label in labels], fontsize=7)
    axis.invert_yaxis()
    axis.set_xlim(0, 1)
    axis.set_xlabel("mean over seeds, 95 % CI of the mean")
    axis.grid(axis="x", alpha=0.3)
    axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    if caption:
        axis.set_title("\n".join(textwrap.wrap(caption, 100)), fontsize=7, loc="left")
    return figure


def gain_vs_fraction_png(gains_by_arm: dict[str, list[tuple[float, dict]]], reference: str) -> bytes:
    drawn = {arm: sorted(((x, stats) for x, stats in points if stats["mean"] is not None), key=lambda p: p[0])
             for arm, points in gains_by_arm.items()}
    drawn = {arm: points for arm, points in drawn.items() if points}
    if not drawn:
        return nothing_to_show(f"no paired gain over {reference}")
    return to_png(gain_vs_fraction_figure(drawn, reference))


def gain_vs_fraction_figure(gains_by_arm: dict[str, list[tuple[float, dict]]], reference: str) -> Figure:
    """The paired gain over `reference` against the real fraction (log x axis): one line per arm, its 95 % CI over
    the replicated units as a shaded band (a bar at a fraction drawn alone); {arm: [(fraction, stats)]}, sorted."""
    figure = Figure(figsize=(6.4, 4.2))
    axis = figure.subplots()
    for index, (arm, points) in enumerate(gains_by_arm.items()):
        draw_gain_line(axis, arm, points, f"C{index}")
    axis.axhline(0.0, color="black", linewidth=0.8)
    axis.set_xscale("log")
    fractions = sorted({x for points in gains_by_arm.values() for x, _ in points})
    axis.set_xticks(fractions, [f"{x:g}" for x in fractions])
    axis.minorticks_off()
    axis.set_xlabel("real fraction of the training split (dataset.train_fraction)")
    axis.set_ylabel(f"paired macro-F1 gain over {reference}")
    axis.set_title("mean, 95 % CI over the replicated units (generator means, or seeds)", fontsize=8)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3, frameon=False)
    return figure


def draw_gain_line(axis, arm: str, points: list[tuple[float, dict]], colour: str) -> None:
    fractions = np.array([x for x, _ in points])
    means = np.array([stats["mean"] for _, stats in points])
    axis.plot(fractions, means, marker="o", markersize=4, color=colour, label=arm)
    with_ci = [(x, stats) for x, stats in points if stats["ci_low"] is not None]
    if len(with_ci) > 1:
        axis.fill_between([x for x, _ in with_ci], [s["ci_low"] for _, s in with_ci],
                          [s["ci_high"] for _, s in with_ci], color=colour, alpha=0.2, linewidth=0)
    elif with_ci:
        x, stats = with_ci[0]
        below, above = stats["mean"] - stats["ci_low"], stats["ci_high"] - stats["mean"]
        axis.errorbar([x], [stats["mean"]], yerr=[[below], [above]], color=colour, capsize=3, linewidth=1)
