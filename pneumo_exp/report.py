"""Sweep reports: collect run folders, group them by configuration (seed left out), summarise over seeds.

`pneumo-exp` writes one folder per job (`outputs/...`, sweeps `multirun/<experiment>/<sweep>/<job>/`). This module
reads every such folder under a root, whatever its depth, and writes into an output folder:

- `table.md`, `table.csv`, `table.tex`: one row per configuration, test metrics of the best epoch as
  mean ± sample std [95 % CI of the mean over seeds, Student t with n-1 dof], with the original study's published
  numbers for comparison;
- a paired comparison of chosen configurations (`report.pairs`; default: the paper table's augmentation gain and each
  classifier mode against zero-shot): the difference in test accuracy and macro F1 with a Student-t CI over
  seed-matched differences, a paired patient-level bootstrap CI over the test split, and McNemar's exact p per
  seed; also in `pairs.csv`;
- `epochs.md`: per-epoch train accuracy, macro F1 and macro recall (mean over seeds) beside the original study's;
- `failures.md`: failed jobs (folder, overrides, first line of the error) and unfinished ones;
- `curves.png`, `confusion_test.png`, `bars.png` (see `pneumo_exp/report_plots.py`).

Every file is written atomically (temporary file in the output folder, then `os.replace`); nothing is written
outside the output folder.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from omegaconf import OmegaConf
from scipy import stats

from pneumo_exp.classify.metrics import confusion_metrics, paired_bootstrap_intervals
from pneumo_exp.errors import UserError
from pneumo_exp.labels import CLASSES
from pneumo_exp.rundir import RESULT_NEUTRAL_KEYS, read_json_lines

DEFAULT_METRICS = ("test/acc", "test/recall_macro", "test/f1_macro", "test/auroc_macro", "test/recall_VIRUS")
EPOCH_METRICS = ("train/acc", "train/f1_macro", "train/recall_macro")
CURVE_METRICS = ("val/f1_macro", "train/acc")
BAR_METRICS = ("test/acc", "test/f1_macro")

# Override keys (and their sub-keys) that never change what a job computes, so never split a configuration.
NOT_A_SETTING = RESULT_NEUTRAL_KEYS
RUN_MARKERS = ("results.json", "failed.json", "metrics.jsonl", "git.json")
NOT_RUN_FOLDERS = {".hydra", "wandb", "checkpoints", "__pycache__"}

COMPLETED, FAILED, UNFINISHED = "completed", "failed", "unfinished"

OFFICIAL_TEST_COUNTS = {"NORMAL": 234, "BACTERIA": 242, "VIRUS": 148}


def always_normal_metrics() -> dict[str, float]:
    """Test metrics of always answering NORMAL on the official test split, by the project's own definitions."""
    confusion = np.zeros((len(CLASSES), len(CLASSES)))
    confusion[:, CLASSES.index("NORMAL")] = [OFFICIAL_TEST_COUNTS[name] for name in CLASSES]
    return {f"test/{name}": float(value) for name, value in confusion_metrics(confusion).items()}


ALWAYS_NORMAL = {"name": "always NORMAL, 3 classes (official test split)", "test": always_normal_metrics()}
ORIGINAL_STUDY: dict[str, Any] = {
    "name": "original study (published)",
    "epochs": {
        1: {"train/acc": 0.4894, "train/f1_macro": 0.4725, "train/recall_macro": 0.4865},
        2: {"train/acc": 0.5051, "train/f1_macro": 0.4911, "train/recall_macro": 0.5095},
        3: {"train/acc": 0.5047, "train/f1_macro": 0.4891, "train/recall_macro": 0.5056},
    },
    "test": {"test/acc": 0.375, "test/f1_macro": 0.2727, "test/recall_macro": 0.5},
    "flagged": ("test/recall_macro", "test/f1_macro"),
    "note": ("The published test recall 0.5 and F1 0.2727 are two-class means. On the official test split "
             "({NORMAL} NORMAL, {BACTERIA} BACTERIA, {VIRUS} VIRUS images) always predicting NORMAL gives "
             "accuracy {acc:.3f}, macro recall {recall:.3f} and macro F1 {f1:.3f} over the three classes (the "
             "always-NORMAL row), and exactly recall 0.5 and F1 0.2727 when averaged over two classes (NORMAL, "
             "PNEUMONIA).").format(
        **OFFICIAL_TEST_COUNTS, acc=ALWAYS_NORMAL["test"]["test/acc"],
        recall=ALWAYS_NORMAL["test"]["test/recall_macro"], f1=ALWAYS_NORMAL["test"]["test/f1_macro"]),
}

# Pairs of configurations compared when `report.pairs` is not given: (A, B) reports A - B.
AUGMENTATION_PAIR = ("original_study", "original_no_augmentation")
DEFAULT_PAIRS = (AUGMENTATION_PAIR, ("linear_probe", "zero_shot"), ("lora", "zero_shot"), ("full", "zero_shot"))
PAIR_METRICS = ("test/acc", "test/f1_macro")
NO_DIFFERENCE = "no difference shown"


# ---------------------------------------------------------------------------------------------------- collecting

@dataclass
class RunRecord:
    path: Path
    status: str  # completed | failed | unfinished (still running, or killed)
    overrides: list[str]
    config: dict  # the resolved config.yaml, else the composed .hydra/config.yaml
    results: dict | None = None
    history: list[dict] = field(default_factory=list)
    error: str | None = None  # failed.json's error

    def value(self, dotted_key: str, default: Any = None) -> Any:
        node: Any = self.config
        for part in dotted_key.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    @property
    def experiment_name(self) -> str:
        return str(self.value("experiment_name", "default"))

    @property
    def seed(self) -> int | None:
        seed = self.value("seed", (self.results or {}).get("seed"))
        return int(seed) if isinstance(seed, (int, float)) and not isinstance(seed, bool) else None

    @property
    def metrics(self) -> dict:
        return (self.results or {}).get("metrics", {})

    @property
    def error_line(self) -> str:
        """The error's first line: what went wrong without the traceback."""
        lines = [line.strip() for line in (self.error or "").splitlines() if line.strip()]
        return lines[0] if lines else "unknown error"


def collect_runs(root: str | os.PathLike) -> list[RunRecord]:
    """Every job folder under root (any depth) that trains, in path order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"report: no folder {root}")
    runs = [read_run(folder) for folder in run_folders(root)]
    return [run for run in runs if run is not None]


def run_folders(root: Path) -> Iterator[Path]:
    for folder, subfolders, _ in os.walk(root):
        folder = Path(folder)
        if is_run_folder(folder):
            subfolders.clear()  # checkpoints, wandb: nothing more to find inside a job
            yield folder
        else:
            subfolders[:] = sorted(name for name in subfolders
                                   if name not in NOT_RUN_FOLDERS and not name.startswith("."))


def is_run_folder(folder: Path) -> bool:
    if (folder / ".hydra" / "config.yaml").is_file():
        return True
    return (folder / "config.yaml").is_file() and any((folder / name).is_file() for name in RUN_MARKERS)


def read_run(folder: Path) -> RunRecord | None:
    """None for jobs that train nothing (`pneumo-exp summary`, `predict`)."""
    config = load_config(folder)
    if config.get("task", "run") != "run" or "classify" not in config.get("stages", ["classify"]):
        return None
    failure = read_json(folder / "failed.json")
    overrides = load_overrides(folder) or list((failure or {}).get("overrides") or [])
    run = RunRecord(path=folder, status=UNFINISHED, overrides=overrides, config=config,
                    history=read_history(folder / "metrics.jsonl"))
    if (folder / "results.json").is_file():
        try:
            run.results, run.status = json.loads((folder / "results.json").read_text()), COMPLETED
        except (OSError, ValueError) as error:
            run.status, run.error = FAILED, f"results.json unreadable: {type(error).__name__}: {error}"
    elif failure is not None:
        run.status = FAILED
        run.error = str(failure.get("error") or "") or last_line(failure.get("traceback")) or "unknown error"
    return run


def load_config(folder: Path) -> dict:
    for path in (folder / "config.yaml", folder / ".hydra" / "config.yaml"):
        if path.is_file():
            loaded = load_yaml(path)
            return loaded if isinstance(loaded, dict) else {}
    return {}


def load_overrides(folder: Path) -> list[str]:
    path = folder / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    loaded = load_yaml(path)
    return [str(item) for item in loaded] if isinstance(loaded, list) else []


def load_yaml(path: Path) -> Any:
    """Interpolations stay unresolved text; a damaged file reads as None rather than stopping the report."""
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except (OSError, ValueError, yaml.YAMLError):
        return None


def read_json(path: Path) -> dict | None:
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


def read_history(path: Path) -> list[dict]:
    """Epoch rows; a line being appended by a running job (cut short) is skipped."""
    return [row for row in read_json_lines(path) if "epoch" in row]


def last_line(text: str | None) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


# ------------------------------------------------------------------------------------------------------ grouping

def parse_override(override: str) -> tuple[str, str]:
    """`+key=value` -> (key, value) with numbers normalised, so that 1e-4 and 0.0001 are one setting."""
    key, _, value = override.lstrip("+").partition("=")
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]
    return key.strip(), normalise_number(value)


def normalise_number(text: str) -> str:
    with contextlib.suppress(ValueError):
        return str(int(text))
    try:
        number = float(text)
    except ValueError:
        return text
    return repr(number) if math.isfinite(number) else text


def is_setting(key: str, value: str, run: RunRecord, ignore: Iterable[str]) -> bool:
    if any(key == name or key.startswith(name + ".") for name in (*NOT_A_SETTING, *ignore)):
        return False
    return not (key == "experiment" and value == run.experiment_name)  # the experiment is grouped on anyway


def configuration_items(run: RunRecord, ignore: Iterable[str] = ("seed",)) -> list[tuple[str, str]]:
    ignore = tuple(ignore)
    items = {key: value for key, value in map(parse_override, run.overrides) if is_setting(key, value, run, ignore)}
    return sorted(items.items())


def group_key(run: RunRecord, ignore: Iterable[str] = ("seed",)) -> str:
    """The overrides that define the configuration, sorted and joined by ','; experiment_name when there are none."""
    items = configuration_items(run, ignore)
    return ",".join(f"{key}={value}" for key, value in items) if items else run.experiment_name


def sort_key(run: RunRecord) -> tuple:
    """Experiment name, then overrides, numbers compared as numbers."""
    def value_order(value: str) -> tuple:
        try:
            return 0, float(value), ""
        except ValueError:
            return 1, 0.0, value
    return run.experiment_name, [(key, value_order(value)) for key, value in configuration_items(run)]


# ---------------------------------------------------------------------------------------------------- statistics

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


def group_runs(runs: Iterable[RunRecord]) -> dict[tuple[str, str], list[RunRecord]]:
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for run in sorted(runs, key=lambda r: (sort_key(r), r.seed if r.seed is not None else -1, str(r.path))):
        groups.setdefault((run.experiment_name, group_key(run)), []).append(run)
    return groups


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


def override_parts(key: str) -> list[str]:
    """`a=1,b={x:1,y:2}` -> ["a=1", "b={x:1,y:2}"]: commas inside braces or brackets belong to the value."""
    return re.split(r",(?![^{\[]*[}\]])", key) if key else []


def shared_overrides(keys: list[str]) -> set[str]:
    """Overrides every configuration has: they say nothing about the differences, so labels leave them out."""
    if len(keys) < 2:
        return set()
    return set.intersection(*(set(override_parts(key)) for key in keys))


def newest_per_seed(runs: list[RunRecord]) -> list[RunRecord]:
    """A seed run twice counts once (the newest results), so repeats never inflate n or shrink the CI."""
    newest: dict[Any, RunRecord] = {}
    for run in sorted(runs, key=lambda r: (r.path / "results.json").stat().st_mtime_ns):
        newest[run.seed if run.seed is not None else str(run.path)] = run
    kept = {id(run) for run in newest.values()}
    return [run for run in runs if id(run) in kept]


def summarize_group(experiment: str, key: str, label: str, members: list[RunRecord],
                    metrics: Sequence[str]) -> dict:
    """experiment, configuration (the group key), label (for plots), status (completed when a seed completed,
    else failed or unfinished), n (completed seeds), seeds, failed, unfinished, repeated_seeds, run_dirs,
    metrics {name: n, mean, std, ci_low, ci_high} over completed seeds,
    epochs [per-epoch means], confusion_matrix_test (summed over completed seeds)."""
    all_completed = [run for run in members if run.status == COMPLETED]
    completed = newest_per_seed(all_completed)
    failed = sum(run.status == FAILED for run in members)
    unfinished = sum(run.status == UNFINISHED for run in members)
    all_seeds = [run.seed for run in all_completed]
    seeds = [run.seed for run in completed]
    summary: dict[str, Any] = {
        "experiment": experiment, "configuration": key, "label": label,
        "status": COMPLETED if completed else (FAILED if failed else UNFINISHED),
        "n": len(completed), "seeds": seeds, "failed": failed, "unfinished": unfinished,
        "repeated_seeds": sorted({s for s in all_seeds if s is not None and all_seeds.count(s) > 1}),
        "run_dirs": [str(run.path) for run in members], "metrics": {},
        "epochs": epoch_means(completed, tuple(dict.fromkeys(EPOCH_METRICS + CURVE_METRICS))),
        "confusion_matrix_test": summed_confusion(completed),
    }
    for metric in metrics:
        summary["metrics"][metric] = summarize(run.metrics.get(metric) for run in completed)
    return summary


# ---------------------------------------------------------------------------------------------- paired comparisons

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


# ---------------------------------------------------------------------------------------------------- formatting

def fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def format_stats(stats: dict, group: dict, plus_minus: str = "±") -> str:
    """`mean ± std [lo, hi]`; the group's status word when no seed completed; `(n=k)` when k < the group's n."""
    if group["n"] == 0:
        return group["status"]
    if stats["n"] == 0:
        return "—"
    text = fmt(stats["mean"])
    if stats["std"] is not None:
        text += f" {plus_minus} {fmt(stats['std'])} [{fmt(stats['ci_low'])}, {fmt(stats['ci_high'])}]"
    if stats["n"] < group["n"]:
        text += f" (n={stats['n']})"
    return text


def group_notes(group: dict) -> str:
    notes = [f"{group[status]} {status}" for status in (FAILED, UNFINISHED) if group[status]]
    notes += [f"seed {seed} run more than once: the newest counted" for seed in group["repeated_seeds"]]
    return "; ".join(notes)


def metric_title(metric: str) -> str:
    return metric.split("/", 1)[-1]


def markdown_rows(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells):
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"
    return [line(header), "| " + " | ".join("---" for _ in header) + " |", *map(line, rows)]


def reference_cell(metric: str, marker: str, reference: dict = ORIGINAL_STUDY) -> str:
    value = reference["test"].get(metric)
    if value is None:
        return "—"
    return fmt(value) + (marker if metric in reference.get("flagged", ()) else "")


def results_markdown(groups: list[dict], metrics: Sequence[str], reference: bool,
                     comparisons: Sequence[dict] = ()) -> list[str]:
    header = ["experiment", "configuration", "n", *map(metric_title, metrics), "notes"]
    rows = [[g["experiment"], g["short_configuration"], str(g["n"]),
             *(format_stats(g["metrics"][m], g) for m in metrics), group_notes(g)] for g in groups]
    if reference:
        rows.append([ORIGINAL_STUDY["name"], "", "—", *(reference_cell(m, " ¹") for m in metrics), ""])
        rows.append([ALWAYS_NORMAL["name"], "", "—", *(reference_cell(m, "", ALWAYS_NORMAL) for m in metrics), ""])
    lines = ["## Test metrics", "",
             "Best epoch by `val/f1_macro`, tested once. Cells: mean ± sample std [95 % CI of the mean over seeds, "
             "Student t with n−1 dof]; n = completed seeds (one seed: the value alone).", "",
             *markdown_rows(header, rows)]
    if reference:
        lines += ["", f"¹ {ORIGINAL_STUDY['note']}"]
    gain = [c for c in comparisons if (c["a"], c["b"]) == AUGMENTATION_PAIR]
    if gain:
        lines += ["", augmentation_gain_line(gain[0])]
    return lines


def signed(value: float | None) -> str:
    return "—" if value is None else f"{value:+.4f}"


def interval_text(low: float | None, high: float | None) -> str:
    return "—" if low is None else f"[{signed(low)}, {signed(high)}]"


def augmentation_gain_line(comparison: dict) -> str:
    title = f"**Augmentation gain** ({comparison['a']} − {comparison['b']}"
    if comparison["status"] != "compared":
        return f"{title}): {comparison['status']}, {comparison['reason']}."
    parts = []
    for metric, values in comparison["metrics"].items():
        parts.append(f"{metric_title(metric)} {signed(values['difference'])} (t 95 % CI "
                     f"{interval_text(values['t_low'], values['t_high'])}, patient bootstrap "
                     f"{interval_text(values['bootstrap_low'], values['bootstrap_high'])}): {values['verdict']}")
    seeds = ", ".join(map(str, comparison["seeds"]))
    return f"{title}, seeds {seeds}): " + "; ".join(parts) + ". See the paired comparisons below."


def mcnemar_text(comparison: dict) -> str:
    return ", ".join(f"seed {seed}: {test['p']:.3g} ({test['a_only']} vs {test['b_only']})"
                     for seed, test in comparison["mcnemar"].items()) or "—"


def pairs_markdown(comparisons: Sequence[dict]) -> list[str]:
    if not comparisons:
        return []
    header = ["A", "B", "seeds", "metric", "A − B", "t 95 % CI", "patient bootstrap 95 % CI", "verdict",
              "McNemar exact p (A only vs B only right)"]
    rows = []
    for c in comparisons:
        if c["status"] != "compared":
            rows.append([c["a"], c["b"], "—", "", "", "", "", f"{c['status']}: {c['reason']}", ""])
            continue
        for number, (metric, values) in enumerate(c["metrics"].items()):
            rows.append([c["a"], c["b"], " ".join(map(str, c["seeds"])), metric_title(metric),
                         signed(values["difference"]), interval_text(values["t_low"], values["t_high"]),
                         interval_text(values["bootstrap_low"], values["bootstrap_high"]), values["verdict"],
                         mcnemar_text(c) if number == 0 else ""])
    return ["## Paired comparisons", "",
            "A − B in test metrics over the seeds both completed. t: mean of the per-seed differences with its "
            "Student-t 95 % CI (n−1 dof; needs 2 seeds), the spread from training randomness. Patient bootstrap: "
            "95 % percentile CI of the mean difference when test patients are resampled (all images of a patient "
            "together, one resample for both arms and every seed), the spread from which patients were tested. "
            "A difference is claimed only where the t CI (so at least 2 seeds) and the bootstrap CI both exclude 0; "
            "otherwise: no difference shown. "
            "McNemar: exact two-sided p per seed on the images exactly one arm classified correctly.", "",
            *markdown_rows(header, rows)]


def epochs_markdown(groups: list[dict], reference: bool = True) -> list[str]:
    header = ["experiment", "configuration", "epoch", "n", "train acc", "train macro F1", "train macro recall"]
    if reference:
        header += ["original: acc", "original: macro F1", "original: macro recall"]
    rows = []
    for g in groups:
        for entry in g["epochs"]:
            row = [g["experiment"], g["short_configuration"], str(entry["epoch"]), str(entry["n"]),
                   *(fmt(entry[m]) for m in EPOCH_METRICS)]
            if reference:
                published = ORIGINAL_STUDY["epochs"].get(entry["epoch"], {})
                row += [fmt(published.get(m)) for m in EPOCH_METRICS]
            rows.append(row)
    lines = ["## Per-epoch training metrics", "",
             "Mean over the completed seeds of each configuration (n = runs that logged the epoch)."]
    if reference:
        lines.append("`original:` the original study's published numbers for its epochs 1-3.")
    return lines + ["", *markdown_rows(header, rows)]


def epochs_document(groups: list[dict], reference: bool) -> str:
    lines = ["# Per-epoch report", "", *epochs_markdown(groups, reference)]
    if reference:
        published = ", ".join(f"{metric_title(m)} {reference_cell(m, ' ¹')}" for m in ORIGINAL_STUDY["test"])
        lines += ["", f"Original study test numbers: {published}.", "", f"¹ {ORIGINAL_STUDY['note']}"]
    return "\n".join(lines) + "\n"


def display_path(path: str | Path, root: Path) -> str:
    with contextlib.suppress(ValueError):
        return Path(path).relative_to(root).as_posix() or "."
    return str(path)


def failures_markdown(runs: Sequence[RunRecord], root: Path) -> list[str]:
    failed = [run for run in runs if run.status == FAILED]
    unfinished = [run for run in runs if run.status == UNFINISHED]
    lines = ["## Failed and unfinished jobs", ""]
    if not failed and not unfinished:
        return lines + ["None: every job finished."]
    lines.append(f"Failed ({len(failed)}):" if failed else "Failed: none.")
    for run in failed:
        lines.append(f"- `{display_path(run.path, root)}` — overrides `{','.join(run.overrides) or '(none)'}` — "
                     f"{run.error_line}")
    lines += ["", f"Unfinished, running or stopped ({len(unfinished)}):" if unfinished else "Unfinished: none."]
    for run in unfinished:
        planned = run.value("trainer.epochs")
        logged = f"{len(run.history)} of {planned}" if planned is not None else str(len(run.history))
        lines.append(f"- `{display_path(run.path, root)}` — overrides `{','.join(run.overrides) or '(none)'}` — "
                     f"epochs logged: {logged}")
    return lines


def report_markdown(root: Path, runs: Sequence[RunRecord], groups: list[dict], metrics: Sequence[str],
                    reference: bool, comparisons: Sequence[dict] = ()) -> str:
    counts = {status: sum(run.status == status for run in runs) for status in (COMPLETED, FAILED, UNFINISHED)}
    lines = ["# Report", "", f"Runs under `{root}`: " + ", ".join(f"{n} {s}" for s, n in counts.items()) +
             f"; {len(groups)} configurations.", "",
             *results_markdown(groups, metrics, reference, comparisons), ""]
    paired = pairs_markdown(comparisons)
    if paired:
        lines += [*paired, ""]
    lines += [*epochs_markdown(groups, reference), "", *failures_markdown(runs, root)]
    return "\n".join(lines) + "\n"


CSV_STATS = ("mean", "std", "ci_low", "ci_high")


def csv_text(groups: list[dict], metrics: Sequence[str]) -> str:
    """Full-precision numbers (repr), empty where undefined."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["experiment", "configuration", "status", "n", "seeds", "failed", "unfinished",
                     *(f"{metric}_{stat}" for metric in metrics for stat in CSV_STATS)])
    for g in groups:
        writer.writerow([g["experiment"], g["configuration"], g["status"], g["n"],
                         " ".join(str(s) for s in g["seeds"]), g["failed"], g["unfinished"],
                         *("" if g["metrics"][m][stat] is None else repr(g["metrics"][m][stat])
                           for m in metrics for stat in CSV_STATS)])
    return buffer.getvalue()


def pairs_csv(comparisons: Sequence[dict]) -> str:
    """One row per compared pair and metric (missing pairs: one row with the reason); full precision."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    columns = ("difference", "t_low", "t_high", "bootstrap_low", "bootstrap_high")
    writer.writerow(["a", "b", "status", "reason", "seeds", "metric", *columns, "verdict", "bootstrap_seeds",
                     "mcnemar_p"])
    for c in comparisons:
        seeds = " ".join(map(str, c["seeds"]))
        mcnemar_p = " ".join(f"{seed}:{test['p']!r}" for seed, test in c["mcnemar"].items())
        for metric, values in c["metrics"].items() or [("", {})]:
            writer.writerow([c["a"], c["b"], c["status"], c["reason"], seeds, metric,
                             *("" if values.get(k) is None else repr(values[k]) for k in columns),
                             values.get("verdict", ""), " ".join(map(str, c["bootstrap_seeds"])), mcnemar_p])
    return buffer.getvalue()


LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(char, char) for char in str(text))


def latex_cell(text: str) -> str:
    """Escape a formatted cell whose ± was written as NUL (so that escaping leaves the math alone)."""
    return latex_escape(text).replace("\0", "$\\pm$").replace("—", "--")


def latex_table(groups: list[dict], metrics: Sequence[str], reference: bool = True,
                comparisons: Sequence[dict] = ()) -> str:
    """A booktabs tabular (needs \\usepackage{booktabs})."""
    columns = 2 + len(metrics)
    lines = ["% pneumo_exp.report: mean $\\pm$ sample std [95 % CI of the mean, Student t] over seeds",
             "\\begin{tabular}{l" + "r" * (columns - 1) + "}", "\\toprule",
             " & ".join(["Configuration", "$n$", *(latex_escape(metric_title(m)) for m in metrics)]) + " \\\\",
             "\\midrule"]
    for g in groups:
        cells = [latex_cell(format_stats(g["metrics"][m], g, plus_minus="\0")) for m in metrics]
        lines.append(" & ".join([latex_escape(g["label"]), str(g["n"]), *cells]) + " \\\\")
    if reference:
        cells = [reference_cell(m, "$^\\dagger$").replace("—", "--") for m in metrics]
        lines += ["\\midrule", " & ".join([latex_escape(ORIGINAL_STUDY["name"].capitalize()), "--", *cells]) + " \\\\"]
        cells = [reference_cell(m, "", ALWAYS_NORMAL).replace("—", "--") for m in metrics]
        lines.append(" & ".join([latex_escape(ALWAYS_NORMAL["name"]), "--", *cells]) + " \\\\")
    lines.append("\\bottomrule")
    if reference:
        lines.append(f"\\multicolumn{{{columns}}}{{p{{0.9\\linewidth}}}}{{\\footnotesize $^\\dagger$ "
                     f"{latex_escape(ORIGINAL_STUDY['note'])}}} \\\\")
    gain = [c for c in comparisons if (c["a"], c["b"]) == AUGMENTATION_PAIR]
    if gain:
        line = augmentation_gain_line(gain[0]).replace("**", "").replace(" See the paired comparisons below.", "")
        text = latex_escape(line).replace("−", "--")
        lines.append(f"\\multicolumn{{{columns}}}{{p{{0.9\\linewidth}}}}{{\\footnotesize {text}}} \\\\")
    lines.append("\\end{tabular}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------- writing

def write_atomic(path: Path, data: str | bytes) -> Path:
    """Write to a temporary file beside path, then rename it over path: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return path


def write_report(root: str | os.PathLike, output_dir: str | os.PathLike, reference: bool = True,
                 metrics: Sequence[str] = DEFAULT_METRICS, pairs: Sequence[Sequence[str]] | None = None,
                 bootstrap_samples: int = 2000) -> dict[str, Path]:
    """Write the tables, plots and failure summary of every run under root; returns {file name: path}.
    `pairs`: [A, B] configuration selectors to compare (None: the paper table's default pairs)."""
    from pneumo_exp import report_plots  # matplotlib only when plots are drawn

    if bootstrap_samples < 1:
        raise UserError(f"report.bootstrap_samples={bootstrap_samples} must be at least 1",
                        where="report.bootstrap_samples", fix="use e.g. 2000")
    root, output_dir = Path(root).resolve(), Path(output_dir)
    runs = collect_runs(root)
    if not runs:
        raise ValueError(f"report: no run folders (with .hydra/config.yaml or config.yaml) under {root}")
    groups = aggregate(runs, metrics)
    comparisons = compare_pairs(runs, pairs, bootstrap_samples)
    completed = [g for g in groups if g["n"]]
    files: dict[str, str | bytes] = {
        "table.md": report_markdown(root, runs, groups, metrics, reference, comparisons),
        "table.csv": csv_text(groups, metrics),
        "table.tex": latex_table(groups, metrics, reference, comparisons),
        "pairs.csv": pairs_csv(comparisons),
        "epochs.md": epochs_document(groups, reference),
        "failures.md": "\n".join(failures_markdown(runs, root)) + "\n",
        "curves.png": report_plots.curves_png({g["label"]: g["epochs"] for g in completed}, CURVE_METRICS),
        "confusion_test.png": report_plots.confusion_grid_png(
            {g["label"]: g["confusion_matrix_test"] for g in completed if g["confusion_matrix_test"]}),
        "bars.png": report_plots.bars_png(
            {g["label"]: {m: g["metrics"][m] for m in BAR_METRICS if m in g["metrics"]} for g in completed},
            **(bar_references() if reference else {})),
    }
    return {name: write_atomic(output_dir / name, content) for name, content in files.items()}


def bar_references() -> dict:
    """Dashed lines: the published numbers; dotted: always NORMAL over three classes; a caption saying which is which."""
    published = {m: ORIGINAL_STUDY["test"][m] for m in BAR_METRICS if m in ORIGINAL_STUDY["test"]}
    baseline = {m: ALWAYS_NORMAL["test"][m] for m in BAR_METRICS}
    caption = ("Dashed: the original study's published numbers (" +
               ", ".join(f"{metric_title(m)} {v:.4g}" for m, v in published.items()) +
               "); its F1 0.2727 and recall 0.5 are two-class means. Dotted: always NORMAL over the three classes "
               "on the official test split (" + ", ".join(f"{metric_title(m)} {v:.3f}" for m, v in baseline.items()) +
               ").")
    return {"reference": published, "baseline": baseline, "caption": caption}


def main_report(input_dir: str | os.PathLike, output_dir: str | os.PathLike,
                pairs: Sequence[Sequence[str]] | None = None, bootstrap_samples: int = 2000) -> str:
    """`pneumo-exp report report.input=DIR [report.output=DIR] [report.pairs=[[A,B],...]]`: writes the report,
    returns table.md's text."""
    paths = write_report(input_dir, output_dir, pairs=pairs, bootstrap_samples=bootstrap_samples)
    return paths["table.md"].read_text()
