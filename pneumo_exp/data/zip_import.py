"""Safe, content-addressed extraction of a dataset .zip: every member checked before anything is written, a zip bomb
refused, the folder renamed into place when complete and reused afterwards."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path, PurePath

from pneumo_exp.core.files import sha256_file
from pneumo_exp.data.files import is_junk
from pneumo_exp.data.manifest import DatasetError

log = logging.getLogger(__name__)

EXTRACTION_MARKER = ".pneumo_exp-extracted.json"
MAX_EXTRACT_BYTES = 20_000_000_000  # the Mendeley zip inflates to about 1.2 GB
MAX_COMPRESSION_RATIO = 200.0  # JPEGs barely compress; a zip bomb's members inflate about 1000x


def extract_zip(zip_path: str | os.PathLike, extract_dir: str | os.PathLike,
                max_extract_bytes: int = MAX_EXTRACT_BYTES,
                max_compression_ratio: float = MAX_COMPRESSION_RATIO) -> Path:
    """Extract ``zip_path`` into ``<extract_dir>/<first 16 hex of its sha256>/`` and return that folder.

    Every member is checked before anything is written: absolute paths, ``..`` components, symlinks, special files,
    encrypted or duplicate members are refused with an error naming the member, and so is an archive that would
    inflate to more than ``max_extract_bytes`` in all, more than the free disk space, or has a member inflating more
    than ``max_compression_ratio`` times (a zip bomb); a member that inflates past its declared size is stopped.
    Files go into a fresh temporary folder next to the target, which is renamed into place when complete; a complete
    earlier extraction is reused; an existing incomplete or altered one is an error, never overwritten. Junk members
    (``__MACOSX/``, ``._*``, ``.DS_Store``) are not written.
    """
    zip_path = Path(zip_path)
    if zip_path.suffix.lower() != ".zip" or not zipfile.is_zipfile(zip_path):
        raise DatasetError(f"{zip_path} is neither a folder nor a valid .zip archive")
    digest = sha256_file(zip_path)
    parent = Path(os.path.abspath(extract_dir))
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
