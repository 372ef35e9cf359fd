"""Carve a validation split out of the training split, stratified by class and grouped by patient; keep a nested,
stratified share of the training split; take a smaller, patient-grouped subset of every split."""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import replace

from pneumo_exp.data.manifest import Record
from pneumo_exp.errors import UserError
from pneumo_exp.labels import CLASSES
from pneumo_exp.validate import SettingError


def carve_validation(records: list[Record], fraction: float, seed: int,
                     group_of: Callable[[str], str] = lambda patient_id: patient_id) -> list[Record]:
    """Move whole patient groups from train to val until each class holds about `fraction` of its images in val.

    `group_of` maps a patient id to the unit that must stay on one side (a dataset can group more cautiously than
    by patient). A group's class is the class most of its images have. Only real training records move: test and
    synthetic records keep their split even when their patient id matches a group carved into val.
    """
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"dataset.val_fraction must be in [0, 1), got {fraction}", "dataset.val_fraction",
                        "give the share of training patients to validate on, e.g. 0.15")
    groups_per_class = _groups_per_class([r for r in records if _real_training(r)], group_of)
    rng = random.Random(seed)
    val_groups: set[str] = set()
    for label in CLASSES:
        groups = groups_per_class[label]
        rng.shuffle(groups)
        val_groups.update(_prefix_near(groups, fraction * _images(groups)))
    return [replace(r, split="val") if _real_training(r) and group_of(r.patient_id) in val_groups else r
            for r in records]


def keep_training_fraction(records: list[Record], fraction: float, seed: int,
                           group_of: Callable[[str], str] = lambda patient_id: patient_id) -> list[Record]:
    """Whole patient groups holding about `fraction` of each class's real training images; the rest is dropped.

    Each class's groups are put in one order seeded by `seed` and the class keeps the prefix whose images come
    closest to its share, so for one seed a smaller fraction keeps a prefix of a larger one's: the subsets nest.
    Validation, test and synthetic records are kept as they are; `fraction` 1 returns `records` themselves.
    """
    if fraction == 1.0:
        return records
    groups_per_class = _groups_per_class([r for r in records if _real_training(r)], group_of)
    ordered = {label: _in_seeded_order(groups_per_class[label], seed, label) for label in CLASSES}
    kept = {label: _prefix_near(groups, fraction * _images(groups)) for label, groups in ordered.items()}
    emptied = [label for label in CLASSES if ordered[label] and not kept[label]]
    if emptied:
        raise SettingError(
            f"dataset.train_fraction={fraction:g} keeps no training patient of class {', '.join(emptied)}",
            "dataset.train_fraction", f"use at least {_least_fraction(ordered.values()):g}, or 1 for every image")
    kept_groups = set().union(*kept.values())
    return [r for r in records if not _real_training(r) or group_of(r.patient_id) in kept_groups]


def _real_training(record: Record) -> bool:
    return record.split == "train" and record.source == "real"


def _in_seeded_order(groups: list[tuple[str, int]], seed: int, label: str) -> list[tuple[str, int]]:
    """The groups in an order fixed by the seed and the class alone, whatever share is then taken of them."""
    shuffled = list(groups)
    random.Random(f"train_fraction:{seed}:{label}").shuffle(shuffled)
    return shuffled


def _least_fraction(class_groups: Iterable[list[tuple[str, int]]]) -> float:
    """The smallest fraction (rounded up to thousandths) at which every class keeps its first group."""
    needed = max(groups[0][1] / (2 * _images(groups)) for groups in class_groups if groups)
    return math.ceil(needed * 1000) / 1000


def limit_per_class(records: list[Record], limit: int, seed: int) -> list[Record]:
    """Whole patients, at most about `limit` images per class in each split, chosen in an order seeded by `seed`.

    Patients are taken per split and class (a patient's class is that of most of its images) in a shuffled order,
    each one whose images still fit within `limit`; where no patient fits, the first one is kept, so no class of a
    split disappears. Records are only dropped, never moved: the subset keeps every patient's split.
    """
    if limit < 1:
        raise UserError(f"dataset.limit_per_class must be a positive number of images, got {limit}",
                        "dataset.limit_per_class", "give N >= 1, or null for every image")
    rng = random.Random(seed)
    kept: set[tuple[str, str]] = set()
    for split in sorted({r.split for r in records}):
        groups_per_class = _groups_per_class([r for r in records if r.split == split and r.source == "real"])
        for label in CLASSES:
            groups = groups_per_class[label]
            rng.shuffle(groups)
            kept.update((split, group) for group in _fitting(groups, limit) or [group for group, _ in groups[:1]])
    return [r for r in records if r.source != "real" or (r.split, r.patient_id) in kept]


def _prefix_near(groups: list[tuple[str, int]], target: float) -> list[str]:
    """The first groups, up to where their running total of images lands closest to `target`."""
    chosen, taken = [], 0
    for group, size in groups:
        if taken + size / 2 > target:
            break
        chosen.append(group)
        taken += size
    return chosen


def _images(groups: list[tuple[str, int]]) -> int:
    return sum(size for _, size in groups)


def _fitting(groups: list[tuple[str, int]], limit: int) -> list[str]:
    """The groups, in order, whose images still fit within `limit` when they come."""
    chosen, taken = [], 0
    for group, size in groups:
        if taken + size <= limit:
            chosen.append(group)
            taken += size
    return chosen


def _groups_per_class(records: list[Record], group_of: Callable[[str], str] = lambda patient_id: patient_id
                      ) -> dict[str, list[tuple[str, int]]]:
    """{class: [(group, images)]}, groups sorted by name, each under the class most of its images have."""
    images_per_group: dict[str, Counter] = defaultdict(Counter)
    for record in records:
        images_per_group[group_of(record.patient_id)][record.label] += 1
    groups_per_class: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for group, labels in sorted(images_per_group.items()):
        majority = max(CLASSES, key=lambda label: (labels[label], -CLASSES.index(label)))
        groups_per_class[majority].append((group, sum(labels.values())))
    return groups_per_class
