"""The report as one W&B run of job type `report`, in the group of the sweep's runs and with the sweep's identity
(so a sweep's dashboard shows the table beside the curves): `table.csv`, `references.csv` and `pairs.csv` as W&B
Tables, the plots as images, and the report folder (with the three tables as W&B Tables) as an artifact,
`report-<sweep id>`, named in the run's config (`report.artifact`). Offline unless `logger.mode=online`, like every
run; `make sync` uploads it. Its files live in `<report folder>/wandb`; running the report again continues the same
run (the id in `<report folder>/wandb_id.txt`) and replaces its offline copy.
"""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path
from typing import Any

from pneumo_exp.config import JobConfig, LoggerMode
from pneumo_exp.report.collect import collect_runs

TABLES = {"report/table": "table.csv", "report/references": "references.csv", "report/pairs": "pairs.csv"}
IMAGES = {"report/curves": "curves.png", "report/confusion_test": "confusion_test.png", "report/bars": "bars.png"}
NOT_IN_ARTIFACT = {"wandb_id.txt"}


def number(text: str) -> float | int:
    try:
        return int(text)
    except ValueError:
        return float(text)


def is_number(text: str) -> bool:
    try:
        number(text)
    except ValueError:
        return False
    return True


def csv_table(path: Path) -> tuple[list[str], list[list[Any]]]:
    """A CSV file's header and rows, an empty cell as None and a column of numbers as numbers (a column holding any
    text stays text, as W&B Tables need one type per column)."""
    with path.open(newline="") as handle:
        header, *rows = list(csv.reader(handle))
    numeric = [all(is_number(row[i]) for row in rows if row[i] != "") for i in range(len(header))]
    return header, [[None if cell == "" else number(cell) if numeric[i] else cell for i, cell in enumerate(row)]
                    for row in rows]


def wandb_table(path: Path):
    import wandb

    columns, data = csv_table(path)
    return wandb.Table(columns=columns, data=data)


def artifact_table(csv_name: str) -> str:
    """The name a CSV table of the report has as a W&B Table in the artifact (its file: `<name>.table.json`)."""
    return Path(csv_name).stem


def artifact_name(sweep: dict | None, input_dir: Path) -> str:
    """The report's artifact: `report-<sweep id>` (a folder that is no sweep: its name), in W&B's characters."""
    from pneumo_exp.sweep import recorded_id

    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"report-{recorded_id(sweep) if sweep else input_dir.name}")


def runs_group(input_dir: Path, default: str) -> str:
    """The W&B group the runs were logged to, when they share one; else `default` (the report's own)."""
    groups = {str(run.value("logger.group")) for run in collect_runs(input_dir) if run.value("logger.group")}
    return groups.pop() if len(groups) == 1 else default


def log_report_run(cfg: JobConfig, input_dir: Path, report_dir: Path) -> Path | None:
    """Logs the report in `report_dir` to W&B; returns the run's local folder (None with `logger=none`)."""
    if LoggerMode(cfg.logger.mode) == LoggerMode.disabled:
        return None
    import wandb

    from pneumo_exp.sweep import recorded_id, recorded_sweep, sweep_tag
    from pneumo_exp.tracking import open_run

    input_dir, report_dir = input_dir.resolve(), report_dir.resolve()
    sweep = recorded_sweep(input_dir)
    report_artifact = artifact_name(sweep, input_dir)
    config: dict[str, Any] = {"report": {"input": str(input_dir), "output": str(report_dir),
                                         "artifact": report_artifact, "pairs": cfg.report.pairs,
                                         "bootstrap_samples": cfg.report.bootstrap_samples}}
    tags = ["report"]
    if sweep is not None:
        config["sweep"] = {"name": sweep["name"], "id": recorded_id(sweep), "folder": str(input_dir),
                           "varied": sweep["varied"]}
        tags.append(sweep_tag(recorded_id(sweep)))
    id_file = report_dir / "wandb_id.txt"
    if id_file.is_file():  # the offline copy of this run from an earlier report: replaced, not logged twice
        for folder in (report_dir / "wandb").glob(f"offline-run-*-{id_file.read_text().strip()}"):
            shutil.rmtree(folder)
    run = open_run(cfg.logger, report_dir, job_type="report", name="report",
                   group=runs_group(input_dir, cfg.logger.group), tags=tags, config=config)
    try:
        tables = {key: wandb_table(report_dir / name) for key, name in TABLES.items()}
        images = {key: wandb.Image(str(report_dir / name), caption=name) for key, name in IMAGES.items()}
        run.log({**tables, **images})
        artifact = wandb.Artifact(report_artifact, type="report", description=f"pneumo-exp report of {input_dir}")
        for path in sorted(report_dir.iterdir()):
            if path.is_file() and path.name not in NOT_IN_ARTIFACT:
                artifact.add_file(str(path), name=path.name, policy="immutable")  # no staging copy: read at sync
        for key, table in tables.items():  # what the dashboard's paper table shows, whichever runs it shows
            artifact.add(table, artifact_table(TABLES[key]))
        run.log_artifact(artifact)
        folder = Path(run.dir).parent
    except BaseException:
        run.finish(exit_code=1)
        wandb.teardown()
        raise
    run.finish()
    wandb.teardown()
    return folder
