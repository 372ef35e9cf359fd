"""task=pretrain_diffusion at tiny size on phantom images: the base learns (its denoising loss on validation images
falls far below a random-init base's, its VAE reconstructs, the validation loss it logs falls from its random start
and is what the saved base scores), plain diffusers loads it and a LoRA trained on it (which logs its own
validation loss on the run's validation split), a killed pretraining resumes to the same weights, and a base that is
missing or from another split is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import RecordedRows, compose

from pneumo_exp.errors import UserError

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]

TINY_BASE = ["diffusion_lora=cxr_small", "diffusion_lora.resolution=32",
             "diffusion_lora.architecture={vae_channels: [16, 32], vae_mid_attention: false, "
             "unet_channels: [16, 32], text_hidden_size: 16, text_layers: 1, unet_attention_heads: 2}",
             "diffusion_lora.pretraining.vae_batch_size=16", "diffusion_lora.pretraining.unet_batch_size=16",
             "diffusion_lora.pretraining.vae_lr=2e-3", "diffusion_lora.pretraining.unet_lr=2e-3",
             "diffusion_lora.pretraining.warmup_steps=10", "diffusion_lora.pretraining.ema_decay=0.9",
             "diffusion_lora.pretraining.log_every=10", "diffusion_lora.pretraining.sample_every=0",
             "diffusion_lora.pretraining.samples_per_class=2", "diffusion_lora.generation.num_inference_steps=4",
             "dataset.patients_per_class=8", "dataset.test_patients_per_class=2", "dataset.difficulty=0.2"]


# VAE and UNet steps of the module's base. Measured at this size: denoising loss 0.25 of a random base's (the test
# asks < 0.6), VAE validation PSNR 22.6 dB (> 20), last logged UNet loss 0.28 of the first (< 0.7).
BASE_STEPS = (100, 120)


def config(tmp_path: Path, cache: Path, *overrides: str, steps: tuple[int, int] = BASE_STEPS):
    return compose([f"paths.output_dir={tmp_path / 'run'}", f"paths.cache_dir={cache}", "logger=none",
                    "task=pretrain_diffusion", f"diffusion_lora.pretrained={tmp_path / 'base'}", *TINY_BASE,
                    f"diffusion_lora.pretraining.vae_steps={steps[0]}",
                    f"diffusion_lora.pretraining.unet_steps={steps[1]}", *overrides])


def pretrain(cfg, logger=None) -> Path:
    from pneumo_exp.config import job_config
    from pneumo_exp.data.prepare import prepare_data
    from pneumo_exp.diffusion.pretrain import pretrain_base, pretraining_images

    typed = job_config(cfg)
    data = prepare_data(typed.dataset, typed.paths.cache_dir)
    images = pretraining_images(data, typed.diffusion_lora.resolution, typed.paths.cache_dir, progress=False)
    return pretrain_base(typed, images, Path(typed.paths.output_dir), logger)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path]:
    """A base pretrained once for the module: (its folder, the cache it used)."""
    folder = tmp_path_factory.mktemp("pretrained")
    cache = tmp_path_factory.mktemp("cache")
    return pretrain(config(folder, cache)), cache


def validation_denoising_loss(source: str, pixels: torch.Tensor) -> float:
    """Plain noise-prediction MSE of the UNet conditioned on the class prompts, on `pixels` (in turn as each
    class), with fixed noise and timesteps."""
    from pneumo_exp.core.seeds import seeded_generator
    from pneumo_exp.data.augment import to_unit_float
    from pneumo_exp.diffusion.stable_diffusion import load_components
    from pneumo_exp.diffusion.train import diffusion_loss, encode_prompts

    components = load_components(source)
    states = encode_prompts(components, dict(compose(TINY_BASE).diffusion_lora.prompts), "cpu")
    with torch.no_grad():
        losses = [diffusion_loss(components, components.unet, to_unit_float(pixels), states[[i % 3] * len(pixels)],
                                 seeded_generator(7, i)).item() for i in range(6)]
    return float(np.mean(losses))


def prepared_phantom(cache: Path):
    from pneumo_exp.config import job_config
    from pneumo_exp.data.prepare import prepare_data

    cfg = compose([f"paths.output_dir={cache / 'unused'}", f"paths.cache_dir={cache}", *TINY_BASE])
    return prepare_data(job_config(cfg).dataset, str(cache))


def validation_pixels(cache: Path) -> torch.Tensor:
    from pneumo_exp.diffusion.pretrain import pretraining_images

    return pretraining_images(prepared_phantom(cache), 32, str(cache), progress=False).validation


def test_the_pretrained_base_denoises_validation_images_far_better_than_a_random_one(base, tmp_path):
    from pneumo_exp.diffusion.stable_diffusion import build_tiny_pipeline

    folder, cache = base
    card = json.loads((folder / "model_card.json").read_text())
    random_init = tmp_path / "random"
    build_tiny_pipeline(card["architecture"], 32, random_init)
    pixels = validation_pixels(cache)
    trained, untrained = (validation_denoising_loss(str(source), pixels) for source in (folder, random_init))
    assert trained < 0.6 * untrained, (trained, untrained)
    assert card["vae"]["validation_psnr_db"] > 20.0, card["vae"]
    assert card["unet"]["loss"]["last_logged"] < 0.7 * card["unet"]["loss"]["first_logged"], card["unet"]


def test_the_unet_logs_its_validation_loss_from_random_init_to_the_saved_base(base):
    from pneumo_exp.core.history import read_json_lines
    from pneumo_exp.diffusion.pretrain import pretraining_images
    from pneumo_exp.diffusion.stable_diffusion import load_components
    from pneumo_exp.diffusion.train import encode_prompts, validation_loss, validation_problem

    folder, cache = base
    history = read_json_lines(folder.parents[1] / "run" / "pretrain" / "metrics.jsonl")
    logged = {row["pretrain/unet_step"]: row["pretrain/unet_val_loss"] for row in history
              if "pretrain/unet_val_loss" in row}
    assert list(logged) == [0, BASE_STEPS[1]]  # at the start and the end (sample_every=0: no grid between)
    assert logged[BASE_STEPS[1]] < 0.6 * logged[0], logged
    images = pretraining_images(prepared_phantom(cache), 32, str(cache), progress=False)
    card = json.loads((folder / "model_card.json").read_text())
    assert card["unet"]["validation_loss"]["last_logged"] == logged[BASE_STEPS[1]]
    assert card["unet"]["validation_images"] == len(images.validation) > 0
    assert "validation denoising loss" in (folder / "README.md").read_text()
    components = load_components(str(folder))  # the saved (moving-average) weights, scored on a problem built again
    problem = validation_problem(components, images.validation, images.validation_labels, 32, 64, "cpu")
    states = encode_prompts(components, dict(compose(TINY_BASE).diffusion_lora.prompts), "cpu")
    assert validation_loss(components, components.unet, problem, states, 16) == pytest.approx(
        logged[BASE_STEPS[1]], rel=1e-5)


def test_plain_diffusers_loads_the_base_and_its_card_names_the_training_split(base):
    from diffusers import StableDiffusionPipeline

    from pneumo_exp.data.provenance import content_fingerprint

    folder, cache = base
    pipeline = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    image = pipeline("a pediatric chest X-ray, normal lungs", num_inference_steps=2, height=32, width=32,
                     output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    data = prepared_phantom(cache)
    train = [r for r in data.split("train") if r.source == "real"]
    card = json.loads((folder / "model_card.json").read_text())
    assert card["training_split"]["fingerprint"] == content_fingerprint(train)
    assert card["training_split"]["images"] == len(train)
    record = json.loads((folder / "training_split.json").read_text())
    assert record["fingerprint"] == content_fingerprint(train)
    assert record["sha256"] == sorted({r.sha256 for r in train})
    assert folder.name.startswith(f"train-{content_fingerprint(train)}-")  # one base per training split
    card_text = (folder / "README.md").read_text()
    assert (folder / "samples.png").is_file() and "samples.png" in card_text
    assert f"loss {card['unet']['loss']['first_logged']:.4g} -> {card['unet']['loss']['last_logged']:.4g}" in card_text
    assert pipeline.vae.config.scaling_factor == pytest.approx(card["vae"]["scaling_factor"])
    assert not folder.with_name(folder.name + ".state").exists()


def test_a_lora_trained_on_the_base_loads_in_plain_diffusers(base, tmp_path):
    from diffusers import StableDiffusionPipeline

    from pneumo_exp.core.history import read_json_lines
    from pneumo_exp.data import manifest
    from pneumo_exp.pipeline import run

    folder, cache = base
    cfg = compose([f"paths.output_dir={tmp_path / 'run'}", f"paths.cache_dir={cache}", "logger=none", *TINY_BASE,
                   f"diffusion_lora.pretrained={folder}", "stages=[data,diffusion]",
                   "diffusion_lora.training.max_train_steps=3", "diffusion_lora.training.batch_size=4",
                   "diffusion_lora.training.validation_every=0"])
    run(cfg)
    validation = [r for r in manifest.read_csv(tmp_path / "run" / "manifest.csv") if r.split == "val"]
    info = json.loads((tmp_path / "run" / "diffusion" / "lora" / "lora_info.json").read_text())
    assert info["validation"]["images"] == len(validation) > 0  # the run's validation split scores the LoRA
    assert [row["diffusion/step"] for row in read_json_lines(tmp_path / "run" / "diffusion" / "metrics.jsonl")
            if "diffusion/val_loss" in row] == [0, 3]
    pipeline = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipeline.load_lora_weights(str(tmp_path / "run" / "diffusion" / "lora"))
    image = pipeline("a pediatric chest X-ray, viral pneumonia", num_inference_steps=2, height=32, width=32,
                     output_type="np").images
    assert image.shape == (1, 32, 32, 3)


def test_a_base_pretrained_on_another_split_is_refused_by_the_lora_stage(base, tmp_path):
    from pneumo_exp.data.manifest import LeakageError
    from pneumo_exp.pipeline import run

    folder, cache = base
    cfg = compose([f"paths.output_dir={tmp_path / 'run'}", f"paths.cache_dir={cache}", "logger=none", *TINY_BASE,
                   f"diffusion_lora.pretrained={folder}", "stages=[data,diffusion]", "dataset.split_seed=1"])
    with pytest.raises(LeakageError, match="diffusion base .* outside this run's training split"):
        run(cfg)


def test_the_synthesize_stage_refuses_a_base_of_another_split_in_one_line(base, tmp_path):
    from pneumo_exp.data.manifest import LeakageError
    from pneumo_exp.pipeline import run

    folder, cache = base
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "lora_info.json").write_text("{}")  # a LoRA folder, never read: the base is refused first
    cfg = compose([f"paths.output_dir={tmp_path / 'run'}", f"paths.cache_dir={cache}", "logger=none", *TINY_BASE,
                   f"diffusion_lora.pretrained={folder}", "stages=[data,synthesize,classify]", "augmentation=balance",
                   f"diffusion_lora.trained_lora={tmp_path / 'lora'}", "dataset.split_seed=1"])
    with pytest.raises(LeakageError) as refused:
        run(cfg)
    assert "\n" not in str(refused.value) and str(folder) in str(refused.value)
    assert "outside this run's training split" in str(refused.value)
    assert not (tmp_path / "run" / "manifest.csv").exists()  # refused before any work


def test_a_pretrained_base_without_its_training_record_is_refused(base, tmp_path):
    from pneumo_exp.data.provenance import TRAINING_SPLIT_FILE, GeneratorProvenanceError
    from pneumo_exp.pipeline import run

    folder, cache = base
    copy = tmp_path / "base"
    shutil.copytree(folder, copy)
    (copy / TRAINING_SPLIT_FILE).unlink()
    cfg = compose([f"paths.output_dir={tmp_path / 'run'}", f"paths.cache_dir={cache}", "logger=none", *TINY_BASE,
                   f"diffusion_lora.pretrained={copy}", "stages=[data,diffusion]"])
    with pytest.raises(GeneratorProvenanceError, match=TRAINING_SPLIT_FILE):
        run(cfg)


def test_bases_of_two_training_splits_live_side_by_side(tmp_path, model_cache):
    """Pretraining for another split writes its own folder: it never replaces the base other LoRAs were trained on."""
    first = pretrain(config(tmp_path, model_cache, steps=(2, 2)))
    second = pretrain(config(tmp_path, model_cache, "dataset.split_seed=1", steps=(2, 2)))
    assert first != second and first.parent == second.parent == tmp_path / "base"
    assert (first / "model_index.json").is_file() and (second / "model_index.json").is_file()


def test_a_base_not_built_yet_names_the_command_that_builds_it(tmp_path, model_cache):
    from pneumo_exp.pipeline import run

    cfg = compose([f"paths.output_dir={tmp_path / 'run'}", f"paths.cache_dir={model_cache}", "logger=none",
                   "diffusion_lora=cxr_small", "stages=[data,diffusion,synthesize,classify]",
                   "augmentation=balance"])
    with pytest.raises(UserError, match="has not been built yet.*task=pretrain_diffusion diffusion_lora=cxr_small"):
        run(cfg)
    assert not (tmp_path / "run" / "manifest.csv").exists()  # refused before any work


def test_a_folder_holding_a_base_of_other_settings_is_not_overwritten(base, tmp_path):
    """A base of the old layout (the pipeline right in `pretrained`) stays as it was: the new base goes to its split's
    own folder beside it."""
    folder, cache = base
    copy = tmp_path / "base"
    shutil.copytree(folder, copy)
    before = {path: path.read_bytes() for path in copy.rglob("*") if path.is_file()}
    built = pretrain(config(tmp_path, cache, "diffusion_lora.pretraining.unet_lr=1e-3", steps=(2, 2)))
    assert built.parent == copy and (built / "model_index.json").is_file()
    assert all(path.read_bytes() == content for path, content in before.items())


def test_a_killed_pretraining_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, model_cache):
    from safetensors.torch import load_file

    short = dict(steps=(10, 20))
    extra = ["diffusion_lora.pretraining.checkpoint_every=10", "diffusion_lora.pretraining.log_every=5"]
    whole = pretrain(config(tmp_path / "whole", model_cache, *extra, **short))

    class Crash(Exception):
        pass

    def crash_after_unet_step_10(row):
        if row.get("pretrain/unet_step") == 15:
            raise Crash

    cfg = config(tmp_path / "killed", model_cache, *extra, **short)
    with pytest.raises(Crash):
        pretrain(cfg, RecordedRows(on_row=crash_after_unet_step_10))
    resumed_rows = RecordedRows()
    resumed = pretrain(cfg, resumed_rows)
    assert resumed_rows[0]["pretrain/unet_step"] == 15  # started from the checkpoint at step 10
    for part in ("unet", "vae", "text_encoder"):
        name = "model.safetensors" if part == "text_encoder" else "diffusion_pytorch_model.safetensors"
        expected, actual = load_file(whole / part / name), load_file(resumed / part / name)
        assert expected.keys() == actual.keys()
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], msg=f"{part}/{key}")
