"""The manifest: one row per image, the only description of a dataset that later stages read.

Columns: path (a file path, or a generator key such as ``phantom:...``), label (a name from ``labels.CLASSES``),
patient_id, split (train/val/test), source and sha256 (of the file's bytes, or of the generated pixels). The source
is real, synthetic (drawn by a generator) or duplicate (a repeat of a real training image, with its path, patient
and sha256: the count-matched control of `augmentation.source=duplicate_real`); the last two are added images and
belong to the training split only.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from pneumo_exp.core.files import atomic_file
from pneumo_exp.errors import UserError
from pneumo_exp.labels import CLASSES

SPLITS = ("train", "val", "test")
SOURCES = ("real", "synthetic", "duplicate")


@dataclass(frozen=True)
class Record:
    path: str
    label: str
    patient_id: str
    split: str
    source: str = "real"
    sha256: str = ""


COLUMNS = tuple(f.name for f in fields(Record))


class DatasetError(UserError, ValueError):
    """The dataset on disk is not usable as it is; the message names the file or folder at fault."""


class LeakageError(UserError, ValueError):
    """A patient appears in more than one split."""


def validate(records: list[Record], where: str = "manifest") -> None:
    """Fail with a message naming the row when a value is outside its vocabulary."""
    for row_number, record in enumerate(records, start=2):
        problem = _row_problem(record)
        if problem:
            raise DatasetError(f"row {row_number} ({record.path}): {problem}", where, "correct the row")


def _row_problem(record: Record) -> str | None:
    if record.label not in CLASSES:
        return f"label {record.label!r} not in {CLASSES}"
    if record.split not in SPLITS:
        return f"split {record.split!r} not in {SPLITS}"
    if record.source not in SOURCES:
        return f"source {record.source!r} not in {SOURCES}"
    if not record.patient_id:
        return "empty patient_id"
    if record.source != "real" and record.split != "train":
        return f"{record.source} images belong to train only"
    return None


def of_a_patient(record: Record) -> bool:
    """A real image or a repeat of one: its patient and bytes are a real patient's (a synthetic image's are not)."""
    return record.source != "synthetic"


def leaking_patients(records: list[Record]) -> dict[str, list[str]]:
    """Patients found in more than one split, with the splits they are in."""
    splits_of_patient: dict[str, set[str]] = defaultdict(set)
    for record in records:
        if of_a_patient(record):
            splits_of_patient[record.patient_id].add(record.split)
    return {patient: sorted(splits) for patient, splits in splits_of_patient.items() if len(splits) > 1}


def images_in_several_splits(records: list[Record]) -> dict[str, list[str]]:
    """Byte-identical real images or repeats (same sha256) found in more than one split, with the splits."""
    splits_of_image: dict[str, set[str]] = defaultdict(set)
    for record in records:
        if of_a_patient(record) and record.sha256:
            splits_of_image[record.sha256].add(record.split)
    return {digest: sorted(splits) for digest, splits in splits_of_image.items() if len(splits) > 1}


def check_no_leakage(records: list[Record], where: str | None = None) -> None:
    """No patient, and no identical image under another name, in two splits; `where` names the records checked."""
    leaks = leaking_patients(records)
    if leaks:
        examples = "; ".join(f"{patient} in {'+'.join(splits)}" for patient, splits in list(leaks.items())[:5])
        raise LeakageError(f"{len(leaks)} patient(s) appear in more than one split: {examples}", where,
                           "all images of a patient belong to one split: correct their patient_id or split")
    copies = images_in_several_splits(records)
    if copies:
        paths = {r.sha256: r.path for r in records if r.sha256 in copies}
        examples = "; ".join(f"{paths[d]} in {'+'.join(s)}" for d, s in list(copies.items())[:5])
        raise LeakageError(f"{len(copies)} identical image(s) appear in more than one split: {examples}", where,
                           "keep the copies of an image in one split, or remove all but one")


def counts(records: list[Record]) -> dict[str, dict[str, int]]:
    """{split: {class: images}} for every split and class, zeros included."""
    table = {split: {label: 0 for label in CLASSES} for split in SPLITS}
    for record in records:
        table[record.split][record.label] += 1
    return table


def patient_counts(records: list[Record]) -> dict[str, int]:
    patients: dict[str, set[str]] = defaultdict(set)
    for record in records:
        patients[record.split].add(record.patient_id)
    return {split: len(patients[split]) for split in SPLITS}


def write_csv(records: list[Record], path: str | os.PathLike) -> Path:
    """Write atomically: a reader never sees half a manifest."""
    with atomic_file(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for record in records:
            writer.writerow(asdict(record))
    return Path(path)


def read_csv(path: str | os.PathLike) -> list[Record]:
    path = Path(path)
    if not path.is_file():
        raise DatasetError("the file does not exist", f"manifest {path}",
                           "check the path: a run writes manifest.csv in its folder and in synthetic/")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"path", "label", "patient_id", "split"} - set(reader.fieldnames or ())
        if missing:
            raise DatasetError(f"missing column(s) {', '.join(sorted(missing))}", f"manifest {path}",
                               f"give the columns {', '.join(COLUMNS)}")
        records = [Record(path=row["path"], label=row["label"], patient_id=row["patient_id"], split=row["split"],
                          source=row.get("source") or "real", sha256=row.get("sha256") or "") for row in reader]
    validate(records, where=f"manifest {path}")
    return records


def fingerprint(records: list[Record]) -> str:
    """A short hash of the manifest's content, used to key caches."""
    digest = hashlib.sha256()
    for record in records:
        digest.update("\t".join(asdict(record).values()).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]
