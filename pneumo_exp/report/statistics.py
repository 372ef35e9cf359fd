"""Statistics over the replicated units of each configuration: mean, sample std and the Student-t 95 % CI of the mean
over the seeds, or over the generator means where two or more generator replicates were trained (the generator is a
random factor of a recipe, as the seed is); the exact sign-flip test behind the paired comparisons' patient-clustered
McNemar."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from scipy import stats

from pneumo_exp.report.collect import (
    COMPLETED,
    FAILED,
    UNFINISHED,
    RunRecord,
    group_runs,
    newest_per_unit,
    override_parts,
    shared_overrides,
)

DEFAULT_METRICS = ("test/acc", "test/recall_macro", "test/f1_macro", "test/auroc_macro", "test/recall_VIRUS")
EPOCH_METRICS = ("train/acc", "train/f1_macro", "train/recall_macro")
CURVE_METRICS = ("val/f1_macro", "train/acc")
SEEDS, GENERATORS = "seeds", "generators"  # the units a CI is over
ONE_GENERATOR = "one generator: its variability is not measured"


def metric_title(metric: str) -> str:
    return metric.split("/", 1)[-1]


def t_quantile_975(dof: int) -> float:
    """Student t quantile 0.975 (two-sided 95 %)."""
    if dof < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {dof}")
    return float(stats.t.ppf(0.975, dof))


def finite(values: Iterable[Any]) -> list[float]:
    return [float(v) for v in values
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def summarize(values: Iterable[Any]) -> dict[str, Any]:
    """n, mean, sample std and the t 95 % CI of the mean over the finite values; std and CI need n >= 2."""
    values = finite(values)
    n = len(values)
    stats: dict[str, Any] = {"n": n, "mean": None, "std": None, "ci_low": None, "ci_high": None}
    if n:
        stats["mean"] = float(np.mean(values))
    if n >= 2:
        stats["std"] = float(np.std(values, ddof=1))
        half_width = t_quantile_975(n - 1) * stats["std"] / math.sqrt(n)
        stats["ci_low"], stats["ci_high"] = stats["mean"] - half_width, stats["mean"] + half_width
    return stats


def replicated_summary(values_by_unit: dict[tuple[str | None, Any], Any]) -> dict[str, Any]:
    """`summarize` over the units that were replicated, from {(generator, seed): value}: where there are two or more
    generators, the mean over the generator means (each the mean over its seeds) with the wider of two t intervals,
    the one over the generator means and the one over the seed means (each the mean over its generators): a seed
    run under every generator shares its classifier's randomness across them, which the spread of the generator
    means alone leaves out. Else the t interval over the seeds. n: the runs with a finite value; level: generators |
    seeds; units: how many generators (or seeds) were replicated."""
    by_generator: dict[str | None, list[float]] = {}
    by_seed: dict[Any, list[float]] = {}
    for (generator, seed), value in values_by_unit.items():
        by_generator.setdefault(generator, []).extend(finite([value]))
        by_seed.setdefault(seed, []).extend(finite([value]))
    by_generator = {generator: values for generator, values in by_generator.items() if values}
    runs = sum(len(values) for values in by_generator.values())
    if len(by_generator) >= 2:
        stats = summarize(float(np.mean(values)) for values in by_generator.values())
        seeds = summarize(float(np.mean(values)) for values in by_seed.values() if values)
        return widest(stats, seeds) | {"n": runs, "level": GENERATORS, "units": stats["n"]}
    stats = summarize(value for values in by_generator.values() for value in values)
    return stats | {"level": SEEDS, "units": stats["n"]}


def widest(stats: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """`stats` with the half-width of its CI widened to `other`'s where that is wider (the mean stays)."""
    if stats["ci_low"] is None or other["ci_low"] is None:
        return stats
    half_width = max(stats["ci_high"] - stats["mean"], other["ci_high"] - other["mean"])
    return stats | {"ci_low": stats["mean"] - half_width, "ci_high": stats["mean"] + half_width}


def replication_text(units: Iterable[tuple[str | None, Any]]) -> str:
    """Which units were replicated: `3 seeds`; `2 generators × 3 seeds (6 runs): the wider CI of the 2 generator
    means and the 3 seed means`; with one generator, that its variability is not measured."""
    units = list(units)
    generators = sorted({generator for generator, _ in units}, key=str)
    seeds = len({seed for _, seed in units})
    if len(generators) >= 2:
        return (f"{len(generators)} generators × {seeds} seeds ({len(units)} runs): the wider CI of the "
                f"{len(generators)} generator means and the {seeds} seed means")
    text = f"{seeds} seed{'s' if seeds != 1 else ''}"
    return f"{text}; {ONE_GENERATOR}" if generators and generators[0] is not None else text


def unit_label(unit: tuple[str | None, Any]) -> Any:
    """A (generator, seed) unit as the tables name it: the seed alone without a generator."""
    generator, seed = unit
    return seed if generator is None else f"{generator}/seed={seed}"


def sign_flip_p(differences: Iterable[int]) -> float:
    """Exact two-sided p of the sign-flip (randomisation) test that integer differences are symmetric about 0:
    P(|sum of e_k d_k| >= |sum of d_k|) over independent fair signs e_k.

    With d_k = (images only A got right) - (images only B got right) of patient k, this is the exact form of the
    clustered McNemar test of Durkalski et al. (2003), whose statistic (sum d_k)^2 / sum d_k^2 orders the sign
    patterns as |sum d_k| does; with one image per patient it is McNemar's exact (binomial) test."""
    differences = np.asarray(list(differences), dtype=int)
    sizes = np.abs(differences[differences != 0])
    total = int(sizes.sum())
    plus_sum = np.zeros(total + 1)  # the distribution of the summed sizes of the patients given a + sign
    plus_sum[0] = 1.0
    for size in sizes:
        shifted = np.zeros_like(plus_sum)
        shifted[size:] = plus_sum[:-size]
        plus_sum = (plus_sum + shifted) / 2
    observed = abs(int(differences.sum()))
    signed_sums = np.abs(2 * np.arange(total + 1) - total)
    return float(min(1.0, plus_sum[signed_sums >= observed].sum()))


def epoch_means(runs: Sequence[RunRecord], metrics: Sequence[str]) -> list[dict]:
    """Per epoch: the number of runs that logged it and the mean of each metric over them."""
    by_epoch: dict[int, list[dict]] = {}
    for run in runs:
        for row in run.history:
            by_epoch.setdefault(int(row["epoch"]), []).append(row)
    table = []
    for epoch in sorted(by_epoch):
        rows = by_epoch[epoch]
        entry: dict[str, Any] = {"epoch": epoch, "n": len(rows)}
        for metric in metrics:
            entry[metric] = summarize(row.get(metric) for row in rows)["mean"]
        table.append(entry)
    return table


def summed_confusion(runs: Sequence[RunRecord], split: str = "test") -> list[list[int]] | None:
    matrices = [run.results.get("confusion_matrix", {}).get(split) for run in runs]
    matrices = [np.asarray(m) for m in matrices if m]
    return np.sum(matrices, axis=0).astype(int).tolist() if matrices else None


def aggregate(runs: Iterable[RunRecord], metrics: Sequence[str] = DEFAULT_METRICS) -> list[dict]:
    """One dict per configuration, sorted by experiment then overrides (see `summarize_group` for the keys)."""
    groups = group_runs(runs)
    single_experiment = len({experiment for experiment, _ in groups}) <= 1
    shared = shared_overrides([key for _, key in groups])
    summaries = []
    for (experiment, key), members in groups.items():
        short = ",".join(part for part in override_parts(key) if part not in shared) or key
        label = short if single_experiment or key == experiment else f"{experiment}: {short}"
        summary = summarize_group(experiment, key, label, members, metrics)
        summary["short_configuration"] = short
        summaries.append(summary)
    return summaries


def summarize_group(experiment: str, key: str, label: str, members: list[RunRecord],
                    metrics: Sequence[str]) -> dict:
    """experiment, configuration (the group key), label (for plots), status (completed when a seed completed,
    else failed or unfinished), n (completed runs: seeds x generator replicates), seeds, generators (the generator
    replicates, none without a generator), replication (`replication_text`), failed, unfinished, repeated_seeds
    (the units run more than once, `unit_label`), commits (the code versions of the counted runs), run_dirs,
    metrics {name: `replicated_summary`} over completed runs,
    epochs [per-epoch means], confusion_matrix_test (summed over completed runs)."""
    all_completed = [run for run in members if run.status == COMPLETED]
    completed = newest_per_unit(all_completed)
    failed = sum(run.status == FAILED for run in members)
    unfinished = sum(run.status == UNFINISHED for run in members)
    all_units = [run.unit for run in all_completed if run.seed is not None]
    summary: dict[str, Any] = {
        "experiment": experiment, "configuration": key, "label": label,
        "status": COMPLETED if completed else (FAILED if failed else UNFINISHED),
        "n": len(completed), "seeds": list(dict.fromkeys(run.seed for run in completed)),
        "generators": sorted({run.generator for run in completed if run.generator is not None}),
        "replication": replication_text(run.unit for run in completed), "failed": failed, "unfinished": unfinished,
        "repeated_seeds": [unit_label(unit) for unit in dict.fromkeys(all_units) if all_units.count(unit) > 1],
        "commits": sorted({run.commit or "unknown" for run in completed}),
        "run_dirs": [str(run.path) for run in members], "metrics": {},
        "epochs": epoch_means(completed, tuple(dict.fromkeys(EPOCH_METRICS + CURVE_METRICS))),
        "confusion_matrix_test": summed_confusion(completed),
    }
    for metric in metrics:
        summary["metrics"][metric] = replicated_summary({run.unit: run.metrics.get(metric) for run in completed})
    return summary
