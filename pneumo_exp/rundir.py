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
    """Why a run's test metrics are no result (none: they are): a capped validation split (the epoch was chosen on
    a part of it) or test split, a subset of the dataset."""
    reasons = []
    if "val" in capped:
        reasons.append(f"validation split capped to {capped['val']['evaluated']} of {capped['val']['available']} "
                       "images (trainer.max_eval_batches): the epoch was chosen on a part of it")
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


SUPERSEDED = ".superseded"  # a job folder's outputs that a rerun replaced (hidden: the report does not read them)


def set_aside_outputs(output_dir: Path) -> Path:
    """Move a job's outputs (all but Hydra's `.hydra/` and log) into `<output_dir>/.superseded/<UTC time>-*/`
    before the job runs again; returns that folder."""
    import tempfile
    import time

    (output_dir / SUPERSEDED).mkdir(exist_ok=True)
    kept = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%dT%H%M%SZ-", time.gmtime()), dir=output_dir / SUPERSEDED))
    for item in output_dir.iterdir():
        if item.name not in {".hydra", SUPERSEDED} and item.suffix != ".log":
            item.rename(kept / item.name)
    return kept


def write_run_info(cfg: JobConfig, output_dir: str | os.PathLike) -> None:
    output_dir = Path(output_dir)
    write_atomic(output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    write_json_atomic(output_dir / "git.json", git_version())


# Config keys (and their sub-keys) that change no number of any task: they neither name a sweep's job folder, nor
# split a report's configurations, nor stop a resume or the skip of a finished job when they differ. (Where a job
# finds its inputs, `paths`, is neutral because the inputs themselves are compared by content: inputs.json.)
RESULT_NEUTRAL_KEYS = ("resume", "logger", "paths", "hydra", "tags", "sweep_name", "sweep_objective", "dashboard")
# Keys only other tasks read: a training job's numbers cannot depend on them.
NOT_READ_BY_TRAINING = ("task", "report", "predict", "generator_study")
# Where a training job finds what it reads: it is compared by content instead (inputs.json), so a moved copy of the
# data is the same job and a LoRA retrained at the same path is another.
INPUT_LOCATIONS = ("dataset.root", "dataset.manifest", "dataset.extract_dir", "clip_lora.pretrained",
                   "diffusion_lora.pretrained", "diffusion_lora.trained_lora", "augmentation.filter.judge_run")


def shapes_result(key: str, neutral: Iterable[str] = RESULT_NEUTRAL_KEYS) -> bool:
    return not any(key == name or key.startswith(name + ".") for name in neutral)


def neutral_keys(task: str) -> tuple[str, ...]:
    """The keys that do not tell two jobs of `task` apart."""
    return (*RESULT_NEUTRAL_KEYS, *NOT_READ_BY_TRAINING, *INPUT_LOCATIONS) if task == "run" else RESULT_NEUTRAL_KEYS


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
    neutral = neutral_keys(cfg.task)
    return sorted(key for key in stored.keys() | current.keys()
                  if shapes_result(key, neutral) and stored.get(key, absent) != current.get(key, absent))


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
