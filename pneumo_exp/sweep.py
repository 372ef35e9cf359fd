"""What a sweep needs beyond Hydra: one folder per distinct job, and a non-zero exit when jobs failed.

`conf/hydra/default.yaml` names each job's folder `${pneumo_job_folder:${hydra.overrides.task}}` and lists
`FailedJobs` among Hydra's callbacks. Launchers that run jobs in other processes (joblib, submitit) send the
callbacks along, so unpickling `FailedJobs` there imports this module, which registers the resolver in time.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from pneumo_exp.rundir import job_folder_name

RESOLVER = "pneumo_job_folder"
OmegaConf.register_new_resolver(RESOLVER, job_folder_name, replace=True)

failed_jobs: list[tuple[str, str]] = []  # (job folder, one-line error) of the last multirun in this process


class FailedJobs(Callback):
    """After all jobs of a multirun: list the jobs that failed during it (their failed.json) on stderr."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()
        failed_jobs.clear()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        for record in sorted(sweep_dir.glob("*/failed.json")):
            if record.stat().st_mtime >= self.started - 1:  # written by this multirun, not an earlier one
                failed_jobs.append((record.parent.name, json.loads(record.read_text()).get("message", "")))
        if failed_jobs:
            lines = [f"pneumo-exp: error: {len(failed_jobs)} job(s) of the sweep in {sweep_dir} failed:"]
            lines += [f"  {folder}: {message}" for folder, message in failed_jobs]
            print("\n".join(lines), file=sys.stderr, flush=True)
