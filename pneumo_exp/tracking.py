"""Per-epoch metrics (and step rows with `trainer.log_every_steps`): `metrics.jsonl` in the run folder (the source
of truth) mirrored to Weights & Biases.

One W&B run per job, opened on the main process only, offline unless the user asks for online, with the resolved
config, group = experiment, job_type = stage, and best-epoch summaries. A job of a multirun also carries its sweep's
identity (config key `sweep`, tag `sweep:<id>`: `pneumo_exp.sweep.job_sweep`), so one view selects one sweep. As it
ends, a run says whether its numbers count (summary `result`: true when it finished and its test, if it ran one, is
a result), so a sweep's view can leave failed and capped or subset runs out of its groups.
"""

from __future__ import annotations

import math
import os
import secrets
from pathlib import Path
from typing import Any

from pneumo_exp.config import JobConfig, LoggerConfig, LoggerMode, plain
from pneumo_exp.core.files import write_atomic
from pneumo_exp.core.history import HistoryFile

RESULT_MARK = "result"  # the summary key a finished run sets; true only when its numbers count
BEST_EPOCH_SUMMARIES = {"val/f1_macro": "max", "val/acc": "max", "val/recall_macro": "max", "val/loss": "min"}


def numeric_items(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def open_run(logger: LoggerConfig, folder: Path, job_type: str, name: str, group: str, tags: list[str],
             config: dict):
    """A W&B run whose files live in `folder/wandb`; its id is kept in `folder/wandb_id.txt`, so running again in
    the same folder continues the same run."""
    import wandb

    id_file = folder / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
    write_atomic(id_file, run_id + "\n")
    return wandb.init(project=logger.project, entity=logger.entity, group=group, job_type=job_type, name=name,
                      tags=tags, config=config, dir=str(folder), mode=LoggerMode(logger.mode).value, id=run_id,
                      resume="allow", settings=wandb.Settings(quiet=True, x_disable_stats=True))


class RunLogger:
    def __init__(self, cfg: JobConfig, output_dir: str | os.PathLike, job_type: str, run_name: str,
                 enabled: bool = True):
        self.output_dir = Path(output_dir)
        self.history = HistoryFile(self.output_dir / "metrics.jsonl", enabled)
        self.run = None
        self.not_a_result = False
        if enabled and LoggerMode(cfg.logger.mode) != LoggerMode.disabled:
            self.run = self._start_wandb(cfg, job_type, run_name)

    def _start_wandb(self, cfg: JobConfig, job_type: str, run_name: str):
        from pneumo_exp.sweep import job_sweep, sweep_tag

        config, tags, sweep = plain(cfg), list(cfg.tags), job_sweep()
        if sweep is not None:
            config["sweep"] = sweep
            tags.append(sweep_tag(sweep["id"]))
        run = open_run(cfg.logger, self.output_dir, job_type=job_type, name=run_name, group=cfg.logger.group,
                       tags=tags, config=config)
        run.define_metric("epoch")
        for prefix in ("train", "val", "val_live", "test"):
            run.define_metric(f"{prefix}/*", step_metric="epoch")
        run.define_metric("step")
        run.define_metric("train_step/*", step_metric="step")
        run.define_metric("diffusion/step")
        run.define_metric("diffusion/*", step_metric="diffusion/step")
        for name, summary in BEST_EPOCH_SUMMARIES.items():
            run.define_metric(name, step_metric="epoch", summary=summary)
        return run

    def rewrite_history(self, history: list[dict]) -> None:
        """On resume: the file holds exactly the rows of the epochs the checkpoint completed."""
        self.history.restart(history)

    def log_row(self, row: dict) -> None:
        """A row of metrics.jsonl and W&B: an epoch's, or a step row of `trainer.log_every_steps`."""
        if self.history.enabled:
            self.history.append(row)
            self.log_metrics(row)

    def log_metrics(self, row: dict) -> None:
        """W&B only, for stages that keep their own metrics file (the diffusion stage)."""
        if self.run is not None:
            self.run.log({k: v for k, v in numeric_items(row).items() if not math.isnan(v)})

    def log_images(self, images: dict[str, Path]) -> None:
        if self.run is not None:
            import wandb

            self.run.log({name: wandb.Image(str(path), caption=name) for name, path in images.items()})

    def set_summary(self, values: dict[str, float]) -> None:
        if self.run is not None:
            for key, value in numeric_items(values).items():
                self.run.summary[key] = value

    def mark_not_a_result(self, reasons: list[str]) -> None:
        """A capped or subset test: the summary says why its test metrics are no result."""
        if self.run is not None and reasons:
            self.run.summary["not_a_result"] = "; ".join(reasons)
            self.not_a_result = True

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        """Leaving the block finishes the run, marked failed when the block raised (a crash, a user error, Ctrl-C)."""
        self.finish(failed=error_type is not None)

    def finish(self, failed: bool = False) -> None:
        """Marks whether the run's numbers count (`RESULT_MARK`), then returns once the run file is complete on disk:
        `run.finish` only asks W&B's service process to close the run, so without the teardown a reader (a test,
        `make sync`) could find it half written."""
        if self.run is not None:
            import wandb

            self.run.summary[RESULT_MARK] = not failed and not self.not_a_result
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None
            wandb.teardown()
