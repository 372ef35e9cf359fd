"""Carve a validation split out of the training split, stratified by class and grouped by patient."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import replace
from typing import Callable

from pneumo_exp.data.manifest import Record
from pneumo_exp.labels import CLASSES


def carve_validation(records: list[Record], fraction: float, seed: int,
                     group_of: Callable[[str], str] = lambda patient_id: patient_id) -> list[Record]:
    """Move whole patient groups from train to val until each class holds about `fraction` of its images in val.

    `group_of` maps a patient id to the unit that must stay on one side (a dataset can group more cautiously than
    by patient). A group's class is the class most of its images have. Only real training records move: test and
    synthetic records keep their split even when their patient id matches a group carved into val.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"dataset.val_fraction must be in [0, 1), got {fraction}")
    def carvable(record: Record) -> bool:
        return record.split == "train" and record.source == "real"

    train = [r for r in records if carvable(r)]
    images_per_group: dict[str, Counter] = defaultdict(Counter)
    for record in train:
        images_per_group[group_of(record.patient_id)][record.label] += 1

    groups_per_class: dict[str, list[str]] = defaultdict(list)
    for group, labels in sorted(images_per_group.items()):
        majority = max(CLASSES, key=lambda label: (labels[label], -CLASSES.index(label)))
        groups_per_class[majority].append(group)

    rng = random.Random(seed)
    val_groups: set[str] = set()
    for label in CLASSES:
        groups = groups_per_class[label]
        rng.shuffle(groups)
        target = fraction * sum(sum(images_per_group[g].values()) for g in groups)
        taken = 0
        for group in groups:
            size = sum(images_per_group[group].values())
            if taken + size / 2 > target:  # stop where the running total lands closest to the target
                break
            val_groups.add(group)
            taken += size

    return [replace(r, split="val") if carvable(r) and group_of(r.patient_id) in val_groups else r for r in records]
