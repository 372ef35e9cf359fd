"""File-level checks shared by the dataset readers (kermany.py, folder.py): junk names, class folders, image
suffixes, checked hashes, and bad-file messages collected to be skipped or raised together."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path, PurePath

from pneumo_exp.core.files import sha256_file
from pneumo_exp.data.images import IMAGE_SUFFIXES, MIN_IMAGE_SIDE, BadImageError, check_image, readable_file
from pneumo_exp.data.manifest import DatasetError, Record

JUNK_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})
MAX_LISTED_PROBLEMS = 20


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


def usable_records(class_folder: Path, problems: Problems, read: Callable[[Path], Record]) -> list[Record]:
    """The records ``read`` makes of a class folder's files; a file it refuses (DatasetError, BadImageError) is a
    problem; a folder with no record fails, giving each file's reason."""
    first_problem = len(problems.messages)
    records = []
    for file in image_entries(class_folder):
        try:
            records.append(read(file))
        except (DatasetError, BadImageError) as error:
            problems.add(str(error))
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
