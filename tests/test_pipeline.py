"""Whole jobs: generative augmentation end to end, and finished jobs skipped when run again."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import compose

from pneumo_exp.pipeline import run

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def demo_base(tmp_path_factory, model_cache) -> Path:
    """The demo's phantom_small base as `make demo` builds it (task=pretrain_diffusion experiment=demo_augmented),
    on the smoke split (debug=smoke) and for a few steps: tests/test_pretrain.py proves that the pretraining learns."""
    folder = tmp_path_factory.mktemp("demo_base")
    run(compose([f"paths.output_dir={folder / 'run'}", f"paths.cache_dir={model_cache}", "logger=none",
                 "task=pretrain_diffusion", "experiment=demo_augmented", "debug=smoke",
                 f"diffusion_lora.pretrained={folder / 'base'}", "diffusion_lora.pretraining.vae_steps=10",
                 "diffusion_lora.pretraining.unet_steps=10"]))
    return folder / "base"


def test_augmented_run_keeps_synthetic_images_in_training_only(make_cfg, demo_base):
    cfg = make_cfg("experiment=demo_augmented", "debug=smoke", f"diffusion_lora.pretrained={demo_base}",
                   "diffusion_lora.training.epochs=1",
                   "diffusion_lora.training.validation_every=0", "diffusion_lora.generation.num_inference_steps=2")
    run(cfg)
    folder = Path(cfg.paths.output_dir)
    with (folder / "manifest.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    synthetic = [row for row in rows if row["source"] == "synthetic"]
    real_train = [row for row in rows if row["source"] == "real" and row["split"] == "train"]
    per_class = Counter(row["label"] for row in real_train)
    assert Counter(row["label"] for row in synthetic) == {label: int(0.5 * n + 0.5) for label, n in per_class.items()}
    assert {row["split"] for row in synthetic} == {"train"}
    assert all(Path(row["path"]).is_relative_to(folder / "synthetic") for row in synthetic)
    evaluated = {line.split(",")[0] for name in ("predictions.csv", "predictions_val.csv")
                 for line in (folder / name).read_text().splitlines()[1:]}
    assert not evaluated & {row["path"] for row in synthetic}
    results = json.loads((folder / "results.json").read_text())
    assert results["train_images"] == {"real": len(real_train), "synthetic": len(synthetic), "duplicate": 0}
    report = json.loads((folder / "quality.json").read_text())
    quality = report["per_class"]
    assert set(quality) == {"NORMAL", "BACTERIA", "VIRUS"}
    scores = report["classification_accuracy_score"]
    assert scores["synthetic_only"]["train_images"] == scores["real_matched"]["train_images"] == len(synthetic)
    assert (folder / "quality" / "classifier_synthetic_only" / "results.json").is_file()
    assert all(row["synthetic"] > 0 and row["fid"] == row["fid"] for row in quality.values())
    assert (folder / "synthetic_vs_real.png").is_file()
    assert (folder / "diffusion" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_a_finished_job_is_not_run_again(make_cfg):
    cfg = make_cfg("debug=smoke")
    first = run(cfg)
    metrics_file = Path(cfg.paths.output_dir) / "metrics.jsonl"
    written = metrics_file.stat().st_mtime_ns
    assert run(cfg) == first
    assert metrics_file.stat().st_mtime_ns == written


def test_synthesize_without_a_lora_is_refused_clearly(make_cfg):
    with pytest.raises(ValueError, match="synthesize needs a LoRA"):
        run(make_cfg("debug=smoke", "stages=[data,synthesize,classify]", "augmentation=balance"))


@pytest.mark.parametrize("override,message", [("task=sumary", "unknown task 'sumary'"),
                                              ("stages=[data,quality]", "quality measures")])
def test_impossible_plans_are_refused_before_any_work(make_cfg, override, message):
    cfg = make_cfg(override)
    with pytest.raises(ValueError, match=message):
        run(cfg)
    assert not (Path(cfg.paths.output_dir) / "manifest.csv").exists()


def test_resume_refuses_changed_settings(make_cfg):
    cfg = make_cfg("debug=smoke")
    run(cfg)
    changed = make_cfg("debug=smoke", "optim.lr=0.5", "resume=true")
    (Path(changed.paths.output_dir) / "results.json").unlink()
    with pytest.raises(ValueError, match="optim"):
        run(changed)


def test_a_lora_trained_on_another_split_is_refused(make_cfg, tmp_path):
    from pneumo_exp.data.prepare import prepare_data
    from pneumo_exp.data.provenance import TRAINING_SPLIT_FILE, check_trained_within, write_training_record
    from pneumo_exp.errors import UserError

    cfg = make_cfg()
    train = prepare_data(cfg.dataset, cfg.paths.cache_dir).split("train")
    with pytest.raises(UserError, match=TRAINING_SPLIT_FILE):
        check_trained_within(tmp_path, train, "LoRA", "diffusion_lora.trained_lora")
    write_training_record(tmp_path, train[: len(train) // 2])  # a subset of the split: it saw nothing else
    check_trained_within(tmp_path, train, "LoRA", "diffusion_lora.trained_lora")
    write_training_record(tmp_path, train[1:] + prepare_data(cfg.dataset, cfg.paths.cache_dir).split("test")[:1])
    with pytest.raises(ValueError, match="outside this run's training split.*diffusion_lora.trained_lora"):
        check_trained_within(tmp_path, train, "LoRA", "diffusion_lora.trained_lora")
    (tmp_path / TRAINING_SPLIT_FILE).write_text(json.dumps({"fingerprint": "another", "images": 1}))  # an old record
    with pytest.raises(ValueError, match="outside this run's training split"):
        check_trained_within(tmp_path, train, "LoRA", "diffusion_lora.trained_lora")
