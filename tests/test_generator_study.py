"""task=generator_study at tiny size on phantom images: it runs end to end with the random tiny preset beside real
validation images, judged by a classifier trained on real images only under that run's own preprocessing (another
resolution and intensity step than the study's own dataset settings); steering is measured against the prompted
class; fidelity is measured with every arm at the same size and says its feature space and preprocessing; copies
of training images are flagged and held-out images are not; two draws give every number a CI and pair the
generators; user mistakes are refused by key."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import compose
from PIL import Image

from pneumo_exp.config import job_config
from pneumo_exp.data.cache import load_pixels
from pneumo_exp.data.manifest import Record
from pneumo_exp.labels import CLASSES
from pneumo_exp.pipeline import run
from pneumo_exp.validate import STUDY_REAL_ARM, SettingError, check_plan

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REFERENCE = ["dataset.patients_per_class=10", "dataset.test_patients_per_class=4", "dataset.val_fraction=0.3",
             "dataset.difficulty=0.1", "dataset.resolution=48", "clip_lora.image_size=48", "dataset.intensity=equalize",
             "trainer.epochs=10", "trainer.batch_size=16", "optim.lr=1e-3", "trainer.bootstrap_samples=20"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, model_cache) -> Path:
    """A finished run whose classifier trained on real phantom images only, at 48 px on equalised images."""
    folder = tmp_path_factory.mktemp("reference")
    run(compose([f"paths.output_dir={folder}", f"paths.cache_dir={model_cache}", "logger=none", *REFERENCE]))
    return folder


def study_config(output: Path, cache: Path, reference: Path, *overrides: str):
    return compose([f"paths.output_dir={output}", f"paths.cache_dir={cache}", "logger=none", "task=generator_study",
                    f"generator_study.reference_run={reference}", "generator_study.generators=[{name:tiny}]",
                    "generator_study.images_per_class=6", "generator_study.grid_images=3",
                    "diffusion_lora.generation.num_inference_steps=2", "diffusion_lora.generation.batch_size=6",
                    *overrides])


@pytest.fixture(scope="module")
def study(tmp_path_factory, model_cache, reference_run) -> Path:
    """The study of the random tiny preset, run as the command runs it."""
    folder = tmp_path_factory.mktemp("study")
    run(study_config(folder, model_cache, reference_run))
    return folder


@pytest.mark.slow
def test_the_study_measures_every_arm_and_writes_its_tables_and_grids(study):
    result = json.loads((study / "generator_study.json").read_text())
    assert list(result["arms"]) == [STUDY_REAL_ARM, "tiny"]
    assert len(result["arms"]["tiny"]["draws"]) == 1 and result["sampling"]["seeds"] == [0]
    tiny = result["arms"]["tiny"]["draws"][0]
    assert tiny["images"] == {label: 6 for label in CLASSES}
    assert set(tiny["steering"]["per_class"]) == set(CLASSES)
    assert tiny["quality"]["NORMAL"]["fid"] is None and "too few images" in tiny["quality"]["NORMAL"]["fid_note"]
    assert tiny["quality"]["NORMAL"]["kid_mean"] is not None
    assert set(tiny["intensity"]["VIRUS"]) == {"mean", "contrast", "border", "centre", "border_over_centre"}
    assert tiny["memorisation"]["images"] == 18
    assert set(tiny["accuracy_score"]) == {"synthetic_only", "real_matched"}
    assert tiny["accuracy_score"]["synthetic_only"]["train_images"] == 18
    assert "accuracy_score" not in result["arms"][STUDY_REAL_ARM]
    assert result["judge"]["resolution"] == 48 and result["judge"]["intensity"] == "equalize"
    assert "quantile" in result["copy_threshold"]["how"]
    markdown = (study / "generator_study.md").read_text()
    for heading in ("(a) Class steering", "(b) Distance", "(c) Intensity", "(d) Memorisation", "(e) Classification",
                    "(f) Fidelity", "(g) Over the 1 draws"):
        assert heading in markdown
    assert "| tiny | synthetic_only | 18 |" in markdown
    for arm in (STUDY_REAL_ARM, "tiny"):
        with Image.open(study / arm / "samples.png") as grid:
            assert grid.height == 3 * 48
    assert len(list((study / "tiny" / "draw_0" / "synthetic").rglob("*.png"))) == 18


@pytest.mark.slow
def test_fidelity_compares_every_arm_at_one_size_and_says_what_it_was_measured_in(study):
    result = json.loads((study / "generator_study.json").read_text())
    how = result["fidelity"]
    assert how["images_per_arm"] == {label: 6 for label in CLASSES}  # 6 drawn, 9 validation images per class
    assert "embedding" in how["feature_space"] and "48 px" in how["preprocessing"]
    assert "intensity=equalize" in how["preprocessing"]
    for arm in (result["arms"][STUDY_REAL_ARM], result["arms"]["tiny"]["draws"][0]):
        overall = arm["fidelity"]["overall"]
        assert overall["images"] == 18 and set(arm["fidelity"]["per_class"]) == set(CLASSES)
        assert 0 <= overall["precision"] <= 1 and 0 <= overall["coverage"] <= 1
        assert overall["c2st_ci_low"] <= overall["c2st_auroc"] <= overall["c2st_ci_high"]
    real, random_weights = (arm["fidelity"]["overall"]["c2st_auroc"] for arm in (
        result["arms"][STUDY_REAL_ARM], result["arms"]["tiny"]["draws"][0]))
    assert random_weights > 0.9 and random_weights > real  # noise from random weights is told from real films
    markdown = (study / "generator_study.md").read_text()
    assert f"Feature space: {how['feature_space']}. Preprocessing: {how['preprocessing']}." in markdown
    assert "| tiny | overall | 18 |" in markdown


@pytest.mark.slow
def test_two_draws_give_every_number_a_ci_and_pair_the_generators(tmp_path, model_cache, reference_run):
    """Two generators with the same weights: their paired differences are 0 in every draw, so no difference is
    shown; their draws share no image."""
    folder = tmp_path / "study"
    run(study_config(folder, model_cache, reference_run, "generator_study.draws=2",
                     "generator_study.accuracy_score=false", "generator_study.generators=[{name:tiny},{name:twin}]"))
    result = json.loads((folder / "generator_study.json").read_text())
    assert result["sampling"]["seeds"] == [0, 1]
    tiny = result["arms"]["tiny"]
    assert [draw["seed"] for draw in tiny["draws"]] == [0, 1]
    drawn = [{path.read_bytes() for path in (folder / "tiny" / f"draw_{i}" / "synthetic").rglob("*.png")}
             for i in range(2)]
    assert len(drawn[0]) == len(drawn[1]) == 18 and not drawn[0] & drawn[1]
    steering = tiny["over_draws"]["steering.mean"]
    values = [draw["steering"]["mean"] for draw in tiny["draws"]]
    assert steering["n"] == 2 and steering["mean"] == pytest.approx(np.mean(values))
    assert steering["ci_low"] <= steering["mean"] <= steering["ci_high"]
    assert tiny["over_draws"]["fidelity.overall.c2st_auroc"]["ci_low"] is not None
    compared = result["comparisons"]["twin - tiny"]["differences"]
    assert compared["fidelity.overall.precision"] == {"n": 2, "mean": 0.0, "std": 0.0, "ci_low": 0.0, "ci_high": 0.0,
                                                      "verdict": "no difference shown"}
    markdown = (folder / "generator_study.md").read_text()
    assert "(g) Over the 2 draws" in markdown and "(h) Generators compared" in markdown
    assert "| tiny draw 1 | overall | 18 |" in markdown
    assert "| twin - tiny | two-sample AUROC | 0 [0, 0] | no difference shown |" in markdown


@pytest.mark.slow
def test_steering_of_real_validation_images_is_the_judges_validation_recall(study, reference_run):
    """The real arm's steering rate of a class is the share of its validation images the reference run itself
    predicted as that class: computed here from the run's own predictions_val.csv."""
    with (reference_run / "predictions_val.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    recall = {label: np.mean([row["prediction"] == label for row in rows if row["label"] == label])
              for label in CLASSES}
    assert len(set(recall.values())) == len(CLASSES)  # so a rate taken against another class cannot match
    rates = json.loads((study / "generator_study.json").read_text())["arms"][STUDY_REAL_ARM]["steering"]["per_class"]
    assert rates == pytest.approx(recall)


def copies_of(records: list[Record], size: int, folder: Path) -> list[Record]:
    """The source images, as they are before the judge's intensity step, written as a generator writes its own and
    labelled as synthetic."""
    folder.mkdir(parents=True)
    copies = []
    for index, record in enumerate(records):
        path = folder / f"{index}.png"
        Image.fromarray(load_pixels(record, size)).save(path)
        copies.append(Record(path=str(path), label=record.label, patient_id=f"copy-{index}", split="train",
                             source="synthetic"))
    return copies


@pytest.mark.slow
def test_copies_of_training_images_are_flagged_and_held_out_images_are_not(tmp_path, model_cache, reference_run):
    from pneumo_exp.evaluation.generator_study import Judge, image_set, load_reference

    cfg = job_config(study_config(tmp_path / "study", model_cache, reference_run))
    judge = Judge(cfg, load_reference(cfg))
    assert judge.copy_threshold > 0
    training = judge.train
    copies = image_set(copies_of(training.records, 48, tmp_path / "copies"), judge.reference)
    memorisation = judge.report(copies)["memorisation"]
    assert memorisation["likely_copies"] >= 0.9 * len(training.records)
    test = image_set([r for r in judge.reference.data.records if r.split == "test"], judge.reference)
    held_out = judge.report(test)["memorisation"]
    assert held_out["likely_copies"] <= 0.1 * len(test.records)


def test_a_missing_or_unfit_reference_run_is_refused_by_key(tmp_path, model_cache):
    def refused(reference: str | None, *overrides: str) -> SettingError:
        cfg = study_config(tmp_path / "study", model_cache, reference or "null", *overrides)
        with pytest.raises(SettingError) as error:
            check_plan(cfg)
        return error.value

    assert refused(None).where == "generator_study.reference_run"
    assert "holds no config.yaml" in str(refused(str(tmp_path / "nowhere")))
    summary_only = tmp_path / "summary"
    summary_only.mkdir()
    (summary_only / "config.yaml").write_text("stages: [data]\n")
    assert "not a finished classifier run" in str(refused(str(summary_only)))


@pytest.mark.slow
def test_a_judge_that_saw_synthetic_images_or_a_bad_generator_list_is_refused(tmp_path, model_cache, reference_run):
    def refused(reference: Path, *overrides: str) -> SettingError:
        with pytest.raises(SettingError) as error:
            check_plan(study_config(tmp_path / "study", model_cache, str(reference), *overrides))
        return error.value

    augmented = tmp_path / "augmented"
    augmented.mkdir()
    for name in ("config.yaml", "results.json"):
        (augmented / name).write_bytes((reference_run / name).read_bytes())
    manifest = (reference_run / "manifest.csv").read_text().splitlines()
    (augmented / "manifest.csv").write_text("\n".join([*manifest, manifest[1].replace(",real,", ",synthetic,")]))
    assert "synthetic images too" in str(refused(augmented))
    assert refused(reference_run, "generator_study.generators=[]").where == "generator_study.generators"
    assert refused(reference_run, "generator_study.draws=0").where == "generator_study.draws"
    assert refused(reference_run, "generator_study.generators=[{name:a},{name:a}]").where == \
        "generator_study.generators[1].name"
    assert refused(reference_run, f"generator_study.generators=[{{name:a,lora:{tmp_path / 'none'}}}]").where == \
        "generator_study.generators[0].lora"
    assert refused(reference_run, "diffusion_lora=cxr_small", "dataset.name=another",
                   "generator_study.generators=[{name:base}]").where == "dataset"  # its base is built per dataset


def test_small_numbers_keep_their_digits_in_the_tables():
    from pneumo_exp.evaluation.generator_study import cell

    assert cell(0.000123) == "0.000123" and cell(122.616) == "122.6" and cell(0.96) == "0.96" and cell(None) == "-"
