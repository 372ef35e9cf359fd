"""The Kermany pediatric chest X-ray dataset, read from any of the layouts it is distributed in.

Layouts recognised under the root (a folder, a folder holding ``chest_xray/``, or a ``.zip`` of either):

* ``kaggle``: ``chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg``; ``val/`` (16 training images) is folded
  back into train.
* ``mendeley``: ``chest_xray/{train,test}/{NORMAL,PNEUMONIA}`` (ChestXRay2017.zip).
* ``class-folders``: ``{train,test}/{NORMAL,BACTERIA,VIRUS}/*.jpg`` (like ``shared/data/kermany-224``).

Pneumonia images become BACTERIA or VIRUS by the ``_bacteria_`` / ``_virus_`` token of their file name. Patient
keys: ``person123_bacteria_456`` -> ``person123`` (``personN`` alone, across classes: the cautious key),
``IM-0115-0001`` -> ``IM-0115``, ``NORMAL2-IM-0012-0001`` -> ``NORMAL2-IM-0012``.
Archive junk (``__MACOSX/``, ``._*``, ``.DS_Store`` and other dot-files) is ignored silently. A zip is extracted
safely into a content-addressed cache folder and reused; the zip and the source folders are never modified.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePath

from pneumo_exp.data.files import (
    Problems,
    checked_sha256,
    is_junk,
    require_image_suffix,
    subfolders_by_name,
    usable_records,
)
from pneumo_exp.data.images import IMAGE_SUFFIXES, MIN_IMAGE_SIDE
from pneumo_exp.data.manifest import DatasetError, Record
from pneumo_exp.data.zip_import import MAX_COMPRESSION_RATIO, MAX_EXTRACT_BYTES, extract_zip
from pneumo_exp.labels import CLASSES

log = logging.getLogger(__name__)

KAGGLE, MENDELEY, CLASS_FOLDERS = "kaggle", "mendeley", "class-folders"
PNEUMONIA = "PNEUMONIA"

_NORMAL_NAME = re.compile(r"^(?P<patient>(?:NORMAL\d*-)?IM-\d+)-\d+(?:-\d+)*$", re.IGNORECASE)
_PNEUMONIA_NAME = re.compile(r"^person(?P<number>\d+)_(?:bacteria|virus)_\d+(?:_\d+)*$", re.IGNORECASE)
_PNEUMONIA_TOKEN = re.compile(r"_(bacteria|virus)_", re.IGNORECASE)
_EXPECTED_NAMES = ("personN_bacteria_K / personN_virus_K (pneumonia) or IM-XXXX-YYYY / NORMAL2-IM-XXXX-YYYY "
                   "(normal), with an image suffix")


# ---------------------------------------------------------------------------------------------------------------
# File names: labels and patient keys


def label_from_name(file_name: str, folder: str) -> str:
    """The class of an image from its class folder and, for pneumonia, the token in its name.

    ``folder`` is NORMAL, PNEUMONIA, BACTERIA or VIRUS (any case). In a BACTERIA/VIRUS folder the name must agree.
    ``file_name`` may be a path; errors quote it as given.
    """
    folder_class = PurePath(folder).name.upper()
    named = _named_class(file_name)
    if folder_class == "NORMAL":
        if named is not None:
            raise DatasetError(f"{file_name}: name says {named} but the file is in a NORMAL folder")
        return "NORMAL"
    if folder_class == PNEUMONIA:
        if named is None:
            raise DatasetError(f"{file_name}: pneumonia image whose name has neither _bacteria_ nor _virus_, "
                               f"so bacterial and viral cannot be told apart; expected {_EXPECTED_NAMES}")
        return named
    if folder_class in ("BACTERIA", "VIRUS"):
        if named != folder_class:
            says = f"says {named}" if named else f"lacks the _{folder_class.lower()}_ token"
            raise DatasetError(f"{file_name}: name {says} but the file is in a {folder_class} folder")
        return folder_class
    raise DatasetError(f"{file_name}: unknown class folder {folder!r}; expected NORMAL, PNEUMONIA, BACTERIA or VIRUS")


def patient_key(file_name: str, label: str) -> str:
    """The patient an image belongs to, from its file name (``file_name`` may be a path).

    Pneumonia patients are numbered per class (``person5_virus`` and ``person5_bacteria`` are different children:
    train and test share 170 numbers but never a number within one class), so the key is number plus class.
    Validation is carved more cautiously, by number alone: see `split_group`.
    """
    stem = _stem(file_name)
    if label == "NORMAL":
        match = _NORMAL_NAME.match(stem)
        if match:
            return match["patient"].upper()
    elif label in ("BACTERIA", "VIRUS"):
        match = _PNEUMONIA_NAME.match(stem)
        if match:
            return f"person{match['number']}_{label.lower()}"
    else:
        raise ValueError(f"unknown class label {label!r}; expected one of {', '.join(CLASSES)}")
    raise DatasetError(f"{file_name}: unrecognised {label} file name; expected {_EXPECTED_NAMES}")


def _named_class(file_name: str) -> str | None:
    tokens = {token.upper() for token in _PNEUMONIA_TOKEN.findall(_stem(file_name))}
    if len(tokens) > 1:
        raise DatasetError(f"{file_name}: name has both _bacteria_ and _virus_")
    return tokens.pop() if tokens else None


def _stem(file_name: str) -> str:
    name = PurePath(file_name).name
    stem, suffix = os.path.splitext(name)
    return stem if suffix.lower() in IMAGE_SUFFIXES else name


# ---------------------------------------------------------------------------------------------------------------
# The dataset


def kermany_records(root: str | os.PathLike, skip_bad_images: bool = False, check_images: bool = True,
                    extract_dir: str | os.PathLike | None = None, max_extract_bytes: int = MAX_EXTRACT_BYTES,
                    max_compression_ratio: float = MAX_COMPRESSION_RATIO,
                    min_image_side: int = MIN_IMAGE_SIDE) -> tuple[list[Record], list[str]]:
    """Records (split train/test, sha256 of each file) of the Kermany dataset under ``root``, and skip messages.

    ``root`` is a folder in one of the module's layouts, a folder holding ``chest_xray/``, or a ``.zip`` of either
    (extracted under ``extract_dir`` within the two limits, see :func:`extract_zip`). Every file is checked:
    name, label, patient key and, when ``check_images``, the image itself (:func:`check_image`, with its shorter
    side at least ``min_image_side``; without it only empty files and files that are not regular files are caught).
    Bad files raise one DatasetError listing them, or with ``skip_bad_images`` are left out with one message each.
    Structural problems (missing root, unknown layout, a class folder with no usable image) always raise.
    """
    root = Path(os.path.abspath(root))
    if not root.exists():
        raise DatasetError("Kermany dataset root does not exist", str(root),
                           "set dataset.root to the chest_xray folder, its parent, or the dataset's .zip")
    if root.is_file() and extract_dir is None:
        raise DatasetError("a .zip dataset needs a folder to be extracted into", str(root), "set dataset.extract_dir")
    folder = extract_zip(root, extract_dir, max_extract_bytes, max_compression_ratio) if root.is_file() else root
    layout = find_layout(folder)
    log.info("%s", layout.describe())
    problems = Problems(skip_bad_images)
    records = []
    for split, folder_class, class_folder in layout.class_folders:
        records += usable_records(class_folder, problems, lambda file, folder_class=folder_class, split=split: _record(
            file, folder_class, split, check_images, min_image_side))
    problems.raise_if_any(f"Kermany dataset at {layout.root}")
    records.sort(key=lambda r: (("train", "test").index(r.split), CLASSES.index(r.label), r.path))
    return records, problems.skipped


def _record(file: Path, folder_class: str, split: str, check_images: bool, min_image_side: int) -> Record:
    require_image_suffix(file)
    label = label_from_name(str(file), folder_class)
    patient = patient_key(str(file), label)
    digest = checked_sha256(file, check_images, min_image_side)
    return Record(path=str(file), label=label, patient_id=patient, split=split, sha256=digest)


@dataclass(frozen=True)
class Layout:
    """A recognised layout: its name, the folder holding the splits, and (record split, class, folder) triples."""
    name: str
    root: Path
    class_folders: tuple[tuple[str, str, Path], ...]

    def describe(self) -> str:
        shapes = {KAGGLE: "Kaggle layout {train,val,test}/{NORMAL,PNEUMONIA}",
                  MENDELEY: "Mendeley layout {train,test}/{NORMAL,PNEUMONIA}",
                  CLASS_FOLDERS: "class-folder layout {train,test}/{NORMAL,BACTERIA,VIRUS}"}
        has_val = any(folder.parent.name.lower() == "val" for _, _, folder in self.class_folders)
        return f"found the {shapes[self.name]} at {self.root}" + ("; val/ folded into train" if has_val else "")


def find_layout(folder: str | os.PathLike) -> Layout:
    """Detect which layout ``folder`` (or a ``chest_xray/`` or single wrapper folder inside it) holds."""
    base = _dataset_base(Path(folder))
    splits = subfolders_by_name(base, str.lower)
    if "train" in splits and "test" in splits:
        split_names = [name for name in ("train", "val", "test") if name in splits]
        classes = {name: subfolders_by_name(splits[name], str.upper) for name in split_names}
        for layout_name, wanted in ((KAGGLE, {"NORMAL", PNEUMONIA}), (CLASS_FOLDERS, set(CLASSES))):
            if all(set(found) == wanted for found in classes.values()):
                if layout_name == KAGGLE and "val" not in splits:
                    layout_name = MENDELEY
                triples = tuple(("test" if split == "test" else "train", name, classes[split][name])
                                for split in split_names for name in sorted(classes[split]))
                return Layout(layout_name, base, triples)
        found = "; ".join(f"{split}/ has {', '.join(sorted(names)) or 'no folders'}"
                          for split, names in classes.items())
    else:
        found = f"{base} has {', '.join(sorted(splits)) or 'no folders'}"
    raise DatasetError(f"no recognised Kermany layout under {folder}: looked for train/ and test/ (and optionally "
                       f"val/), directly or inside chest_xray/, each holding NORMAL+PNEUMONIA (Kaggle/Mendeley) or "
                       f"NORMAL+BACTERIA+VIRUS (class folders); found: {found}")


def _dataset_base(folder: Path, max_depth: int = 3) -> Path:
    """Step into ``chest_xray/`` or a lone wrapper folder until train/ and test/ are in sight."""
    for _ in range(max_depth):
        children = subfolders_by_name(folder, str.lower)
        if "train" in children and "test" in children:
            break
        if "chest_xray" in children:
            folder = children["chest_xray"]
        elif len(children) == 1 and not any(p.is_file() and not is_junk(p) for p in folder.iterdir()):
            folder = next(iter(children.values()))  # a lone wrapper folder, e.g. ChestXRay2017/
        else:
            break
    return folder


def split_group(patient_id: str) -> str:
    """The unit kept on one side when validation is carved: ``person5`` for both ``person5_virus`` and
    ``person5_bacteria``, the patient itself for normals."""
    return patient_id.rsplit("_", 1)[0] if patient_id.startswith("person") else patient_id


def split_notes(records: list[Record]) -> list[str]:
    """Facts about the official split worth printing beside the leakage check."""
    groups_per_split: dict[str, set[str]] = {}
    for record in records:
        groups_per_split.setdefault(record.split, set()).add(split_group(record.patient_id))
    shared = groups_per_split.get("test", set()) & (groups_per_split.get("train", set()) |
                                                    groups_per_split.get("val", set()))
    if not shared:
        return []
    return [f"{len(shared)} personN numbers occur in both the official train and test splits, always with "
            f"different classes (numbering is per class), so no patient is shared; validation is grouped by "
            f"number alone"]
