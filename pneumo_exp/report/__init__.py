"""Sweep reports: collect run folders, group them by configuration (seed and generator replicate left out),
summarise over the replicated units.

`pneumo-exp` writes one folder per job (`outputs/...`, sweeps `multirun/<experiment>/<sweep>/<job>/`). This package
reads every such folder under a root, whatever its depth (`collect`), summarises each configuration over its seeds
and generator replicates (`statistics`), compares chosen pairs of configurations (`compare`) and writes into an
output folder (`tables`, `plots`):

- `table.md`, `table.csv`, `table.tex`: one row per configuration (the same overrides and resolved settings; runs
  differing only in `report.replicate_keys`, the generator replicate, and seed are one configuration), test
  metrics of the best epoch as mean ± sample std [95 % CI of the mean, Student t with n-1 dof] over the replicated
  units: the seeds, or the generator means (each over its seeds) where two or more generators were trained; with one
  generator, a note that its variability is not measured. Beside them the original study's published numbers and
  always NORMAL for comparison (`published`, from conf/report/default.yaml) where every result was tested on the
  official test split, else always NORMAL on the results' own test split (those reference rows alone in
  `references.csv`);
- a paired comparison of chosen configurations (`report.pairs`; default: the paper table's augmentation gain and each
  classifier mode against zero-shot): the difference in test accuracy and macro F1 with a Student-t CI over the
  replicated units of the paired differences (paired by seed, and by generator replicate), then, conditional on the
  trained models (which test patients were drawn), not on the recipe, a paired patient-level bootstrap CI over the
  test split and McNemar's exact p per run pair; also in `pairs.csv`;
- for an augmentation study (runs of several `dataset.train_fraction` values, or of `experiment=augment_study/<arm>`):
  `gains.md` and `gains.csv` (also inside `table.md`), per real fraction and arm, test accuracy and macro F1 and the
  paired gain over the `none` and `duplicate_real` arms of the same fraction, each with its CI over the replicated
  units, and `gain_vs_fraction.png`, the macro-F1 gain over `none` against the fraction (log x), one line per arm
  with its CI as a band;
- `epochs.md`: per-epoch train accuracy, macro F1 and macro recall (mean over seeds) beside the original study's;
- `failures.md`: failed jobs (folder, overrides, first line of the error) and unfinished ones, and the runs that are
  no result (a capped or subset test), which no table, plot or comparison counts;
- `curves.png`, `confusion_test.png`, `bars.png` (see `pneumo_exp/report/plots.py`).

`pneumo-exp report` also logs it all to one W&B run (`wandb_run`), unless `logger=none`.

Every file is written atomically (temporary file in the output folder, then `os.replace`); nothing is written
outside the output folder.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from pneumo_exp.core.files import write_atomic
from pneumo_exp.errors import UserError
from pneumo_exp.labels import CLASSES
from pneumo_exp.report.collect import COMPLETED, REPLICATE_KEYS, RunRecord, collect_runs
from pneumo_exp.report.compare import GAIN_REFERENCES, compare_pairs, is_study, study_gains
from pneumo_exp.report.published import ALWAYS_NORMAL, OFFICIAL_TEST_COUNTS, ORIGINAL_STUDY, always_normal_row
from pneumo_exp.report.statistics import CURVE_METRICS, DEFAULT_METRICS, aggregate, metric_title
from pneumo_exp.report.tables import (
    csv_text,
    epochs_document,
    failures_markdown,
    gains_csv,
    gains_document,
    latex_table,
    not_results_markdown,
    pairs_csv,
    references_csv,
    report_markdown,
)
from pneumo_exp.validate import SettingError

BAR_METRICS = ("test/acc", "test/f1_macro")


def write_report(root: str | os.PathLike, output_dir: str | os.PathLike, reference: bool = True,
                 metrics: Sequence[str] = DEFAULT_METRICS, pairs: Sequence[Sequence[str]] | None = None,
                 bootstrap_samples: int = 2000, split_by_commit: bool = False,
                 replicate_keys: Sequence[str] = REPLICATE_KEYS) -> dict[str, Path]:
    """Write the tables, plots and failure summary of every run under root; returns {file name: path}.
    `pairs`: [A, B] configuration selectors to compare (None: the paper table's default pairs);
    `replicate_keys`: the keys that tell generator replicates apart (report.replicate_keys)."""
    from pneumo_exp.report import plots as report_plots  # matplotlib only when plots are drawn

    if bootstrap_samples < 1:
        raise UserError(f"report.bootstrap_samples={bootstrap_samples} must be at least 1",
                        where="report.bootstrap_samples", fix="use e.g. 2000")
    root, output_dir = Path(root).resolve(), Path(output_dir)
    runs = collect_runs(root, split_by_commit, replicate_keys)
    if not runs:
        raise SettingError(f"no run folders (with .hydra/config.yaml or config.yaml) under {root}",
                           where="report.input", fix="give a sweep folder, or any folder holding run folders")
    results = [run for run in runs if not run.not_a_result]  # a capped or subset test is never a result
    groups = aggregate(results, metrics)
    comparisons = compare_pairs(results, pairs, bootstrap_samples)
    references = reference_rows(results) if reference else None
    gains = study_gains(results) if is_study(results) else []
    completed = [g for g in groups if g["n"]]
    files: dict[str, str | bytes] = {
        "table.md": report_markdown(root, runs, groups, metrics, references, comparisons, gains),
        "table.csv": csv_text(groups, metrics),
        "table.tex": latex_table(groups, metrics, references, comparisons),
        "pairs.csv": pairs_csv(comparisons),
        "references.csv": references_csv(references or []),
        "epochs.md": epochs_document(groups, ORIGINAL_STUDY in (references or ())),
        "failures.md": "\n".join([*failures_markdown(runs, root), *not_results_markdown(runs, root)]) + "\n",
        "curves.png": report_plots.curves_png({g["label"]: g["epochs"] for g in completed}, CURVE_METRICS),
        "confusion_test.png": report_plots.confusion_grid_png(
            {g["label"]: g["confusion_matrix_test"] for g in completed if g["confusion_matrix_test"]}),
        "bars.png": report_plots.bars_png(
            {g["label"]: {m: g["metrics"][m] for m in BAR_METRICS if m in g["metrics"]} for g in completed},
            **bar_references(references or ())),
    }
    if gains:
        files |= study_files(gains, report_plots)
    return {name: write_atomic(output_dir / name, content) for name, content in files.items()}


def study_files(gains: Sequence[dict], report_plots) -> dict[str, str | bytes]:
    """An augmentation study's gains table and its figure: the macro-F1 gain over the first reference arm."""
    reference = GAIN_REFERENCES[0]
    return {"gains.md": gains_document(gains), "gains.csv": gains_csv(gains),
            "gain_vs_fraction.png": report_plots.gain_vs_fraction_png(gain_curves(gains, reference), reference)}


def gain_curves(gains: Sequence[dict], reference: str = GAIN_REFERENCES[0],
                metric: str = "test/f1_macro") -> dict[str, list[tuple[float, dict]]]:
    """{arm: [(real fraction, the paired gain's stats over `reference`)]} of the study's rows (`study_gains`)."""
    curves: dict[str, list[tuple[float, dict]]] = {}
    for row in gains:
        gain = row["gains"].get(reference, {})
        if "metrics" in gain:
            curves.setdefault(row["label"], []).append((row["fraction"], gain["metrics"][metric]))
    return curves


def reference_rows(runs: Sequence[RunRecord]) -> list[dict]:
    """Beside results all tested on the official Kermany test split: the published numbers and always NORMAL on
    it; beside results all tested on one other split: always NORMAL on that split; otherwise none."""
    splits = {run.test_counts for run in runs if run.status == COMPLETED and run.test_counts}
    if len(splits) != 1:
        return []
    counts = dict(zip(CLASSES, splits.pop()))
    return [ORIGINAL_STUDY, ALWAYS_NORMAL] if counts == OFFICIAL_TEST_COUNTS else [always_normal_row(counts)]


def bar_references(references: Sequence[dict] = (ORIGINAL_STUDY, ALWAYS_NORMAL)) -> dict:
    """Dashed lines: the published numbers; dotted: always NORMAL over three classes; a caption saying which is which
    (of the reference rows `references`)."""
    published = {m: ORIGINAL_STUDY["test"][m] for m in BAR_METRICS if m in ORIGINAL_STUDY["test"]} \
        if ORIGINAL_STUDY in references else {}
    normal = [row for row in references if row is not ORIGINAL_STUDY]
    baseline = {m: normal[0]["test"][m] for m in BAR_METRICS} if normal else {}
    caption = []
    if published:
        caption.append("Dashed: the original study's published numbers (" +
                       ", ".join(f"{metric_title(m)} {v:.4g}" for m, v in published.items()) +
                       "); its F1 0.2727 and recall 0.5 are two-class means.")
    if baseline:
        caption.append(f"Dotted: {normal[0]['name']}: " +
                       ", ".join(f"{metric_title(m)} {v:.3f}" for m, v in baseline.items()) + ".")
    return {"reference": published, "baseline": baseline, "caption": " ".join(caption)}


def main_report(input_dir: str | os.PathLike, output_dir: str | os.PathLike,
                pairs: Sequence[Sequence[str]] | None = None, bootstrap_samples: int = 2000,
                split_by_commit: bool = False, replicate_keys: Sequence[str] = REPLICATE_KEYS) -> str:
    """`pneumo-exp report report.input=DIR [report.output=DIR] [report.pairs=[[A,B],...]]`: writes the report,
    returns table.md's text."""
    paths = write_report(input_dir, output_dir, pairs=pairs, bootstrap_samples=bootstrap_samples,
                         split_by_commit=split_by_commit, replicate_keys=replicate_keys)
    return paths["table.md"].read_text()
