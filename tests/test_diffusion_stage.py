"""The diffusion stage at its edges: the native resolution and the source images' upsampling, latent caching and
gradient checkpointing that train as the plain loop does, throughput in the history, the validation loss (fixed
noise, lower after training, the LoRA of its lowest value kept on request) and the LoRA's effective scale, memory
freed after each stage, one non-finite-loss stop for every rank, and the quality stage in batches on the
classifier's device."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, RecordedRows, bench_main, compose, stop_in_diffusion_epoch_two

from pneumo_exp.config import DiffusionTrainingConfig
from pneumo_exp.data.cache import load_pixels
from pneumo_exp.data.manifest import Record
from pneumo_exp.data.phantom import phantom_records
from pneumo_exp.diffusion.stable_diffusion import pipeline_source
from pneumo_exp.diffusion.train import TrainingImages, source_image_sides, train_diffusion_lora
from pneumo_exp.errors import UserError
from pneumo_exp.labels import class_index

TIMING_KEYS = ("diffusion/step_seconds", "diffusion/images_per_second")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def phantom_batch(size: int = 64) -> TrainingImages:
    records = phantom_records(patients_per_class=2, test_patients_per_class=0, images_per_patient=2)
    return TrainingImages(torch.from_numpy(np.stack([load_pixels(r, size) for r in records])),
                          torch.tensor([class_index(r.label) for r in records]))


def with_validation(data: TrainingImages, size: int = 64) -> TrainingImages:
    """`data` with 6 validation images: other phantom patients (another dataset seed) than the training ones."""
    records = phantom_records(patients_per_class=1, test_patients_per_class=0, images_per_patient=2, seed=1)
    return dataclasses.replace(data, validation_pixels=torch.from_numpy(np.stack([load_pixels(r, size)
                                                                                  for r in records])),
                               validation_labels=torch.tensor([class_index(r.label) for r in records]))


def config(output: Path, cache: Path, *overrides: str, **training):
    cfg = compose([f"paths.output_dir={output}", f"paths.cache_dir={cache}", "logger=none", *overrides])
    settings = {"max_train_steps": 3, "batch_size": 4, "lr": 2e-3, "warmup_ratio": 0.0, "log_every": 1,
                "validation_every": 0, **training}
    for key, value in settings.items():
        cfg.diffusion_lora.training[key] = value
    return cfg


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


# ------------------------------------------------------------------------------------- resolution


def test_a_resolution_other_than_the_models_is_refused_unless_allowed(model_cache, tmp_path, caplog):
    native_source = pipeline_source(compose([f"paths.cache_dir={model_cache}"]).diffusion_lora, model_cache)
    cfg = config(tmp_path, model_cache, f"diffusion_lora.pretrained={native_source}",
                 "diffusion_lora.resolution=32", max_train_steps=1)
    data = dataclasses.replace(phantom_batch(32), source_sides=[20] * 12)
    not_native = r"diffusion_lora.resolution=32 is not the native resolution.*\(64 px"
    with pytest.raises(UserError, match=not_native) as refused:
        train_diffusion_lora(cfg, data, tmp_path)
    assert refused.value.where == "diffusion_lora.resolution"
    assert "allow_non_native_resolution" in refused.value.fix
    assert not (tmp_path / "diffusion").exists()

    cfg.diffusion_lora.allow_non_native_resolution = True
    with caplog.at_level(logging.WARNING, logger="pneumo_exp.diffusion.train"):
        lora = train_diffusion_lora(cfg, data, tmp_path)
    info = json.loads((lora / "lora_info.json").read_text())
    assert (info["resolution"], info["native_resolution"]) == (32, 64)
    assert info["upsampling"] == {"source_side_median": 20, "source_side_min": 20, "factor": 1.6}
    assert "upsampled 1.6x" in caplog.text


def test_synthesis_with_a_trained_lora_refuses_a_non_native_resolution(model_cache, tmp_path):
    from pneumo_exp.diffusion.generate import synthesize_for_run

    native_source = pipeline_source(compose([f"paths.cache_dir={model_cache}"]).diffusion_lora, model_cache)
    cfg = config(tmp_path, model_cache, f"diffusion_lora.pretrained={native_source}", "diffusion_lora.resolution=32",
                 "augmentation=balance")
    with pytest.raises(UserError, match="diffusion_lora.resolution=32 is not the native resolution"):
        synthesize_for_run(cfg, tmp_path / "lora", {"NORMAL": 1, "BACTERIA": 2, "VIRUS": 1}, tmp_path, progress=False)
    assert not (tmp_path / "synthetic").exists()


def test_source_sides_are_read_from_the_original_files_not_the_cache(tmp_path):
    from PIL import Image

    files = []
    for index, size in enumerate([(40, 30), (224, 224)]):
        files.append(tmp_path / f"{index}.png")
        Image.new("L", size).save(files[-1])
    records = [Record(path=str(f), label="NORMAL", patient_id=f"p{i}", split="train") for i, f in enumerate(files)]
    assert source_image_sides(records) == [30, 224]
    assert source_image_sides(phantom_records(patients_per_class=1, test_patients_per_class=0,
                                              images_per_patient=1)) == [None] * 3


def test_the_validation_grid_draws_one_image_per_class_on_the_cpu_by_default(make_cfg):
    default = DiffusionTrainingConfig()
    assert (default.validation_images("cpu"), default.validation_images("cuda")) == (1, 4)
    assert DiffusionTrainingConfig(validation_images_per_class=3).validation_images("cpu") == 3
    assert make_cfg().diffusion_lora.training.validation_images_per_class is None


# ------------------------------------------------------------------------------------ validation loss


@pytest.mark.slow
def test_the_validation_loss_is_fixed_for_fixed_weights_and_falls_with_training(model_cache, tmp_path):
    from pneumo_exp.diffusion.stable_diffusion import load_components
    from pneumo_exp.diffusion.train import encode_prompts, validation_loss, validation_problem

    cfg = config(tmp_path, model_cache, max_train_steps=8, validation_every=4, validation_images_per_class=1,
                 validation_inference_steps=1, lr=1e-2)
    components = load_components(pipeline_source(cfg.diffusion_lora, model_cache))
    data, rows = with_validation(phantom_batch()), RecordedRows()
    lora = train_diffusion_lora(cfg, data, tmp_path, logger=rows, components=components)
    logged = {row["diffusion/step"]: row["diffusion/val_loss"] for row in rows if "diffusion/val_loss" in row}
    assert list(logged) == [0, 4, 8]  # the base model's, then every validation_every steps
    assert logged[8] < 0.99 * logged[0], logged  # 0.974 at this size
    problem = validation_problem(components, data.validation_pixels, data.validation_labels, 64, 4, "cpu")
    states = encode_prompts(components, dict(cfg.diffusion_lora.prompts), "cpu")
    first, second, one_batch = (validation_loss(components, components.unet, problem, states, batch_size)
                                for batch_size in (4, 4, 6))
    assert first == second and one_batch == pytest.approx(first, rel=1e-6)
    assert first == pytest.approx(logged[8], rel=1e-6)  # a problem built again: the same noise and timesteps
    info = json.loads((lora / "lora_info.json").read_text())
    assert (info["r"], info["alpha"], info["scale"], info["lr"]) == (4, 16.0, 4.0, 1e-2)
    best_step = min(logged, key=logged.get)
    assert info["kept"] == {"rule": "last", "step": 8}
    assert info["validation"] == {"images": 6, "last_loss": logged[8], "best_loss": logged[best_step],
                                  "best_step": best_step}


@pytest.mark.slow
def test_keep_best_val_loss_saves_the_lora_of_the_lowest_logged_validation_loss(model_cache, tmp_path, monkeypatch):
    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors.torch import load_file

    from pneumo_exp.diffusion import train
    from pneumo_exp.diffusion.lora_files import lora_weights

    scripted, seen = iter([5.0, 3.0, 1.0, 2.0, 4.0]), []  # steps 0 to 4: the lowest at step 2

    def scripted_loss(components, unet, problem, class_states, batch_size):
        seen.append(lora_weights(unet))
        return next(scripted)

    monkeypatch.setattr(train, "validation_loss", scripted_loss)
    cfg = config(tmp_path, model_cache, max_train_steps=4, validation_every=1, validation_images_per_class=1,
                 validation_inference_steps=1, keep="best_val_loss")
    rows = RecordedRows()
    lora = train_diffusion_lora(cfg, with_validation(phantom_batch()), tmp_path, logger=rows)
    assert [row["diffusion/val_loss"] for row in rows if "diffusion/val_loss" in row] == [5.0, 3.0, 1.0, 2.0, 4.0]
    assert json.loads((lora / "lora_info.json").read_text())["kept"] == {"rule": "best_val_loss", "step": 2}
    saved = load_file(lora / "pytorch_lora_weights.safetensors")
    for step, weights in ((2, seen[2]), (4, seen[4])):
        expected = {f"unet.{key}": value for key, value in convert_state_dict_to_diffusers(weights).items()}
        assert saved.keys() == expected.keys()
        same = all(torch.equal(saved[key], expected[key]) for key in saved)
        assert same == (step == 2), step


def test_keeping_the_best_lora_needs_validation_images_and_a_known_rule(model_cache, tmp_path):
    from pneumo_exp.validate import SettingError, check_plan

    cfg = config(tmp_path, model_cache, keep="best_val_loss")
    with pytest.raises(UserError, match="needs validation images") as refused:
        train_diffusion_lora(cfg, phantom_batch(), tmp_path)
    assert refused.value.where == "diffusion_lora.training.keep"
    with pytest.raises(SettingError) as unknown:
        check_plan(config(tmp_path, model_cache, keep="lowest"))
    assert unknown.value.where == "diffusion_lora.training.keep"


# ---------------------------------------------------------------------------------- speed features


@pytest.mark.slow
def test_cached_latents_and_checkpointing_train_as_the_plain_loop(model_cache, tmp_path, caplog):
    from safetensors.torch import load_file

    data = phantom_batch()
    runs = {}
    for name, training in {"plain": {}, "cached": {"cache_latents": True},
                           "checkpointed": {"gradient_checkpointing": True}}.items():
        rows = RecordedRows()
        cfg = config(tmp_path / name, model_cache, max_train_steps=5, crop_min_side=1.0, **training)
        with caplog.at_level(logging.INFO, logger="pneumo_exp.diffusion.train"):
            lora = train_diffusion_lora(cfg, data, tmp_path / name, logger=rows)
        runs[name] = rows, load_file(lora / "pytorch_lora_weights.safetensors")
    assert "5 optimizer steps (max_train_steps=5" in caplog.text
    plain_rows, plain_lora = runs["plain"]
    steps = [row for row in plain_rows if "diffusion/loss" in row]
    assert len(steps) == 5 and all(row[key] > 0 for row in steps for key in TIMING_KEYS)
    for name in ("cached", "checkpointed"):
        rows, weights = runs[name]
        assert len(rows) == len(plain_rows)
        for row, plain in zip(without_timing(rows), without_timing(plain_rows)):
            assert row == pytest.approx(plain, rel=1e-5, abs=1e-6), name
        for key in plain_lora:
            torch.testing.assert_close(weights[key], plain_lora[key], rtol=1e-4, atol=1e-6)
    on_disk = [json.loads(line) for line in (tmp_path / "cached" / "diffusion" / "metrics.jsonl").read_text()
               .splitlines()]
    assert on_disk == runs["cached"][0]


def test_cached_latents_refuse_pixel_space_crops(model_cache, tmp_path):
    cfg = config(tmp_path, model_cache, cache_latents=True, crop_min_side=0.9)
    with pytest.raises(UserError, match="crop_min_side"):
        train_diffusion_lora(cfg, phantom_batch(), tmp_path)


@pytest.mark.slow
def test_resume_with_cached_latents_continues_exactly(model_cache, tmp_path):
    from safetensors.torch import load_file

    data = phantom_batch()
    settings = {"max_train_steps": None, "epochs": 2, "cache_latents": True, "crop_min_side": 1.0}
    straight = train_diffusion_lora(config(tmp_path / "a", model_cache, **settings), data, tmp_path / "a")

    stop_in_diffusion_epoch_two(train_diffusion_lora, config(tmp_path / "b", model_cache, **settings), data,
                                tmp_path / "b")
    cfg = config(tmp_path / "b", model_cache, **settings)
    cfg.resume = True
    resumed = train_diffusion_lora(cfg, data, tmp_path / "b")
    first, second = (load_file(folder / "pytorch_lora_weights.safetensors") for folder in (straight, resumed))
    assert all(torch.equal(first[key], second[key]) for key in first)


# ------------------------------------------------------------------------------------------ memory


@pytest.mark.slow
def test_no_unet_outlives_its_training_or_synthesis_stage(model_cache, tmp_path, monkeypatch):
    from pneumo_exp.diffusion import generate, stable_diffusion, train

    alive = []

    def spy(load, unet_of):
        def wrapped(*args, **kwargs):
            loaded = load(*args, **kwargs)
            alive.append(weakref.ref(unet_of(loaded)))
            return loaded
        return wrapped

    monkeypatch.setattr(train, "load_components", spy(train.load_components, lambda parts: parts.unet))
    monkeypatch.setattr(stable_diffusion, "load_pipeline", spy(stable_diffusion.load_pipeline, lambda pipe: pipe.unet))
    cfg = config(tmp_path, model_cache, max_train_steps=1, validation_every=1, precision="bf16",
                 validation_images_per_class=1, validation_inference_steps=1)
    lora = train_diffusion_lora(cfg, phantom_batch(), tmp_path)  # mixed precision: accelerate wraps forward
    assert len(alive) == 1 and alive[0]() is None, "the trained UNet is still alive after its stage"
    prompts = dict(cfg.diffusion_lora.prompts)
    generate.generate_synthetic(pipeline_source(cfg.diffusion_lora, model_cache), lora, {"NORMAL": 1}, prompts,
                                tmp_path / "gen", seed=0, steps=1, guidance=1.0, batch_size=1, resolution=64,
                                precision="bf16", progress=False)
    assert len(alive) == 2 and alive[1]() is None, "the sampling UNet is still alive after its stage"


# ------------------------------------------------------------------------------------- distributed


NON_FINITE_ON_RANK_ONE = """
import os, sys, torch
from conftest import compose
from pneumo_exp.diffusion import train
from pneumo_exp.data.cache import load_pixels
from pneumo_exp.data.phantom import phantom_records
from pneumo_exp.labels import class_index

rank = int(os.environ["RANK"])  # not PartialState(): without cpu=True it would fix a one-process state
plain = train.latent_loss
train.latent_loss = lambda *args, **kwargs: plain(*args, **kwargs) * (float("nan") if rank == 1 else 1.0)
output, cache = sys.argv[1], sys.argv[2]
cfg = compose([f"paths.output_dir={output}", f"paths.cache_dir={cache}", "logger=none", "trainer.cpu=true",
               "diffusion_lora.training.max_train_steps=2", "diffusion_lora.training.validation_every=0"])
records = phantom_records(patients_per_class=2, test_patients_per_class=0, images_per_patient=2)
data = train.TrainingImages(torch.from_numpy(__import__("numpy").stack([load_pixels(r, 64) for r in records])),
                            torch.tensor([class_index(r.label) for r in records]))
try:
    train.train_diffusion_lora(cfg, data, output)
except train.NonFiniteLossError as error:
    print(f"rank {rank} stopped: {error}", flush=True)
    sys.exit(3)
"""


@pytest.mark.slow
@pytest.mark.xdist_group("subprocess")
def test_a_non_finite_loss_on_one_rank_stops_every_rank(model_cache, tmp_path):
    script = tmp_path / "non_finite.py"
    script.write_text(NON_FINITE_ON_RANK_ONE)
    pipeline_source(compose([f"paths.cache_dir={model_cache}"]).diffusion_lora, model_cache)  # built once, here
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}",
           "OMP_NUM_THREADS": "1"}
    launch = subprocess.run([str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu",
                             "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                             "--dynamo_backend", "no",
                             str(script), str(tmp_path / "run"), str(model_cache)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = launch.stdout + launch.stderr
    assert launch.returncode != 0
    for rank in (0, 1):
        assert f"rank {rank} stopped: diffusion loss became non-finite at step 1" in output, output[-3000:]


# ------------------------------------------------------------------------------------------ quality


def test_quality_features_in_batches_equal_one_pass_and_respect_the_batch_size():
    from torch import nn

    from pneumo_exp.evaluation.quality import quality_report

    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(1, 8, 4, 4), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    seen = []
    encoder.register_forward_pre_hook(lambda module, inputs: seen.append(len(inputs[0])))
    generator = torch.Generator().manual_seed(0)
    real = torch.randint(0, 200, (23, 32, 32), dtype=torch.uint8, generator=generator)
    synthetic = torch.cat([real[:2], torch.randint(0, 200, (9, 32, 32), dtype=torch.uint8, generator=generator)])
    options = {"num_features": 32, "image_size": 32, "kid_subset_size": 8}
    batched = quality_report({"VIRUS": real}, {"VIRUS": synthetic}, encoder, batch_size=5, **options)
    assert seen and max(seen) <= 5
    seen.clear()
    one_pass = quality_report({"VIRUS": real}, {"VIRUS": synthetic}, encoder, batch_size=1000, **options)
    assert max(seen) == 23
    numbers = lambda row: {key: value for key, value in row.items() if isinstance(value, (int, float))}  # noqa: E731
    assert numbers(batched["VIRUS"]) == pytest.approx(numbers(one_pass["VIRUS"]), rel=1e-6, abs=1e-9)
    assert batched["VIRUS"]["likely_copies"] == 2 and batched["VIRUS"]["diversity_synthetic_over_real"] > 0


@pytest.mark.slow
def test_quality_stage_batches_on_the_device_and_scores_only_the_synthetic_classes(make_cfg, monkeypatch):
    from pneumo_exp.classify import predict
    from pneumo_exp.classify import train as classify_train
    from pneumo_exp.classify.model import build_classifier
    from pneumo_exp.config import job_config
    from pneumo_exp.data.prepare import PreparedData, prepare_data
    from pneumo_exp.evaluation import quality_stage

    cfg = make_cfg("dataset.patients_per_class=6", "dataset.test_patients_per_class=2", "trainer.eval_batch_size=4")
    data = prepare_data(cfg.dataset, cfg.paths.cache_dir)
    real_train = [r for r in data.split("train") if r.source == "real"]
    synthetic = [Record(path=r.path, label=label, patient_id=f"synthetic-{label}-{i}", split="train",
                        source="synthetic") for label in ("NORMAL", "VIRUS")
                 for i, r in enumerate([r for r in real_train if r.label == label][:4])]
    data = PreparedData(records=data.records + synthetic)
    classifier = build_classifier(cfg.clip_lora, cfg.paths.cache_dir, seed=0)[0]
    monkeypatch.setattr(predict, "load_trained", lambda run_dir, cache_dir: (classifier.eval(), cfg))
    seen = []
    forward = quality_stage.ImageEmbedding.forward
    monkeypatch.setattr(quality_stage.ImageEmbedding, "forward",
                        lambda self, images: seen.append(len(images)) or forward(self, images))
    arms = {}

    def train_and_evaluate(cfg, prepared, folder, logger):
        arms[folder.name] = [r for r in prepared.records if r.split == "train"]
        return {"test/acc": 0.5, "test/f1_macro": 0.5, "test/recall_macro": 0.5}

    monkeypatch.setattr(classify_train, "train_and_evaluate", train_and_evaluate)
    output = Path(cfg.paths.output_dir)
    output.mkdir(parents=True)

    class NoLogger:
        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    quality_stage.run_quality(job_config(cfg), data, output, NoLogger())
    assert seen and max(seen) <= 4
    report = json.loads((output / "quality.json").read_text())
    assert report["synthetic_classes"] == ["NORMAL", "VIRUS"]
    assert set(report["fidelity"]["arms"]) == {"synthetic", "real_validation"}
    assert set(report["fidelity"]["images_per_arm"]) == {"NORMAL", "VIRUS"}
    synthetic_arm, real_arm = arms["classifier_synthetic_only"], arms["classifier_real_matched"]
    bacteria = [r for r in real_train if r.label == "BACTERIA"]
    assert bacteria and [r for r in synthetic_arm if r.label == "BACTERIA"] == bacteria
    assert [r for r in real_arm if r.label == "BACTERIA"] == bacteria
    for label in ("NORMAL", "VIRUS"):
        assert {r.source for r in synthetic_arm if r.label == label} == {"synthetic"}
        assert {r.source for r in real_arm if r.label == label} == {"real"}
        assert sum(r.label == label for r in synthetic_arm) == sum(r.label == label for r in real_arm)
    assert report["classification_accuracy_score"]["synthetic_only"]["train_images"] == len(synthetic_arm)


# ------------------------------------------------------------------------------------------ bench


@pytest.mark.slow
def test_the_diffusion_bench_runs_at_tiny_size(tmp_path):
    import tempfile

    def scratch_folders() -> set[Path]:
        return set(Path(tempfile.gettempdir()).glob("bench-diffusion-*"))

    before = scratch_folders()
    out = tmp_path / "diffusion.json"
    printed = bench_main("bench_diffusion", "--tiny", "--out", str(out))
    assert scratch_folders() == before, "the bench left its scratch folder behind"
    result = json.loads(out.read_text())
    assert result["latent_cache_loop_ratio_vs_plain"] > 0 and result["latent_cache_ratio_vs_plain"] > 0
    assert set(result["train_mean_loss"]) == {"framework_training", "framework_cached_training", "plain_training"}
    assert result["train_mean_loss"]["framework_cached_training"] == pytest.approx(
        result["train_mean_loss"]["framework_training"], rel=1e-4)
    assert "latent cache:" in printed
