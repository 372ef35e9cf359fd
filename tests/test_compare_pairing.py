"""Paired comparisons say what they compared: test images paired by the sha256 of their bytes (so a moved dataset
folder still pairs), a note beside the verdict where the arms tested different images, and a McNemar test that
takes patients (not images) as the units, per seed and over the seeds together, checked against scipy."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from scipy import stats

from pneumo_exp.classify.metrics import confusion_metrics
from pneumo_exp.labels import CLASSES
from pneumo_exp.report import compare, write_report
from pneumo_exp.report.collect import collect_runs, group_runs
from pneumo_exp.report.statistics import sign_flip_p

A, B = compare.AUGMENTATION_PAIR
SEEDS = (0, 1, 2)
PATIENTS, IMAGES_PER_PATIENT = 12, 3
SKILL = {A: 0.85, B: 0.55}


# ------------------------------------------------------------------------------------------- fake run folders

def split_images(root: str) -> list[dict]:
    """One test split: the same bytes (sha256) wherever the dataset folder lies; one file copied within a patient."""
    images = []
    for number in range(PATIENTS * IMAGES_PER_PATIENT):
        patient = number // IMAGES_PER_PATIENT
        label = CLASSES[patient % len(CLASSES)]
        digest = f"{number:064x}" if number != 1 else f"{0:064x}"  # image 1 is a copy of image 0
        images.append({"path": f"{root}/test/{label}/person{patient}_{number}.jpeg", "label": label,
                       "patient_id": f"person{patient}", "sha256": digest})
    return images


def write_run(folder: Path, row: str, seed: int, images: list[dict], rng: np.random.Generator,
              manifest: bool = True) -> None:
    """A completed job: config files, results.json, predictions.csv (rows shuffled) and manifest.csv."""
    (folder / ".hydra").mkdir(parents=True)
    config = {"task": "run", "stages": ["data", "classify"], "experiment_name": "pairing", "seed": seed}
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(config))
    (folder / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml([f"experiment=paper_cpu/{row}",
                                                                          f"seed={seed}"]))
    labels = np.array([CLASSES.index(image["label"]) for image in images])
    right = rng.random(len(images)) < SKILL[row]
    predictions = np.where(right, labels, (labels + rng.integers(1, 3, len(labels))) % 3)
    with (folder / "predictions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", *(f"prob_{name}" for name in CLASSES), "prediction"])
        for number in rng.permutation(len(images)):
            writer.writerow([images[number]["path"], images[number]["label"], 0.2, 0.2, 0.6,
                             CLASSES[predictions[number]]])
    if manifest:
        with (folder / "manifest.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["path", "label", "patient_id", "split", "source", "sha256"])
            writer.writeheader()
            writer.writerows({**image, "split": "test", "source": "real"} for image in images)
    confusion = np.zeros((3, 3), dtype=int)
    np.add.at(confusion, (labels, predictions), 1)
    metrics = {f"test/{name}": float(value) for name, value in confusion_metrics(confusion).items()
               if name in ("acc", "f1_macro")}
    (folder / "results.json").write_text(json.dumps({"metrics": metrics, "seed": seed,
                                                     "confusion_matrix": {"test": confusion.tolist()}}))


def write_runs(root: Path, images_of: dict[str, list[dict]], manifest: bool = True) -> Path:
    rng = np.random.default_rng(5)
    for row, images in images_of.items():
        for seed in SEEDS:
            write_run(root / f"{row}-seed{seed}", row, seed, images, rng, manifest)
    return root


def comparison(root: Path) -> dict:
    return compare.compare_pair(A, B, group_runs(collect_runs(root)), samples=200)


def markdown_cells(table: str, first: tuple[str, ...]) -> list[str]:
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        if tuple(cells[:len(first)]) == first:
            return cells
    raise AssertionError(f"no row {first}")


def discordance(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(targets, predictions, patients) of one run in the manifest's order."""
    with (folder / "predictions.csv").open(newline="") as handle:
        predicted = {row["path"]: CLASSES.index(row["prediction"]) for row in csv.DictReader(handle)}
    with (folder / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return (np.array([CLASSES.index(row["label"]) for row in rows]),
            np.array([predicted[row["path"]] for row in rows]), np.array([row["patient_id"] for row in rows]))


def per_patient_difference(root: Path, seeds=SEEDS) -> np.ndarray:
    """Σ over the seeds of (A-only minus B-only right images) per patient, counted straight from the files."""
    total: dict[str, int] = {}
    for seed in seeds:
        (targets, a, patients), (_, b, _) = (discordance(root / f"{row}-seed{seed}") for row in (A, B))
        for patient, right_a, right_b in zip(patients, a == targets, b == targets):
            total[patient] = total.get(patient, 0) + int(right_a) - int(right_b)
    return np.array(list(total.values()))


def scipy_sign_flip_p(differences: np.ndarray) -> float:
    """The exact randomisation test: every sign pattern of the per-patient differences equally likely."""
    return stats.permutation_test((differences,), lambda x, axis: np.abs(np.sum(x, axis=axis)), vectorized=True,
                                  permutation_type="samples", n_resamples=np.inf, alternative="greater").pvalue


# ------------------------------------------------------------------------------------------------------- pairing

def test_images_pair_by_sha256_when_the_arms_read_the_dataset_from_different_folders(tmp_path):
    root = write_runs(tmp_path / "runs", {A: split_images("/data/kermany"), B: split_images("/mnt/copy/kermany/.")})
    result = comparison(root)
    assert result["bootstrap_seeds"] == list(SEEDS) and sorted(result["mcnemar"]) == list(SEEDS)
    assert result["pairing"]["key"] == "sha256" and result["pairing"]["unpaired"] == {}
    assert result["pairing"]["images"] == PATIENTS * IMAGES_PER_PATIENT and result["pairing"]["patients"] == PATIENTS
    for metric in compare.PAIR_METRICS:
        assert result["metrics"][metric]["bootstrap_low"] is not None


def test_arms_tested_on_different_images_are_said_to_be_unpaired_beside_the_verdict(tmp_path):
    images = split_images("/data/kermany")
    root = write_runs(tmp_path / "runs", {A: images, B: images[:24]})  # B's test capped at 24 images
    result = comparison(root)
    assert result["bootstrap_seeds"] == [] and result["mcnemar"] == {} and result["pairing"]["seeds"] == []
    assert result["pairing"]["unpaired"] == {seed: f"{A} tested 36 images, {B} 24, 24 in both" for seed in SEEDS}
    paths = write_report(root, tmp_path / "report", pairs=[[A, B]], bootstrap_samples=100)
    table = paths["table.md"].read_text()
    header = markdown_cells(table, ("A", "B"))
    row = markdown_cells(table, (A, B, "0 1 2", "acc"))
    assert header[header.index("verdict") + 1] == "test images"
    note = row[header.index("test images")]
    assert note == ("not paired: the verdict rests on the t CI alone "
                    f"(seeds 0 1 2: {A} tested 36 images, {B} 24, 24 in both)")
    with paths["pairs.csv"].open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert all(row["pairing"] == note for row in rows) and all(row["bootstrap_low"] == "" for row in rows)
    gain = next(line for line in paths["table.tex"].read_text().splitlines() if "Augmentation gain" in line)
    assert "not paired: the verdict rests on the t CI alone" in gain


def test_runs_without_a_manifest_pair_by_path_and_say_mcnemar_is_image_level(tmp_path):
    root = write_runs(tmp_path / "runs", {A: split_images("/data"), B: split_images("/data")}, manifest=False)
    result = comparison(root)
    assert result["pairing"]["key"] == "path" and result["pairing"]["patients"] is None
    assert result["bootstrap_seeds"] == [] and result["mcnemar_all_seeds"]["level"] == "image"
    table = write_report(root, tmp_path / "report", pairs=[[A, B]], bootstrap_samples=100)["table.md"].read_text()
    header = markdown_cells(table, ("A", "B"))
    row = markdown_cells(table, (A, B, "0 1 2", "acc"))
    assert row[header.index("test images")].startswith("paired by path: 36 images, patients unknown")
    assert row[-1].startswith("image-level (patients unknown): seeds 0 1 2 together")


# ------------------------------------------------------------------------------------------- clustered McNemar

def test_sign_flip_p_with_one_image_per_patient_is_mcnemars_exact_test():
    rng = np.random.default_rng(0)
    for _ in range(20):
        differences = rng.choice([-1, 0, 1], size=int(rng.integers(1, 60)), p=[0.2, 0.5, 0.3])
        a_only, b_only = int(np.sum(differences == 1)), int(np.sum(differences == -1))
        expected = stats.binomtest(a_only, a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
        assert sign_flip_p(differences) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_sign_flip_p_equals_scipys_exact_permutation_test_on_patient_sums():
    rng = np.random.default_rng(1)
    for _ in range(20):
        differences = rng.integers(-3, 5, size=int(rng.integers(2, 13)))
        assert sign_flip_p(differences) == pytest.approx(scipy_sign_flip_p(differences), rel=1e-9)


def test_mcnemar_takes_patients_as_units_per_seed_and_over_the_seeds_together(tmp_path):
    images = split_images("/data/kermany")
    root = write_runs(tmp_path / "runs", {A: images, B: images})
    result = comparison(root)
    for seed in SEEDS:
        seed_test = result["mcnemar"][seed]
        assert seed_test["level"] == "patient"
        assert seed_test["p"] == pytest.approx(scipy_sign_flip_p(per_patient_difference(root, [seed])), rel=1e-9)
        (targets, a, _), (_, b, _) = (discordance(root / f"{row}-seed{seed}") for row in (A, B))
        a_only, b_only = int(np.sum((a == targets) & (b != targets))), int(np.sum((a != targets) & (b == targets)))
        assert (seed_test["a_only"], seed_test["b_only"]) == (a_only, b_only)
        assert seed_test["image_level_p"] == pytest.approx(stats.binomtest(a_only, a_only + b_only).pvalue)
    together = result["mcnemar_all_seeds"]
    assert together["level"] == "patient" and together["seeds"] == list(SEEDS)
    assert together["p"] == pytest.approx(scipy_sign_flip_p(per_patient_difference(root)), rel=1e-9)
    assert together["p"] != pytest.approx(result["mcnemar"][0]["p"])
    table = write_report(root, tmp_path / "report", pairs=[[A, B]], bootstrap_samples=100)["table.md"].read_text()
    assert markdown_cells(table, (A, B, "0 1 2", "acc"))[-1].startswith(
        f"patients as units: seeds 0 1 2 together p {together['p']:.3g}")
