"""Where a model comes from: a hub id at a revision, or a local folder; and the record of what was loaded.

A hub id can move (a rewritten repository, a withdrawn one): each `pretrained` setting has a `revision` beside it
(a commit hash pins it), and the run folder's `models.json` records the commit the hub cache resolved the id to, or
the content hash of a local folder, so two runs that loaded different weights can be told apart. The commit is read
when the model is loaded (`note_loaded`, called by every loader right after `from_pretrained`), not when the job
ends: the hub cache's ref may have moved on in between.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from pneumo_exp.core.files import write_json_atomic
from pneumo_exp.errors import UserError

MODELS_FILE = "models.json"
LOADED: dict[tuple[str, str | None], dict] = {}  # what this process loaded, by (source, revision), until recorded


class ModelSourceError(UserError, FileNotFoundError):
    """A `pretrained` hub id or folder that cannot be loaded."""


def cannot_load(key: str, source: str, revision: str | None, error: Exception, layout: str) -> ModelSourceError:
    at = f" at revision {revision!r}" if revision else ""
    return ModelSourceError(f"no model could be loaded from {source!r}{at} ({type(error).__name__}: {error})",
                            where=key, fix=f"give a local folder ({layout}), or a hub id and revision that exist, "
                                           f"on a machine with hub access")


def folder_content_hash(folder: str | os.PathLike) -> str:
    """sha256 over the relative path and bytes of every file under `folder`, in sorted order. Computed once per
    process for a folder whose files (names, sizes, modification times) have not changed since: a job asks for its
    diffusion base's hash several times (inputs.json, the LoRA's base check, models.json)."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    listing = tuple((path.relative_to(folder).as_posix(), stat.st_size, stat.st_mtime_ns)
                    for path in files for stat in [path.stat()])
    key = (str(folder.resolve()), listing)
    if key not in FOLDER_HASHES:
        FOLDER_HASHES[key] = hash_files(folder, files)
    return FOLDER_HASHES[key]


FOLDER_HASHES: dict[tuple, str] = {}  # (folder, its files' names, sizes and times) -> content hash, per process


def hash_files(folder: Path, files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def resolved_commit(repo_id: str, revision: str | None, marker: str, cache_dir: str | None = None) -> str | None:
    """The commit of the hub cache's snapshot that `repo_id` at `revision` resolves to, or None if not cached."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, marker, cache_dir=cache_dir, revision=revision)
    if not isinstance(cached, str):
        return None
    return Path(cached).parent.name  # .../models--org--name/snapshots/<commit>/<marker>


def describe_source(source: str, revision: str | None, marker: str, cache_dir: str | None = None) -> dict:
    """What `from_pretrained(source, revision=revision)` loaded: a local folder's content hash or a hub commit."""
    if Path(source).is_dir():
        return {"source": str(Path(source).resolve()), "kind": "local folder",
                "content_sha256": folder_content_hash(source)}
    return {"source": source, "kind": "hub", "revision": revision,
            "commit": resolved_commit(source, revision, marker, cache_dir)}


def note_loaded(source: str, revision: str | None, marker: str) -> None:
    """Keep what `from_pretrained(source, revision=revision)` has just loaded, for `record_model`."""
    LOADED[(source, revision)] = describe_source(source, revision, marker)


def record_model(output_dir: str | os.PathLike, role: str, source: str, revision: str | None, marker: str) -> dict:
    """Add (or replace) the entry of `role` in the run folder's models.json: what this process loaded from `source`
    at `revision`, or, if it loaded nothing from there, what the source resolves to now (marked so); returns it."""
    path = Path(output_dir) / MODELS_FILE
    models = json.loads(path.read_text()) if path.is_file() else {}
    loaded = LOADED.pop((source, revision), None)
    models[role] = loaded or {**describe_source(source, revision, marker), "not_loaded_by_this_job": True}
    write_json_atomic(path, models)
    return models[role]
