"""A real multirun: 2 x 2 grid on the tiny preset plus a job made to fail, a rerun that skips finished jobs,
and the report's table checked against the runs' own results files. The sweeps run in this process (Hydra's basic
launcher runs its jobs in the calling process anyway); only the launchers that start processes are started apart."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from pneumo_exp.report.collect import collect_runs, group_key

pytestmark = pytest.mark.slow

GRID = ["-m", "experiment=demo", "debug=smoke", "trainer.epochs=1", "clip_lora=tiny_vit", "clip_lora.lora.alpha=8,16",
        "logger=none"]


def pneumo_exp(*args: str, returncode: int = 0) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "pneumo_exp.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == returncode, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def output_of(ran, returncode: int = 0) -> str:
    """What an in-process `pneumo-exp` (the command_line fixture) printed, after checking its exit status."""
    output = ran.out + "\n".join(ran.err)
    assert ran.status == returncode, output[-5000:]
    return output


def test_grid_sweep_report_failure_and_rerun(tmp_path, model_cache, command_line):
    sweep = tmp_path / "sweep"
    common = [f"hydra.sweep.dir={sweep}", f"paths.cache_dir={model_cache}"]
    output = output_of(command_line(*GRID, "optim.lr=1e-3,2e-3,-1", *common), returncode=1)
    jobs = sorted(path for path in sweep.iterdir() if (path / ".hydra").is_dir())
    finished = [job for job in jobs if (job / "results.json").is_file()]
    failed = [job for job in jobs if (job / "failed.json").is_file()]
    assert len(jobs) == 6 and len(finished) == 4 and len(failed) == 2
    assert all("optim.lr=-1" in job.name for job in failed)
    message = json.loads((failed[0] / "failed.json").read_text())["message"]
    assert message == "bad value -1.0 (optim.lr): use a value above 0"
    assert "2 job(s) of the sweep" in output and f"{failed[0].name}: bad value -1.0 (optim.lr)" in output

    stamps = {job: (job / "results.json").stat().st_mtime_ns for job in finished}
    output_of(command_line(*GRID, "optim.lr=1e-3,2e-3", *common))
    assert all((job / "results.json").stat().st_mtime_ns == stamp for job, stamp in stamps.items())

    output_of(command_line("report", f"report.input={sweep}", f"report.output={tmp_path / 'report'}",
                           f"hydra.run.dir={tmp_path / 'report_job'}"))
    with (tmp_path / "report" / "table.csv").open() as handle:
        rows = {row["configuration"]: row for row in csv.DictReader(handle)}
    key_of_job = {run.path: group_key(run) for run in collect_runs(sweep)}
    for job in finished:
        row = rows[key_of_job[job]]
        assert row["status"] != "failed" and row["n"] == "1"
        results = json.loads((job / "results.json").read_text())["metrics"]
        for metric in ("test/acc", "test/f1_macro", "test/recall_macro"):
            assert float(row[f"{metric}_mean"]) == pytest.approx(results[metric], abs=1e-6)
    assert sorted(row["status"] for row in rows.values()).count("failed") == 2
    table = (tmp_path / "report" / "table.md").read_text()
    assert "failed" in table and (tmp_path / "report" / "curves.png").is_file()


@pytest.mark.xdist_group("subprocess")
@pytest.mark.parametrize("launcher", ["parallel", "submitit_local"])
def test_parallel_and_submitit_launchers_run_a_sweep(tmp_path, model_cache, launcher):
    """joblib processes and submitit (the Slurm launcher's local twin) run the same jobs, W&B offline included."""
    sweep = tmp_path / "sweep"
    extra = ["hydra.launcher.timeout_min=10"] if launcher == "submitit_local" else []
    pneumo_exp("-m", f"hydra/launcher={launcher}", *extra, "experiment=demo", "clip_lora=tiny_vit",
               "optim.lr=1e-3,2e-3", "debug=smoke", "trainer.epochs=1", "logger.mode=offline",
               f"hydra.sweep.dir={sweep}", f"paths.cache_dir={model_cache}")
    finished = sorted(sweep.glob("*/results.json"))
    assert len(finished) == 2
    assert all(list(path.parent.glob("wandb/offline-run-*")) for path in finished)


def test_jobs_that_differ_only_in_a_path_get_their_own_folders(tmp_path, model_cache, command_line):
    """dataset.root=A,MISSING,B: three folders, two results, one failure listed, a non-zero exit."""
    import numpy as np
    from PIL import Image

    noise = np.random.default_rng(0)
    for name in ("A", "B"):
        for split, count in (("train", 7), ("test", 2)):
            for label in ("NORMAL", "BACTERIA", "VIRUS"):
                folder = tmp_path / name / split / label
                folder.mkdir(parents=True)
                for i in range(count):
                    pixels = noise.integers(0, 256, (48, 48), dtype=np.uint8)
                    Image.fromarray(pixels).save(folder / f"{split}_{label.lower()}{i}.png")
    sweep = tmp_path / "sweep"
    roots = ",".join(str(tmp_path / name) for name in ("A", "MISSING", "B"))
    output = output_of(command_line("-m", "dataset=folder", f"dataset.root={roots}", "dataset.resolution=64",
                                    "trainer.epochs=1", "trainer.batch_size=8", "trainer.bootstrap_samples=10",
                                    f"paths.cache_dir={model_cache}", f"hydra.sweep.dir={sweep}"), returncode=1)
    jobs = sorted(path for path in sweep.iterdir() if (path / ".hydra").is_dir())
    assert len(jobs) == 3
    assert len(list(sweep.glob("*/results.json"))) == 2
    failed = list(sweep.glob("*/failed.json"))
    assert len(failed) == 1 and "dataset.root=MISSING-" in failed[0].parent.name
    assert f"{failed[0].parent.name}: " in output and "MISSING" in json.loads(failed[0].read_text())["message"]
