"""Diffusion throughput for the `tiny` preset: the framework against a minimal loop written directly on diffusers.

    python bench/bench_diffusion.py [--steps 60] [--images 32] [--repeats 2] [--tiny] [--threads 1]
                                    [--out bench/results/diffusion.json]

  LoRA training  `train_diffusion_lora` (accelerate, checkpoints, metrics file; no validation grids), with and
                 without `cache_latents`, against the diffusers example's inner loop (VAE encode, noise, UNet, MSE,
                 AdamW) on the same images and batch; the mean training loss of each beside its steps/s
  generation     `generate_synthetic` (seeded per image, PNGs and manifests written) against plain
                 `StableDiffusionPipeline.__call__` batches with the same scheduler, steps and guidance
Times are the best of `--repeats` interleaved rounds; only the ratios within one run mean much on these machines.
`--tiny` is a seconds-long run that checks the script works (the test suite runs it), not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import RecordedRows, compose  # noqa: E402

from pneumo_exp.data.cache import load_pixels  # noqa: E402
from pneumo_exp.data.phantom import phantom_records  # noqa: E402
from pneumo_exp.diffusion.generate import generate_synthetic  # noqa: E402
from pneumo_exp.diffusion.stable_diffusion import load_components, load_pipeline, pipeline_source, to_vae_input  # noqa: E402
from pneumo_exp.diffusion.train import TrainingImages, add_lora, encode_prompts, train_diffusion_lora  # noqa: E402
from pneumo_exp.labels import class_index  # noqa: E402


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="6 steps, 4 images, 1 round: a smoke run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 avoids waits)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/diffusion.json"))
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.images, args.repeats = 6, 4, 1
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-diffusion-") as scratch:  # runs, LoRAs, images: removed after
        result = measure(args, Path(scratch))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    losses = result["train_mean_loss"]
    print(f"latent cache: {result['latent_cache_loop_ratio_vs_plain']:.2f}x the steps/s of the plain diffusers loop "
          f"in the loop, {result['latent_cache_ratio_vs_plain']:.2f}x with loading and encoding "
          f"(mean loss {losses['framework_cached_training']:.4f} cached vs {losses['plain_training']:.4f} plain, "
          f"{losses['framework_training']:.4f} framework without the cache)")
    return result


def measure(args: argparse.Namespace, scratch: Path) -> dict:
    cfg = compose(["paths.output_dir=" + str(scratch / "run"), f"paths.cache_dir={scratch / 'cache'}",
                   "logger=none", "trainer.cpu=true", f"diffusion_lora.training.max_train_steps={args.steps}",
                   "diffusion_lora.training.validation_every=0", "diffusion_lora.training.warmup_ratio=0",
                   "diffusion_lora.training.log_every=1", "diffusion_lora.training.crop_min_side=1"])
    settings, generation = cfg.diffusion_lora.training, cfg.diffusion_lora.generation
    resolution, batch = cfg.diffusion_lora.resolution, settings.batch_size
    records = phantom_records(patients_per_class=20, test_patients_per_class=0, images_per_patient=1)
    pixels = torch.from_numpy(np.stack([load_pixels(r, resolution) for r in records]))
    labels = torch.tensor([class_index(r.label) for r in records])
    source = pipeline_source(cfg.diffusion_lora, cfg.paths.cache_dir)
    prompts = dict(cfg.diffusion_lora.prompts)

    losses: dict[str, float] = {}
    loop_seconds: dict[str, float] = {}  # the training loop alone: no loading, no latent encoding beforehand

    def framework_training(cache_latents: bool = False) -> None:
        cfg.paths.output_dir = str(scratch / f"run-{time.time_ns()}")
        cfg.diffusion_lora.training.cache_latents = cache_latents
        rows = RecordedRows()
        train_diffusion_lora(cfg, TrainingImages(pixels, labels), cfg.paths.output_dir, logger=rows)
        name = "framework_cached_training" if cache_latents else "framework_training"
        losses[name] = float(np.mean([row["diffusion/loss"] for row in rows if "diffusion/loss" in row]))
        loop = sum(row["diffusion/step_seconds"] for row in rows if "diffusion/step_seconds" in row)
        loop_seconds[name] = min(loop_seconds.get(name, float("inf")), loop)

    def plain_training() -> None:
        parts = load_components(source)
        add_lora(parts, cfg.diffusion_lora.lora)
        states = encode_prompts(parts, prompts, "cpu")
        optimizer = torch.optim.AdamW([p for p in parts.unet.parameters() if p.requires_grad], lr=settings.lr)
        generator = torch.Generator().manual_seed(0)
        step_losses, start = [], time.perf_counter()
        for _ in range(args.steps):
            index = torch.randint(0, len(labels), (batch,), generator=generator)
            images = pixels[index].unsqueeze(1).float() / 255
            with torch.no_grad():
                latents = parts.vae.encode(to_vae_input(images)).latent_dist.sample() * parts.vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, parts.noise_scheduler.config.num_train_timesteps, (batch,))
            prediction = parts.unet(parts.noise_scheduler.add_noise(latents, noise, timesteps), timesteps,
                                    states[labels[index]], return_dict=False)[0]
            loss = F.mse_loss(prediction, noise)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parts.unet.parameters(), settings.max_grad_norm)
            optimizer.step()
            step_losses.append(loss.item())
        loop_seconds["plain_training"] = min(loop_seconds.get("plain_training", float("inf")),
                                             time.perf_counter() - start)
        losses["plain_training"] = float(np.mean(step_losses))

    lora = None

    def framework_generation() -> None:
        generate_synthetic(source, lora, {"NORMAL": args.images}, prompts, scratch / f"gen-{time.time_ns()}",
                           seed=0, steps=generation.num_inference_steps, guidance=generation.guidance_scale,
                           batch_size=generation.batch_size, resolution=resolution, device="cpu", progress=False)

    def plain_generation() -> None:
        pipeline = load_pipeline(source, lora=lora, device="cpu")
        for start in range(0, args.images, generation.batch_size):
            count = min(generation.batch_size, args.images - start)
            pipeline([prompts["NORMAL"]] * count, num_inference_steps=generation.num_inference_steps,
                     guidance_scale=generation.guidance_scale, height=resolution, width=resolution,
                     generator=torch.Generator().manual_seed(start), output_type="np")

    framework_training()  # warm-up, and the LoRA the generation runs use
    lora = Path(cfg.paths.output_dir) / "diffusion" / "lora"
    runs = {"framework_training": framework_training, "framework_cached_training": lambda: framework_training(True),
            "plain_training": plain_training, "framework_generation": framework_generation,
            "plain_generation": plain_generation}
    plain_generation()
    seconds = {name: float("inf") for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            seconds[name] = min(seconds[name], timed(run))
    result = {
        "preset": "tiny", "resolution": resolution, "batch_size": batch, "train_steps": args.steps,
        "images": args.images, "inference_steps": generation.num_inference_steps,
        "train_steps_per_second": {k: round(args.steps / seconds[k], 2) for k in TRAINING_RUNS},
        "train_mean_loss": {k: round(losses[k], 4) for k in TRAINING_RUNS},
        "loop_steps_per_second": {k: round(args.steps / loop_seconds[k], 2) for k in TRAINING_RUNS},
        "latent_cache_ratio_vs_plain": round(seconds["plain_training"] / seconds["framework_cached_training"], 3),
        "latent_cache_loop_ratio_vs_plain": round(loop_seconds["plain_training"]
                                                  / loop_seconds["framework_cached_training"], 3),
        "generated_images_per_second": {k: round(args.images / seconds[k], 2) for k in ("framework_generation",
                                                                                       "plain_generation")},
        "training_overhead_vs_plain": round(seconds["framework_training"] / seconds["plain_training"] - 1, 4),
        "generation_overhead_vs_plain": round(seconds["framework_generation"] / seconds["plain_generation"] - 1, 4),
        "note": "both sides include loading the model (and the cached run its latent encoding); the framework "
                "also writes checkpoints, PNGs and manifests",
    }
    return result


TRAINING_RUNS = ("framework_training", "framework_cached_training", "plain_training")


if __name__ == "__main__":
    main()
