"""`pneumo-exp report` logs one W&B run of job type `report`: read back from its offline run file, its tables equal
table.csv, references.csv and pairs.csv cell for cell, its plots and the report folder are in it, and it carries the
sweep's identity and group."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from test_report import PAPER_ROWS, SEEDS, write_paper_job

from pneumo_exp import wandb_offline
from pneumo_exp.pipeline import run
from pneumo_exp.report.wandb_run import IMAGES, TABLES, artifact_table

SWEEP_NAME = "paper_demo/2026-01-05_10-00-00"


@pytest.fixture(scope="module")
def paper_sweep(tmp_path_factory) -> Path:
    """A paper-demo-like sweep folder (3 rows x 3 seeds) whose jobs were logged to the W&B group paper_demo; its
    sweep.json was written before sweeps had ids."""
    record = {"name": SWEEP_NAME, "varied": ["experiment", "seed"]}
    return write_paper_sweep(tmp_path_factory.mktemp("report_wandb"), record)


def write_paper_sweep(parent: Path, record: dict) -> Path:
    """The sweep folder parent/multirun/SWEEP_NAME, with `record` as its sweep.json."""
    root = parent / "multirun" / SWEEP_NAME
    rng = np.random.default_rng(5)
    for number, (row, seed) in enumerate((row, seed) for row in PAPER_ROWS for seed in SEEDS):
        folder = root / f"{number}_experiment=paper_cpu-{row},seed={seed}"
        write_paper_job(folder, row, seed, rng)
        config = OmegaConf.load(folder / "config.yaml")
        config.logger = {"mode": "offline", "project": "pneumo_exp", "group": "paper_demo"}
        (folder / "config.yaml").write_text(OmegaConf.to_yaml(config))
    (root / "sweep.json").write_text(json.dumps(record))
    return root


def report(make_cfg, sweep: Path, logger: str = "wandb") -> Path:
    run(make_cfg("task=report", f"report.input={sweep}", "report.bootstrap_samples=100", logger=logger))
    return sweep / "report"


def csv_rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as handle:
        return list(csv.reader(handle))


def same_cell(logged, text: str) -> bool:
    if text == "":
        return logged is None
    return logged == text if isinstance(logged, str) else logged == float(text)


def report_artifact(run_file: Path):
    """The artifact of type `report` the run logged (its name and manifest)."""
    (artifact,) = [record.artifact for record in wandb_offline._records(run_file)
                   if record.WhichOneof("record_type") == "artifact" and record.artifact.type == "report"]
    return artifact


def test_report_run_tables_equal_the_csv_files(paper_sweep, make_cfg, capsys):
    folder = report(make_cfg, paper_sweep)
    (run_file,) = wandb_offline.run_files(folder)
    assert "W&B run 'report' (offline)" in capsys.readouterr().out
    logged = wandb_offline.read_run(run_file)
    assert (logged.job_type, logged.name, logged.group) == ("report", "report", "paper_demo")
    assert f"sweep:{SWEEP_NAME}" in logged.tags and logged.config["sweep"]["name"] == SWEEP_NAME
    for key, name in TABLES.items():
        header, *rows = csv_rows(folder / name)
        table = wandb_offline.logged_table(run_file, key)
        assert table["columns"] == header and len(table["data"]) == len(rows) > 0, key
        for logged_row, row in zip(table["data"], rows):
            assert all(same_cell(value, text) for value, text in zip(logged_row, row)), (key, logged_row, row)
    pairs = wandb_offline.logged_table(run_file, "report/pairs")
    verdicts = {row[pairs["columns"].index("verdict")] for row in pairs["data"]}
    assert "original_study higher" in verdicts  # the comparisons with their CIs and verdicts
    assert set(IMAGES) <= logged.history_keys
    assert all(logged.summary[key]["_type"] == "image-file" for key in IMAGES)


def test_report_folder_is_an_artifact_and_a_rerun_replaces_the_offline_copy(paper_sweep, make_cfg):
    folder = report(make_cfg, paper_sweep)
    first_id = wandb_offline.read_run(wandb_offline.run_files(folder)[0]).run_id
    folder = report(make_cfg, paper_sweep)
    (run_file,) = wandb_offline.run_files(folder)  # one offline copy, of the same run
    assert wandb_offline.read_run(run_file).run_id == first_id
    artifact = report_artifact(run_file)
    assert artifact.name == "report-paper_demo-2026-01-05_10-00-00"
    tables = {f"{artifact_table(name)}.table.json" for name in TABLES.values()}
    assert {item.path for item in artifact.manifest.contents} == \
        {path.name for path in folder.iterdir() if path.is_file() and path.name != "wandb_id.txt"} | tables


def test_no_report_run_with_logger_none(paper_sweep, make_cfg, tmp_path):
    run(make_cfg("task=report", f"report.input={paper_sweep}", f"report.output={tmp_path / 'quiet'}",
                 "report.bootstrap_samples=20"))
    assert (tmp_path / "quiet" / "table.csv").is_file() and not (tmp_path / "quiet" / "wandb").exists()


def test_reports_of_two_sweeps_with_one_folder_name_share_no_tag_and_no_artifact(make_cfg, tmp_path):
    """Each sweep's id (sweep.json) names the report run's tag and artifact, so a sweep launched again after
    `make clean`, or on another machine, keeps its report apart."""
    logged = []
    for number, suffix in enumerate(("0123abcd", "fedc4567")):
        record = {"name": SWEEP_NAME, "id": f"{SWEEP_NAME}-{suffix}", "varied": ["experiment", "seed"]}
        folder = report(make_cfg, write_paper_sweep(tmp_path / f"machine{number}", record))
        (run_file,) = wandb_offline.run_files(folder)
        report_run = wandb_offline.read_run(run_file)
        assert f"sweep:{record['id']}" in report_run.tags and report_run.config["sweep"]["id"] == record["id"]
        artifact = report_artifact(run_file).name
        assert artifact == f"report-paper_demo-2026-01-05_10-00-00-{suffix}" == report_run.config["report"]["artifact"]
        logged.append(({tag for tag in report_run.tags if tag.startswith("sweep:")}, artifact))
    (first_tags, first_artifact), (second_tags, second_artifact) = logged
    assert not first_tags & second_tags and first_artifact != second_artifact
