"""What every run folder holds besides Hydra's `.hydra/`: the resolved config and the code version."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import subprocess
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf

from pneumo_exp.config import JobConfig
from pneumo_exp.core.files import write_atomic, write_json_atomic

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def is_main_process() -> bool:
    """Rank 0 of a launched run (torchrun / accelerate launch set RANK), or a plain process."""
    return int(os.environ.get("RANK", "0")) == 0


def process_count() -> int:
    """The processes of a launched run (torchrun / accelerate launch set WORLD_SIZE), or 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def recorded_processes(results: dict) -> int:
    """The process count a results.json records; one for results written before it was recorded (a plain launch,
    the schema's default as for any key an older run lacks)."""
    return int(results.get("processes", 1))


def not_a_result(capped: dict, limit_per_class: int | None) -> list[str]:
    """Why a run's test metrics are no result (none: they are): a capped test split, a subset of the dataset."""
    reasons = []
    if "test" in capped:
        reasons.append(f"test split capped to {capped['test']['evaluated']} of {capped['test']['available']} images "
                       "(trainer.max_eval_batches with trainer.cap_test)")
    if limit_per_class is not None:
        reasons.append(f"a subset of the dataset (dataset.limit_per_class={limit_per_class})")
    return reasons


def git_version() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    try:
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        return {"sha": git("rev-parse", "HEAD") or None, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}


def write_run_info(cfg: JobConfig, output_dir: str | os.PathLike) -> None:
    output_dir = Path(output_dir)
    write_atomic(output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    write_json_atomic(output_dir / "git.json", git_version())


# Config keys (and their sub-keys) that never change what a job computes: they neither name a sweep's job folder,
# nor split a report's configurations, nor stop a resume or the skip of a finished job when they differ.
RESULT_NEUTRAL_KEYS = ("task", "resume", "logger", "paths", "hydra", "tags", "sweep_name", "sweep_objective",
                       "report", "dashboard", "predict", "generator_study")


def shapes_result(key: str, neutral: Iterable[str] = RESULT_NEUTRAL_KEYS) -> bool:
    return not any(key == name or key.startswith(name + ".") for name in neutral)


def _dotted(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict) or not node:
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(_dotted(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def schema_defaults(stored: dict, schema: type = JobConfig) -> dict:
    """The defaults of `schema` for a stored config: a group the job schema leaves open takes its own schema's
    defaults (a dataset's by its kind)."""
    defaults = OmegaConf.to_container(OmegaConf.structured(schema), enum_to_str=True)
    hints = typing.get_type_hints(schema)
    for field in dataclasses.fields(schema):
        group = hints[field.name]
        if field.default == MISSING and dataclasses.is_dataclass(group):
            values = stored.get(field.name) if isinstance(stored.get(field.name), dict) else {}
            kinds = [sub for sub in group.__subclasses__() if getattr(sub, "kind", None) == values.get("kind")]
            defaults[field.name] = schema_defaults(values, kinds[0] if kinds else group)
    return defaults


def resolved_settings(stored: dict) -> dict[str, Any]:
    """A stored config as dotted keys, read against today's schema: a key it lacks (a setting added since the run
    started) holds its schema default."""
    merged = OmegaConf.merge(OmegaConf.create(schema_defaults(stored)), OmegaConf.create(stored))
    return _dotted(OmegaConf.to_container(merged))


def changed_settings(cfg: JobConfig, stored_file: Path) -> list[str]:
    """The keys that shape the result on which `cfg` differs from the config stored in `stored_file`, a key
    either config lacks counting as its schema default."""
    stored = resolved_settings(OmegaConf.to_container(OmegaConf.load(stored_file)))
    current = resolved_settings(OmegaConf.to_container(OmegaConf.create(OmegaConf.to_yaml(cfg, resolve=True))))
    absent = object()
    return sorted(key for key in stored.keys() | current.keys()
                  if shapes_result(key) and stored.get(key, absent) != current.get(key, absent))


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
