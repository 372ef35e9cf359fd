"""The report's text files: markdown tables, CSV (full precision) and a booktabs LaTeX table."""

from __future__ import annotations

import contextlib
import csv
import io
from collections.abc import Sequence
from pathlib import Path

from pneumo_exp.report.collect import COMPLETED, FAILED, UNFINISHED, RunRecord
from pneumo_exp.report.compare import (
    AUGMENTATION_PAIR,
    CONDITIONAL,
    GAIN_METRICS,
    GAIN_REFERENCES,
    PATIENT_LEVEL,
    pairing_text,
)
from pneumo_exp.report.published import OFFICIAL_TEST_COUNTS, ORIGINAL_STUDY
from pneumo_exp.report.statistics import EPOCH_METRICS, GENERATORS, metric_title


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
    notes = [group["replication"]] if group.get("generators") else []
    notes += [f"{group[status]} {status}" for status in (FAILED, UNFINISHED) if group[status]]
    notes += [f"seed {seed} run more than once: the newest counted" for seed in group["repeated_seeds"]]
    if len(group.get("commits", ())) > 1:
        notes.append(f"seeds from {len(group['commits'])} code versions ({', '.join(group['commits'])}; "
                     "report.split_by_commit=true splits them)")
    return "; ".join(notes)


def markdown_rows(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells):
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"
    return [line(header), "| " + " | ".join("---" for _ in header) + " |", *map(line, rows)]


def reference_cell(metric: str, marker: str, reference: dict = ORIGINAL_STUDY) -> str:
    value = reference["test"].get(metric)
    if value is None:
        return "—"
    return fmt(value) + (marker if metric in reference.get("flagged", ()) else "")


NOT_OFFICIAL_SPLIT = ("The original study's published numbers and always NORMAL on the official test split are left "
                      "out: not every result here was tested on the official Kermany test split ({NORMAL} NORMAL, "
                      "{BACTERIA} BACTERIA, {VIRUS} VIRUS images).").format(**OFFICIAL_TEST_COUNTS)


def results_markdown(groups: list[dict], metrics: Sequence[str], references: Sequence[dict] | None,
                     comparisons: Sequence[dict] = ()) -> list[str]:
    """`references`: the reference rows beside these results (None: none asked for)."""
    header = ["experiment", "configuration", "n", *map(metric_title, metrics), "notes"]
    rows = [[g["experiment"], g["short_configuration"], str(g["n"]),
             *(format_stats(g["metrics"][m], g) for m in metrics), group_notes(g)] for g in groups]
    rows += [[row["name"], "", "—", *(reference_cell(m, " ¹", row) for m in metrics), ""] for row in references or ()]
    lines = ["## Test metrics", "",
             "Best epoch by `val/f1_macro`, tested once. Cells: mean ± sample std [95 % CI of the mean, Student t "
             "with n−1 dof] over the replicated units: the seeds, or, where two or more generator replicates were "
             "trained (`report.replicate_keys`), the generator means, each the mean over its seeds (the notes say "
             "which, and where one generator's variability is not measured); n = completed runs, seeds × generator "
             "replicates (one run: the value alone).", "",
             *markdown_rows(header, rows)]
    if ORIGINAL_STUDY in (references or ()):
        lines += ["", f"¹ {ORIGINAL_STUDY['note']}"]
    elif references is not None and any(g["n"] for g in groups):
        lines += ["", NOT_OFFICIAL_SPLIT]
    gain = [c for c in comparisons if (c["a"], c["b"]) == AUGMENTATION_PAIR]
    for line in augmentation_gain_lines(gain[0]) if gain else ():
        lines += ["", line]
    return lines


def signed(value: float | None) -> str:
    return "—" if value is None else f"{value:+.4f}"


def interval_text(low: float | None, high: float | None) -> str:
    return "—" if low is None else f"[{signed(low)}, {signed(high)}]"


def over_units(values: dict) -> str:
    """What a paired CI is over: `3 seeds`, `2 generator means`."""
    return f"{values['units']} generator means" if values["level"] == GENERATORS else f"{values['units']} seeds"


def augmentation_gain_lines(comparison: dict) -> list[str]:
    """The gain with its CI over the replicated units and verdict; then, conditional on the trained models, the
    patient bootstrap, the test images and McNemar."""
    title = f"**Augmentation gain** ({comparison['a']} − {comparison['b']}"
    if comparison["status"] != "compared":
        return [f"{title}): {comparison['status']}, {comparison['reason']}."]
    parts, bootstrap = [], []
    for metric, values in comparison["metrics"].items():
        parts.append(f"{metric_title(metric)} {signed(values['difference'])} (t 95 % CI over {over_units(values)} "
                     f"{interval_text(values['t_low'], values['t_high'])}): {values['verdict']}")
        bootstrap.append(f"{metric_title(metric)} {interval_text(values['bootstrap_low'], values['bootstrap_high'])}")
    seeds = ", ".join(map(str, comparison["seeds"]))
    replicated = f" ({comparison['replication']})" if "generator" in comparison["replication"] else ""
    return [f"{title}, seeds {seeds}): " + "; ".join(parts) + f"{replicated}.",
            f"Patient bootstrap 95 % CI and McNemar, {CONDITIONAL}: " + ", ".join(bootstrap) +
            f"; test images {pairing_text(comparison)}; McNemar {mcnemar_text(comparison)}. "
            "See the paired comparisons below."]


def mcnemar_text(comparison: dict) -> str:
    """The runs together, then each pair's p; the units named (patients, or images where patients are unknown)."""
    together = comparison["mcnemar_all_seeds"]
    if together is None:
        return "—"
    level = "patients as units" if together["level"] == PATIENT_LEVEL else "image-level (patients unknown)"
    seeds = together["seeds"]
    word = "runs" if len(comparison.get("generators", ())) > 1 else "seeds"
    which = f"{word} {' '.join(map(str, seeds))} together" if len(seeds) > 1 else f"{word[:-1]} {seeds[0]}"
    text = (f"{level}: {which} p {together['p']:.3g} ({together['a_only']} vs {together['b_only']} images, "
            f"{together['units']} {'patients' if together['level'] == PATIENT_LEVEL else 'images'})")
    if len(seeds) > 1:
        text += f"; per {word[:-1]} " + ", ".join(f"{seed}: {test['p']:.3g}"
                                                  for seed, test in comparison["mcnemar"].items())
    return text


def seeds_cell(comparison: dict) -> str:
    seeds = " ".join(map(str, comparison["seeds"]))
    generators = len(comparison["generators"])
    return f"{seeds} × {generators} generators" if generators > 1 else seeds


def unmeasured_note(comparison: dict, row: int) -> str:
    """On a compared pair's first row: the arms whose one generator's variability is not measured."""
    notes = comparison["unmeasured"]
    return f" ({'; '.join(notes)})" if notes and row == 0 else ""


def pairs_markdown(comparisons: Sequence[dict]) -> list[str]:
    if not comparisons:
        return []
    header = ["A", "B", "seeds", "metric", "A − B", "t 95 % CI over the replicated units",
              "patient bootstrap 95 % CI (conditional on the trained models)", "verdict", "test images",
              "McNemar exact p (A only vs B only right images; conditional on the trained models)"]
    rows = []
    for c in comparisons:
        if c["status"] != "compared":
            rows.append([c["a"], c["b"], "—", "", "", "", "", f"{c['status']}: {c['reason']}", "", ""])
            continue
        for number, (metric, values) in enumerate(c["metrics"].items()):
            interval = interval_text(values["t_low"], values["t_high"])
            rows.append([c["a"], c["b"], seeds_cell(c), metric_title(metric), signed(values["difference"]),
                         f"{interval} over {over_units(values)}" + unmeasured_note(c, number),
                         interval_text(values["bootstrap_low"], values["bootstrap_high"]), values["verdict"],
                         *([pairing_text(c), mcnemar_text(c)] if number == 0 else ["", ""])])
    return ["## Paired comparisons", "",
            "A − B in test metrics over the runs both completed, paired by seed and, where both arms were "
            "replicated over the same generators, by generator replicate. t: the mean paired difference with its "
            "Student-t 95 % CI over the units that were replicated, the spread from training randomness: the seeds "
            "(n−1 dof; needs 2 seeds), or, where two or more generator replicates were trained, the generator means "
            "(each the mean over its seeds of the paired differences), since the generator is a random factor of "
            "the recipe as the seed is; with one generator, its variability is not measured. "
            f"Patient bootstrap and McNemar are {CONDITIONAL}. "
            "Patient bootstrap: 95 % percentile CI of the mean difference when test patients are resampled (all "
            "images of a patient together, one resample for both arms and every run pair), the spread from which "
            "patients were tested. "
            "A difference is claimed only where the t CI and the bootstrap CI both exclude 0; "
            "otherwise: no difference shown. "
            "Test images: the two arms' test images are matched by the sha256 of their bytes (from each run's "
            "manifest.csv; by path where it gives none), so runs that read the dataset from another folder still "
            "pair; where the arms tested different images (another cap or subset), the bootstrap and McNemar are "
            "left out and the column says the verdict rests on the t CI alone. "
            "McNemar: exact two-sided p with patients as the units (the sign of each patient's count of images only "
            "A got right minus those only B got right is flipped, the exact form of Durkalski et al.'s 2003 clustered "
            "McNemar; McNemar's exact test when each patient has one image), since images of one patient are not "
            "independent. The runs share the test patients, so their p values are not independent: one test takes "
            "the runs together (each patient's counts summed over them, flipped as a whole) and the per-run p "
            "values beside it are not a verdict.", "",
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


def not_results_markdown(runs: Sequence[RunRecord], root: Path) -> list[str]:
    """Completed runs whose test was capped or a subset: listed (after a blank line), never counted as results."""
    set_aside = [run for run in runs if run.status == COMPLETED and run.not_a_result]
    if not set_aside:
        return []
    lines = ["", "## Not results", "", f"Completed, but their test metrics are no result, so they are left out of the "
                                   f"tables, plots and paired comparisons ({len(set_aside)}):"]
    for run in set_aside:
        lines.append(f"- `{display_path(run.path, root)}` — overrides `{','.join(run.overrides) or '(none)'}` — "
                     f"{'; '.join(run.not_a_result)}")
    return lines


def report_markdown(root: Path, runs: Sequence[RunRecord], groups: list[dict], metrics: Sequence[str],
                    references: Sequence[dict] | None, comparisons: Sequence[dict] = (),
                    gains: Sequence[dict] = ()) -> str:
    """`references`: the reference rows beside these results (None: none asked for); `gains`: an augmentation
    study's rows (`compare.study_gains`)."""
    counts = [f"{sum(run.status == status for run in runs)} {status}" for status in (COMPLETED, FAILED, UNFINISHED)]
    set_aside = sum(run.status == COMPLETED and bool(run.not_a_result) for run in runs)
    if set_aside:
        counts[0] += f" ({set_aside} not results: a capped or subset test)"
    lines = ["# Report", "", f"Runs under `{root}`: {', '.join(counts)}; {len(groups)} configurations.", "",
             *results_markdown(groups, metrics, references, comparisons), ""]
    if gains:
        lines += [*gains_markdown(gains), ""]
    paired = pairs_markdown(comparisons)
    if paired:
        lines += [*paired, ""]
    lines += [*epochs_markdown(groups, ORIGINAL_STUDY in (references or ())), "", *failures_markdown(runs, root),
              *not_results_markdown(runs, root)]
    return "\n".join(lines) + "\n"


CSV_STATS = ("mean", "std", "ci_low", "ci_high")


def csv_text(groups: list[dict], metrics: Sequence[str]) -> str:
    """Full-precision numbers (repr), empty where undefined."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["experiment", "configuration", "status", "n", "seeds", "failed", "unfinished",
                     *(f"{metric}_{stat}" for metric in metrics for stat in CSV_STATS), "generators", "replication"])
    for g in groups:
        writer.writerow([g["experiment"], g["configuration"], g["status"], g["n"],
                         " ".join(str(s) for s in g["seeds"]), g["failed"], g["unfinished"],
                         *("" if g["metrics"][m][stat] is None else repr(g["metrics"][m][stat])
                           for m in metrics for stat in CSV_STATS), " ".join(g["generators"]), g["replication"]])
    return buffer.getvalue()


def pairs_csv(comparisons: Sequence[dict]) -> str:
    """One row per compared pair and metric (missing pairs: one row with the reason); full precision."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    columns = ("difference", "t_low", "t_high", "bootstrap_low", "bootstrap_high")
    writer.writerow(["a", "b", "status", "reason", "seeds", "metric", *columns, "verdict", "pairing",
                     "bootstrap_seeds", "mcnemar_level", "mcnemar_p_all_seeds", "mcnemar_p",
                     "mcnemar_image_level_p", "t_over", "t_units", "generators", "replication"])
    for c in comparisons:
        seeds = " ".join(map(str, c["seeds"]))
        together = c["mcnemar_all_seeds"] or {}
        mcnemar = [" ".join(f"{seed}:{test[p]!r}" for seed, test in c["mcnemar"].items())
                   for p in ("p", "image_level_p")]
        for metric, values in c["metrics"].items() or [("", {})]:
            writer.writerow([c["a"], c["b"], c["status"], c["reason"], seeds, metric,
                             *("" if values.get(k) is None else repr(values[k]) for k in columns),
                             values.get("verdict", ""), pairing_text(c) if c["status"] == "compared" else "",
                             " ".join(map(str, c["bootstrap_seeds"])), together.get("level", ""),
                             repr(together["p"]) if together else "", *mcnemar, values.get("level", ""),
                             values.get("units", ""), " ".join(c["generators"]), c["replication"]])
    return buffer.getvalue()


def gain_cell(gain: dict, metric: str) -> str:
    """`+0.0123 [-0.0050, +0.0300]`, or why there is no gain."""
    if "reason" in gain:
        return gain["reason"]
    values = gain["metrics"][metric]
    if values["ci_low"] is None:
        return signed(values["mean"])
    return f"{signed(values['mean'])} {interval_text(values['ci_low'], values['ci_high'])}"


def mean_cell(values: dict) -> str:
    """`0.8123 [0.8012, 0.8234]`; the mean alone without a CI."""
    if values["ci_low"] is None:
        return fmt(values["mean"])
    return f"{fmt(values['mean'])} [{fmt(values['ci_low'])}, {fmt(values['ci_high'])}]"


def gains_markdown(rows: Sequence[dict]) -> list[str]:
    """Per real fraction and arm: the test metrics and the paired gains over each reference arm."""
    header = ["fraction", "arm", "replicated units", *map(metric_title, GAIN_METRICS),
              *(f"{metric_title(m)} gain over {reference}" for reference in GAIN_REFERENCES for m in GAIN_METRICS)]
    table = [[f"{row['fraction']:g}", row["label"], row["replication"],
              *(mean_cell(row["metrics"][m]) for m in GAIN_METRICS),
              *(gain_cell(row["gains"][reference], m) if reference in row["gains"] else "reference"
                for reference in GAIN_REFERENCES for m in GAIN_METRICS)] for row in rows]
    return ["## Gains against the real fraction", "",
            "Per real fraction (`dataset.train_fraction`) and arm (`experiment=augment_study/<arm>`, other recipes by "
            "name): test accuracy and macro F1, mean [95 % CI over the replicated units], and the paired gain over "
            f"the {' and '.join(GAIN_REFERENCES)} arms of the same fraction, mean [Student-t 95 % CI over the "
            "replicated units]. Runs are paired by seed, and by generator replicate where both arms have several; "
            "the units are the generator means (each the mean over its seeds of the paired differences) where two or "
            "more generator replicates were trained, else the seeds. `gain_vs_fraction.png` plots the macro-F1 gain "
            f"over {GAIN_REFERENCES[0]} against the fraction; `gains.csv` holds these numbers at full precision.", "",
            *markdown_rows(header, table)]


def gains_document(rows: Sequence[dict]) -> str:
    return "\n".join(["# Augmentation study", "", *gains_markdown(rows)]) + "\n"


def number_cell(value: float | str | None) -> str:
    """Full precision (repr) for numbers, text as it is, empty where undefined."""
    return "" if value is None else value if isinstance(value, str) else repr(value)


def gains_csv(rows: Sequence[dict]) -> str:
    """One row per real fraction and arm (full precision); a missing gain's columns empty, its reason given."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    stats = ("mean", "ci_low", "ci_high", "level", "units")
    writer.writerow(["fraction", "arm", "configuration", "seeds", "generators", "replication",
                     *(f"{m}_{stat}" for m in GAIN_METRICS for stat in stats),
                     *(column for reference in GAIN_REFERENCES for column in
                       (*(f"gain_{reference}_{m}_{stat}" for m in GAIN_METRICS for stat in stats),
                        f"gain_{reference}_replication"))])
    for row in rows:
        cells = [repr(row["fraction"]), row["label"], row["configuration"], " ".join(map(str, row["seeds"])),
                 " ".join(row["generators"]), row["replication"],
                 *(number_cell(row["metrics"][m][stat]) for m in GAIN_METRICS for stat in stats)]
        for reference in GAIN_REFERENCES:
            gain = row["gains"].get(reference, {"reason": "reference"})
            values = gain.get("metrics", {})
            cells += [number_cell(values[m][stat]) if values else "" for m in GAIN_METRICS for stat in stats]
            cells.append(gain.get("replication") or gain["reason"])
        writer.writerow(cells)
    return buffer.getvalue()


def references_csv(references: Sequence[dict]) -> str:
    """The reference rows beside the table (published numbers, always NORMAL): name, then their test metrics."""
    metrics = list(dict.fromkeys(metric for row in references for metric in row["test"]))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["name", *metrics])
    for row in references:
        writer.writerow([row["name"], *("" if row["test"].get(m) is None else repr(row["test"][m]) for m in metrics)])
    return buffer.getvalue()


LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(char, char) for char in str(text))


def latex_cell(text: str) -> str:
    """Escape a formatted cell whose ± was written as NUL (so that escaping leaves the math alone)."""
    return latex_escape(text).replace("\0", "$\\pm$").replace("—", "--")


def latex_table(groups: list[dict], metrics: Sequence[str], references: Sequence[dict] | None = (),
                comparisons: Sequence[dict] = ()) -> str:
    """A booktabs tabular (needs \\usepackage{booktabs}), with the reference rows `references` below a rule."""
    columns = 2 + len(metrics)
    lines = ["% pneumo_exp.report: mean $\\pm$ sample std [95 % CI of the mean, Student t] over the replicated units "
             "(seeds, or generator means where two or more generators were trained)",
             "\\begin{tabular}{l" + "r" * (columns - 1) + "}", "\\toprule",
             " & ".join(["Configuration", "$n$", *(latex_escape(metric_title(m)) for m in metrics)]) + " \\\\",
             "\\midrule"]
    for g in groups:
        cells = [latex_cell(format_stats(g["metrics"][m], g, plus_minus="\0")) for m in metrics]
        lines.append(" & ".join([latex_escape(g["label"]), str(g["n"]), *cells]) + " \\\\")
    if references:
        lines.append("\\midrule")
    for row in references or ():
        cells = [reference_cell(m, "$^\\dagger$", row).replace("—", "--") for m in metrics]
        lines.append(" & ".join([latex_escape(row["name"]), "--", *cells]) + " \\\\")
    lines.append("\\bottomrule")
    if ORIGINAL_STUDY in (references or ()):
        lines.append(f"\\multicolumn{{{columns}}}{{p{{0.9\\linewidth}}}}{{\\footnotesize $^\\dagger$ "
                     f"{latex_escape(ORIGINAL_STUDY['note'])}}} \\\\")
    gain = [c for c in comparisons if (c["a"], c["b"]) == AUGMENTATION_PAIR]
    if gain:
        line = " ".join(augmentation_gain_lines(gain[0])).replace("**", "")
        text = latex_escape(line.replace(" See the paired comparisons below.", "")).replace("−", "--")
        lines.append(f"\\multicolumn{{{columns}}}{{p{{0.9\\linewidth}}}}{{\\footnotesize {text}}} \\\\")
    lines.append("\\end{tabular}")
    return "\n".join(lines) + "\n"
