"""The real-size smoke bench runs end to end on a config folder of the same layout with tiny models, so it cannot
rot between the occasions it is run at true size."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, compose
from PIL import Image

KERMANY_NAMES = {"NORMAL": "IM-{patient:04d}-0001.jpeg", "BACTERIA": "person{patient}_bacteria_1.jpeg",
                 "VIRUS": "person{patient}_virus_1.jpeg"}


def tiny_model_configs(target: Path, model_cache: Path) -> Path:
    """The layout of ../shared/models (configs and tokenizer files, no weights), from the tiny presets."""
    from pneumo_exp.classify.model import backbone_source
    from pneumo_exp.core.presets import character_tokenizer
    from pneumo_exp.diffusion.stable_diffusion import pipeline_source

    cfg = compose(["clip_lora=tiny_vit", "diffusion_lora=tiny"])
    clip, sd = Path(backbone_source(cfg.clip_lora, model_cache)), Path(pipeline_source(cfg.diffusion_lora, model_cache))
    (target / "clip-vit-large-patch14").mkdir(parents=True)
    for path in clip.glob("*.json"):
        if path.name != "tokenizer.json":  # like the official folders: the BPE files only, in clip-bpe/
            shutil.copy(path, target / "clip-vit-large-patch14")
    (target / "clip-bpe").mkdir()
    vocabulary = character_tokenizer().get_vocab()
    (target / "clip-bpe" / "vocab.json").write_text(json.dumps(vocabulary))
    (target / "clip-bpe" / "merges.txt").write_text("#version: 0.2\n")
    for path in sd.rglob("*.json"):
        if path.name == "tokenizer.json":
            continue
        destination = target / "stable-diffusion-2" / path.relative_to(sd)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, destination)
    return target


def kermany_like_tree(target: Path, per_class: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for split, first_patient in (("train", 1), ("test", 101)):
        for label, name in KERMANY_NAMES.items():
            folder = target / split / label
            folder.mkdir(parents=True)
            for patient in range(first_patient, first_patient + per_class):
                pixels = rng.integers(0, 256, (64, 64), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / name.format(patient=patient))
    return target


# The bench's bf16 and its preset batch are what it measures on a GPU; here it only has to run end to end, and on a
# CPU without bf16 units a bf16 convolution is about 13x slower than fp32 (bf16 paths are tested elsewhere).
FP32_BATCH_ONE = [argument for override in ("trainer.precision=no", "diffusion_lora.training.precision=no",
                                            "diffusion_lora.generation.precision=no",
                                            "diffusion_lora.training.batch_size=1",
                                            "diffusion_lora.training.grad_accum_steps=1")
                  for argument in ("--override", override)]


@pytest.mark.slow
def test_real_size_bench_runs_a_paper_row_on_tiny_configs(tmp_path, model_cache):
    configs = tiny_model_configs(tmp_path / "models", model_cache)
    data = kermany_like_tree(tmp_path / "data")
    out = tmp_path / "real_size.json"
    image_size = compose(["clip_lora=tiny_vit"]).clip_lora.image_size
    command = [sys.executable, str(REPO / "bench" / "bench_real_size.py"), "--configs", str(configs),
               "--data", str(data), "--images-per-class", "4", "--model-cache", str(tmp_path / "built"),
               "--out", str(out), "--override", "diffusion_lora.resolution=64",
               "--override", f"clip_lora.image_size={image_size}", "--override", "dataset.resolution=64",
               "--override", "dataset.val_fraction=0.3", "--throughput", *FP32_BATCH_ONE]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    assert row["row"] == "original_study"
    assert [stage["stage"] for stage in row["stages"]] == ["data", "diffusion", "synthesize", "classify", "quality"]
    assert all(stage["seconds"] > 0 and stage["rss_peak_gib"] > 0 for stage in row["stages"])
    assert all(stage["live_tensors_after_gib"] >= 0 for stage in row["stages"])
    assert row["rss_peak_gib"] >= row["rss_peak_largest_stage_gib"]
    assert (tmp_path / "built" / "stable-diffusion-2" / "unet").is_dir()
    throughput = report["throughput"]
    assert throughput["clip_lora"]["tflop_per_step"] > 0 and throughput["clip_lora"]["images_per_second"] > 0
    assert set(throughput["sd_lora"]) >= {"cache_latents=false", "cache_latents=true"}
