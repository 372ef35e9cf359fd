"""The images the synthesize stage adds to the training split: how many per class (the augmentation strategy), then
either class-conditioned samples of the trained LoRA, taken from the synthetic image bank (`diffusion/bank.py`), or,
for `augmentation.source=duplicate_real`, as many seeded repeats of real training images (the count-matched control).

What a run adds lands in `output_dir/synthetic/`: `manifest.csv` (Records with split=train, source synthetic or
duplicate) and `generation.json` (the settings); for synthetic images also `<CLASS>/syn_<CLASS>_<i>.png` (bank
image i of the class, linked or copied from the bank) and `generation.csv` (bank key, index, prompt, seed and LoRA
sha256 of every image). The folder is built aside and swapped in whole, so a crash never leaves a mix of old and new
images. Image i of a class always comes from the seed `image_seed(seed, class, i)`, so it does not depend on the
batch size or on how many images are asked for.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from pneumo_exp.config import AugmentationConfig, AugmentationStrategy, JobConfig, plain
from pneumo_exp.core.files import swap_folder, write_json_atomic
from pneumo_exp.core.seeds import seed_of_text
from pneumo_exp.data.manifest import Record, write_csv
from pneumo_exp.diffusion.bank import BANK_DIR, SCHEDULER, BankImage, Generation, SyntheticBank, open_bank
from pneumo_exp.errors import UserError
from pneumo_exp.labels import CLASSES
from pneumo_exp.validate import check_class_keys

SYNTHETIC_DIR = "synthetic"
SIDECAR_COLUMNS = ("path", "label", "bank_key", "index", "seed", "prompt", "lora_sha256", "steps", "guidance",
                   "resolution")


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


def checked_counts(counts: dict[str, int], prompts: dict[str, str]) -> dict[str, int]:
    """Every class in CLASSES order, each count >= 0 and with a prompt where it is above 0."""
    check_class_keys(dict(counts), "counts")
    counts = {label: int(counts.get(label, 0)) for label in CLASSES}
    if any(n < 0 for n in counts.values()):
        raise ValueError(f"counts must be >= 0, got {counts}")
    missing = [label for label, n in counts.items() if n and label not in prompts]
    if missing:
        raise ValueError(f"no prompt for class(es) {missing}")
    return counts


def generate_synthetic(pipeline_source: str, lora_folder: str | os.PathLike | None, counts: dict[str, int],
                       prompts: dict[str, str], output_dir: str | os.PathLike, seed: int, steps: int,
                       guidance: float, batch_size: int, resolution: int, *, device: str | None = None,
                       precision: str = "no", progress: bool = True, revision: str | None = None,
                       bank_root: str | os.PathLike | None = None) -> list[Record]:
    """The first `counts[c]` images of each class c of the bank under `bank_root` (drawn with the class prompt where
    the bank lacks them; None: a temporary bank of their own), as Records (split=train, source=synthetic,
    sha256 of the PNG file) in `output_dir/synthetic/`. A missing or corrupt LoRA file raises LoraFileError naming
    it; `lora_folder=None` draws with the base model alone."""
    if batch_size < 1 or steps < 1:
        raise ValueError(f"batch_size and steps must be >= 1 (got {batch_size}, {steps})")
    generation = Generation(pipeline_source, lora_folder, dict(prompts), seed, steps, guidance, resolution,
                            precision, revision)
    return take_from_bank(generation, counts, output_dir, bank_root, batch_size=batch_size, device=device,
                          progress=progress)


def take_from_bank(generation: Generation, counts: dict[str, int], output_dir: str | os.PathLike,
                   bank_root: str | os.PathLike | None, *, batch_size: int, device: str | None,
                   progress: bool) -> list[Record]:
    counts = checked_counts(counts, generation.prompts)
    if not sum(counts.values()):
        return write_synthetic_folder([], generation, None, output_dir)
    with contextlib.ExitStack() as stack:
        if bank_root is None:
            bank_root = stack.enter_context(tempfile.TemporaryDirectory(prefix="pneumo-exp-bank-"))
        bank = stack.enter_context(open_bank(generation, bank_root, batch_size=batch_size, device=device,
                                             progress=progress))
        images = [image for label in CLASSES for image in bank.images(label, counts[label])]
        return write_synthetic_folder(images, generation, bank, output_dir)


def write_synthetic_folder(images: list[BankImage], generation: Generation, bank: SyntheticBank | None,
                           output_dir: str | os.PathLike) -> list[Record]:
    """`output_dir/synthetic/`: the bank's `images` (linked where the file system allows, else copied), their
    manifest, generation.csv and generation.json; returns their Records."""
    target = Path(output_dir).resolve() / SYNTHETIC_DIR
    lora_sha256 = (generation.identity["lora_sha256"] or "") if images else ""
    records: list[Record] = []
    sidecar: list[dict] = []

    def fill(staging: Path) -> None:
        for image in images:
            name = f"{image.label}/syn_{image.label}_{image.index:05d}.png"
            (staging / image.label).mkdir(exist_ok=True)
            link_or_copy(image.path, staging / name)
            records.append(Record(path=str(target / name), label=image.label,
                                  patient_id=f"synthetic-{image.label}-{image.index}", split="train",
                                  source="synthetic", sha256=image.sha256))
            sidecar.append({"path": str(target / name), "label": image.label, "bank_key": bank.key,
                            "index": image.index, "seed": image.seed, "prompt": generation.prompts[image.label],
                            "lora_sha256": lora_sha256, "steps": generation.steps,
                            "guidance": generation.guidance, "resolution": generation.resolution})
        write_csv(records, staging / "manifest.csv")
        with (staging / "generation.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=SIDECAR_COLUMNS)
            writer.writeheader()
            writer.writerows(sidecar)
        write_json_atomic(staging / "generation.json", {
            "source": "synthetic", "base": generation.source, "lora_sha256": lora_sha256,
            "lora": str(Path(generation.lora).resolve()) if generation.lora is not None else None,
            "bank_key": bank.key if bank is not None else None,
            "counts": {label: sum(image.label == label for image in images) for label in CLASSES},
            "prompts": {k: generation.prompts[k] for k in CLASSES if k in generation.prompts},
            "seed": generation.seed, "steps": generation.steps, "guidance": generation.guidance,
            "resolution": generation.resolution, "scheduler": SCHEDULER, "precision": generation.precision})

    swap_folder(target, fill)
    return records


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link where bank and run share a file system (bank images are never rewritten), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def run_generation(cfg: JobConfig, lora_folder: str | os.PathLike | None) -> Generation:
    """The generator and sampling settings of a run: `diffusion_lora` (its prompts, resolution and `generation`)."""
    from pneumo_exp.diffusion.stable_diffusion import check_resolution, pipeline_source

    settings = cfg.diffusion_lora.generation
    source = pipeline_source(cfg.diffusion_lora, cfg.paths.cache_dir)
    check_resolution(cfg.diffusion_lora, source)
    return Generation(source, lora_folder, plain(cfg.diffusion_lora.prompts),
                      seed=int(cfg.seed if settings.seed is None else settings.seed),
                      steps=settings.num_inference_steps, guidance=settings.guidance_scale,
                      resolution=int(cfg.diffusion_lora.resolution), precision=settings.precision,
                      revision=cfg.diffusion_lora.revision)


def run_bank_root(cfg: JobConfig) -> Path:
    """Shared by every job of this cache that draws with the same generator and settings."""
    return Path(cfg.paths.cache_dir) / BANK_DIR


def run_sampling(cfg: JobConfig) -> dict:
    """How a run draws (not what: that is `run_generation`)."""
    return {"batch_size": cfg.diffusion_lora.generation.batch_size, "device": "cpu" if cfg.trainer.cpu else None}


def synthesize_for_run(cfg: JobConfig, lora_folder: str | os.PathLike, real_counts: dict[str, int],
                       output_dir: str | os.PathLike, progress: bool = True) -> list[Record]:
    """The stage as a run does it: counts from `cfg.augmentation` and the training split's real counts, the images
    from the run's bank."""
    return take_from_bank(run_generation(cfg, lora_folder), synthetic_counts(real_counts, cfg.augmentation),
                          output_dir, run_bank_root(cfg), **run_sampling(cfg), progress=progress)


def duplicate_real(real_train: list[Record], counts: dict[str, int], seed: int) -> list[Record]:
    """The count-matched control: `counts[c]` repeats of the real training images of class c (source=duplicate,
    their path, patient and sha256), drawn with a generator seeded by `seed` and the class, with replacement only
    where more are asked than the class has."""
    repeats = []
    for label in CLASSES:
        pool = sorted((r for r in real_train if r.label == label), key=lambda r: r.path)
        wanted = int(counts.get(label, 0))
        if wanted and not pool:
            raise UserError(f"{wanted} repeats of {label} training images asked, but the training split holds none",
                            where="augmentation", fix=f"ask for no {label} images, or use a dataset that has some")
        rng = np.random.default_rng(seed_of_text(f"{seed}:duplicate:{label}"))
        chosen = rng.choice(len(pool), size=wanted, replace=wanted > len(pool))
        repeats += [replace(pool[index], source="duplicate") for index in chosen]
    return repeats


def duplicate_for_run(cfg: JobConfig, real_train: list[Record], output_dir: str | os.PathLike) -> list[Record]:
    """`augmentation.source=duplicate_real`: the synthetic arm's counts as repeats of real training images, seeded
    by the run's seed, in `output_dir/synthetic/manifest.csv`. No generator is read."""
    real_counts = {label: sum(r.label == label for r in real_train) for label in CLASSES}
    counts = synthetic_counts(real_counts, cfg.augmentation)
    repeats = duplicate_real(real_train, counts, int(cfg.seed))

    def fill(staging: Path) -> None:
        write_csv(repeats, staging / "manifest.csv")
        write_json_atomic(staging / "generation.json", {"source": "duplicate_real", "seed": int(cfg.seed),
                                                        "counts": counts})

    swap_folder(Path(output_dir).resolve() / SYNTHETIC_DIR, fill)
    return repeats
