"""Sweep reports: collect run folders, group them by configuration (seed left out), summarise over seeds.

`pneumo-exp` writes one folder per job (`outputs/...`, sweeps `multirun/<experiment>/<sweep>/<job>/`). This module
reads every such folder under a root, whatever its depth, and writes into an output folder:

- `table.md`, `table.csv`, `table.tex`: one row per configuration, test metrics of the best epoch as
  mean ± sample std [95 % CI of the mean over seeds, Student t with n-1 dof], with the original study's published
  numbers for comparison;
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

DEFAULT_METRICS = ("test/acc", "test/recall_macro", "test/f1_macro", "test/auroc_macro", "test/recall_VIRUS")
EPOCH_METRICS = ("train/acc", "train/f1_macro", "train/recall_macro")
CURVE_METRICS = ("val/f1_macro", "train/acc")
BAR_METRICS = ("test/acc", "test/f1_macro")

# Override keys (and their sub-keys) that never change what a job computes, so never split a configuration.
NOT_A_SETTING = ("logger", "paths", "hydra", "task", "resume", "tags")
RUN_MARKERS = ("results.json", "failed.json", "metrics.jsonl", "git.json")
NOT_RUN_FOLDERS = {".hydra", "wandb", "checkpoints", "__pycache__"}

COMPLETED, FAILED, UNFINISHED = "completed", "failed", "unfinished"

ORIGINAL_STUDY: dict[str, Any] = {
    "name": "original study (published)",
    "epochs": {
        1: {"train/acc": 0.4894, "train/f1_macro": 0.4725, "train/recall_macro": 0.4865},
        2: {"train/acc": 0.5051, "train/f1_macro": 0.4911, "train/recall_macro": 0.5095},
        3: {"train/acc": 0.5047, "train/f1_macro": 0.4891, "train/recall_macro": 0.5056},
    },
    "test": {"test/acc": 0.375, "test/f1_macro": 0.2727, "test/recall_macro": 0.5},
    "flagged": ("test/recall_macro",),
    "note": ("Test recall 0.5 is as published. On the official test split (234 NORMAL, 242 BACTERIA, 148 VIRUS "
             "images) always predicting NORMAL gives accuracy 234/624 = 0.375, macro recall 1/3 = 0.333 and macro "
             "F1 0.182 over the three classes; the published recall 0.5 and F1 0.2727 are what that constant "
             "prediction gets when averaged over two classes (NORMAL, PNEUMONIA)."),
}

# Two-sided 95 %: t quantile 0.975 by degrees of freedom (tests check it against numerical integration).
T_975 = {1: 12.706205, 2: 4.302653, 3: 3.182446, 4: 2.776445, 5: 2.570582, 6: 2.446912, 7: 2.364624,
         8: 2.306004, 9: 2.262157, 10: 2.228139, 11: 2.200985, 12: 2.178813, 13: 2.160369, 14: 2.144787,
         15: 2.131450, 16: 2.119905, 17: 2.109816, 18: 2.100922, 19: 2.093024, 20: 2.085963, 21: 2.079614,
         22: 2.073873, 23: 2.068658, 24: 2.063899, 25: 2.059539, 26: 2.055529, 27: 2.051831, 28: 2.048407,
         29: 2.045230, 30: 2.042272, 40: 2.021075, 60: 2.000298, 120: 1.979930}
Z_975 = 1.959964


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
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            row = json.loads(line)
            if isinstance(row, dict) and "epoch" in row:
                rows.append(row)
    return rows


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
    """Student t quantile 0.975 (two-sided 95 %); between table entries linear in 1/dof."""
    if dof < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {dof}")
    if dof in T_975:
        return T_975[dof]
    points = sorted([(1 / key, value) for key, value in T_975.items()] + [(0.0, Z_975)])
    x = 1 / dof
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    raise AssertionError("unreachable: 1/dof lies in (0, 1]")


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


def bootstrap_mean(runs: Sequence[RunRecord], metric: str) -> tuple[float | None, float | None]:
    """Mean over runs of each run's own bootstrap CI (over test images), where results.json has one."""
    bounds = [run.results.get("ci95", {}).get(metric) for run in runs]
    bounds = [b for b in bounds if isinstance(b, (list, tuple)) and len(b) == 2 and len(finite(b)) == 2]
    if not bounds:
        return None, None
    return float(np.mean([b[0] for b in bounds])), float(np.mean([b[1] for b in bounds]))


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
    metrics {name: n, mean, std, ci_low, ci_high, bootstrap_low, bootstrap_high} over completed seeds,
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
        stats = summarize(run.metrics.get(metric) for run in completed)
        stats["bootstrap_low"], stats["bootstrap_high"] = bootstrap_mean(completed, metric)
        summary["metrics"][metric] = stats
    return summary


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


def reference_cell(metric: str, marker: str) -> str:
    value = ORIGINAL_STUDY["test"].get(metric)
    if value is None:
        return "—"
    return fmt(value) + (marker if metric in ORIGINAL_STUDY["flagged"] else "")


def results_markdown(groups: list[dict], metrics: Sequence[str], reference: bool) -> list[str]:
    header = ["experiment", "configuration", "n", *map(metric_title, metrics), "notes"]
    rows = [[g["experiment"], g["short_configuration"], str(g["n"]),
             *(format_stats(g["metrics"][m], g) for m in metrics), group_notes(g)] for g in groups]
    if reference:
        rows.append([ORIGINAL_STUDY["name"], "", "—", *(reference_cell(m, " ¹") for m in metrics), ""])
    lines = ["## Test metrics", "",
             "Best epoch by `val/f1_macro`, tested once. Cells: mean ± sample std [95 % CI of the mean over seeds, "
             "Student t with n−1 dof]; n = completed seeds (one seed: the value alone).", "",
             *markdown_rows(header, rows)]
    if reference:
        lines += ["", f"¹ {ORIGINAL_STUDY['note']}"]
    return lines


def bootstrap_markdown(groups: list[dict], metrics: Sequence[str]) -> list[str]:
    groups = [g for g in groups if g["n"]]
    metrics = [m for m in metrics if any(g["metrics"][m]["bootstrap_low"] is not None for g in groups)]
    if not metrics:
        return []
    rows = []
    for g in groups:
        cells = []
        for metric in metrics:
            stats = g["metrics"][metric]
            cells.append("—" if stats["bootstrap_low"] is None
                         else f"[{fmt(stats['bootstrap_low'])}, {fmt(stats['bootstrap_high'])}]")
        rows.append([g["experiment"], g["short_configuration"], str(g["n"]), *cells])
    header = ["experiment", "configuration", "n", *map(metric_title, metrics)]
    return ["## Bootstrap intervals over test patients", "",
            "Each run's percentile-bootstrap 95 % CI over test patients (all images of a drawn patient together;",
            "`results.json` ci95), averaged over seeds.",
            "", *markdown_rows(header, rows)]


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
                    reference: bool) -> str:
    counts = {status: sum(run.status == status for run in runs) for status in (COMPLETED, FAILED, UNFINISHED)}
    lines = ["# Report", "", f"Runs under `{root}`: " + ", ".join(f"{n} {s}" for s, n in counts.items()) +
             f"; {len(groups)} configurations.", "",
             *results_markdown(groups, metrics, reference), ""]
    bootstrap = bootstrap_markdown(groups, metrics)
    if bootstrap:
        lines += [*bootstrap, ""]
    lines += [*epochs_markdown(groups, reference), "", *failures_markdown(runs, root)]
    return "\n".join(lines) + "\n"


CSV_STATS = ("mean", "std", "ci_low", "ci_high", "bootstrap_low", "bootstrap_high")


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


LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(char, char) for char in str(text))


def latex_cell(text: str) -> str:
    """Escape a formatted cell whose ± was written as NUL (so that escaping leaves the math alone)."""
    return latex_escape(text).replace("\0", "$\\pm$").replace("—", "--")


def latex_table(groups: list[dict], metrics: Sequence[str], reference: bool = True) -> str:
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
    lines.append("\\bottomrule")
    if reference:
        lines.append(f"\\multicolumn{{{columns}}}{{p{{0.9\\linewidth}}}}{{\\footnotesize $^\\dagger$ "
                     f"{latex_escape(ORIGINAL_STUDY['note'])}}} \\\\")
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
                 metrics: Sequence[str] = DEFAULT_METRICS) -> dict[str, Path]:
    """Write the tables, plots and failure summary of every run under root; returns {file name: path}."""
    from pneumo_exp import report_plots  # matplotlib only when plots are drawn

    root, output_dir = Path(root).resolve(), Path(output_dir)
    runs = collect_runs(root)
    if not runs:
        raise ValueError(f"report: no run folders (with .hydra/config.yaml or config.yaml) under {root}")
    groups = aggregate(runs, metrics)
    completed = [g for g in groups if g["n"]]
    files: dict[str, str | bytes] = {
        "table.md": report_markdown(root, runs, groups, metrics, reference),
        "table.csv": csv_text(groups, metrics),
        "table.tex": latex_table(groups, metrics, reference),
        "epochs.md": epochs_document(groups, reference),
        "failures.md": "\n".join(failures_markdown(runs, root)) + "\n",
        "curves.png": report_plots.curves_png({g["label"]: g["epochs"] for g in completed}, CURVE_METRICS),
        "confusion_test.png": report_plots.confusion_grid_png(
            {g["label"]: g["confusion_matrix_test"] for g in completed if g["confusion_matrix_test"]}),
        "bars.png": report_plots.bars_png(
            {g["label"]: {m: g["metrics"][m] for m in BAR_METRICS if m in g["metrics"]} for g in completed},
            ORIGINAL_STUDY["test"] if reference else {}),
    }
    return {name: write_atomic(output_dir / name, content) for name, content in files.items()}


def main_report(input_dir: str | os.PathLike, output_dir: str | os.PathLike) -> str:
    """`pneumo-exp report report.input=DIR report.output=DIR`: writes the report, returns table.md's text."""
    return write_report(input_dir, output_dir)["table.md"].read_text()
