"""The README stays true: its printed blocks match what the commands print, and every make target, config option,
task and result-neutral key it names exists.

A printed block is a fenced block without a language. Its lines must appear, in order, in what the command prints
(lines left out are allowed); `...` in a line stands for any text. The tests here are cheap and run nothing: the
demo's data summary is built in process; the metric tables and the quality report must be in the exact format the
code prints for their numbers, and the numbers must fit the counts the README shows (an accuracy is a whole number of
the split's images; on a split with as many images in every class the macro recall is the accuracy; the synthetic
counts follow from the training counts and the augmentation ratio, the classification accuracy score's training
images from both). `make readme-check` runs them, then `python tests/test_readme.py`: `make demo`'s jobs afresh (the
demo, the phantom_small base where the cache lacks it, the augmented demo), each number of their blocks within the
tolerance below of the fresh run's (CPU kernels round differently between machines) and every count exact, and the
real data's summary where ../shared/data/kermany-224 exists.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from conftest import REAL_DATA, REPO, compose

README = REPO / "README.md"
FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```$", re.M | re.S)
DEMO_COMMAND = "pneumo-exp experiment=demo"
DEMO = ("experiment=demo",)
PRETRAIN = ("task=pretrain_diffusion", "experiment=demo_augmented")
AUGMENTED = ("experiment=demo_augmented",)
AUGMENTED_BLOCK = "synthetic training images: "  # how the augmented demo's block begins
QUALITY_TITLE = "synthetic image quality (classifier embedding space)"
QUALITY_COLUMNS = ("real", "synthetic", "fid", "kid_mean", "diversity_synthetic_over_real", "nn_median",
                   "real_nn_median", "likely_copies")  # as format_quality prints them
SCORE_ROW = re.compile(r"  (\w+) +(\d+) images   test acc ([\d.]+)   macro F1 ([\d.]+)")
FID_NOTE = re.compile(r"  (\w+) FID: .* the (\d+) feature dimensions")

# How far a fresh run's numbers may lie from the README's (absolute), about 1.5 times the largest gap seen between
# two fresh runs on two machines (the augmented demo's README block of 85cab07 and a run of e97172b: test acc 0.042,
# classification accuracy score 0.109, KID 0.0018, diversity 0.247, nearest-neighbour medians 0.041).
TOLERANCE = 0.1  # a classifier metric; one of the 72 test images moves acc 0.014
SCORE_TOLERANCE = 0.15  # the classification accuracy score's test acc and macro F1: classifiers of 90 images, trained
# on synthetic images that every rounding difference upstream (LoRA training, sampling) changes as well
QUALITY_TOLERANCE = {  # the quality report, per column, counts exact; narrow enough still to tell phantom_small's
    # class-like images (KID about 0.001, diversity about 1, nearest neighbours about 0.1 away) from the near-chance
    # ones of the demo's earlier generators (KID 0.05-0.11, diversity 0.2-0.35, nearest neighbours 0.6-0.87 away)
    "real": 0, "synthetic": 0, "fid": 0.5, "kid_mean": 0.005, "diversity_synthetic_over_real": 0.4, "nn_median": 0.06,
    "real_nn_median": 0.06, "likely_copies": 0}
SCORE_TOLERANCES = {"train_images": 0, "test/acc": SCORE_TOLERANCE, "test/f1_macro": SCORE_TOLERANCE}


def readme_text() -> str:
    return README.read_text()


def fenced_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(language, lines) of each fenced block, its indentation removed."""
    return [(language, [line[len(indent):].rstrip() for line in body.splitlines()])
            for indent, language, body in FENCE.findall(text)]


def printed_blocks(text: str) -> dict[str, list[str]]:
    """The blocks that show what a command prints, by their first line."""
    return {lines[0]: lines for language, lines in fenced_blocks(text) if not language}


def code_text(text: str) -> str:
    """Everything the README sets as code: fenced blocks and inline spans."""
    prose = FENCE.sub("", text)
    return "\n".join(["\n".join(lines) for _, lines in fenced_blocks(text)] + re.findall(r"`([^`]+)`", prose))


def line_matches(shown: str, printed: str) -> bool:
    if "..." not in shown:
        return shown == printed.rstrip()
    return re.fullmatch(".*".join(re.escape(part) for part in shown.split("...")), printed.rstrip()) is not None


def missing_lines(shown: list[str], printed: list[str]) -> list[str]:
    """The shown lines that do not appear, in order, among the printed ones (a line `...` stands for any lines)."""
    missing, position = [], 0
    for line in shown:
        if line == "...":
            continue
        found = next((i for i in range(position, len(printed)) if line_matches(line, printed[i])), None)
        if found is None:
            missing.append(line)
        else:
            position = found + 1
    return missing


def demo_block() -> list[str]:
    return printed_blocks(readme_text())["dataset: phantom"]


def augmented_block() -> list[str]:
    """The augmented demo's block: its synthetic counts, metric table and quality report."""
    return next(lines for first, lines in printed_blocks(readme_text()).items() if first.startswith(AUGMENTED_BLOCK))


def split_demo_block(lines: list[str]) -> tuple[list[str], list[str]]:
    """The data summary (through the leakage check) and the metric table of the demo's block."""
    end = next(i for i, line in enumerate(lines) if line.startswith("leakage check:")) + 1
    return lines[:end], lines[end:]


def split_augmented_block(lines: list[str]) -> tuple[str, list[str], list[str]]:
    """The synthetic counts line, the metric table and the quality report of the augmented demo's block."""
    title = lines.index(QUALITY_TITLE)
    return lines[0], lines[1:title], lines[title:]


def summary_counts(summary: list[str]) -> dict[str, dict[str, int]]:
    """Per split of a data summary, its count in each column (the classes, total, patients)."""
    header = next(line for line in summary if line.startswith("split")).split()[1:]
    return {cells[0]: dict(zip(header, map(int, cells[1:]), strict=True))
            for cells in map(str.split, summary) if cells[:1] in (["train"], ["val"], ["test"])}


def metric_rows(lines: list[str]) -> dict[str, dict[str, float]]:
    """The rows of the metric tables among lines, by split (a data summary's rows hold counts, not decimals)."""
    from pneumo_exp.classify.metrics import HEADLINE

    return {cells[0]: dict(zip(HEADLINE, map(float, cells[1:]), strict=True)) for cells in map(str.split, lines)
            if cells[:1] in (["val"], ["test"]) and len(cells) == 1 + len(HEADLINE)
            and all(re.fullmatch(r"-?\d+\.\d+|nan", value) for value in cells[1:])}


def metric_table_of(lines: list[str]) -> list[str]:
    """The metric table among printed lines: its header and the split rows below it ([] where there is none)."""
    start = next((i for i, line in enumerate(lines) if line.split()[:2] == ["split", "acc"]), None)
    if start is None:
        return []
    end = start + 1
    while end < len(lines) and metric_rows(lines[end:end + 1]):
        end += 1
    return lines[start:end]


def quality_rows(lines: list[str]) -> dict[str, dict[str, float | None]]:
    """The per class rows of the quality reports among lines, a dash (no number) read as None."""
    from pneumo_exp.labels import CLASSES

    return {cells[0]: {c: None if v == "-" else float(v) for c, v in zip(QUALITY_COLUMNS, cells[1:], strict=True)}
            for cells in map(str.split, lines) if cells[:1] and cells[0] in CLASSES
            and len(cells) == 1 + len(QUALITY_COLUMNS)}


def accuracy_scores(lines: list[str]) -> dict[str, dict[str, float]]:
    """The classification accuracy score rows among lines, by arm."""
    return {row[1]: {"train_images": int(row[2]), "test/acc": float(row[3]), "test/f1_macro": float(row[4])}
            for row in map(SCORE_ROW.fullmatch, lines) if row}


def is_number_row(line: str) -> bool:
    return bool(metric_rows([line]) or quality_rows([line]) or accuracy_scores([line]))


def metric_table_problems(lines: list[str]) -> list[str]:
    """Differences between the README's metric table and what the demo prints for the same numbers."""
    from pneumo_exp.pipeline import format_metrics

    printed = format_metrics({f"{split}/{name}": value for split, row in metric_rows(lines).items()
                              for name, value in row.items()}).splitlines()
    return [f"README: {shown!r}\nprints: {fresh!r}" for shown, fresh in zip(lines, printed, strict=True)
            if shown != fresh]


def quality_lines_printed_for(lines: list[str]) -> list[str]:
    """What the quality stage prints for the numbers the README's quality block shows."""
    from pneumo_exp.evaluation.quality import fid_shortfall
    from pneumo_exp.evaluation.quality_stage import format_quality
    from pneumo_exp.labels import CLASSES

    per_class = quality_rows(lines)
    for label, dimensions in (note.groups() for note in map(FID_NOTE.match, lines) if note):
        row = per_class[label]
        row["fid_note"] = fid_shortfall(int(row["real"]), int(row["synthetic"]), int(dimensions))
    return format_quality({"per_class": per_class, "classification_accuracy_score": accuracy_scores(lines),
                           "synthetic_classes": list(CLASSES)}).splitlines()


def whole_fraction(value: float, total: int) -> bool:
    """Whether `value`, printed to 4 decimals, is a whole number of `total` items divided by `total`."""
    return abs(round(value * total) / total - value) <= 0.00005 + 1e-9


def metric_count_problems(table: list[str], counts: dict[str, dict[str, int]]) -> list[str]:
    """Where a metric table's numbers cannot come from the splits the summary counts: an accuracy that is no whole
    number of the split's images, or a macro recall other than the accuracy on a split balanced over the classes."""
    from pneumo_exp.labels import CLASSES

    problems = []
    for split, row in metric_rows(table).items():
        if not whole_fraction(row["acc"], counts[split]["total"]):
            problems.append(f"{split}/acc {row['acc']} is no whole number of the {counts[split]['total']} images")
        if len({counts[split][label] for label in CLASSES}) == 1 and row["recall_macro"] != row["acc"]:
            problems.append(f"{split}/recall_macro {row['recall_macro']} is not acc {row['acc']} on a balanced split")
    return problems


def quality_count_problems(block: list[str], counts: dict[str, dict[str, int]], augmentation) -> list[str]:
    """Where the augmented demo's block disagrees with the counts the demo's data and `augmentation` imply: the
    synthetic images per class, the quality rows' real and synthetic counts and likely copies, the classification
    accuracy score's training images (per class the smaller of real and synthetic) and test accuracies."""
    from pneumo_exp.diffusion.generate import synthetic_counts
    from pneumo_exp.labels import CLASSES

    synthetic_line, table, quality = split_augmented_block(block)
    real = {label: counts["train"][label] for label in CLASSES}
    synthetic = {label: n for label, n in synthetic_counts(real, augmentation).items() if n}
    problems = [f"{label}: {row['likely_copies']} likely copies of {row['synthetic']} synthetic images"
                for label, row in quality_rows(quality).items() if not 0 <= row["likely_copies"] <= row["synthetic"]]
    if ast.literal_eval(synthetic_line.removeprefix(AUGMENTED_BLOCK)) != synthetic:
        problems.append(f"{synthetic_line!r}: the augmentation draws {synthetic}")
    shown = {label: (row["real"], row["synthetic"]) for label, row in quality_rows(quality).items()}
    if shown != {label: (real[label], n) for label, n in synthetic.items()}:
        problems.append(f"quality rows' real and synthetic counts {shown}: training has {real}, synthetic {synthetic}")
    training_images = sum(min(real[label], synthetic.get(label, real[label])) for label in CLASSES)
    for arm, row in accuracy_scores(quality).items():
        if row["train_images"] != training_images:
            problems.append(f"{arm}: {row['train_images']} training images, not {training_images}")
        if not whole_fraction(row["test/acc"], counts["test"]["total"]):
            problems.append(f"{arm}: test acc {row['test/acc']} is no whole number of the test images")
    return problems + metric_count_problems(table, counts)


def within(shown: float | None, fresh: float | None, tolerance: float) -> bool:
    """Whether two numbers are within `tolerance`; None (no number, as FID from too few images) matches only None."""
    if shown is None or fresh is None:
        return shown is fresh
    return abs(shown - fresh) <= tolerance + 1e-9


def beyond_tolerance(where: str, shown: dict, fresh: dict | None, tolerances: dict[str, float]) -> list[str]:
    """The values of one README row farther from the fresh run's row than their tolerance."""
    if fresh is None:
        return [f"{where}: not printed by the fresh run"]
    return [f"{where} {name}: README {value}, fresh run {fresh.get(name)} (tolerance {tolerances[name]})"
            for name, value in shown.items() if not within(value, fresh.get(name), tolerances[name])]


def metric_tolerance_problems(job: str, table: list[str], printed: list[str]) -> list[str]:
    """The README's metric table against the one a fresh run of `job` printed: the header exact, values within
    TOLERANCE."""
    from pneumo_exp.classify.metrics import HEADLINE

    fresh_table = metric_table_of(printed)
    if not fresh_table:
        return [f"{job} printed no metric table"]
    problems = []
    if fresh_table[0] != table[0]:
        problems.append(f"{job}'s metric header\nREADME: {table[0]!r}\nprints: {fresh_table[0]!r}")
    fresh = metric_rows(fresh_table)
    for split, row in metric_rows(table).items():
        problems += beyond_tolerance(f"{job} {split}", row, fresh.get(split), dict.fromkeys(HEADLINE, TOLERANCE))
    return problems


def quality_tolerance_problems(quality: list[str], printed: list[str]) -> list[str]:
    """The README's quality rows and classification accuracy scores against a fresh run's, within their tolerances."""
    fresh_rows, fresh_scores = quality_rows(printed), accuracy_scores(printed)
    problems = []
    for label, row in quality_rows(quality).items():
        problems += beyond_tolerance(f"quality {label}", row, fresh_rows.get(label), QUALITY_TOLERANCE)
    for arm, row in accuracy_scores(quality).items():
        problems += beyond_tolerance(f"classification accuracy score {arm}", row, fresh_scores.get(arm),
                                     SCORE_TOLERANCES)
    return problems


def demo_problems(block: list[str], printed: list[str]) -> list[str]:
    """The demo's README block against what a fresh demo printed: its summary lines exactly, metrics in tolerance."""
    summary, table = split_demo_block(block)
    return ([f"not printed by the demo: {line!r}" for line in missing_lines(summary, printed)]
            + metric_tolerance_problems("the demo", table, printed))


def augmented_problems(block: list[str], printed: list[str]) -> list[str]:
    """The augmented demo's README block against what a fresh run printed: the lines without table numbers exactly
    (the synthetic counts, headers, FID notes), each number within its tolerance."""
    _, table, quality = split_augmented_block(block)
    text = [line for line in block if not is_number_row(line)]
    return ([f"not printed by the augmented demo: {line!r}" for line in missing_lines(text, printed)]
            + metric_tolerance_problems("the augmented demo", table, printed)
            + quality_tolerance_problems(quality, printed))


def readme_neutral_keys(text: str) -> list[str]:
    """The config keys the README says name no sweep job folder (the sentence citing RESULT_NEUTRAL_KEYS)."""
    sentence = re.search(r"\(only ([^()]*?) do not: `pneumo_exp\.rundir\.RESULT_NEUTRAL_KEYS`\)", text)
    assert sentence, "the README no longer lists the result-neutral keys before `pneumo_exp.rundir.RESULT_NEUTRAL_KEYS`"
    return re.findall(r"`(\w+)`", sentence[1])


def with_token(lines: list[str], first: str, position: int, text: str) -> list[str]:
    """`lines` with token `position` (0 is the first) of the line beginning with token `first` replaced by `text`."""
    at = next(i for i, line in enumerate(lines) if line.split()[:1] == [first])
    start, end = list(re.finditer(r"\S+", lines[at]))[position].span()
    return [*lines[:at], lines[at][:start] + text + lines[at][end:], *lines[at + 1:]]


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w-]*):(?!=)", (REPO / "Makefile").read_text(), re.M))


def config_groups() -> list[str]:
    conf = REPO / "conf"
    return sorted({str(Path(folder).relative_to(conf)) for folder, _, files in os.walk(conf, followlinks=True)
                   if any(name.endswith(".yaml") for name in files) and Path(folder) != conf})


def named_options(code: str) -> set[tuple[str, str]]:
    """(group, option) for every `group=option[,option...]` the README's code names (BACKBONES= names clip_lora)."""
    groups = "|".join(re.escape(group) for group in sorted(config_groups(), key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w./])({groups}|BACKBONES)=([\w/-]+(?:,[\w/-]+)*)(?![\w/.=-])")
    return {("clip_lora" if group == "BACKBONES" else group, option)
            for group, options in pattern.findall(code) for option in options.split(",")}


def option_exists(group: str, option: str) -> bool:
    if (REPO / "conf" / group / f"{option}.yaml").is_file():
        return True
    if not group.startswith("hydra/"):
        return False
    try:  # a Hydra plugin's own config, e.g. hydra/launcher=submitit_local
        compose([f"{group}={option}"])
    except Exception:
        return False
    return True


def test_every_printed_block_is_checked():
    unchecked = {first for first in printed_blocks(readme_text())
                 if first not in {"dataset: phantom", "dataset: kermany"} and not first.startswith(AUGMENTED_BLOCK)}
    assert not unchecked, f"a new printed block in the README: teach tests/test_readme.py to check it: {unchecked}"


def test_the_result_neutral_keys_listed_are_the_codes():
    from pneumo_exp.rundir import RESULT_NEUTRAL_KEYS

    listed = readme_neutral_keys(readme_text())
    assert sorted(listed) == sorted(RESULT_NEUTRAL_KEYS), \
        f"README lists {listed}; pneumo_exp.rundir.RESULT_NEUTRAL_KEYS holds {list(RESULT_NEUTRAL_KEYS)}"


def test_every_make_target_named_exists():
    named = set(re.findall(r"\bmake ([a-z][\w-]*)", code_text(readme_text())))
    assert {"demo", "test", "summary"} <= named
    assert not named - makefile_targets(), f"README names make targets the Makefile lacks: {named - makefile_targets()}"


def test_every_config_option_named_exists():
    named = named_options(code_text(readme_text()))
    assert {("experiment", "demo"), ("clip_lora", "vit_l14"), ("diffusion_lora", "cxr_small")} <= named
    missing = sorted(pair for pair in named if not option_exists(*pair))
    assert not missing, f"README names options that are not under conf/ or experiments/: {missing}"


def test_the_option_finder_sees_a_missing_option():
    named = named_options("pneumo-exp experiment=nonesuch clip_lora=tiny,vit_x dataset.root=~/x `make demo`")
    assert named == {("experiment", "nonesuch"), ("clip_lora", "tiny"), ("clip_lora", "vit_x")}
    assert [pair for pair in sorted(named) if not option_exists(*pair)] == [("clip_lora", "vit_x"),
                                                                           ("experiment", "nonesuch")]


def test_every_task_named_exists():
    from pneumo_exp.validate import TASKS

    named = set(re.findall(r"\btask=(\w+)", code_text(readme_text())))
    assert named and not named - set(TASKS), f"README names unknown tasks: {named - set(TASKS)}"


def test_configuration_table_lists_each_groups_options():
    for group, options in re.findall(r"^\| `(\w+)` \| ([^|]+) \|", readme_text(), re.M):
        if "files in" in options or not (REPO / "conf" / group).is_dir():
            continue
        listed = set(re.findall(r"`(\w+)`", options))
        present = {path.stem for path in (REPO / "conf" / group).glob("*.yaml")}
        assert listed == present, f"README's options for {group}: {sorted(listed)}; conf/{group}: {sorted(present)}"


def test_demo_block_shows_the_demos_data_summary(make_cfg):
    from pneumo_exp.data.prepare import prepare_data
    from pneumo_exp.summary import format_summary

    text = readme_text()
    assert DEMO_COMMAND in text
    summary, _ = split_demo_block(printed_blocks(text)["dataset: phantom"])
    cfg = make_cfg("experiment=demo")
    printed = format_summary(prepare_data(cfg.dataset, cfg.paths.cache_dir), cfg.dataset.name).splitlines()
    assert len(summary) >= 5 and not missing_lines(summary, printed), missing_lines(summary, printed)


def test_demo_block_shows_the_metric_table_as_printed():
    summary, table = split_demo_block(demo_block())
    assert set(metric_rows(table)) == {"val", "test"} and len(table) == 3
    assert not metric_table_problems(table), "\n".join(metric_table_problems(table))
    problems = metric_count_problems(table, summary_counts(summary))
    assert not problems, "\n".join(problems)


def test_augmented_block_shows_the_metric_table_as_printed():
    _, table, _ = split_augmented_block(augmented_block())
    assert set(metric_rows(table)) == {"val", "test"} and len(table) == 3
    assert not metric_table_problems(table), "\n".join(metric_table_problems(table))


def test_quality_block_shows_the_quality_report_as_printed():
    from pneumo_exp.labels import CLASSES

    _, _, quality = split_augmented_block(augmented_block())
    assert set(quality_rows(quality)) == set(CLASSES) and set(accuracy_scores(quality)) == {"synthetic_only",
                                                                                           "real_matched"}
    printed = quality_lines_printed_for(quality)
    assert not missing_lines(quality, printed), missing_lines(quality, printed)


def test_augmented_block_fits_the_demos_counts():
    counts = summary_counts(split_demo_block(demo_block())[0])
    problems = quality_count_problems(augmented_block(), counts, compose(list(AUGMENTED)).augmentation)
    assert not problems, "\n".join(problems)


def test_a_number_that_does_not_fit_the_counts_is_caught():
    counts = summary_counts(split_demo_block(demo_block())[0])
    augmentation = compose(list(AUGMENTED)).augmentation
    block = augmented_block()
    acc = metric_rows(block)["test"]["acc"]
    assert metric_count_problems(with_token(block, "test", 1, f"{acc + 0.0001:.4f}"), counts)  # acc, recall differ
    assert metric_count_problems(with_token(block, "test", 2, f"{acc + 1 / 72:.4f}"), counts)  # recall off acc
    for first, position, text in [("synthetic_only", 1, "91"), ("synthetic_only", 5, "0.5557"), ("NORMAL", 2, "31"),
                                  ("VIRUS", 1, "59"), ("BACTERIA", 8, "31")]:
        assert quality_count_problems(with_token(block, first, position, text), counts, augmentation), (first, text)
    stale_synthetic = [block[0].replace("30", "29", 1), *block[1:]]
    assert quality_count_problems(stale_synthetic, counts, augmentation)


def test_a_fresh_run_beyond_the_tolerance_is_caught():
    block = augmented_block()
    assert not augmented_problems(block, block) and not demo_problems(demo_block(), demo_block())
    acc = metric_rows(block)["test"]["acc"]
    assert not augmented_problems(block, with_token(block, "test", 1, f"{acc + TOLERANCE / 2:.4f}"))
    for first, position, change in [("test", 1, 2 * TOLERANCE), ("NORMAL", 4, 2 * QUALITY_TOLERANCE["kid_mean"]),
                                    ("BACTERIA", 5, 2 * QUALITY_TOLERANCE["diversity_synthetic_over_real"]),
                                    ("VIRUS", 6, 2 * QUALITY_TOLERANCE["nn_median"]), ("NORMAL", 8, 1),
                                    ("real_matched", 8, 2 * SCORE_TOLERANCE),
                                    ("synthetic_only", 5, -2 * SCORE_TOLERANCE)]:
        line = next(line for line in block if line.split()[:1] == [first])
        fresh = with_token(block, first, position, f"{float(line.split()[position]) + change:.4g}")
        assert augmented_problems(block, fresh), (first, position, change)
    assert augmented_problems(block, with_token(block, "NORMAL", 3, "12.5"))  # an FID where the README shows none
    summary, table = split_demo_block(demo_block())
    assert demo_problems(demo_block(), summary + with_token(table, "val", 3, "0.5"))


def test_a_stale_line_is_caught():
    printed = ["dataset: phantom", "train  60  60", "note: 170 personN numbers occur in both splits, always apart"]
    assert not missing_lines(["dataset: phantom", "note: 170 personN numbers occur ...", "..."], printed)
    assert missing_lines(["dataset: phantom", "train  61  60"], printed) == ["train  61  60"]
    assert missing_lines(["train  60  60", "dataset: phantom"], printed) == ["dataset: phantom"]  # out of order
    stale = ["split            acc  recall_macro      f1_macro   auroc_macro           ece",
             "test         0.8194        0.8194        0.8154        0.9763        0.087"]
    assert metric_table_problems(stale)


def test_neutral_keys_are_read_from_the_sentence_that_cites_them():
    text = "names the folder (only `task`, `resume` and\n`hydra` do not: `pneumo_exp.rundir.RESULT_NEUTRAL_KEYS`); `x`"
    assert readme_neutral_keys(text) == ["task", "resume", "hydra"]


def pneumo_exp(*overrides: str) -> subprocess.CompletedProcess:
    """`pneumo-exp OVERRIDES` in its own process, W&B off, in a temporary run folder (the cache is the user's)."""
    with tempfile.TemporaryDirectory() as folder:
        return subprocess.run([str(Path(sys.executable).parent / "pneumo-exp"), *overrides, "logger=none",
                               f"hydra.run.dir={folder}"], cwd=REPO, capture_output=True, text=True, check=False)


def fresh_run_problems(name: str, block: list[str], compare: Callable[[list[str], list[str]], list[str]],
                       *jobs: tuple[str, ...]) -> list[str]:
    """Runs the jobs in order and compares what the last one printed with the README's block."""
    for overrides in jobs:
        done = pneumo_exp(*overrides)
        if done.returncode != 0:
            return [f"pneumo-exp {' '.join(overrides)} failed (exit {done.returncode}):\n{done.stderr[-3000:]}"]
    print("\n".join([f"{name} printed:", *done.stdout.splitlines()]), flush=True)
    return compare(block, done.stdout.splitlines())


def real_data_summary_problems() -> list[str]:
    """The README's `make summary` block against the summary of the real data (about 20 s: it hashes every file)."""
    from pneumo_exp.data.prepare import prepare_data
    from pneumo_exp.summary import format_summary

    block = printed_blocks(readme_text())["dataset: kermany"]
    with tempfile.TemporaryDirectory() as folder:
        cfg = compose(["dataset=kermany", f"dataset.root={REAL_DATA}", f"paths.cache_dir={folder}"])
        printed = format_summary(prepare_data(cfg.dataset, cfg.paths.cache_dir), cfg.dataset.name).splitlines()
    return [f"not printed by make summary: {line!r}" for line in missing_lines(block, printed)]


def main() -> int:
    problems = fresh_run_problems("the demo", demo_block(), demo_problems, DEMO)
    problems += fresh_run_problems("the augmented demo", augmented_block(), augmented_problems, PRETRAIN, AUGMENTED)
    if (REAL_DATA / "train").is_dir():
        problems += real_data_summary_problems()
        print(f"make summary's block checked against {REAL_DATA}")
    else:
        print(f"the real data summary block is not checked: no dataset at {REAL_DATA}")
    print("\n".join(problems) if problems else
          f"README's printed blocks: OK (within this run's: classifier metrics {TOLERANCE}, classification accuracy "
          f"score {SCORE_TOLERANCE}, quality report {QUALITY_TOLERANCE})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
