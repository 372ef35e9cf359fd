"""The quality stage reports only numbers it can stand behind: no FID from a singular covariance, fidelity with the
synthetic and the real validation images cut to one size and its feature space and preprocessing stated, a
classification accuracy score with arms of equal size per class, a reason instead of a crash or an empty entry
where the score cannot run, and its runs' real best epoch."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from pneumo_exp.config import job_config
from pneumo_exp.core.history import read_json_lines
from pneumo_exp.data.manifest import Record
from pneumo_exp.data.prepare import PreparedData, prepare_data
from pneumo_exp.evaluation import quality_stage
from pneumo_exp.evaluation.quality import class_quality

FEATURES = 32


def pooled_encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 4, 4), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())  # 32 features


def images(count: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 200, (count, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_fid_from_fewer_images_than_feature_dimensions_is_no_number():
    few = class_quality(images(30, 0), images(30, 1), pooled_encoder(), FEATURES, image_size=32, kid_subset_size=20)
    assert few["fid"] is None and "too few images" in few["fid_note"] and f"{FEATURES}" in few["fid_note"]
    assert few["kid_mean"] == few["kid_mean"]  # KID, an unbiased kernel estimate, needs no covariance
    line = quality_stage.format_quality({"per_class": {"NORMAL": few}})
    assert "too few" in line
    enough = class_quality(images(40, 0), images(40, 1), pooled_encoder(), FEATURES, image_size=32,
                           kid_subset_size=20)
    assert isinstance(enough["fid"], float) and "fid_note" not in enough


def bright_images(count: int, seed: int) -> torch.Tensor:
    return torch.randint(230, 256, (count, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_fidelity_cuts_both_arms_to_one_size_and_states_what_it_measured_in(make_cfg):
    cfg = job_config(make_cfg())
    real = {"NORMAL": images(60, 0), "BACTERIA": images(60, 1), "VIRUS": images(60, 2)}
    validation = {"NORMAL": images(12, 3), "BACTERIA": images(20, 4), "VIRUS": images(9, 5)}
    synthetic = {"NORMAL": validation["NORMAL"].clone(), "VIRUS": bright_images(30, 6)}  # BACTERIA: none drawn
    report = quality_stage.fidelity_report(cfg, real, synthetic, validation, pooled_encoder(), FEATURES)
    assert report["images_per_arm"] == {"NORMAL": 12, "VIRUS": 9}
    drawn, held_out = report["arms"]["synthetic"], report["arms"]["real_validation"]
    assert drawn["per_class"]["NORMAL"] == held_out["per_class"]["NORMAL"]  # the same images, cut alike
    assert drawn["per_class"]["VIRUS"]["c2st_auroc"] == 1.0 and drawn["per_class"]["VIRUS"]["precision"] == 0.0
    assert drawn["overall"]["images"] == held_out["overall"]["images"] == 21
    assert drawn["overall"]["real_images"] == 120  # the training images of the synthetic classes
    assert f"({FEATURES}-d)" in report["feature_space"]
    assert f"dataset.resolution={cfg.dataset.resolution} px" in report["preprocessing"]
    printed = quality_stage.format_quality({"per_class": {}, "fidelity": report})
    assert report["feature_space"] in printed and report["preprocessing"] in printed
    assert any(line.startswith("real_validation overall") for line in printed.splitlines())
    missing = quality_stage.fidelity_report(cfg, real, synthetic, {"BACTERIA": images(5, 7)}, pooled_encoder(),
                                            FEATURES)
    assert "no real validation images" in missing["not_run"]
    assert "fidelity: not run" in quality_stage.format_quality({"per_class": {}, "fidelity": missing})


def record(label: str, source: str, index: int) -> Record:
    return Record(path=f"/{source}/{label}/{index}.png", label=label, patient_id=f"{source}-{label}-{index}",
                  split="train", source=source)


def test_accuracy_score_arms_hold_as_many_images_per_class():
    counts = {"NORMAL": (4, 8), "BACTERIA": (5, 0), "VIRUS": (6, 3)}  # (real, synthetic): ratio 2, none, ratio 0.5
    records = [record(label, source, i) for label, sizes in counts.items()
               for source, size in zip(("real", "synthetic"), sizes) for i in range(size)]
    arms = quality_stage.accuracy_score_training_sets(PreparedData(records=records), seed=0)
    synthetic_arm, real_arm = arms["synthetic_only"], arms["real_matched"]
    assert Counter(r.label for r in synthetic_arm) == Counter(r.label for r in real_arm) == {
        "NORMAL": 4, "BACTERIA": 5, "VIRUS": 3}
    assert {r.source for r in synthetic_arm if r.label != "BACTERIA"} == {"synthetic"}
    assert {r.source for r in real_arm} == {"real"}
    assert len(set(synthetic_arm)) == len(synthetic_arm) and len(set(real_arm)) == len(real_arm)


@pytest.fixture
def with_synthetic(make_cfg):
    """A tiny phantom run's data with a few training images of two classes relabelled as synthetic."""
    def make(*overrides: str):
        cfg = job_config(make_cfg("dataset.patients_per_class=4", "dataset.test_patients_per_class=2",
                                  "trainer.epochs=2", "trainer.batch_size=8", "trainer.bootstrap_samples=20",
                                  *overrides))
        data = prepare_data(cfg.dataset, cfg.paths.cache_dir)
        records = [replace(r, source="synthetic") if r.split == "train" and r.label != "BACTERIA" and i % 2 else r
                   for i, r in enumerate(data.records)]
        return cfg, PreparedData(records=records)

    return make


def never_trains(*args, **kwargs):
    raise AssertionError("the classification accuracy score trained where it cannot be computed")


@pytest.mark.parametrize("override,world_size,reason", [("trainer.evaluate_test=false", "1", "trainer.evaluate_test"),
                                                        ("seed=0", "2", "2 processes")])
def test_accuracy_score_says_why_it_cannot_run(with_synthetic, monkeypatch, tmp_path, override, world_size, reason):
    from pneumo_exp.classify import train

    monkeypatch.setattr(train, "train_and_evaluate", never_trains)
    monkeypatch.setenv("WORLD_SIZE", world_size)
    cfg, data = with_synthetic(override)
    scores = quality_stage.classification_accuracy_score(cfg, data, tmp_path)
    assert list(scores) == ["not_run"] and reason in scores["not_run"]
    assert f"classification accuracy score: not run ({scores['not_run']})" in quality_stage.format_quality(
        {"per_class": {}, "classification_accuracy_score": scores})


@pytest.mark.slow
def test_accuracy_score_runs_record_their_best_epoch(with_synthetic, tmp_path):
    cfg, data = with_synthetic()
    scores = quality_stage.classification_accuracy_score(cfg, data, tmp_path)
    assert set(scores) == {"synthetic_only", "real_matched"}
    for name in scores:
        folder = Path(tmp_path) / "quality" / f"classifier_{name}"
        history = read_json_lines(folder / "metrics.jsonl")
        best = max(history, key=lambda row: row[cfg.trainer.selection_metric])["epoch"]
        assert json.loads((folder / "results.json").read_text())["best_epoch"] == best >= 1
