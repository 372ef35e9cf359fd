"""An augmentation study in the report: the generator is a random factor (runs differing only in the generator
replicate and seed are one configuration, whose CI is over the generator means when two or more generators were
trained, with a note when one was), the patient-level numbers are labelled conditional on the trained models, and
the gains of each arm over `none` and `duplicate_real` per real fraction are tabled and drawn."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image
from scipy import stats

from pneumo_exp import report
from pneumo_exp.labels import CLASSES
from pneumo_exp.report import compare, plots, tables
from pneumo_exp.report.collect import collect_runs, group_runs
from pneumo_exp.report.statistics import aggregate, summarize

FRACTIONS = (0.1, 1.0)
SEEDS = (0, 1, 2)
LORA_SEEDS = (0, 1)
ARM_EFFECT = {"none": 0.0, "duplicate_real": 0.01, "mix": 0.03, "filtered": 0.05, "augment_cpu/original_study": 0.02}
GENERATOR_EFFECT = {0: -0.04, 1: 0.06}  # the two generators disagree
SEED_EFFECT = {0: 0.0, 1: 0.01, 2: -0.005}  # shared by every arm of a seed: cancels in a seed-paired difference
PATIENTS, IMAGES_PER_PATIENT = 8, 2
ONE_GENERATOR = "one generator: its variability is not measured"


def macro_f1(arm: str, fraction: float, seed: int, lora: int | None) -> float:
    """The study's truth: arm, generator and seed effects, and a generator x seed interaction."""
    generated = 0.0 if lora is None else GENERATOR_EFFECT[lora] + 0.004 * seed * (lora + 1)
    return 0.5 + 0.2 * fraction + ARM_EFFECT[arm] + generated + SEED_EFFECT[seed]


def accuracy(arm: str, fraction: float, seed: int, lora: int | None) -> float:
    return macro_f1(arm, fraction, seed, lora) + 0.1


# ------------------------------------------------------------------------------------------- fake run folders

def study_config(arm: str, fraction: float, seed: int, lora: int | None) -> tuple[list[str], dict]:
    """The overrides and resolved config of one job of the grid; the older augment_cpu recipe reads one LoRA."""
    old_recipe = arm.startswith("augment_cpu/")
    generator = lora is not None or old_recipe
    source = "duplicate_real" if arm == "duplicate_real" else "synthetic"
    config = {"task": "run", "stages": ["data", "synthesize", "classify"] if arm != "none" else ["data", "classify"],
              "experiment_name": "augment_cpu" if old_recipe else "augment_study", "seed": seed,
              "dataset": {"name": "phantom", "kind": "phantom", "train_fraction": fraction},
              "augmentation": {"name": arm, "strategy": "none" if arm == "none" else "ratio", "source": source},
              "diffusion_lora": {"training": {"seed": None if old_recipe else 0 if lora is None else lora}}}
    recipe = arm if old_recipe else f"augment_study/{arm}"
    overrides = [f"experiment={recipe}", f"seed={seed}"]
    if not old_recipe:
        overrides.insert(1, f"dataset.train_fraction={fraction}")
    if lora is not None:
        overrides.append(f"diffusion_lora.training.seed={lora}")
    inputs = {"images.train": f"fraction={fraction}"}
    if generator:
        inputs["diffusion_lora"] = f"lora-{fraction}-{lora}"  # each replicate's own LoRA
    return overrides, {"config": config, "inputs": inputs}


def split_images() -> list[tuple[str, str, str]]:
    return [(f"test/{CLASSES[patient % 3]}/p{patient}_{image}.png", CLASSES[patient % 3], f"p{patient}")
            for patient in range(PATIENTS) for image in range(IMAGES_PER_PATIENT)]


def write_study_run(folder: Path, arm: str, fraction: float, seed: int, lora: int | None,
                    rng: np.random.Generator) -> None:
    """A completed job: config files, inputs.json, results.json (the study's truth), predictions and manifest."""
    overrides, written = study_config(arm, fraction, seed, lora)
    (folder / ".hydra").mkdir(parents=True)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(written["config"])))
    (folder / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    (folder / "inputs.json").write_text(json.dumps(written["inputs"]))
    metrics = {"test/acc": accuracy(arm, fraction, seed, lora), "test/f1_macro": macro_f1(arm, fraction, seed, lora)}
    (folder / "results.json").write_text(json.dumps({"metrics": metrics, "seed": seed}))
    images = split_images()
    with (folder / "predictions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", *(f"prob_{name}" for name in CLASSES), "prediction"])
        for path, label, _ in images:
            right = rng.random() < 0.7
            writer.writerow([path, label, 0.2, 0.2, 0.6, label if right else CLASSES[(CLASSES.index(label) + 1) % 3]])
    with (folder / "manifest.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "patient_id", "split", "source", "sha256"])
        writer.writerows([path, label, patient, "test", "real", ""] for path, label, patient in images)


def grid() -> list[tuple[str, float, int | None]]:
    """(arm, fraction, generator replicate): two generators per synthetic arm, but one for `filtered` at full data,
    and the older augment_cpu recipe (one LoRA) at full data."""
    jobs = []
    for fraction in FRACTIONS:
        jobs += [("none", fraction, None), ("duplicate_real", fraction, None)]
        for arm in ("mix", "filtered"):
            loras = LORA_SEEDS[:1] if (arm, fraction) == ("filtered", 1.0) else LORA_SEEDS
            jobs += [(arm, fraction, lora) for lora in loras]
    return [*jobs, ("augment_cpu/original_study", 1.0, None)]


def selector(arm: str, fraction: float) -> str:
    return f"dataset.train_fraction={fraction!r},experiment=augment_study/{arm}"


PAIRS = [[selector("filtered", 0.1), selector("mix", 0.1)], [selector("mix", 0.1), selector("none", 0.1)],
         [selector("filtered", 1.0), selector("none", 1.0)]]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("study") / "runs"
    rng = np.random.default_rng(3)
    for number, (arm, fraction, lora) in enumerate(grid()):
        for seed in SEEDS:
            name = f"{number}_{arm.replace('/', '-')},fraction={fraction},lora={lora},seed={seed}"
            write_study_run(root / name, arm, fraction, seed, lora, rng)
    paths = report.write_report(root, root.parent / "report", pairs=PAIRS, bootstrap_samples=50)
    runs = collect_runs(root)
    return {"root": root, "paths": paths, "runs": runs, "groups": aggregate(runs, ["test/acc", "test/f1_macro"]),
            "comparisons": {(c["a"], c["b"]): c for c in compare.compare_pairs(runs, PAIRS, samples=50)}}


def text(study: dict, name: str) -> str:
    return study["paths"][name].read_text()


def markdown_cells(table: str, first: tuple[str, ...]) -> list[str]:
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        if tuple(cells[:len(first)]) == first:
            return cells
    raise AssertionError(f"no row {first}")


def configuration(study: dict, arm: str, fraction: float) -> dict:
    (group,) = [g for g in study["groups"] if f"experiment=augment_study/{arm}" in g["configuration"]
                and f"dataset.train_fraction={fraction!r}" in g["configuration"]]
    return group


def t_interval(values: list[float]) -> tuple[float, float]:
    return stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))


# -------------------------------------------------------------------------------------- the generator as a factor

def test_runs_differing_only_in_the_generator_replicate_and_seed_are_one_configuration(study):
    groups = group_runs(study["runs"])
    assert len(groups) == len(study["groups"]) == 9  # 12 arm replicates in the grid: each arm's replicates pooled
    mix = configuration(study, "mix", 0.1)
    assert mix["n"] == 6 and mix["seeds"] == list(SEEDS)
    assert mix["generators"] == ["training.seed=0", "training.seed=1"]
    assert "inputs.diffusion_lora" not in mix["configuration"]  # each replicate's own LoRA splits nothing


def test_two_generators_give_a_ci_over_the_generator_means_wider_than_over_the_seeds(study):
    stats_ = configuration(study, "mix", 0.1)["metrics"]["test/f1_macro"]
    generator_means = [np.mean([macro_f1("mix", 0.1, seed, lora) for seed in SEEDS]) for lora in LORA_SEEDS]
    assert stats_["level"] == "generators" and stats_["units"] == 2 and stats_["n"] == 6
    assert stats_["mean"] == pytest.approx(np.mean(generator_means), rel=1e-12)
    assert (stats_["ci_low"], stats_["ci_high"]) == pytest.approx(t_interval(generator_means), rel=1e-9)
    over_seeds = summarize(macro_f1("mix", 0.1, seed, lora) for lora in LORA_SEEDS for seed in SEEDS)
    assert stats_["ci_high"] - stats_["ci_low"] > 2 * (over_seeds["ci_high"] - over_seeds["ci_low"])
    table = text(study, "table.md")
    notes = markdown_cells(table, ("augment_study", "dataset.train_fraction=0.1,experiment=augment_study/mix"))[-1]
    assert notes == "2 generators × 3 seeds (6 runs): the wider CI of the 2 generator means and the 3 seed means"


def test_one_generator_gives_the_ci_over_seeds_and_says_its_variability_is_not_measured(study):
    filtered = configuration(study, "filtered", 1.0)
    values = [macro_f1("filtered", 1.0, seed, 0) for seed in SEEDS]
    assert filtered["metrics"]["test/f1_macro"]["level"] == "seeds"
    assert (filtered["metrics"]["test/f1_macro"]["ci_low"], filtered["metrics"]["test/f1_macro"]["ci_high"]) == \
        pytest.approx(t_interval(values), rel=1e-9)
    table = text(study, "table.md")
    notes = markdown_cells(table, ("augment_study", "dataset.train_fraction=1.0,experiment=augment_study/filtered"))
    assert notes[-1] == f"3 seeds; {ONE_GENERATOR}"
    none = markdown_cells(table, ("augment_study", "dataset.train_fraction=1.0,experiment=augment_study/none"))
    assert none[-1] == ""  # no generator: nothing to say


def test_a_paired_comparison_pairs_by_seed_and_by_generator_and_its_ci_is_over_generator_means(study):
    by_pair = study["comparisons"]
    against_none = by_pair[tuple(PAIRS[1])]["metrics"]["test/f1_macro"]
    gains = [np.mean([macro_f1("mix", 0.1, s, lora) - macro_f1("none", 0.1, s, None) for s in SEEDS])
             for lora in LORA_SEEDS]
    assert against_none["level"] == "generators" and against_none["units"] == 2
    assert against_none["difference"] == pytest.approx(np.mean(gains), rel=1e-12)
    assert (against_none["t_low"], against_none["t_high"]) == pytest.approx(t_interval(gains), rel=1e-9)
    within = by_pair[tuple(PAIRS[0])]  # filtered - mix, each generator against itself: 0.05 - 0.03 exactly
    assert within["units"] == [f"training.seed={lora}/seed={seed}" for seed in SEEDS for lora in LORA_SEEDS]
    for values in within["metrics"].values():
        assert values["t_low"] == pytest.approx(0.02) and values["t_high"] == pytest.approx(0.02)
    one = by_pair[tuple(PAIRS[2])]
    assert one["metrics"]["test/f1_macro"]["level"] == "seeds"
    assert one["replication"] == f"3 seeds; {PAIRS[2][0]} has {ONE_GENERATOR}"


def test_patient_level_numbers_are_labelled_conditional_on_the_trained_models(study):
    table = text(study, "table.md")
    header = markdown_cells(table, ("A", "B"))
    assert "patient bootstrap 95 % CI (conditional on the trained models)" in header
    assert header[-1].endswith("conditional on the trained models)") and header[-1].startswith("McNemar")
    assert f"Patient bootstrap and McNemar are {compare.CONDITIONAL}." in table
    assert compare.CONDITIONAL == ("conditional on the trained models (which test patients were drawn), "
                                   "not on the recipe")
    row = markdown_cells(table, (*PAIRS[1], "0 1 2 × 2 generators", "acc"))
    assert row[5].endswith("] over 2 generator means")
    row = markdown_cells(table, (*PAIRS[2], "0 1 2", "acc"))
    assert row[5].endswith(f"] over 3 seeds ({PAIRS[2][0]} has {ONE_GENERATOR})")
    first, second = tables.augmentation_gain_lines(study["comparisons"][tuple(PAIRS[1])])
    assert "t 95 % CI over 2 generator means" in first and "bootstrap" not in first
    assert second.startswith(f"Patient bootstrap 95 % CI and McNemar, {compare.CONDITIONAL}: acc [")


# ------------------------------------------------------------------------------------ gains against the fraction

def gains_rows(study: dict) -> dict[tuple[str, str], dict]:
    with study["paths"]["gains.csv"].open(newline="") as handle:
        return {(row["fraction"], row["arm"]): row for row in csv.DictReader(handle)}


def test_the_gains_table_has_one_row_per_fraction_and_arm_with_the_paired_gains(study):
    rows = gains_rows(study)
    expected = [(repr(f), arm) for f in FRACTIONS for arm in ("none", "duplicate_real", "mix", "filtered")]
    assert list(rows) == [*expected, ("1.0", "augment_cpu/original_study")]
    mix = rows[("0.1", "mix")]
    # by hand: 0.03 (arm) + mean over the generators of (their effect + 0.004 * mean seed * (lora + 1)) = 0.046
    assert float(mix["gain_none_test/f1_macro_mean"]) == pytest.approx(0.046, abs=1e-12)
    assert float(mix["gain_duplicate_real_test/f1_macro_mean"]) == pytest.approx(0.036, abs=1e-12)
    assert float(mix["gain_none_test/acc_mean"]) == pytest.approx(0.046, abs=1e-12)
    low, high = t_interval([-0.01 + 0.004, 0.09 + 0.008])  # the two generator means of the paired gain
    assert float(mix["gain_none_test/f1_macro_ci_low"]) == pytest.approx(low, rel=1e-9)
    assert float(mix["gain_none_test/f1_macro_ci_high"]) == pytest.approx(high, rel=1e-9)
    assert mix["gain_none_test/f1_macro_level"] == "generators" and mix["gain_none_test/f1_macro_units"] == "2"
    assert float(mix["test/f1_macro_mean"]) == pytest.approx(0.5 + 0.02 + 0.03 + 0.016 + 0.005 / 3, rel=1e-12)
    none = rows[("0.1", "none")]
    assert none["gain_none_replication"] == "reference" and none["gain_none_test/acc_mean"] == ""
    assert float(none["gain_duplicate_real_test/acc_mean"]) == pytest.approx(-0.01, abs=1e-12)
    old = rows[("1.0", "augment_cpu/original_study")]
    assert float(old["gain_none_test/f1_macro_mean"]) == pytest.approx(0.02, abs=1e-12)
    assert old["gain_none_replication"] == f"3 seeds; augment_cpu/original_study has {ONE_GENERATOR}"
    markdown = text(study, "gains.md")
    assert markdown.count("\n| 0.1 | ") == 4 and markdown.count("\n| 1 | ") == 5
    cells = markdown_cells(markdown, ("0.1", "mix"))
    assert cells[2] == "2 generators × 3 seeds (6 runs): the wider CI of the 2 generator means and the 3 seed means"
    assert cells[5] == f"+0.0460 [{low:+.4f}, {high:+.4f}]"
    assert markdown.split("\n", 2)[2] in text(study, "table.md")  # the same section inside table.md


def test_the_gain_figure_draws_each_arm_against_the_fraction_on_a_log_axis(study):
    with Image.open(study["paths"]["gain_vs_fraction.png"]) as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] > 300
    rows = compare.study_gains(study["runs"])
    curves = report.gain_curves(rows)
    assert list(curves) == ["duplicate_real", "mix", "filtered", "augment_cpu/original_study"]
    assert [fraction for fraction, _ in curves["mix"]] == list(FRACTIONS)
    figure = plots.gain_vs_fraction_figure(curves, "none")
    axis = figure.axes[0]
    assert axis.get_xscale() == "log"
    lines = {line.get_label(): line for line in axis.get_lines() if not line.get_label().startswith("_")}
    assert list(lines) == list(curves)
    assert list(lines["mix"].get_ydata()) == pytest.approx([0.046, 0.046])
    assert len(axis.collections) >= 3  # the bands of the arms replicated at both fractions


def test_a_sweep_of_one_fraction_without_study_arms_has_no_gains(tmp_path):
    root = tmp_path / "runs"
    rng = np.random.default_rng(0)
    for seed in SEEDS:
        write_study_run(root / f"mix-{seed}", "mix", 1.0, seed, 0, rng)
        overrides = (root / f"mix-{seed}" / ".hydra" / "overrides.yaml")
        overrides.write_text(OmegaConf.to_yaml(["experiment=demo_augmented", f"seed={seed}"]))
    paths = report.write_report(root, tmp_path / "report", bootstrap_samples=20)
    assert "gains.md" not in paths and "## Gains against the real fraction" not in paths["table.md"].read_text()


def test_seeds_crossed_with_generators_keep_their_spread_in_the_interval():
    """Each seed run under both generators: the generator means agree exactly, yet the seeds vary; the interval must
    not collapse to zero width (it takes the seed means' spread)."""
    from pneumo_exp.report.statistics import replicated_summary

    values = {(generator, seed): value for generator in ("g0", "g1")
              for seed, value in ((0, 0.77), (1, 0.80), (2, 0.83))}
    stats = replicated_summary(values)
    assert stats["level"] == "generators" and stats["mean"] == pytest.approx(0.80)
    assert stats["ci_high"] - stats["ci_low"] > 0.1  # the seed means' t interval: 0.80 +- 4.30 x 0.03 / sqrt(3)
