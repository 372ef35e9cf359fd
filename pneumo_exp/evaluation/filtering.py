"""`augmentation.filter`: keep a drawn image only where a classifier trained on real images agrees with its prompt.

The judge is the classifier of a finished run (`augmentation.filter.judge_run`) trained on real images of this run's
training split only. It sees each image as its own run saw images: decoded at its `dataset.resolution` with its
`dataset.intensity` through the image cache, under its precision. Each class's bank images are walked in order, as
every arm sees them; an image is kept when the judge gives its prompted class at least `min_probability`, and the
bank is extended until the count the augmentation asks for is met. A class still short after `max_draws_factor` x
its count images is refused: a result never silently has fewer images. `synthetic/filter.json` records, per class,
the images judged, kept and the acceptance rate.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from pneumo_exp.config import JobConfig, SyntheticFilterConfig
from pneumo_exp.core.files import write_json_atomic
from pneumo_exp.data.augment import to_unit_float
from pneumo_exp.data.cache import open_or_build
from pneumo_exp.data.manifest import LeakageError, Record, read_csv
from pneumo_exp.data.prepare import PreparedData
from pneumo_exp.data.provenance import SPLIT_SETTINGS
from pneumo_exp.diffusion.bank import BankImage, SyntheticBank, open_bank
from pneumo_exp.diffusion.generate import (
    SYNTHETIC_DIR,
    run_bank_root,
    run_generation,
    run_sampling,
    synthetic_counts,
    write_synthetic_folder,
)
from pneumo_exp.labels import CLASSES, class_index
from pneumo_exp.validate import SettingError

JUDGE_KEY = "augmentation.filter.judge_run"
FILTER_FILE = "filter.json"


def check_judge(run_dir: Path, data: PreparedData) -> None:
    """Refuse, before any work, a judge that is no finished classifier run, that trained on synthetic images, or on
    an image outside this run's real training split, or chose its epoch on one of this run's test images."""
    if not all((run_dir / name).is_file() for name in ("config.yaml", "results.json", "manifest.csv")):
        raise SettingError(f"{run_dir} is not a finished classifier run (no config.yaml, results.json and "
                           "manifest.csv)", where=JUDGE_KEY,
                           fix="give the folder of a run that trained a classifier on real images of this run's "
                               "training split")
    judged_by = read_csv(run_dir / "manifest.csv")
    trained_on = [r for r in judged_by if r.split == "train"]
    if any(r.source == "synthetic" for r in trained_on):
        raise SettingError(f"the classifier of {run_dir} trained on synthetic images too", where=JUDGE_KEY,
                           fix="give a run that trained on real images only (augmentation=none)")
    real_train = {r.sha256 for r in data.split("train") if r.source == "real"}
    test = {r.sha256 for r in data.split("test")}
    seen = [r for r in trained_on if r.sha256 not in real_train] + [r for r in judged_by
                                                                    if r.split == "val" and r.sha256 in test]
    if seen:
        raise LeakageError(f"the judge {run_dir} trained or chose its epoch on {len(seen)} image(s) outside this "
                           f"run's training split (e.g. {seen[0].path}): it may have seen validation or test images",
                           where=JUDGE_KEY, fix=f"train the judge on this run's training split (the same "
                                                f"{SPLIT_SETTINGS})")


class Judge:
    """A finished run's classifier and the way its run saw images."""

    def __init__(self, run_dir: Path, cache_dir: str | os.PathLike):
        from pneumo_exp.classify.predict import load_as_trained

        self.classifier, run_cfg, self.accelerator = load_as_trained(run_dir, str(cache_dir))
        self.resolution, self.intensity = int(run_cfg.dataset.resolution), run_cfg.dataset.get("intensity", "none")
        self.batch_size, self.cache_dir = int(run_cfg.trainer.eval_batch_size), cache_dir

    def prompted_probability(self, images: list[BankImage]) -> np.ndarray:
        """Each image's probability of the class it was drawn for."""
        from pneumo_exp.classify.predict import class_probabilities

        records = [Record(path=str(image.path), label=image.label, patient_id=f"synthetic-{image.label}-{image.index}",
                          split="train", source="synthetic", sha256=image.sha256) for image in images]
        cache = open_or_build(records, self.resolution, self.cache_dir, progress=False, intensity=self.intensity)
        pixels = torch.from_numpy(np.asarray(cache.pixels[cache.rows_of(records)]))
        labels = torch.tensor([class_index(image.label) for image in images])
        chunks = [class_probabilities(self.classifier, to_unit_float(pixels[start:start + self.batch_size]),
                                      self.accelerator) for start in range(0, len(images), self.batch_size)]
        probabilities = torch.cat(chunks) if chunks else torch.zeros(0, len(CLASSES))
        return probabilities.gather(1, labels[:, None])[:, 0].numpy()


def accepted_images(bank: SyntheticBank, judge: Judge, label: str, count: int,
                    settings: SyntheticFilterConfig) -> tuple[list[BankImage], int]:
    """The class's first `count` bank images that the judge accepts, and how many bank images it took to find them
    (up to the last one kept: the acceptance rate's denominator, whatever the batches)."""
    limit = math.floor(settings.max_draws_factor * count)
    kept: list[tuple[int, BankImage]] = []  # (bank index, image)
    judged = 0
    while len(kept) < count and judged < limit:
        stop = min(limit, judged + next_batch(count - len(kept), len(kept), judged))
        batch = bank.images(label, stop, start=judged)
        probabilities = judge.prompted_probability(batch)
        kept += [(judged + offset, image) for offset, (image, probability) in enumerate(zip(batch, probabilities))
                 if probability >= settings.min_probability]
        judged = stop
    if len(kept) < count:
        raise SettingError(f"the judge accepted {len(kept)} of the {judged} {label} images drawn, {count - len(kept)} "
                           f"short of the {count} asked", where="augmentation.filter.max_draws_factor",
                           fix="raise it (each class draws at most this many times its count), or lower "
                               "augmentation.filter.min_probability")
    kept = kept[:count]
    return [image for _, image in kept], (kept[-1][0] + 1 if kept else 0)


def next_batch(missing: int, accepted: int, judged: int) -> int:
    """How many more images to judge: the missing count at first, then as many as the acceptance seen so far needs
    (twice as many as judged while none was accepted), so a low acceptance does not draw one image at a time."""
    if judged == 0:
        return missing
    if accepted == 0:
        return 2 * judged
    return math.ceil(missing * judged / accepted)


def filter_for_run(cfg: JobConfig, lora_folder: str | os.PathLike, real_counts: dict[str, int],
                   output_dir: str | os.PathLike, progress: bool = True) -> list[Record]:
    """The synthesize stage with a filter: the accepted bank images in `output_dir/synthetic/`, as the unfiltered
    stage writes them, and `synthetic/filter.json`."""
    settings = cfg.augmentation.filter
    counts = synthetic_counts(real_counts, cfg.augmentation)
    generation = run_generation(cfg, lora_folder)
    judge = Judge(Path(settings.judge_run), cfg.paths.cache_dir)
    kept, per_class = [], {}
    with open_bank(generation, run_bank_root(cfg), **run_sampling(cfg), progress=progress) as bank:
        for label in CLASSES:
            accepted, judged = accepted_images(bank, judge, label, counts[label], settings)
            kept += accepted
            per_class[label] = {"asked": counts[label], "judged": judged, "kept": len(accepted),
                                "acceptance_rate": len(accepted) / judged if judged else None}
        records = write_synthetic_folder(kept, generation, bank, output_dir)
    write_json_atomic(Path(output_dir) / SYNTHETIC_DIR / FILTER_FILE, {
        "judge_run": str(Path(settings.judge_run).resolve()), "min_probability": settings.min_probability,
        "max_draws_factor": settings.max_draws_factor, "per_class": per_class})
    return records
