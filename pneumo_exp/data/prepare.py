"""Turn the `dataset` config into a checked manifest with train, val and test splits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pneumo_exp.config import DatasetConfig
from pneumo_exp.data import kermany, manifest, phantom
from pneumo_exp.data.folder import TREE_PATIENTS_NOTE, folder_records
from pneumo_exp.data.manifest import DatasetError, Record
from pneumo_exp.data.splits import carve_validation, keep_training_fraction, limit_per_class


@dataclass
class PreparedData:
    records: list[Record]
    skipped: list[str] = field(default_factory=list)  # one message per file left out, saying why
    notes: list[str] = field(default_factory=list)  # dataset facts worth printing with the summary

    def split(self, name: str) -> list[Record]:
        return [r for r in self.records if r.split == name]


def source_records(cfg: DatasetConfig, cache_dir: str) -> tuple[list[Record], list[str]]:
    """The dataset's own records, before a validation split is carved."""
    if cfg.kind == "phantom":
        return phantom.phantom_records(patients_per_class=cfg.patients_per_class,
                                       test_patients_per_class=cfg.test_patients_per_class,
                                       images_per_patient=cfg.images_per_patient, difficulty=cfg.difficulty,
                                       seed=cfg.seed), []
    if cfg.kind == "kermany":
        extract_dir = cfg.extract_dir or str(Path(cache_dir) / "extracted")
        return kermany.kermany_records(cfg.root, skip_bad_images=cfg.skip_bad_images,
                                       check_images=cfg.check_images, extract_dir=extract_dir,
                                       max_extract_bytes=cfg.max_extract_bytes,
                                       max_compression_ratio=cfg.max_compression_ratio,
                                       min_image_side=cfg.min_image_side)
    if cfg.kind == "folder":
        if (cfg.root is None) == (cfg.manifest is None):
            raise DatasetError("dataset=folder needs exactly one of dataset.root and dataset.manifest",
                               "dataset.root, dataset.manifest", "give dataset.root (a {split}/{class}/image tree) "
                               "or dataset.manifest (a CSV with path,label,patient_id,split)")
        return folder_records(root=cfg.root, manifest=cfg.manifest, skip_bad_images=cfg.skip_bad_images,
                              check_images=cfg.check_images, class_aliases=dict(cfg.class_aliases),
                              min_image_side=cfg.min_image_side)
    raise DatasetError(f"unknown dataset kind {cfg.kind!r}", "dataset.kind", "use dataset=phantom, kermany or folder")


def prepare_data(cfg: DatasetConfig, cache_dir: str, output_dir: str | Path | None = None) -> PreparedData:
    """Records with a patient-grouped validation split, checked for leakage; writes manifest.csv if asked."""
    records, skipped = source_records(cfg, cache_dir)
    if not records:
        raise DatasetError("the dataset yielded no images", f"dataset={cfg.name}",
                           "point dataset.root or dataset.manifest at the dataset's images")
    manifest.validate(records, where=f"dataset {cfg.name}")
    manifest.check_no_leakage(records, where=f"the official split of dataset {cfg.name}")
    group_of = kermany.split_group if cfg.kind == "kermany" else (lambda patient_id: patient_id)
    own_validation = any(r.split == "val" for r in records)
    if not own_validation:
        records = carve_validation(records, cfg.val_fraction, cfg.split_seed, group_of=group_of)
    manifest.check_no_leakage(records, where=f"dataset {cfg.name} after carving validation")
    notes = dataset_notes(cfg, records) + ([own_validation_note(cfg, records)] if own_validation else [])
    data = PreparedData(records=records, skipped=skipped, notes=notes)
    if cfg.train_fraction != 1.0:
        data = training_share(data, cfg.train_fraction, cfg.split_seed, group_of)
        manifest.check_no_leakage(data.records, where=f"dataset {cfg.name} after keeping dataset.train_fraction")
    if cfg.limit_per_class is not None:
        data = subset(data, cfg.limit_per_class, cfg.split_seed)
    if output_dir is not None:
        manifest.write_csv(data.records, Path(output_dir) / "manifest.csv")
    return data


def check_splits_filled(data: PreparedData, dataset_name: str) -> None:
    """The classifier trains on the train split and tests on the test split (validation may be empty: the final
    fit): a source without one of them (a folder tree with no test/, a manifest without test rows) is refused."""
    for name, purpose in (("train", "train on"), ("test", "evaluate")):
        if not data.split(name):
            raise DatasetError(f"the {name} split is empty: nothing to {purpose}", f"dataset={dataset_name}",
                               f"give the dataset {name} images (a {name}/ folder, or manifest rows with "
                               f"split={name})")


def own_validation_note(cfg: DatasetConfig, records: list[Record]) -> str:
    """dataset.val_fraction carves validation only from a source without one."""
    images = sum(r.split == "val" for r in records)
    return (f"dataset.val_fraction={cfg.val_fraction:g} is not used: the dataset has its own validation split "
            f"({images} images), kept as it is")


def dataset_notes(cfg: DatasetConfig, records: list[Record]) -> list[str]:
    if cfg.kind == "kermany":
        return kermany.split_notes(records)
    if cfg.kind == "folder" and cfg.root is not None:
        return [TREE_PATIENTS_NOTE]
    return []


def training_share(data: PreparedData, fraction: float, seed: int, group_of: Callable[[str], str]) -> PreparedData:
    """The nested, class-stratified share of the training split that `dataset.train_fraction` keeps."""
    records = keep_training_fraction(data.records, fraction, seed, group_of)
    before, after = data.split("train"), [r for r in records if r.split == "train"]
    note = (f"train_fraction: dataset.train_fraction={fraction:g} keeps whole patients, about {fraction:g} of each "
            f"class's training images (nested for split_seed={seed}): {len(after)} of {len(before)} training images, "
            f"{_patients(after)} of {_patients(before)} patients; validation and test are complete, so this is a "
            "real result")
    return PreparedData(records=records, skipped=data.skipped, notes=[*data.notes, note])


def _patients(records: list[Record]) -> int:
    return len({r.patient_id for r in records})


def subset(data: PreparedData, limit: int, seed: int) -> PreparedData:
    """The patient-grouped subset of `limit_per_class`, taken after the split so it never moves a patient."""
    records = limit_per_class(data.records, limit, seed)
    note = (f"subset: dataset.limit_per_class={limit} keeps whole patients, up to about {limit} images per class "
            f"and split (chosen with split_seed={seed}): {len(records)} of {len(data.records)} images")
    return PreparedData(records=records, skipped=data.skipped, notes=[*data.notes, note])
