"""Files and folders that a reader never sees half written, and the sha256 of a file."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

HASH_CHUNK_BYTES = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", **open_args) -> Iterator[IO]:
    """A handle on a temporary file beside `path` that replaces `path` when the block ends without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, mode, **open_args) as handle:
            yield handle
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    with atomic_file(path, "wb") as handle:
        handle.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def finite_or_none(payload: Any) -> Any:
    """The payload with every NaN or infinity replaced by None, so that it can be written as strict JSON."""
    if isinstance(payload, float):
        return payload if math.isfinite(payload) else None
    if isinstance(payload, dict):
        return {key: finite_or_none(value) for key, value in payload.items()}
    if isinstance(payload, (list, tuple)):
        return [finite_or_none(value) for value in payload]
    return payload


def write_json_atomic(path: str | os.PathLike, payload: Any) -> Path:
    """Strict JSON (RFC 8259): non-finite numbers are written as null."""
    return write_atomic(path, json.dumps(finite_or_none(payload), indent=2, sort_keys=False, allow_nan=False) + "\n")


def _staging_folder(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent))


def swap_folder(target: str | os.PathLike, fill: Callable[[Path], None]) -> None:
    """Build a folder with `fill(staging)` and swap it in for `target`: a crash leaves the old folder (as
    `target`, or as `target.old` between the two renames) or the new one."""
    target = Path(target)
    staging = _staging_folder(target)
    try:
        fill(staging)
        old = target.with_name(target.name + ".old")
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(target, old)
        os.rename(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build_folder_once(folder: str | os.PathLike, marker: str, build: Callable[[Path], None]) -> Path:
    """Make `folder` with `build(staging)` unless `folder/marker` exists; the staging folder is renamed into place,
    so a crash leaves nothing half-built and, of two processes building the same thing, the first rename wins."""
    folder = Path(folder)
    if (folder / marker).is_file():
        return folder
    staging = _staging_folder(folder)
    try:
        build(staging)
        os.rename(staging, folder)
    except OSError:
        if not (folder / marker).is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def remove_stale_staging(folder: str | os.PathLike) -> None:
    """Staging folders (`best.XXXX.tmp`, `last.XXXX.tmp`) that a killed process left behind in `folder`."""
    for staging in Path(folder).glob("*.tmp"):
        if staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
