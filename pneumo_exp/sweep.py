"""What a sweep needs beyond Hydra: one folder per distinct job, a non-zero exit when jobs failed, and the sweep's
identity for W&B.

A sweep's identity is its id, `<experiment>/<sweep>-<8 hex digits>`: drawn when its folder's first multirun starts,
kept in `sweep.json` and reused by every later multirun into the same folder (a resumed or extended sweep). Two
sweeps whose folders share a name (one launched after `make clean`, or on another machine) get different ids, so
their runs never share a W&B tag or a dashboard view.

`conf/hydra/default.yaml` names each job's folder `${pneumo_job_folder:${hydra.overrides.task}}` and lists
`FailedJobs` and `SweepIdentity` among Hydra's callbacks. Launchers that run jobs in other processes (joblib,
submitit) send the callbacks along, so unpickling them there imports this module, which registers the resolver in
time.
"""

from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from pneumo_exp.core.files import write_json_atomic
from pneumo_exp.rundir import job_folder_name

RESOLVER = "pneumo_job_folder"
OmegaConf.register_new_resolver(RESOLVER, job_folder_name, replace=True)

failed_jobs: list[tuple[str, str]] = []  # (job folder, one-line error) of the last multirun in this process


def failure_records(sweep_dir: Path) -> dict[Path, tuple[int, int]]:
    """Each job's failed.json in the sweep folder with its inode and mtime (ns): a record rewritten is a new one,
    however soon after the last multirun, whatever process (launcher) wrote it."""
    return {record: (stat.st_ino, stat.st_mtime_ns)
            for record in sweep_dir.glob("*/failed.json") for stat in [record.stat()]}


class FailedJobs(Callback):
    """After all jobs of a multirun: list the jobs that failed during it (their failed.json) on stderr."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.earlier = failure_records(Path(config.hydra.sweep.dir))
        failed_jobs.clear()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        for record, identity in sorted(failure_records(sweep_dir).items()):
            if self.earlier.get(record) != identity:  # written by this multirun, not left by an earlier one
                failed_jobs.append((record.parent.name, json.loads(record.read_text()).get("message", "")))
        if failed_jobs:
            lines = [f"pneumo-exp: error: {len(failed_jobs)} job(s) of the sweep in {sweep_dir} failed:"]
            lines += [f"  {folder}: {message}" for folder, message in failed_jobs]
            print("\n".join(lines), file=sys.stderr, flush=True)


SWEEP_FILE = "sweep.json"  # in the sweep folder: {"name": ..., "id": ..., "varied": [keys the sweep varies]}
TAG_LENGTH = 64  # W&B's longest tag


def varied_keys(config: DictConfig) -> list[str]:
    """The keys a multirun varies: sweep overrides on the command line (`a=1,2`, `range(...)`, `choice(...)`) and
    the sweeper's `params` (an experiment file's grid, an Optuna search space), in that order."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = list(config.hydra.overrides.task)
    lines += [f"{key}={value}" for key, value in (OmegaConf.select(config, "hydra.sweeper.params") or {}).items()]
    keys = [override.key_or_group for override in OverridesParser.create().parse_overrides(lines)
            if override.is_sweep_override()]
    return list(dict.fromkeys(keys))


def sweep_name(folder: Path) -> str:
    """A sweep's name: its folder under multirun/, `<experiment>/<sweep>`."""
    return f"{folder.parent.name}/{folder.name}"


def recorded_sweep(folder: Path) -> dict | None:
    """What the sweep folder's sweep.json records, if it has one."""
    record = folder / SWEEP_FILE
    return json.loads(record.read_text()) if record.is_file() else None


def recorded_id(record: dict) -> str:
    """The id a sweep.json records; a sweep.json written before sweeps had ids: the name, its runs' tag then."""
    return record.get("id") or record["name"]


def sweep_id(folder: Path) -> str:
    """The id of the sweep in `folder`: the one its sweep.json records, else a new one (a sweep starting)."""
    record = recorded_sweep(folder)
    return recorded_id(record) if record else f"{sweep_name(folder)}-{secrets.token_hex(4)}"


def sweep_tag(identity: str) -> str:
    """The W&B tag of a sweep's runs, from its id (a long id keeps its start and a hash, to fit W&B's 64
    characters)."""
    import hashlib

    tag = f"sweep:{identity}"
    if len(tag) <= TAG_LENGTH:
        return tag
    return f"{tag[:TAG_LENGTH - 9]}-{hashlib.sha256(identity.encode()).hexdigest()[:8]}"


class SweepIdentity(Callback):
    """Learns the sweep's id and varied keys once, as the multirun starts (from its folder's sweep.json when an
    earlier multirun wrote one, and from its own command line and sweeper), and writes them into the sweep folder
    as each job starts (in the job's process, whatever the launcher), where the job's W&B run reads them."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.varied = varied_keys(config)
        self.id = sweep_id(Path(config.hydra.sweep.dir).resolve())

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not hasattr(self, "varied"):  # a single run: no multirun started
            return
        folder = Path(config.hydra.sweep.dir).resolve()
        record = {"name": sweep_name(folder), "id": self.id, "varied": self.varied}
        if recorded_sweep(folder) != record:
            write_json_atomic(folder / SWEEP_FILE, record)


def job_sweep() -> dict | None:
    """In a multirun job: the sweep's identity for the job's W&B config (`sweep`): its name and id, the keys it varies,
    the W&B config keys its configurations differ in (`group_by`: the varied keys but seed; a varied config group
    such as `experiment` by its choice, `sweep.choices.<group>`) and this job's choices of those groups. None in a
    single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hydra = HydraConfig.get()
    folder = Path(hydra.sweep.dir).resolve()
    record = recorded_sweep(folder) or {"name": sweep_name(folder)}
    varied = list(record.get("varied", []))
    choices = {key: hydra.runtime.choices[key] for key in varied if key in hydra.runtime.choices}
    return {"name": record["name"], "id": recorded_id(record), "folder": str(folder), "varied": varied,
            "group_by": [f"sweep.choices.{key}" if key in choices else key for key in varied if key != "seed"],
            "choices": choices}
