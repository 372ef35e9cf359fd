"""The diffusion stage on the tiny random-init Stable Diffusion: the preset builds once and loads through
from_pretrained, the LoRA loss trains the LoRA and nothing else, save/reload gives the same images, resume restores
the LoRA, augmentation counts, and synthetic images land in output_dir/synthetic as train-only Records."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import RecordedRows
from omegaconf import OmegaConf

from pneumo_exp.config import DiffusionTrainingConfig, job_config
from pneumo_exp.data.cache import load_pixels
from pneumo_exp.data.manifest import read_csv
from pneumo_exp.data.phantom import phantom_records
from pneumo_exp.diffusion.generate import generate_synthetic, synthetic_counts
from pneumo_exp.diffusion.stable_diffusion import (
    LORA_WEIGHT_NAME,
    LoraFileError,
    load_components,
    load_pipeline,
    pipeline_from_components,
    pipeline_source,
    sample,
)
from pneumo_exp.diffusion.train import (
    TrainingImages,
    add_lora,
    diffusion_loss,
    encode_prompts,
    load_checkpoint,
    lora_parameters,
    random_crops,
    train_diffusion_lora,
)
from pneumo_exp.labels import CLASSES, class_index

PROMPT = "a pediatric chest X-ray, viral pneumonia"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def phantom_batch(per_class: int = 4, size: int = 64) -> TrainingImages:
    records = phantom_records(patients_per_class=per_class // 2, test_patients_per_class=0, images_per_patient=2)
    return TrainingImages(torch.from_numpy(np.stack([load_pixels(r, size) for r in records])),
                          torch.tensor([class_index(r.label) for r in records]))


def with_training(cfg, **training):
    for key, value in training.items():
        cfg.diffusion_lora.training[key] = value
    return cfg


def base_weights(components) -> dict[str, torch.Tensor]:
    """Every non-LoRA tensor, under the name it has without peft's `base_layer` wrapper."""
    weights = {}
    for part in ("vae", "text_encoder", "unet"):
        for name, tensor in getattr(components, part).state_dict().items():
            if "lora_" not in name:
                weights[f"{part}.{name.replace('.base_layer', '')}"] = tensor.detach().clone()
    return weights


def lora_weights(unet) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in unet.state_dict().items() if "lora_" in name}


# ------------------------------------------------------------------------------------------ pipeline


def test_tiny_pipeline_is_built_once_and_loads_with_from_pretrained(make_cfg):
    cfg = make_cfg()
    source = pipeline_source(cfg.diffusion_lora, cfg.paths.cache_dir)
    index = Path(source) / "model_index.json"
    stamp = index.stat().st_mtime_ns
    assert pipeline_source(cfg.diffusion_lora, cfg.paths.cache_dir) == source
    assert index.stat().st_mtime_ns == stamp
    assert Path(source).parent == Path(cfg.paths.cache_dir) / "models"

    components = load_components(source)
    architecture = cfg.diffusion_lora.architecture
    assert list(components.unet.config.block_out_channels) == list(architecture.unet_channels)
    assert components.unet.config.cross_attention_dim == components.text_encoder.config.hidden_size \
        == architecture.text_hidden_size
    assert components.unet.config.sample_size * 2 ** (len(architecture.vae_channels) - 1) \
        == cfg.diffusion_lora.resolution
    assert sum(p.numel() for p in components.unet.parameters()) < 2_000_000
    assert components.noise_scheduler.config.prediction_type == "epsilon"
    assert components.tokenizer.model_max_length == components.text_encoder.config.max_position_embeddings

    pipeline = load_pipeline(source)
    assert type(pipeline.scheduler).__name__ == "DPMSolverMultistepScheduler"
    images = sample(pipeline, PROMPT, [1, 2], steps=2, guidance=7.5, resolution=cfg.diffusion_lora.resolution)
    assert images.shape == (2, 64, 64) and images.dtype == np.uint8
    assert not np.array_equal(images[0], images[1])
    np.testing.assert_array_equal(sample(pipeline, PROMPT, [2], 2, 7.5, 64)[0], images[1])


@pytest.mark.parametrize("pretrained", ["/nonexistent/stable-diffusion", "nobody/no-such-sd-model"])
def test_unloadable_source_is_named_in_the_error(make_cfg, pretrained):
    cfg = make_cfg(f"diffusion_lora.pretrained={pretrained}")
    source = pipeline_source(cfg.diffusion_lora, cfg.paths.cache_dir)
    assert source == pretrained
    with pytest.raises(FileNotFoundError, match=pretrained):
        load_components(source)
    with pytest.raises(FileNotFoundError, match=pretrained):
        load_pipeline(source)


def test_settings_come_from_the_config_and_unknown_keys_fail_at_composition(make_cfg):
    from hydra.errors import ConfigCompositionException

    cfg = make_cfg()
    settings = job_config(cfg).diffusion_lora.training
    assert isinstance(settings, DiffusionTrainingConfig)
    assert (settings.epochs, settings.lr) == (cfg.diffusion_lora.training.epochs, cfg.diffusion_lora.training.lr)
    with pytest.raises(ConfigCompositionException, match="stepz"):
        make_cfg("diffusion_lora.training.stepz=3")


# ------------------------------------------------------------------------------------------ training


def test_random_crops_keep_orientation_and_size():
    pixels = torch.zeros(2, 80, 80, dtype=torch.uint8)
    pixels[:, :, :40] = 255  # bright left half: a flip would move it right
    crops = random_crops(pixels, 64, 0.9, torch.Generator().manual_seed(0))
    assert crops.shape == (2, 1, 64, 64)
    assert (crops[:, :, :, :20].mean() > 0.9) and (crops[:, :, :, -20:].mean() < 0.1)


@pytest.mark.slow
def test_lora_loss_falls_and_only_the_lora_changes(make_cfg):
    cfg = make_cfg()
    components = load_components(pipeline_source(cfg.diffusion_lora, cfg.paths.cache_dir))
    add_lora(components, cfg.diffusion_lora.lora)
    before_base, before_lora = base_weights(components), lora_weights(components.unet)
    assert before_lora and all(not p.requires_grad for p in components.vae.parameters())
    data = phantom_batch(per_class=2)
    states = encode_prompts(components, OmegaConf.to_container(cfg.diffusion_lora.prompts), "cpu")[data.labels]
    optimizer = torch.optim.AdamW(lora_parameters(components.unet), lr=1e-2)
    components.unet.train()
    losses = []
    for _ in range(30):  # the same crops, noise and timesteps every step: only the LoRA can lower the loss
        generator = torch.Generator().manual_seed(0)
        images = random_crops(data.pixels, 64, 0.9, generator)
        loss = diffusion_loss(components, components.unet, images, states, generator, min_snr_gamma=5.0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.95 * np.mean(losses[:5]), losses  # a frozen LoRA keeps it constant
    after_base = base_weights(components)
    assert after_base.keys() == before_base.keys()
    assert all(torch.equal(before_base[k], after_base[k]) for k in before_base)
    after_lora = lora_weights(components.unet)
    assert any(not torch.equal(before_lora[k], after_lora[k]) for k in before_lora if "lora_B" in k)


@pytest.fixture(scope="module")
def trained(model_cache, tmp_path_factory):
    """One short training run shared by the tests below: its config, components (trained in place), output."""
    from conftest import compose

    output = tmp_path_factory.mktemp("diffusion-run")
    cfg = with_training(compose([f"paths.output_dir={output}", f"paths.cache_dir={model_cache}", "logger=none"]),
                        max_train_steps=8, batch_size=4, lr=2e-3, warmup_ratio=0.0, log_every=1,
                        validation_every=4, validation_images_per_class=2, validation_inference_steps=2)
    source = pipeline_source(cfg.diffusion_lora, cfg.paths.cache_dir)
    components = load_components(source)
    initial = base_weights(components)
    rows = RecordedRows()
    lora = train_diffusion_lora(cfg, phantom_batch(), output, logger=rows, components=components)
    return {"cfg": cfg, "source": source, "components": components, "initial": initial, "lora": lora,
            "rows": rows, "output": output}


@pytest.mark.slow
def test_training_writes_lora_grids_metrics_and_keeps_the_base_model(trained):
    lora, output = trained["lora"], trained["output"]
    info = json.loads((lora / "lora_info.json").read_text())
    from pneumo_exp.core.files import sha256_file

    assert info["sha256"] == sha256_file(lora / LORA_WEIGHT_NAME)
    assert (info["r"], info["alpha"], info["steps"], info["images"]) == (4, 16.0, 8, 12)
    assert sorted(p.name for p in (output / "diffusion" / "samples").iterdir()) == ["step_00004.png",
                                                                                     "step_00008.png"]
    steps = [row for row in trained["rows"] if "diffusion/loss" in row]
    epochs = [row for row in trained["rows"] if "diffusion/epoch_loss" in row]
    assert [row["diffusion/step"] for row in steps] == list(range(1, 9)) and len(epochs) == 3
    on_disk = [json.loads(line) for line in (output / "diffusion" / "metrics.jsonl").read_text().splitlines()]
    assert on_disk == trained["rows"]
    after = base_weights(trained["components"])
    assert all(torch.equal(trained["initial"][k], after[k]) for k in trained["initial"])
    from safetensors.torch import load_file

    saved = load_file(lora / LORA_WEIGHT_NAME)
    assert saved and all(k.startswith("unet.") for k in saved)
    assert any(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k or "lora.up" in k)


@pytest.mark.slow
def test_saved_lora_reloads_to_the_same_images(trained):
    source, resolution = trained["source"], trained["cfg"].diffusion_lora.resolution
    in_memory = sample(pipeline_from_components(trained["components"]), PROMPT, [7, 8], 3, 7.5, resolution)
    reloaded = sample(load_pipeline(source, trained["lora"]), PROMPT, [7, 8], 3, 7.5, resolution)
    base = sample(load_pipeline(source), PROMPT, [7, 8], 3, 7.5, resolution)
    np.testing.assert_array_equal(reloaded, in_memory)
    assert np.abs(base.astype(int) - in_memory).mean() > 1.0


@pytest.mark.slow
def test_resume_restores_the_lora_and_continues_exactly(model_cache, tmp_path):
    from conftest import compose, stop_in_diffusion_epoch_two
    from safetensors.torch import load_file

    data = phantom_batch()

    def config(output: Path):
        return with_training(compose([f"paths.output_dir={output}", f"paths.cache_dir={model_cache}",
                                      "logger=none"]), epochs=2, batch_size=4, lr=2e-3, log_every=1,
                             validation_every=0)

    straight = train_diffusion_lora(config(tmp_path / "a"), data, tmp_path / "a")

    stop_in_diffusion_epoch_two(train_diffusion_lora, config(tmp_path / "b"), data, tmp_path / "b")
    checkpoint_dir = tmp_path / "b" / "diffusion" / "checkpoints" / "last"
    cfg = config(tmp_path / "b")
    components = load_components(pipeline_source(cfg.diffusion_lora, cfg.paths.cache_dir))
    add_lora(components, cfg.diffusion_lora.lora)
    state = load_checkpoint(checkpoint_dir, components.unet)
    assert (state["epoch"], state["global_step"]) == (1, 3)
    from peft.utils import get_peft_model_state_dict

    saved, restored = load_file(checkpoint_dir / "lora.safetensors"), get_peft_model_state_dict(components.unet)
    assert saved and saved.keys() == restored.keys()
    assert all(torch.equal(saved[k], restored[k]) for k in saved)

    cfg.resume = True
    resumed = train_diffusion_lora(cfg, data, tmp_path / "b")
    first, second = load_file(straight / LORA_WEIGHT_NAME), load_file(resumed / LORA_WEIGHT_NAME)
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=0, atol=1e-6)
    timing = ("diffusion/step_seconds", "diffusion/images_per_second")
    history = lambda run: [{k: v for k, v in json.loads(line).items() if k not in timing}  # noqa: E731
                           for line in (tmp_path / run / "diffusion" / "metrics.jsonl").read_text().splitlines()]
    assert history("b") == history("a")


@pytest.mark.slow
def test_gradient_accumulation_counts_optimizer_steps(model_cache, tmp_path):
    """12 images, micro-batches of 2, 2 per optimizer step: 3 steps per epoch, the schedule ends at the last."""
    from conftest import compose

    cfg = with_training(compose([f"paths.output_dir={tmp_path}", f"paths.cache_dir={model_cache}", "logger=none"]),
                        epochs=2, batch_size=2, grad_accum_steps=2, log_every=1, validation_every=0)
    rows = RecordedRows()
    train_diffusion_lora(cfg, phantom_batch(), tmp_path, logger=rows)
    steps = [row for row in rows if "diffusion/loss" in row]
    assert [(row["diffusion/epoch"], row["diffusion/step"]) for row in steps] == [(1, 1), (1, 2), (1, 3),
                                                                                   (2, 4), (2, 5), (2, 6)]
    assert steps[-1]["diffusion/lr"] == 0.0 and steps[0]["diffusion/lr"] > 0


# ------------------------------------------------------------------------------------------ counts


REAL = {"NORMAL": 1349, "BACTERIA": 2538, "VIRUS": 1345}


@pytest.mark.parametrize("preset,changes,expected", [
    ("none", {}, {"NORMAL": 0, "BACTERIA": 0, "VIRUS": 0}),
    ("balance", {}, {"NORMAL": 1189, "BACTERIA": 0, "VIRUS": 1193}),
    ("ratio", {}, {"NORMAL": 675, "BACTERIA": 1269, "VIRUS": 673}),  # ratio 0.5, halves rounded up
    ("ratio", {"ratio": 0.2, "per_class_ratio": {"VIRUS": 1.0, "BACTERIA": 0.0}},
     {"NORMAL": 270, "BACTERIA": 0, "VIRUS": 1345}),
    ("original_study", {}, {"NORMAL": 1000, "BACTERIA": 0, "VIRUS": 1000}),
    ("original_study", {"per_class_count": {"BACTERIA": 5}}, {"NORMAL": 0, "BACTERIA": 5, "VIRUS": 0}),
])
def test_synthetic_counts_per_strategy(make_cfg, preset, changes, expected):
    augmentation = make_cfg(f"augmentation={preset}").augmentation
    for key, value in changes.items():
        augmentation[key] = value
    counts = synthetic_counts(REAL, augmentation)
    assert counts == expected and list(counts) == list(CLASSES)


def test_synthetic_counts_refuse_unknown_classes_and_negative_values(make_cfg):
    fixed = make_cfg("augmentation=original_study").augmentation
    fixed.per_class_count = {"COVID": 3}
    with pytest.raises(ValueError, match="COVID"):
        synthetic_counts(REAL, fixed)
    with pytest.raises(ValueError, match=">= 0"):
        synthetic_counts(REAL, make_cfg("augmentation=ratio", "augmentation.ratio=-1").augmentation)
    with pytest.raises(ValueError, match="PNEUMONIA"):
        synthetic_counts({"NORMAL": 3, "PNEUMONIA": 4}, make_cfg("augmentation=balance").augmentation)


# ------------------------------------------------------------------------------------------ generation


@pytest.mark.slow
def test_generated_images_are_train_only_records_under_synthetic(trained, tmp_path):
    cfg = trained["cfg"]
    prompts = OmegaConf.to_container(cfg.diffusion_lora.prompts)
    counts = {"NORMAL": 2, "BACTERIA": 0, "VIRUS": 3}

    def generate(output: Path, batch_size: int):
        return generate_synthetic(trained["source"], trained["lora"], counts, prompts, output, seed=3, steps=2,
                                  guidance=7.5, batch_size=batch_size, resolution=64, progress=False)

    records = generate(tmp_path / "run", batch_size=2)
    synthetic = (tmp_path / "run" / "synthetic").resolve()
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["synthetic"]
    assert sorted(p.relative_to(synthetic).as_posix() for p in synthetic.rglob("*") if p.is_file()) == [
        "NORMAL/syn_NORMAL_00000.png", "NORMAL/syn_NORMAL_00001.png", "VIRUS/syn_VIRUS_00000.png",
        "VIRUS/syn_VIRUS_00001.png", "VIRUS/syn_VIRUS_00002.png", "generation.csv", "generation.json",
        "manifest.csv"]
    assert [(r.label, r.patient_id) for r in records] == [("NORMAL", "synthetic-NORMAL-0"),
                                                          ("NORMAL", "synthetic-NORMAL-1"),
                                                          ("VIRUS", "synthetic-VIRUS-0"),
                                                          ("VIRUS", "synthetic-VIRUS-1"),
                                                          ("VIRUS", "synthetic-VIRUS-2")]
    assert all(r.split == "train" and r.source == "synthetic" for r in records)
    assert all(Path(r.path).is_file() and Path(r.path).parent.parent == synthetic for r in records)
    assert read_csv(synthetic / "manifest.csv") == records
    with (synthetic / "generation.csv").open() as handle:
        sidecar = list(csv.DictReader(handle))
    lora_sha = json.loads((trained["lora"] / "lora_info.json").read_text())["sha256"]
    assert [row["path"] for row in sidecar] == [r.path for r in records]
    assert {row["lora_sha256"] for row in sidecar} == {lora_sha}
    assert sidecar[2]["prompt"] == prompts["VIRUS"] and len({row["seed"] for row in sidecar}) == 5

    again = generate(tmp_path / "again", batch_size=3)  # per-image seeds: the batch size does not matter
    from PIL import Image

    for first, second in zip(records, again):
        difference = np.abs(np.asarray(Image.open(first.path), dtype=int) - np.asarray(Image.open(second.path)))
        assert difference.max() <= 1


@pytest.mark.slow
def test_a_run_synthesizes_what_its_augmentation_preset_asks_for(trained, tmp_path):
    from pneumo_exp.diffusion.generate import synthesize_for_run

    cfg = trained["cfg"].copy()
    cfg.augmentation.strategy = "fixed"
    cfg.augmentation.per_class_count = {"BACTERIA": 2}
    cfg.diffusion_lora.generation.num_inference_steps = 2
    cfg.diffusion_lora.generation.batch_size = 2
    records = synthesize_for_run(cfg, trained["lora"], REAL, tmp_path, progress=False)
    assert [(r.label, r.split, r.source) for r in records] == [("BACTERIA", "train", "synthetic")] * 2
    assert json.loads((tmp_path / "synthetic" / "generation.json").read_text())["steps"] == 2
    cfg.augmentation.strategy = "none"  # nothing to draw: no LoRA needed, an empty manifest
    assert synthesize_for_run(cfg, tmp_path / "no-lora", REAL, tmp_path / "none", progress=False) == []
    assert read_csv(tmp_path / "none" / "synthetic" / "manifest.csv") == []


@pytest.mark.slow
def test_missing_or_corrupt_lora_is_named_in_the_error(trained, tmp_path):
    cfg = trained["cfg"]
    prompts = OmegaConf.to_container(cfg.diffusion_lora.prompts)

    def generate(lora):
        return generate_synthetic(trained["source"], lora, {"NORMAL": 1}, prompts, tmp_path / "out", seed=0,
                                  steps=1, guidance=1.0, batch_size=1, resolution=64, progress=False)

    missing = tmp_path / "no-lora"
    with pytest.raises(LoraFileError, match=re.escape(f"LoRA {missing} does not exist")):
        generate(missing)
    missing.mkdir()
    with pytest.raises(LoraFileError, match=re.escape(f"{missing / LORA_WEIGHT_NAME} does not exist")):
        generate(missing)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(trained["lora"], corrupt)
    (corrupt / LORA_WEIGHT_NAME).write_bytes(b"\x00" * 100)
    with pytest.raises(LoraFileError, match=re.escape(str(corrupt / LORA_WEIGHT_NAME)) + ".*cannot be read"):
        generate(corrupt)
    changed = tmp_path / "changed"
    shutil.copytree(trained["lora"], changed)
    from safetensors.torch import load_file, save_file

    weights = load_file(changed / LORA_WEIGHT_NAME)
    save_file({k: v + 1 for k, v in weights.items()}, changed / LORA_WEIGHT_NAME)
    with pytest.raises(LoraFileError, match=re.escape(str(changed / LORA_WEIGHT_NAME)) + ".*sha256"):
        generate(changed)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ quality


def test_quality_ranks_copies_fresh_and_shifted_images():
    from torch import nn

    from pneumo_exp.evaluation.quality import quality_report

    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(1, 8, 4, 4), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())  # 32 features
    generator = torch.Generator().manual_seed(0)
    real = torch.randint(0, 200, (40, 32, 32), dtype=torch.uint8, generator=generator)
    fresh = torch.randint(0, 200, (40, 32, 32), dtype=torch.uint8, generator=generator)  # FID needs > 32 images
    brighter = (fresh.int() + 55).clamp(max=255).to(torch.uint8)
    report = quality_report({"NORMAL": real, "BACTERIA": real, "VIRUS": real},
                            {"NORMAL": real.clone(), "BACTERIA": fresh, "VIRUS": brighter}, encoder,
                            num_features=32, image_size=32, kid_subset_size=20)
    copies, same_distribution, shifted = report["NORMAL"], report["BACTERIA"], report["VIRUS"]
    assert abs(copies["fid"]) < 1e-9 and copies["nn_max"] == 0.0
    assert copies["fid"] < same_distribution["fid"] < shifted["fid"]
    assert same_distribution["kid_mean"] < shifted["kid_mean"]
    assert same_distribution["nn_median"] > 0.5 * same_distribution["real_nn_median"]  # no copies
    with pytest.raises(ValueError, match="num_features=16"):
        quality_report({"NORMAL": real}, {"NORMAL": fresh}, encoder, num_features=16, image_size=32)


@pytest.mark.slow
def test_mixed_precision_training_keeps_the_lora_in_fp32(model_cache, tmp_path):
    from conftest import compose
    from safetensors.torch import load_file

    cfg = with_training(compose([f"paths.output_dir={tmp_path}", f"paths.cache_dir={model_cache}", "logger=none"]),
                        max_train_steps=1, precision="bf16", min_snr_gamma=5.0, validation_every=1,
                        validation_images_per_class=1, validation_inference_steps=1)
    source = pipeline_source(cfg.diffusion_lora, cfg.paths.cache_dir)
    components = load_components(source)
    lora = train_diffusion_lora(cfg, phantom_batch(), tmp_path, components=components)
    assert components.vae.dtype == torch.bfloat16
    assert {p.dtype for p in lora_parameters(components.unet)} == {torch.float32}
    assert {v.dtype for v in load_file(lora / LORA_WEIGHT_NAME).values()} == {torch.float32}
    assert (tmp_path / "diffusion" / "samples" / "step_00001.png").is_file()
