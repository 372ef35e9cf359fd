"""What every run folder holds besides Hydra's `.hydra/`: the resolved config and the code version."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

from omegaconf import DictConfig, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def is_main_process() -> bool:
    """Rank 0 of a launched run (torchrun / accelerate launch set RANK), or a plain process."""
    return int(os.environ.get("RANK", "0")) == 0


def git_version() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    try:
        return {"sha": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as handle:
        handle.write(text)
    os.replace(handle.name, path)
    return path


def finite_or_none(payload: Any) -> Any:
    """The payload with every NaN or infinity replaced by None, so that it can be written as strict JSON."""
    if isinstance(payload, float):
        return payload if math.isfinite(payload) else None
    if isinstance(payload, dict):
        return {key: finite_or_none(value) for key, value in payload.items()}
    if isinstance(payload, (list, tuple)):
        return [finite_or_none(value) for value in payload]
    return payload


def json_line(row: dict) -> str:
    """One strict-JSON line of a `.jsonl` history (non-finite numbers as null), newline included."""
    return json.dumps(finite_or_none(row), allow_nan=False) + "\n"


def read_json_lines(path: str | os.PathLike) -> list[dict]:
    """The rows of a `.jsonl` history, null values read back as NaN; a line cut short by a writer still running
    (or any line that is not a JSON object) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append({key: math.nan if value is None else value for key, value in row.items()})
    return rows


def write_json_atomic(path: str | os.PathLike, payload: Any) -> Path:
    """Strict JSON (RFC 8259): non-finite numbers are written as null."""
    return write_text_atomic(path, json.dumps(finite_or_none(payload), indent=2, sort_keys=False,
                                              allow_nan=False) + "\n")


def write_run_info(cfg: DictConfig, output_dir: str | os.PathLike) -> None:
    output_dir = Path(output_dir)
    write_text_atomic(output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    write_json_atomic(output_dir / "git.json", git_version())


def build_folder_once(folder: str | os.PathLike, marker: str, build: Callable[[Path], None]) -> Path:
    """Make `folder` with `build(staging)` unless `folder/marker` exists; the staging folder is renamed into place,
    so a crash leaves nothing half-built and, of two processes building the same thing, the first rename wins."""
    folder = Path(folder)
    if (folder / marker).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", suffix=".tmp", dir=folder.parent))
    try:
        build(staging)
        os.rename(staging, folder)
    except OSError:
        if not (folder / marker).is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


# Config keys (and their sub-keys) that never change what a job computes: they neither name a sweep's job folder,
# nor split a report's configurations, nor stop a resume or the skip of a finished job when they differ.
RESULT_NEUTRAL_KEYS = ("task", "resume", "logger", "paths", "hydra", "tags", "sweep_name", "sweep_objective",
                       "report", "predict")


def shapes_result(key: str, neutral: Iterable[str] = RESULT_NEUTRAL_KEYS) -> bool:
    return not any(key == name or key.startswith(name + ".") for name in neutral)


def _dotted(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict) or not node:
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(_dotted(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def changed_settings(cfg: DictConfig, stored_file: Path) -> list[str]:
    """The keys that shape the result on which `cfg` differs from the config stored in `stored_file`. Only keys
    both configs hold count: a setting added to the schema after the stored run started is not a change the user
    made (its default reproduces the old behaviour)."""
    stored = _dotted(OmegaConf.to_container(OmegaConf.load(stored_file)))
    current = _dotted(OmegaConf.to_container(OmegaConf.create(OmegaConf.to_yaml(cfg, resolve=True))))
    return sorted(key for key in stored.keys() & current.keys()
                  if shapes_result(key) and stored[key] != current[key])


LONG_VALUE = 40
SHORT_HASH = 8


def folder_value(value: str) -> str:
    """A value as it appears in a job folder's name: paths and long values become a readable tail plus a short
    hash of the whole value, so that two values never share a folder and the name stays short."""
    if "/" not in value and "\\" not in value and len(value) <= LONG_VALUE:
        return value
    tail = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(value.rstrip("/")).name or "root")[-24:]
    return f"{tail}-{hashlib.sha256(value.encode()).hexdigest()[:SHORT_HASH]}"


def override_key(override: str) -> str:
    """`+a.b=1`, `~a.b`, `a.b@pkg=x` -> `a.b`."""
    return override.partition("=")[0].lstrip("+~").split("@")[0]


MAX_FOLDER_NAME = 200  # file systems refuse names over 255 bytes


def job_folder_name(overrides: Iterable[str]) -> str:
    """A sweep job's folder: its overrides that shape the result as written (as Hydra's override_dirname), sorted
    and joined by ','; a path or long value as `folder_value` shortens it, and a name too long for the file system
    keeps its head and ends in a short hash of the whole."""
    items = []
    for override in map(str, overrides):
        if shapes_result(override_key(override)):
            key, sep, value = override.partition("=")
            items.append(key + sep + folder_value(value) if sep else override)
    name = ",".join(sorted(items)) or "defaults"
    if len(name.encode()) <= MAX_FOLDER_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:SHORT_HASH]
    head = name.encode()[:MAX_FOLDER_NAME - SHORT_HASH - 1].decode(errors="ignore")
    return f"{head}-{digest}"
