"""Any labelled image collection: a ``{split}/{class}/image`` tree or a CSV manifest.

Tree: split folders ``train``, ``val``, ``test`` (any subset, any case); class folders named like ``labels.CLASSES``
(any case) or by an alias from ``class_aliases``. A tree carries no patient information, so each image is its own
patient (patient_id = its path under the root, unique per split and class): images are not grouped by patient, and
``train/NORMAL/1.png`` and ``test/NORMAL/1.png`` are two patients. Use a CSV manifest when patients matter.

CSV manifest: columns ``path,label,patient_id,split`` (optionally ``source``, ``sha256``); relative paths are
resolved against the CSV's folder; labels go through the same case-insensitive alias lookup; a non-empty
``sha256`` cell must match the file. Errors name the CSV row.

Bad files are handled as in :mod:`pneumo_exp.data.kermany`: one DatasetError listing them, or skipped with one
message each when ``skip_bad_images``. Files are only read.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import replace
from pathlib import Path

from pneumo_exp.data.files import (
    Problems,
    checked_sha256,
    listed,
    require_image_suffix,
    subfolders_by_name,
    usable_records,
)
from pneumo_exp.data.images import MIN_IMAGE_SIDE, BadImageError, readable_file
from pneumo_exp.data.manifest import SPLITS, DatasetError, Record, validate
from pneumo_exp.labels import CLASSES

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("path", "label", "patient_id", "split")
TREE_PATIENTS_NOTE = ("no patient ids: give a manifest with patient_id for a grouped split (in a folder tree each "
                      "image counts as its own patient)")


def folder_records(root: str | os.PathLike | None = None, manifest: str | os.PathLike | None = None,
                   skip_bad_images: bool = False, check_images: bool = True,
                   class_aliases: dict[str, str] | None = None,
                   min_image_side: int = MIN_IMAGE_SIDE) -> tuple[list[Record], list[str]]:
    """Records of a labelled folder tree (``root``) or of a CSV manifest (``manifest``), and skip messages.

    Exactly one of ``root`` and ``manifest`` is given. ``class_aliases`` maps extra folder names or labels
    (matched case-insensitively) to a class, e.g. ``{"bacterial": "BACTERIA", "viral": "VIRUS"}``.
    """
    if (root is None) == (manifest is None):
        raise ValueError("give exactly one of root= (a split/class folder tree) or manifest= (a CSV file)")
    lookup = class_lookup(class_aliases)
    problems = Problems(skip_bad_images)
    if root is not None:
        records = _tree_records(Path(os.path.abspath(root)), lookup, check_images, min_image_side, problems)
    else:
        records = _manifest_records(Path(os.path.abspath(manifest)), lookup, check_images, min_image_side, problems)
    records.sort(key=lambda r: (SPLITS.index(r.split), CLASSES.index(r.label), r.path))
    return records, problems.skipped


def class_lookup(class_aliases: dict[str, str] | None) -> dict[str, str]:
    """Lower-cased folder name or label -> class, from CLASSES and the aliases."""
    lookup = {name.lower(): name for name in CLASSES}
    for alias, target in (class_aliases or {}).items():
        if target not in CLASSES:
            raise DatasetError(f"{alias!r} maps to {target!r}, not one of {', '.join(CLASSES)}",
                               "dataset.class_aliases", "map each folder name or label to one of the classes")
        if lookup.get(alias.lower(), target) != target:
            raise DatasetError(f"{alias!r} -> {target!r} contradicts class {lookup[alias.lower()]!r}",
                               "dataset.class_aliases", "remove the alias: a class's own name always means that class")
        lookup[alias.lower()] = target
    return lookup


# ---------------------------------------------------------------------------------------------------------------
# {split}/{class}/image trees


def _tree_records(root: Path, lookup: dict[str, str], check_images: bool, min_image_side: int,
                  problems: Problems) -> list[Record]:
    if not root.exists():
        raise DatasetError("image folder does not exist", str(root),
                           "set dataset.root to a {split}/{class}/image folder")
    if not root.is_dir():
        raise DatasetError("not a folder", str(root), "set dataset.root to a {split}/{class}/image folder, or give a "
                                                      "CSV as dataset.manifest")
    folders = subfolders_by_name(root, str.lower)
    splits = {name: path for name, path in folders.items() if name in SPLITS}
    if not splits:
        raise DatasetError(f"no split folders in {root}: looked for {', '.join(SPLITS)} (any case) holding class "
                           f"folders; found {', '.join(sorted(folders)) or 'no folders'}")
    ignored = sorted(set(folders) - set(splits))
    if ignored:
        log.warning("%s: ignoring folder(s) that are not splits: %s", root, ", ".join(ignored))
    records = []
    for split in (name for name in SPLITS if name in splits):
        for label, class_folder in _class_folders(splits[split], lookup).items():
            records += usable_records(class_folder, problems, lambda file, label=label, split=split: _tree_record(
                root, file, label, split, check_images, min_image_side))
    problems.raise_if_any(f"image folder {root}")
    return records


def _class_folders(split_folder: Path, lookup: dict[str, str]) -> dict[str, Path]:
    by_class: dict[str, Path] = {}
    for name, folder in subfolders_by_name(split_folder, str.lower).items():
        if name not in lookup:
            hint = "; a Kermany NORMAL/PNEUMONIA tree is read by kermany_records" if name == "pneumonia" else ""
            raise DatasetError(f"{folder}: class folder {folder.name!r} is not a known class; expected "
                               f"{', '.join(CLASSES)} (any case) or a key of class_aliases{hint}")
        label = lookup[name]
        if label in by_class:
            raise DatasetError(f"{split_folder}: folders {by_class[label].name!r} and {folder.name!r} are both "
                               f"class {label}")
        by_class[label] = folder
    if not by_class:
        raise DatasetError(f"split folder {split_folder} has no class folders")
    return by_class


def _tree_record(root: Path, file: Path, label: str, split: str, check_images: bool, min_image_side: int) -> Record:
    require_image_suffix(file)
    digest = checked_sha256(file, check_images, min_image_side)
    return Record(path=str(file), label=label, patient_id=file.relative_to(root).as_posix(), split=split,
                  sha256=digest)


# ---------------------------------------------------------------------------------------------------------------
# CSV manifests


def _manifest_records(csv_path: Path, lookup: dict[str, str], check_images: bool, min_image_side: int,
                      problems: Problems) -> list[Record]:
    rows = _read_rows(csv_path)
    listed_records = [_listed_record(csv_path, row_number, row, lookup) for row_number, row in rows]
    validate(listed_records, where=f"manifest {csv_path}")
    _require_unique_paths(csv_path, rows, listed_records)
    records = []
    for (row_number, _), record in zip(rows, listed_records):
        try:
            digest = _checked_listed_file(record, check_images, min_image_side)
        except (DatasetError, BadImageError) as error:
            problems.add(f"manifest {csv_path} row {row_number}: {error}")
        else:
            records.append(replace(record, sha256=digest))
    problems.raise_if_any(f"manifest {csv_path}")
    if not records:
        raise DatasetError("no usable row: every row was skipped", f"manifest {csv_path}",
                           "repair these files or their rows:" + listed(problems.messages))
    return records


def _read_rows(csv_path: Path) -> list[tuple[int, dict[str, str]]]:
    if not csv_path.is_file():
        raise DatasetError("manifest does not exist", str(csv_path),
                           "set dataset.manifest to a CSV with columns path,label,patient_id,split")
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = set(REQUIRED_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise DatasetError(f"manifest {csv_path}: missing column(s) {', '.join(sorted(missing))}; "
                               f"expected {', '.join(REQUIRED_COLUMNS)} (optionally source, sha256)")
        rows = [(reader.line_num, row) for row in reader]
    if not rows:
        raise DatasetError(f"manifest {csv_path} has no rows")
    return rows


def _listed_record(csv_path: Path, row_number: int, row: dict[str, str], lookup: dict[str, str]) -> Record:
    if not row.get("path"):
        raise DatasetError(f"manifest {csv_path}: row {row_number}: empty path")
    label = row.get("label") or ""
    return Record(path=str(csv_path.parent / row["path"]), label=lookup.get(label.lower(), label),
                  patient_id=row.get("patient_id") or "", split=row.get("split") or "",
                  source=row.get("source") or "real", sha256=(row.get("sha256") or "").lower())


def _require_unique_paths(csv_path: Path, rows: list[tuple[int, dict]], records: list[Record]) -> None:
    first_row: dict[str, int] = {}
    for (row_number, _), record in zip(rows, records):
        key = os.path.normpath(record.path)
        if key in first_row:
            raise DatasetError(f"manifest {csv_path}: row {row_number} ({record.path}) repeats the file of row "
                               f"{first_row[key]}")
        first_row[key] = row_number


def _checked_listed_file(record: Record, check_images: bool, min_image_side: int) -> str:
    file = readable_file(record.path)
    require_image_suffix(file)
    digest = checked_sha256(file, check_images, min_image_side)
    if record.sha256 and record.sha256 != digest:
        raise DatasetError(f"{file}: sha256 is {digest}, the manifest says {record.sha256}")
    return digest
