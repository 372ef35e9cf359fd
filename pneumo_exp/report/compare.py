"""Paired comparisons of two configurations over the seeds both completed: the Student-t CI over seed-matched
differences, a paired patient-level bootstrap CI over the test split, and McNemar's exact p per seed."""

from __future__ import annotations

import contextlib
import csv
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from pneumo_exp.classify.metrics import paired_bootstrap_intervals
from pneumo_exp.errors import UserError
from pneumo_exp.labels import CLASSES
from pneumo_exp.report.collect import (COMPLETED, RunRecord, group_runs, newest_per_seed, override_parts,
                                       parse_override)
from pneumo_exp.report.statistics import finite, metric_title, summarize

# Pairs of configurations compared when `report.pairs` is not given: (A, B) reports A - B.
AUGMENTATION_PAIR = ("original_study", "original_no_augmentation")
DEFAULT_PAIRS = (AUGMENTATION_PAIR, ("linear_probe", "zero_shot"), ("lora", "zero_shot"), ("full", "zero_shot"))
PAIR_METRICS = ("test/acc", "test/f1_macro")
NO_DIFFERENCE = "no difference shown"


def check_pairs(pairs: Any) -> list[tuple[str, str]]:
    """`report.pairs` as a list of (A, B) configuration selectors."""
    if not isinstance(pairs, (list, tuple)) or not all(
            isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) and x for x in pair)
            for pair in pairs):
        raise UserError(f"report.pairs={pairs!r} is not a list of [A, B] pairs", where="report.pairs",
                        fix="give e.g. report.pairs=[[original_study,original_no_augmentation],[lora,zero_shot]]")
    return [(str(a), str(b)) for a, b in pairs]


def matches(selector: str, experiment: str, key: str) -> bool:
    """`name`: a recipe (`experiment=paper/NAME`, or the full recipe path) or an experiment_name;
    `key=value[,key=value]`: a configuration holding all of those overrides."""
    parts = set(override_parts(key))
    if "=" in selector:
        wanted = {"=".join(parse_override(part)) for part in override_parts(selector)}
        return wanted <= parts
    recipes = [part.split("=", 1)[1] for part in parts if part.startswith("experiment=")]
    return experiment == selector or any(r == selector or r.endswith("/" + selector) for r in recipes)


def select_configuration(selector: str, groups: dict[tuple[str, str], list[RunRecord]]) -> list[tuple[str, str]]:
    return [name for name in groups if matches(selector, *name)]


def read_test_predictions(folder: Path) -> dict | None:
    """{"images": {path: (label index, predicted index)}, "patients": {path: patient_id}} from a run's
    predictions.csv and manifest.csv (patients empty without a manifest); None without readable predictions."""
    index = {name: number for number, name in enumerate(CLASSES)}
    try:
        with (folder / "predictions.csv").open(newline="") as handle:
            images = {row["path"]: (index[row["label"]], index[row["prediction"]]) for row in csv.DictReader(handle)}
    except (OSError, KeyError, csv.Error):
        return None
    patients: dict[str, str] = {}
    with contextlib.suppress(OSError, KeyError, csv.Error):
        with (folder / "manifest.csv").open(newline="") as handle:
            patients = {row["path"]: row["patient_id"] for row in csv.DictReader(handle) if row["split"] == "test"}
    return {"images": images, "patients": patients}


def aligned_predictions(run_a: RunRecord, run_b: RunRecord) -> tuple[np.ndarray, ...] | None:
    """(targets, predictions_a, predictions_b, patients or None) over the test images both runs predicted;
    None when predictions are missing or the two runs were tested on different images."""
    a, b = read_test_predictions(run_a.path), read_test_predictions(run_b.path)
    if a is None or b is None or a["images"].keys() != b["images"].keys() or not a["images"]:
        return None
    paths = sorted(a["images"])
    if any(a["images"][path][0] != b["images"][path][0] for path in paths):
        return None
    targets = np.array([a["images"][path][0] for path in paths])
    predictions_a = np.array([a["images"][path][1] for path in paths])
    predictions_b = np.array([b["images"][path][1] for path in paths])
    known = all(path in a["patients"] for path in paths)
    patients = np.array([a["patients"][path] for path in paths]) if known else None
    return targets, predictions_a, predictions_b, patients


def mcnemar(targets: np.ndarray, predictions_a: np.ndarray, predictions_b: np.ndarray) -> dict:
    """McNemar's exact test: of the images exactly one arm got right, is A's share different from 1/2?"""
    right_a, right_b = predictions_a == targets, predictions_b == targets
    a_only, b_only = int(np.sum(right_a & ~right_b)), int(np.sum(~right_a & right_b))
    p = stats.binomtest(a_only, a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
    return {"a_only": a_only, "b_only": b_only, "p": float(p)}


def verdict(a: str, b: str, over_seeds: tuple[float, float] | None,
            over_patients: tuple[float, float] | None) -> str:
    """A difference is claimed only with a CI over seeds (2 or more) that excludes 0, and the patient bootstrap's
    CI, where there is one, excluding 0 on the same side."""
    if over_seeds is None:
        return f"{NO_DIFFERENCE} (one seed: no CI over seeds)"
    intervals = [over_seeds] + ([over_patients] if over_patients is not None else [])
    if all(low > 0 for low, _ in intervals):
        return f"{a} higher"
    if all(high < 0 for _, high in intervals):
        return f"{b} higher"
    return NO_DIFFERENCE


def compare_pair(a: str, b: str, groups: dict[tuple[str, str], list[RunRecord]], samples: int) -> dict:
    """a, b, status (compared | missing | ambiguous), reason, seeds, metrics {name: n, difference, t_low, t_high,
    bootstrap_low, bootstrap_high, verdict}, bootstrap_seeds, mcnemar {seed: a_only, b_only, p}."""
    comparison: dict[str, Any] = {"a": a, "b": b, "status": "missing", "reason": "", "seeds": [], "metrics": {},
                                  "bootstrap_seeds": [], "mcnemar": {}}
    arms = {}
    for name in (a, b):
        selected = select_configuration(name, groups)
        if len(selected) > 1:
            return comparison | {"status": "ambiguous", "reason": f"{name} matches {len(selected)} configurations"}
        arms[name] = completed_by_seed(groups[selected[0]]) if selected else {}
        if not arms[name]:
            return comparison | {"reason": f"no completed runs of {name}"}
    seeds = sorted(set(arms[a]) & set(arms[b]))
    if not seeds:
        return comparison | {"reason": f"no seed completed in both {a} and {b}"}
    paired = {seed: aligned_predictions(arms[a][seed], arms[b][seed]) for seed in seeds}
    with_patients = [seed for seed, arrays in paired.items() if arrays is not None and arrays[3] is not None]
    bootstrap = paired_bootstrap_intervals([paired[seed] for seed in with_patients], samples=samples) \
        if with_patients else {}
    metrics = {metric: metric_difference(a, b, [(arms[a][seed], arms[b][seed]) for seed in seeds], metric,
                                         bootstrap.get(metric_title(metric), {}).get("ci"))
               for metric in PAIR_METRICS}
    return comparison | {"status": "compared", "seeds": seeds, "metrics": metrics, "bootstrap_seeds": with_patients,
                         "mcnemar": {seed: mcnemar(*arrays[:3]) for seed, arrays in paired.items()
                                     if arrays is not None}}


def completed_by_seed(members: list[RunRecord]) -> dict[int, RunRecord]:
    completed = newest_per_seed([run for run in members if run.status == COMPLETED])
    return {run.seed: run for run in completed if run.seed is not None}


def metric_difference(a: str, b: str, runs: list[tuple[RunRecord, RunRecord]], metric: str,
                      bootstrap: list[float] | None) -> dict:
    """The seed-matched differences' mean and t CI beside the patient bootstrap's CI, and the verdict."""
    values = [(run_a.metrics.get(metric), run_b.metrics.get(metric)) for run_a, run_b in runs]
    differences = summarize(value_a - value_b for value_a, value_b in values
                            if is_number(value_a) and is_number(value_b))
    over_seeds = (differences["ci_low"], differences["ci_high"]) if differences["ci_low"] is not None else None
    return {"n": differences["n"], "difference": differences["mean"],
            "t_low": differences["ci_low"], "t_high": differences["ci_high"],
            "bootstrap_low": bootstrap[0] if bootstrap else None, "bootstrap_high": bootstrap[1] if bootstrap else None,
            "verdict": verdict(a, b, over_seeds, tuple(bootstrap) if bootstrap else None)}


def is_number(value: Any) -> bool:
    return bool(finite([value]))


def compare_pairs(runs: Iterable[RunRecord], pairs: Sequence[tuple[str, str]] | None, samples: int) -> list[dict]:
    """Explicit pairs are all reported (missing ones as missing); of the default pairs, those with a run of
    either side, so that a report of an unrelated sweep has no comparison section."""
    groups = group_runs(runs)
    if pairs is not None:
        return [compare_pair(a, b, groups, samples) for a, b in check_pairs(pairs)]
    present = [(a, b) for a, b in DEFAULT_PAIRS
               if select_configuration(a, groups) or select_configuration(b, groups)]
    return [compare_pair(a, b, groups, samples) for a, b in present]
