"""Every number is computed on what was trained, as it was trained: `predict`, the quality stage and the validation
stress test evaluate a bf16 run under its autocast and on its intensity-standardised pixels (stress shifts applied to
the source pixels, before that step); a cached size other than the tower's is refused unless allowed, and a run
records the size its model saw."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import bench_module, compose
from PIL import Image

from pneumo_exp.config import job_config
from pneumo_exp.data import manifest
from pneumo_exp.data.augment import to_unit_float
from pneumo_exp.data.cache import open_or_build
from pneumo_exp.data.images import standardize_intensity
from pneumo_exp.data.manifest import Record
from pneumo_exp.data.prepare import PreparedData
from pneumo_exp.labels import CLASSES
from pneumo_exp.pipeline import run
from pneumo_exp.validate import SettingError, check_plan

PROBABILITIES = [f"prob_{name}" for name in CLASSES]


def low_contrast_tree(root: Path) -> Path:
    """{train,test}/{class}/i.png: dim, low-contrast gradients with noise, so that equalisation changes them a lot."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, 48)[None, :]
    for split, count in (("train", 10), ("test", 4)):
        for index, label in enumerate(CLASSES):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = 50 + 25 * index + 30 * ramp * rng.uniform(0.5, 1.5) + rng.normal(0, 6, (48, 48))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / split / label / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory, model_cache):
    """A finished run trained under bf16 autocast on histogram-equalised images of a folder tree."""
    root = low_contrast_tree(tmp_path_factory.mktemp("tree"))
    cfg = compose([f"paths.output_dir={tmp_path_factory.mktemp('run')}", f"paths.cache_dir={model_cache}",
                   "logger=none", "dataset=folder", f"dataset.root={root}", "dataset.resolution=64",
                   "dataset.val_fraction=0.3", "dataset.intensity=equalize", "trainer.precision=bf16",
                   "trainer.cpu=true", "trainer.epochs=2", "trainer.batch_size=8", "trainer.bootstrap_samples=20"])
    run(cfg)
    return job_config(cfg), root


def probabilities_by_path(path: Path) -> dict[str, dict]:
    with path.open() as handle:
        return {os.path.abspath(row["path"]): row for row in csv.DictReader(handle)}


def trained_under_autocast(run_dir: Path, cache_dir: str):
    """The run's best weights in an accelerator prepared as the run's test_best prepares them (bf16, CPU)."""
    from pneumo_exp.classify.predict import load_trained
    from pneumo_exp.core.training import fresh_accelerator

    classifier, _ = load_trained(run_dir, cache_dir)
    return classifier, fresh_accelerator("bf16", cpu=True).prepare(classifier)


def test_predict_on_a_bf16_runs_test_images_reproduces_its_predictions_csv(bf16_run, tmp_path):
    from pneumo_exp.classify.predict import predict

    cfg, root = bf16_run
    output = tmp_path / "again.csv"
    predict(job_config(compose(["task=predict", f"predict.run_dir={cfg.paths.output_dir}",
                                f"predict.input={root / 'test'}", f"predict.output={output}",
                                f"paths.output_dir={tmp_path}", f"paths.cache_dir={cfg.paths.cache_dir}"])), tmp_path)
    stored = probabilities_by_path(Path(cfg.paths.output_dir) / "predictions.csv")
    again = probabilities_by_path(output)
    assert len(stored) == 12 and set(again) == set(stored)
    for path, row in stored.items():
        assert again[path]["prediction"] == row["prediction"], path
        assert [float(again[path][name]) for name in PROBABILITIES] == pytest.approx(
            [float(row[name]) for name in PROBABILITIES], abs=2e-6), path


def test_the_quality_stage_measures_the_pixels_and_features_the_classifier_was_trained_on(bf16_run, monkeypatch):
    from pneumo_exp.evaluation import quality_stage

    cfg, _ = bf16_run
    run_dir = Path(cfg.paths.output_dir)
    records = manifest.read_csv(run_dir / "manifest.csv")
    real_train = [r for r in records if r.split == "train"]
    synthetic = [Record(path=r.path, label=r.label, patient_id=f"synthetic-{i}", split="train", source="synthetic")
                 for i, r in enumerate(real_train[::3])]
    seen = {}

    def recording_report(real, synthetic, feature, num_features, **options):
        seen["real"] = real
        seen["classifier"] = feature.classifier
        seen["features"] = {label: feature(to_unit_float(torch.from_numpy(pixels))) for label, pixels in real.items()}
        return {}

    class NoLogger:
        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(quality_stage, "quality_report", recording_report)
    monkeypatch.setattr(quality_stage, "classification_accuracy_score", lambda *args, **kwargs: {})
    quality_stage.run_quality(cfg, PreparedData(records=records + synthetic), run_dir, NoLogger())

    equalized = open_or_build(real_train, 64, cfg.paths.cache_dir, progress=False, intensity="equalize")
    classifier, prepared = trained_under_autocast(run_dir, cfg.paths.cache_dir)
    projected = []
    classifier.clip.visual_projection.register_forward_hook(lambda module, inputs, output: projected.append(output))
    for label in CLASSES:
        pixels = equalized.pixels[equalized.rows_of([r for r in real_train if r.label == label])]
        assert np.array_equal(seen["real"][label], pixels), label
        projected.clear()
        with torch.no_grad():
            prepared(to_unit_float(torch.from_numpy(np.asarray(pixels))))
        as_trained = F.normalize(projected[0].float(), dim=-1)
        assert seen["features"][label] == pytest.approx(as_trained, abs=1e-6), label


def test_val_stress_shifts_the_source_pixels_then_standardises_and_evaluates_as_trained(bf16_run, monkeypatch):
    cfg, _ = bf16_run
    run_dir = Path(cfg.paths.output_dir)
    val_stress = bench_module("val_stress")
    recorded = {}
    shifts = iter(val_stress.SHIFTS)
    metrics = val_stress.classification_metrics
    monkeypatch.setattr(val_stress, "classification_metrics",
                        lambda probabilities, labels: metrics(recorded.setdefault(next(shifts), probabilities), labels))
    val_stress.stress(run_dir, cfg.paths.cache_dir)

    stored = probabilities_by_path(run_dir / "predictions_val.csv")
    validation = [r for r in manifest.read_csv(run_dir / "manifest.csv") if r.split == "val"]
    expected = torch.tensor([[float(stored[os.path.abspath(r.path)][name]) for name in PROBABILITIES]
                             for r in validation])
    assert recorded["none"] == pytest.approx(expected, abs=2e-6)

    source = open_or_build(validation, 64, cfg.paths.cache_dir, progress=False)
    raw = torch.from_numpy(np.ascontiguousarray(source.pixels[source.rows_of(validation)]))
    shifted = val_stress.SHIFTS["gamma 1.4"](to_unit_float(raw))[:, 0].mul(255).round().to(torch.uint8).numpy()
    deployed = to_unit_float(torch.from_numpy(np.stack([standardize_intensity(image, "equalize")
                                                        for image in shifted])))
    _, prepared = trained_under_autocast(run_dir, cfg.paths.cache_dir)
    with torch.no_grad():
        assert recorded["gamma 1.4"] == pytest.approx(prepared(deployed).float().softmax(-1), abs=1e-5)


def test_a_cached_size_other_than_the_towers_is_refused_naming_both_keys():
    with pytest.raises(SettingError) as refused:
        check_plan(compose(["clip_lora=small", "dataset.resolution=160"]))
    assert "dataset.resolution=160" in str(refused.value) and "clip_lora.image_size=128" in str(refused.value)
    assert "clip_lora.allow_resize" in str(refused.value)
    check_plan(compose(["clip_lora=small", "dataset.resolution=160", "clip_lora.allow_resize=true"]))
    check_plan(compose(["clip_lora=small", "dataset.resolution=128"]))
    check_plan(compose(["dataset=kermany", "dataset.root=/data", "task=summary"]))  # no classifier sees the images


def test_a_run_with_an_allowed_resize_records_both_sizes(make_cfg):
    cfg = make_cfg("dataset.patients_per_class=4", "dataset.test_patients_per_class=2", "dataset.resolution=48",
                   "clip_lora.allow_resize=true", "trainer.epochs=1", "trainer.batch_size=8",
                   "trainer.bootstrap_samples=20")
    run(cfg)
    results = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert results["image_size"] == {"cached": 48, "model": cfg.clip_lora.image_size} and cfg.clip_lora.image_size != 48
