"""Carve a validation split out of the training split, stratified by class and grouped by patient."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from typing import Callable

from pneumo_exp.data.manifest import Record, with_split
from pneumo_exp.labels import CLASSES


def carve_validation(records: list[Record], fraction: float, seed: int,
                     group_of: Callable[[str], str] = lambda patient_id: patient_id) -> list[Record]:
    """Move whole patient groups from train to val until each class holds about `fraction` of its images in val.

    `group_of` maps a patient id to the unit that must stay on one side (a dataset can group more cautiously than
    by patient). A group's class is the class most of its images have. Other splits are left as they are.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"dataset.val_fraction must be in [0, 1), got {fraction}")
    train = [r for r in records if r.split == "train" and r.source == "real"]
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

    split_of_patient = {r.patient_id: "val" for r in train if group_of(r.patient_id) in val_groups}
    return with_split(records, split_of_patient)
