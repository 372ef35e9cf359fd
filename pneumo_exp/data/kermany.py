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

import json
import logging
import os
import re
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePath

from pneumo_exp.data.images import (IMAGE_SUFFIXES, MIN_IMAGE_SIDE, BadImageError, check_image, readable_file,
                                    sha256_file)
from pneumo_exp.data.manifest import DatasetError, Record
from pneumo_exp.labels import CLASSES

log = logging.getLogger(__name__)

KAGGLE, MENDELEY, CLASS_FOLDERS = "kaggle", "mendeley", "class-folders"
PNEUMONIA = "PNEUMONIA"
JUNK_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})
EXTRACTION_MARKER = ".pneumo_exp-extracted.json"
MAX_EXTRACT_BYTES = 20_000_000_000  # the Mendeley zip inflates to about 1.2 GB
MAX_COMPRESSION_RATIO = 200.0  # JPEGs barely compress; a zip bomb's members inflate about 1000x
MAX_LISTED_PROBLEMS = 20

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
    folder = extract_zip(root, extract_dir, max_extract_bytes, max_compression_ratio) if root.is_file() else root
    layout = find_layout(folder)
    log.info("%s", layout.describe())
    problems = Problems(skip_bad_images)
    records = []
    for split, folder_class, class_folder in layout.class_folders:
        records += usable_records(class_folder, problems, lambda file: _record(
            file, folder_class, split, check_images, min_image_side, problems))
    problems.raise_if_any(f"Kermany dataset at {layout.root}")
    records.sort(key=lambda r: (("train", "test").index(r.split), CLASSES.index(r.label), r.path))
    return records, problems.skipped


def _record(file: Path, folder_class: str, split: str, check_images: bool, min_image_side: int,
            problems: Problems) -> Record | None:
    try:
        require_image_suffix(file)
        label = label_from_name(str(file), folder_class)
        patient = patient_key(str(file), label)
        digest = checked_sha256(file, check_images, min_image_side)
    except (DatasetError, BadImageError) as error:
        problems.add(str(error))
        return None
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


# ---------------------------------------------------------------------------------------------------------------
# Helpers shared with folder.py


class Problems:
    """Collects bad-file messages: skipped with a message, or raised together at the end."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.messages: list[str] = []

    def add(self, message: str) -> None:
        self.messages.append(message)

    @property
    def skipped(self) -> list[str]:
        return [f"skipped {message}" for message in self.messages] if self.skip else []

    def raise_if_any(self, where: str) -> None:
        if self.messages and not self.skip:
            raise DatasetError(f"{len(self.messages)} bad file(s)", where, "repair or remove them, or set "
                               "dataset.skip_bad_images=true to leave them out (listed in skipped.txt):"
                               + listed(self.messages))


def listed(messages: list[str]) -> str:
    """One indented line per message, at most MAX_LISTED_PROBLEMS of them."""
    more = len(messages) - MAX_LISTED_PROBLEMS
    return "".join(f"\n  {message}" for message in messages[:MAX_LISTED_PROBLEMS]) + (
        f"\n  ... and {more} more" if more > 0 else "")


def is_junk(path: PurePath) -> bool:
    """Archive and desktop litter: ``__MACOSX``, ``._*``, ``.DS_Store`` and other dot-files."""
    return path.name.startswith(".") or path.name in JUNK_NAMES


def subfolders_by_name(folder: Path, normalise) -> dict[str, Path]:
    """Sub-folders keyed by normalised name (e.g. upper-cased); junk ignored; names equal once normalised fail."""
    found: dict[str, Path] = {}
    for child in sorted(folder.iterdir()):
        if child.is_dir() and not is_junk(child):
            key = normalise(child.name)
            if key in found:
                raise DatasetError(f"{folder}: folders {found[key].name!r} and {child.name!r} differ only in case")
            found[key] = child
    return found


def image_entries(class_folder: Path) -> list[Path]:
    """Everything (junk aside) in a class folder, sorted; an empty class folder is an error."""
    entries = sorted(entry for entry in class_folder.iterdir() if not is_junk(entry))
    if not entries:
        raise DatasetError(f"empty class folder {class_folder}")
    return entries


def usable_records(class_folder: Path, problems: Problems, read: Callable[[Path], Record | None]) -> list[Record]:
    """The records ``read`` makes of a class folder's files; a folder with none fails, giving each file's reason."""
    first_problem = len(problems.messages)
    records = [record for record in map(read, image_entries(class_folder)) if record is not None]
    if not records:
        reasons = problems.messages[first_problem:]
        raise DatasetError(f"no usable image among the {len(reasons)} file(s) of the class folder", str(class_folder),
                           "replace them with readable images named as expected:" + listed(reasons))
    return records


def require_image_suffix(file: Path) -> None:
    if file.is_dir():
        raise DatasetError(f"{file}: unexpected folder inside a class folder")
    if file.suffix.lower() not in IMAGE_SUFFIXES:
        raise DatasetError(f"{file}: not an image file (suffix {file.suffix or 'none'!r}); "
                           f"expected one of {', '.join(IMAGE_SUFFIXES)}")


def checked_sha256(file: Path, check_images: bool, min_image_side: int = MIN_IMAGE_SIDE) -> str:
    """SHA-256 of the file after checking it is an image (or, without checks, at least a non-empty regular file)."""
    if check_images:
        check_image(file, min_side=min_image_side)
    else:
        readable_file(file)
    return sha256_file(file)


# ---------------------------------------------------------------------------------------------------------------
# Zip archives


def default_extract_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "pneumo_exp" / "extracted"


def extract_zip(zip_path: str | os.PathLike, extract_dir: str | os.PathLike | None = None,
                max_extract_bytes: int = MAX_EXTRACT_BYTES,
                max_compression_ratio: float = MAX_COMPRESSION_RATIO) -> Path:
    """Extract ``zip_path`` into ``<extract_dir>/<first 16 hex of its sha256>/`` and return that folder.

    ``extract_dir`` defaults to ``$XDG_CACHE_HOME/pneumo_exp/extracted`` (``~/.cache/...``). Every member is checked
    before anything is written: absolute paths, ``..`` components, symlinks, special files, encrypted or duplicate
    members are refused with an error naming the member, and so is an archive that would inflate to more than
    ``max_extract_bytes`` in all, more than the free disk space, or has a member inflating more than
    ``max_compression_ratio`` times (a zip bomb); a member that inflates past its declared size is stopped. Files
    go into a fresh temporary folder next to the target, which is renamed into place when complete; a complete
    earlier extraction is reused; an existing incomplete or altered one is an error, never overwritten. Junk members
    (``__MACOSX/``, ``._*``, ``.DS_Store``) are not written.
    """
    zip_path = Path(zip_path)
    if zip_path.suffix.lower() != ".zip" or not zipfile.is_zipfile(zip_path):
        raise DatasetError(f"{zip_path} is neither a folder nor a valid .zip archive")
    digest = sha256_file(zip_path)
    parent = Path(os.path.abspath(extract_dir if extract_dir is not None else default_extract_dir()))
    target = parent / digest[:16]
    with zipfile.ZipFile(zip_path) as archive:
        members = _safe_members(zip_path, archive.infolist())
        _require_within_bounds(zip_path, members, max_extract_bytes, max_compression_ratio)
        if target.exists():
            _require_complete(target, zip_path, digest, members)
            return target
        _require_free_space(zip_path, parent, sum(info.file_size for info in members.values()))
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{digest[:16]}-", suffix=".partial", dir=parent))
        try:
            for relative, info in members.items():
                _extract_member(archive, info, staging / relative, zip_path)
            _write_marker(staging, digest, members)
            moved = _move_into_place(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    if not moved:  # another process finished first: use its copy
        shutil.rmtree(staging, ignore_errors=True)
        _require_complete(target, zip_path, digest, members)
    log.info("extracted %s into %s", zip_path, target)
    return target


def _safe_members(zip_path: Path, infos: Iterable[zipfile.ZipInfo]) -> dict[str, zipfile.ZipInfo]:
    """Relative path -> member for every non-junk member; raises on the first unsafe member."""
    members: dict[str, zipfile.ZipInfo] = {}
    seen: set[str] = set()
    for info in infos:
        name = info.filename
        problem = _member_problem(info)
        if problem:
            raise DatasetError(f"{zip_path}: refusing unsafe member {name!r}: {problem}; nothing was extracted")
        parts = [part for part in re.split(r"[\\/]+", name) if part not in ("", ".")]
        if not parts or any(is_junk(PurePath(part)) for part in parts):
            continue
        relative = "/".join(parts)
        if relative in seen and not info.is_dir():
            raise DatasetError(f"{zip_path}: member {name!r} appears more than once")
        seen.add(relative)
        members[relative] = info
    return members


def _member_problem(info: zipfile.ZipInfo) -> str | None:
    name = info.filename
    parts = re.split(r"[\\/]+", name)
    file_type = stat.S_IFMT(info.external_attr >> 16)
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    if ".." in parts:
        return "'..' path component"
    if file_type == stat.S_IFLNK:
        return "symbolic link"
    if file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
        return "special file"
    if info.flag_bits & 0x1:
        return "encrypted member"
    return None


def _require_within_bounds(zip_path: Path, members: dict[str, zipfile.ZipInfo], max_bytes: int,
                           max_ratio: float) -> None:
    """Refuse a zip bomb from its declared sizes (extraction stops any member that exceeds its declared size)."""
    total = sum(info.file_size for info in members.values())
    if total > max_bytes:
        raise DatasetError(f"the archive would inflate to {total:,} bytes, more than dataset.max_extract_bytes="
                           f"{max_bytes:,}", str(zip_path),
                           "nothing was extracted; raise dataset.max_extract_bytes if you trust the archive")
    for info in members.values():
        ratio = info.file_size / max(info.compress_size, 1)
        if ratio > max_ratio:
            raise DatasetError(f"member {info.filename!r} would inflate {ratio:,.0f} times ({info.compress_size:,} "
                               f"to {info.file_size:,} bytes), more than dataset.max_compression_ratio={max_ratio:g}",
                               str(zip_path), "nothing was extracted; this looks like a zip bomb: raise "
                               "dataset.max_compression_ratio only if you trust the archive")


def _require_free_space(zip_path: Path, parent: Path, needed: int) -> None:
    existing = next(folder for folder in (parent, *parent.parents) if folder.exists())
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise DatasetError(f"extracting needs {needed:,} bytes but {existing} has only {free:,} free", str(zip_path),
                           "nothing was extracted; free some space or set dataset.extract_dir to a disk with room")


def _extract_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, destination: Path, zip_path: Path) -> None:
    if info.is_dir():
        destination.mkdir(parents=True, exist_ok=True)
        return
    destination.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    try:
        with archive.open(info) as source, open(destination, "xb") as sink:
            for chunk in iter(lambda: source.read(1 << 20), b""):
                written += len(chunk)
                if written > info.file_size:
                    raise DatasetError(f"{zip_path}: member {info.filename!r} is larger than its declared size")
                sink.write(chunk)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError) as error:
        raise DatasetError(f"{zip_path}: cannot extract member {info.filename!r}: {error}") from error


def _write_marker(folder: Path, digest: str, members: dict[str, zipfile.ZipInfo]) -> None:
    files = {relative: info.file_size for relative, info in members.items() if not info.is_dir()}
    (folder / EXTRACTION_MARKER).write_text(json.dumps({"zip_sha256": digest, "files": files}))


def _move_into_place(staging: Path, target: Path) -> bool:
    """Rename atomically; False when ``target`` appeared meanwhile (the rename never replaces a non-empty folder)."""
    try:
        os.rename(staging, target)
    except OSError:
        if not target.exists():
            raise
        return False
    return True


def _require_complete(target: Path, zip_path: Path, digest: str, members: dict[str, zipfile.ZipInfo]) -> None:
    """Reuse an earlier extraction only if its marker matches the zip and every file is there at its size."""
    marker = target / EXTRACTION_MARKER
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        recorded = {}
    missing = [relative for relative, info in members.items() if not info.is_dir()
               and not ((target / relative).is_file() and (target / relative).stat().st_size == info.file_size)]
    if recorded.get("zip_sha256") != digest or missing:
        detail = f"{len(missing)} file(s) missing or changed, e.g. {missing[0]}" if missing else "no valid marker"
        raise DatasetError(f"{target} exists but is not a complete extraction of {zip_path} ({detail}); "
                           f"it is left untouched: remove it to extract again")


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
