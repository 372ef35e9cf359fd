"""Synthetic training images: how many per class (the augmentation strategy), then class-conditioned sampling with
the trained LoRA.

Everything generated lands in `output_dir/synthetic/` and nowhere else: `<CLASS>/syn_<CLASS>_<i>.png`,
`manifest.csv` (Records with split=train, source=synthetic) and `generation.csv` (prompt, seed and LoRA sha256 of
every image) plus `generation.json` (the settings). The folder is built aside and swapped in whole, so a crash never
leaves a mix of old and new images. Image i of a class always comes from the seed `image_seed(seed, class, i)`, so
it does not depend on the batch size or on how many images are asked for.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np

from pneumo_exp.config import AugmentationConfig, AugmentationStrategy, JobConfig, plain
from pneumo_exp.data.manifest import Record, write_csv
from pneumo_exp.labels import CLASSES
from pneumo_exp.validate import check_class_keys

SYNTHETIC_DIR = "synthetic"
SIDECAR_COLUMNS = ("path", "label", "index", "seed", "prompt", "lora_sha256", "steps", "guidance", "resolution")


def _round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


def synthetic_counts(real_counts: dict[str, int], augmentation_cfg: AugmentationConfig) -> dict[str, int]:
    """Synthetic images per class (every class present, in CLASSES order) for the training split's real counts.

    none: 0. balance: every class up to the largest. ratio: round(ratio x real), `per_class_ratio` overriding
    single classes. fixed: `per_class_count` (classes not named get 0), e.g. the original study's 1000 NORMAL +
    1000 VIRUS."""
    check_class_keys(dict(real_counts), "real_counts")
    real = {label: int(real_counts.get(label, 0)) for label in CLASSES}
    if any(n < 0 for n in real.values()):
        raise ValueError(f"real_counts must be >= 0, got {real}")
    strategy = AugmentationStrategy(augmentation_cfg.strategy)
    if strategy == AugmentationStrategy.none:
        return {label: 0 for label in CLASSES}
    if strategy == AugmentationStrategy.balance:
        largest = max(real.values())
        return {label: largest - real[label] for label in CLASSES}
    if strategy == AugmentationStrategy.ratio:
        overrides = dict(augmentation_cfg.per_class_ratio)
        check_class_keys(overrides, "augmentation.per_class_ratio")
        ratios = {label: float(overrides.get(label, augmentation_cfg.ratio)) for label in CLASSES}
        if any(r < 0 or not math.isfinite(r) for r in ratios.values()):
            raise ValueError(f"augmentation: ratios must be finite and >= 0, got {ratios}")
        return {label: _round_half_up(ratios[label] * real[label]) for label in CLASSES}
    counts = dict(augmentation_cfg.per_class_count)
    check_class_keys(counts, "augmentation.per_class_count")
    result = {label: int(counts.get(label, 0)) for label in CLASSES}
    if any(n < 0 for n in result.values()):
        raise ValueError(f"augmentation.per_class_count must be >= 0, got {result}")
    return result


def generate_synthetic(pipeline_source: str, lora_folder: str | os.PathLike | None, counts: dict[str, int],
                       prompts: dict[str, str], output_dir: str | os.PathLike, seed: int, steps: int,
                       guidance: float, batch_size: int, resolution: int, *, device: str | None = None,
                       precision: str = "no", progress: bool = True, revision: str | None = None) -> list[Record]:
    """Draw `counts[c]` images of each class c with the class prompt; returns their Records (split=train,
    source=synthetic, sha256 of the PNG file). A missing or corrupt LoRA file raises LoraFileError naming it;
    `lora_folder=None` draws with the base model alone."""
    from accelerate.utils.memory import clear_device_cache
    from PIL import Image
    from tqdm.auto import tqdm

    from pneumo_exp.core.files import sha256_file, swap_folder, write_json_atomic
    from pneumo_exp.core.seeds import image_seed
    from pneumo_exp.diffusion.stable_diffusion import WEIGHT_DTYPES, check_lora_file, load_pipeline, sample

    check_class_keys(dict(counts), "counts")
    counts = {label: int(counts.get(label, 0)) for label in CLASSES}
    if any(n < 0 for n in counts.values()):
        raise ValueError(f"counts must be >= 0, got {counts}")
    missing = [label for label, n in counts.items() if n and label not in prompts]
    if missing:
        raise ValueError(f"no prompt for class(es) {missing}")
    if batch_size < 1 or steps < 1:
        raise ValueError(f"batch_size and steps must be >= 1 (got {batch_size}, {steps})")
    target = Path(output_dir).resolve() / SYNTHETIC_DIR
    total = sum(counts.values())
    lora_sha256 = check_lora_file(lora_folder)[1] if total and lora_folder is not None else ""
    pipeline = load_pipeline(pipeline_source, lora_folder, device=device, dtype=WEIGHT_DTYPES[precision],
                             revision=revision) \
        if total else None
    records: list[Record] = []
    sidecar: list[dict] = []

    def fill(staging: Path) -> None:
        bar = tqdm(total=total, desc="generating synthetic images", unit="img", disable=not progress,
                   mininterval=1.0)
        for label in CLASSES:
            if not counts[label]:
                continue
            (staging / label).mkdir()
            seeds = [image_seed(seed, label, i) for i in range(counts[label])]
            for start in range(0, len(seeds), batch_size):
                batch = seeds[start:start + batch_size]
                images = sample(pipeline, prompts[label], batch, steps, guidance, resolution)
                for offset, (image_seed_value, pixels) in enumerate(zip(batch, images)):
                    index = start + offset
                    name = f"{label}/syn_{label}_{index:05d}.png"
                    Image.fromarray(np.ascontiguousarray(pixels)).save(staging / name, format="PNG")
                    path = str(target / name)
                    records.append(Record(path=path, label=label, patient_id=f"synthetic-{label}-{index}",
                                          split="train", source="synthetic", sha256=sha256_file(staging / name)))
                    sidecar.append({"path": path, "label": label, "index": index, "seed": image_seed_value,
                                    "prompt": prompts[label], "lora_sha256": lora_sha256, "steps": steps,
                                    "guidance": guidance, "resolution": resolution})
                bar.update(len(batch))
        bar.close()
        write_csv(records, staging / "manifest.csv")
        with (staging / "generation.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=SIDECAR_COLUMNS)
            writer.writeheader()
            writer.writerows(sidecar)
        write_json_atomic(staging / "generation.json", {
            "base": pipeline_source, "lora_sha256": lora_sha256,
            "lora": str(Path(lora_folder).resolve()) if lora_folder is not None else None,
            "counts": counts, "prompts": {k: prompts[k] for k in CLASSES if k in prompts}, "seed": seed,
            "steps": steps, "guidance": guidance, "resolution": resolution, "scheduler": "DPMSolverMultistep",
            "precision": precision})

    swap_folder(target, fill)
    pipeline = None  # noqa: F841 - the closure above holds it: the stage frees its UNet here
    clear_device_cache(garbage_collection=True)
    return records


def synthesize_for_run(cfg: JobConfig, lora_folder: str | os.PathLike, real_counts: dict[str, int],
                       output_dir: str | os.PathLike, progress: bool = True) -> list[Record]:
    """The stage as a run does it: counts from `cfg.augmentation` and the training split's real counts, sampling
    settings from `diffusion_lora.generation`, prompts and resolution from `diffusion_lora`."""
    from pneumo_exp.diffusion.stable_diffusion import check_resolution, pipeline_source

    settings = cfg.diffusion_lora.generation
    source = pipeline_source(cfg.diffusion_lora, cfg.paths.cache_dir)
    check_resolution(cfg.diffusion_lora, source)
    prompts = plain(cfg.diffusion_lora.prompts)
    return generate_synthetic(
        source, lora_folder,
        synthetic_counts(real_counts, cfg.augmentation), prompts, output_dir,
        seed=int(cfg.seed if settings.seed is None else settings.seed), steps=settings.num_inference_steps,
        guidance=settings.guidance_scale, batch_size=settings.batch_size, resolution=int(cfg.diffusion_lora.resolution),
        device="cpu" if cfg.trainer.cpu else None, precision=settings.precision,
        progress=progress, revision=cfg.diffusion_lora.revision)
