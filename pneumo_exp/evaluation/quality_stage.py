"""The `quality` stage: are the synthetic images any good? Per class, in the feature space of the classifier this
run trained (a chest-X-ray encoder; Inception features say little about radiographs): FID, KID, diversity, and
nearest-real-neighbour distances that flag likely copies of training images. Writes `quality.json` and
`synthetic_vs_real.png` (a row of real and a row of synthetic images per class) and logs both to W&B.

Plus fidelity as the field measures it (`fidelity.py`), per class and overall, in the same feature space: the
synthetic images and, as the reference arm, the run's real validation images, each cut to the same number of
images per class, against the real training images: FID and KID, precision, recall, density and coverage (k = 5),
and a classifier two-sample test (held-out AUROC, 0.5: indistinguishable).

Plus the classification accuracy score: the same classifier recipe trained on synthetic images alone and on as
many real training images per class, both tested on the real test split (validation stays real for both).

Everything is measured as the classifier was trained: on the run's intensity-standardised cache, under its autocast.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pneumo_exp.config import JobConfig, LoggerMode
from pneumo_exp.core.files import atomic_file, write_json_atomic
from pneumo_exp.core.training import resolve_precision
from pneumo_exp.data.cache import open_or_build
from pneumo_exp.data.manifest import Record
from pneumo_exp.data.prepare import PreparedData
from pneumo_exp.evaluation.fidelity import RealReference, matched_sizes, measured_in
from pneumo_exp.evaluation.quality import encode, quality_report
from pneumo_exp.labels import CLASSES

log = logging.getLogger(__name__)


class ImageEmbedding(nn.Module):
    """The trained classifier's unit-norm image embedding, as a feature extractor: images in on the CPU, computed
    on the accelerator's device under its autocast (the run's precision), features out on the CPU."""

    def __init__(self, classifier, accelerator):
        super().__init__()
        self.classifier = classifier.eval()
        self.accelerator = accelerator

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with self.accelerator.autocast():
            pixel_values = self.classifier.pixel_values(images.to(self.accelerator.device))
            features = self.classifier.image_features(pixel_values)
        return F.normalize(features.float(), dim=-1).cpu()


def pixels_by_class(data: PreparedData, source: str, cfg: JobConfig, split: str = "train") -> dict[str, np.ndarray]:
    """The images of one source and split per class, from the cache the classifier trained on (same resolution
    and `dataset.intensity`)."""
    records = [r for r in data.split(split) if r.source == source]
    if not records:
        return {}
    cache = open_or_build(records, cfg.dataset.resolution, cfg.paths.cache_dir, progress=False,
                          intensity=cfg.dataset.intensity)
    rows = cache.rows_of(records)
    return {label: np.asarray(cache.pixels[rows[[r.label == label for r in records]]])
            for label in CLASSES if any(r.label == label for r in records)}


def synthetic_classes(data: PreparedData) -> list[str]:
    return [label for label in CLASSES if any(r.source == "synthetic" and r.label == label
                                              for r in data.split("train"))]


def drawn(records: list[Record], size: int, rng: np.random.Generator) -> list[Record]:
    """`size` of the records drawn at random without replacement, in their order."""
    return [records[i] for i in sorted(rng.choice(len(records), size=size, replace=False))]


def accuracy_score_training_sets(data: PreparedData, seed: int) -> dict[str, list[Record]]:
    """The two arms of the classification accuracy score, of equal size in every class. A class with synthetic
    images: as many synthetic (synthetic_only) as real training images (real_matched), each drawn at random down
    to the smaller count. A class without: all its real training images, the same in both arms, so the score
    differs only where the synthetic images are."""
    rng = np.random.default_rng(seed)
    synthetic_only, real_matched = [], []
    for label in CLASSES:
        synthetic = [r for r in data.split("train") if r.source == "synthetic" and r.label == label]
        real = [r for r in data.split("train") if r.source == "real" and r.label == label]
        if not synthetic:
            synthetic_only += real
            real_matched += real
            continue
        size = min(len(synthetic), len(real))
        synthetic_only += drawn(synthetic, size, rng)
        real_matched += drawn(real, size, rng)
    return {"synthetic_only": synthetic_only, "real_matched": real_matched}


def accuracy_score_blocker(cfg: JobConfig) -> str | None:
    """Why the classification accuracy score cannot be computed in this job, or None."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1:
        return (f"it trains two more classifiers on the main process alone, which a job of {processes} processes "
                f"cannot do; run the quality stage in a one-process job")
    if not cfg.trainer.evaluate_test:
        return "it is a test split score, and trainer.evaluate_test=false leaves the test split unread"
    return None


def classification_accuracy_score(cfg: JobConfig, data: PreparedData, output_dir: Path) -> dict:
    """Test metrics of the run's classifier recipe trained on the synthetic images (plus the real images of the
    classes that have none), and on matched real ones; {"not_run": reason} where this job cannot compute them.
    Each arm's folder keeps its metrics.jsonl (so its results.json names the epoch it kept), without W&B."""
    from pneumo_exp.classify.train import train_and_evaluate
    from pneumo_exp.tracking import RunLogger

    blocker = accuracy_score_blocker(cfg)
    if blocker:
        log.warning("classification accuracy score not run: %s", blocker)
        return {"not_run": blocker}
    held_out = [r for r in data.records if r.split != "train"]
    training_sets = accuracy_score_training_sets(data, cfg.seed)
    history_only = replace(cfg, logger=replace(cfg.logger, mode=LoggerMode.disabled))
    scores = {}
    for name, train in training_sets.items():
        folder = output_dir / "quality" / f"classifier_{name}"
        folder.mkdir(parents=True, exist_ok=True)
        metrics = train_and_evaluate(cfg, PreparedData(records=train + held_out), folder,
                                     RunLogger(history_only, folder, "quality", name))
        scores[name] = {"train_images": len(train), **{k: metrics[k] for k in
                                                       ("test/acc", "test/f1_macro", "test/recall_macro")}}
    return scores


FIDELITY_ARMS = ("synthetic", "real_validation")


def fidelity_report(cfg: JobConfig, real: dict, synthetic: dict, validation: dict, encoder: nn.Module,
                    dimension: int) -> dict:
    """`fidelity.RealReference.measure` of the synthetic and the real validation images, cut to the same number of
    images per class, against the real training images of the synthetic classes; {"not_run": reason} without
    validation images of those classes."""
    sizes = matched_sizes(*({label: len(pixels) for label, pixels in images.items()}
                            for images in (synthetic, validation, real)))  # the test's real images too: a small split
    if not sizes:
        return {"not_run": "no real validation images of the synthetic classes to compare with"}

    def features(by_class: dict) -> tuple[torch.Tensor, np.ndarray]:
        labels = list(sizes)
        encoded = [encode(by_class[label], encoder, dimension, cfg.dataset.resolution, cfg.trainer.eval_batch_size)
                   for label in labels]
        return torch.cat(encoded), np.concatenate([np.full(len(e), CLASSES.index(label))
                                                   for label, e in zip(labels, encoded)])

    reference = RealReference(*features(real), sizes, dimension, cfg.quality.kid_subset_size, cfg.quality.kid_subsets,
                              cfg.seed)
    arms = {name: reference.measure(*features(images), seed=cfg.seed)
            for name, images in zip(FIDELITY_ARMS, (synthetic, validation))}
    how = measured_in(f"the run's classifier's unit-norm image embedding ({dimension}-d)",
                      f"the run's image cache at dataset.resolution={cfg.dataset.resolution} px with "
                      f"dataset.intensity={cfg.dataset.intensity}, then the classifier's own input transform, under "
                      f"trainer.precision={resolve_precision(cfg.trainer.precision, cfg.trainer.cpu)}", sizes)
    return {**how, "arms": arms}


def run_quality(cfg: JobConfig, data: PreparedData, output_dir: Path, logger) -> dict:
    from pneumo_exp.classify.predict import load_trained
    from pneumo_exp.diffusion.stable_diffusion import grid_image

    real = pixels_by_class(data, "real", cfg)
    synthetic = pixels_by_class(data, "synthetic", cfg)
    if not synthetic:
        return {}
    from accelerate.utils.memory import clear_device_cache

    from pneumo_exp.classify.predict import evaluation_accelerator

    classifier, _ = load_trained(output_dir, cfg.paths.cache_dir)
    accelerator = evaluation_accelerator(cfg.trainer)
    encoder = ImageEmbedding(classifier.to(accelerator.device), accelerator)
    dimension = classifier.embedding_dim
    report = quality_report(real, synthetic, encoder, dimension, image_size=cfg.dataset.resolution, seed=cfg.seed,
                            batch_size=cfg.trainer.eval_batch_size, copy_fraction=cfg.quality.copy_fraction,
                            kid_subset_size=cfg.quality.kid_subset_size, kid_subsets=cfg.quality.kid_subsets)
    fidelity = fidelity_report(cfg, real, synthetic, pixels_by_class(data, "real", cfg, split="val"), encoder,
                               dimension)
    del classifier, encoder
    clear_device_cache(garbage_collection=True)
    scores = classification_accuracy_score(cfg, data, output_dir)
    write_json_atomic(output_dir / "quality.json", {"feature_space": f"classifier image embedding ({dimension}-d)",
                                                    "copy_threshold": f"{cfg.quality.copy_fraction} x median real-real "
                                                                      f"nearest-neighbour distance",
                                                    "synthetic_classes": synthetic_classes(data),
                                                    "per_class": report, "fidelity": fidelity,
                                                    "classification_accuracy_score": scores})
    rows = {}
    for label in CLASSES:
        if label in synthetic:
            rows[f"{label} real"] = real[label][:6]
            rows[f"{label} synth"] = synthetic[label][:6]
    grid_path = output_dir / "synthetic_vs_real.png"
    with atomic_file(grid_path, "wb") as handle:
        grid_image(rows).save(handle, format="PNG")
    logger.log_images({"synthetic_vs_real": grid_path})
    logger.set_summary({f"quality/{label}/{key}": value for label, row in report.items()
                        for key, value in row.items() if isinstance(value, (int, float))})
    if "not_run" not in scores:
        logger.set_summary({f"quality/cas/{name}/{key}": value for name, row in scores.items()
                            for key, value in row.items()})
    logger.set_summary({f"quality/fidelity/{arm}/{label}/{key}": value
                        for arm, measured in fidelity.get("arms", {}).items()
                        for label, row in [*measured["per_class"].items(), ("overall", measured["overall"])]
                        for key, value in row.items() if isinstance(value, (int, float))})
    return {"synthetic_classes": synthetic_classes(data), "per_class": report, "fidelity": fidelity,
            "classification_accuracy_score": scores}


def quality_cell(value) -> str:
    """A table cell; None (a number that could not be computed, e.g. FID from too few images) as a dash."""
    return f"{'-':>15}" if value is None else f"{value:>15.4g}"


def format_quality(quality: dict) -> str:
    columns = ("real", "synthetic", "fid", "kid_mean", "diversity_synthetic_over_real", "nn_median",
               "real_nn_median", "likely_copies")
    lines = ["synthetic image quality (classifier embedding space)",
             f"{'class':<10}" + "".join(f"{c.replace('diversity_synthetic_over_real', 'diversity'):>15}"
                                        for c in columns)]
    for label, row in quality.get("per_class", {}).items():
        lines.append(f"{label:<10}" + "".join(quality_cell(row.get(c, math.nan)) for c in columns))
    lines += [f"  {label} FID: {row['fid_note']}" for label, row in quality.get("per_class", {}).items()
              if "fid_note" in row]
    lines += fidelity_lines(quality.get("fidelity"))
    scores = quality.get("classification_accuracy_score", {})
    if "not_run" in scores:
        lines.append(f"classification accuracy score: not run ({scores['not_run']})")
    elif scores:
        lines.append(f"classification accuracy score (trained on ..., tested on the real test split; synthetic "
                     f"classes: {', '.join(quality.get('synthetic_classes', []))}, the others real in both arms)")
        for name, row in scores.items():
            lines.append(f"  {name:<16}{row['train_images']:>6} images   test acc {row['test/acc']:.4f}   "
                         f"macro F1 {row['test/f1_macro']:.4f}")
    return "\n".join(lines)


FIDELITY_COLUMNS = ("images", "fid", "kid_mean", "precision", "recall", "density", "coverage", "c2st_auroc")


def fidelity_lines(fidelity: dict | None) -> list[str]:
    """The fidelity block: what it was measured in, then per arm and class (and overall) its numbers; the
    two-sample AUROC with its CI."""
    if not fidelity:
        return []
    if "not_run" in fidelity:
        return [f"fidelity: not run ({fidelity['not_run']})"]
    sizes = ", ".join(f"{label} {size}" for label, size in fidelity["images_per_arm"].items())
    lines = [f"fidelity against the real training images: {fidelity['feature_space']}; {fidelity['preprocessing']}; "
             f"every arm cut to {sizes} images per class; k = {fidelity['neighbours']}",
             f"{'arm':<16}{'class':<10}" + "".join(f"{c.replace('c2st_auroc', 'two-sample AUROC'):>17}"
                                                 for c in FIDELITY_COLUMNS) + f"{'95 % CI':>18}"]
    for arm, measured in fidelity["arms"].items():
        for label, row in [*measured["per_class"].items(), ("overall", measured["overall"])]:
            interval = "-" if row["c2st_ci_low"] is None else f"[{row['c2st_ci_low']:.3f}, {row['c2st_ci_high']:.3f}]"
            lines.append(f"{arm:<16}{label:<10}" + "".join(f"{quality_cell(row.get(c, math.nan)):>17}"
                                                           for c in FIDELITY_COLUMNS) + f"{interval:>18}")
            lines += [f"  {arm} {label}: {note}" for note in row.get("notes", ())]
    return lines
