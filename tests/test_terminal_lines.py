"""The terminal shows the project's lines: other libraries' INFO records and warnings the user cannot act on go to
the job's log file only. Each check starts a fresh process, as a user's first command would: on a fresh home folder
matplotlib builds its font cache and says so, and transformers warns once per process that torchvision is missing."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

FONT_CACHE_LINE = "generated new fontManager"
TORCHVISION_LINE = "requires torchvision"
PROJECT_LINE = "the job's own line"

# A job that does what the stages do when a run draws synthetic images and plots: diffusers' StableDiffusionPipeline
# imports CLIPImageProcessor and SiglipImageProcessor (transformers warns that torchvision is missing), matplotlib
# reads its font cache; then it logs a line of the project's.
JOB_IMPORTING_THE_LIBRARIES = f"""
import logging, sys
from pneumo_exp import cli, pipeline

def job(cfg):
    from diffusers import StableDiffusionPipeline
    import matplotlib.font_manager
    logging.getLogger("pneumo_exp.job").info({PROJECT_LINE!r})
    return {{}}

pipeline.run = job
sys.argv = ["pneumo-exp", *sys.argv[1:]]
cli.main()
"""


def fresh_home(tmp_path: Path) -> dict[str, str]:
    """The environment of a user's first command: a home folder without matplotlib's or anyone's caches."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("MPLCONFIGDIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME")}
    home = tmp_path / "home"
    home.mkdir()
    return {**env, "HOME": str(home), "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}


def run_process(tmp_path: Path, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *command], cwd=tmp_path, env=fresh_home(tmp_path), capture_output=True,
                          text=True, timeout=300)


def job_log(run_folder: Path) -> str:
    return "".join(log.read_text() for log in run_folder.glob("*.log"))


@pytest.mark.xdist_group("subprocess")
def test_dashboard_on_a_fresh_home_prints_only_its_error(tmp_path):
    empty_sweep = tmp_path / "sweep"
    empty_sweep.mkdir()
    ran = run_process(tmp_path, "-m", "pneumo_exp.cli", "dashboard", f"report.input={empty_sweep}",
                      f"hydra.run.dir={tmp_path / 'run'}")
    assert ran.returncode == 2
    assert ran.stdout == ""
    errors = ran.stderr.splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"pneumo-exp: error: no W&B runs under {empty_sweep}")


@pytest.mark.xdist_group("subprocess")
def test_other_libraries_records_reach_the_log_file_not_the_terminal(tmp_path):
    run_folder = tmp_path / "run"
    ran = run_process(tmp_path, "-c", JOB_IMPORTING_THE_LIBRARIES, "logger=none", f"hydra.run.dir={run_folder}")
    assert ran.returncode == 0, ran.stderr
    terminal = ran.stdout + ran.stderr
    assert PROJECT_LINE in ran.stdout
    assert FONT_CACHE_LINE not in terminal and TORCHVISION_LINE not in terminal
    assert PROJECT_LINE in job_log(run_folder) and FONT_CACHE_LINE in job_log(run_folder)
    if importlib.util.find_spec("torchvision") is None:
        assert f"[transformers.utils.import_utils][WARNING] - `CLIPImageProcessor` {TORCHVISION_LINE}" in \
            job_log(run_folder)


@pytest.mark.parametrize(("logger", "level", "shown"), [
    ("pneumo_exp.classify.train", logging.INFO, True),
    ("hydra._internal.core_plugins.basic_launcher", logging.INFO, True),  # a sweep's "#1 : overrides" line
    ("matplotlib.font_manager", logging.INFO, False),
    ("transformers.utils.import_utils", logging.WARNING, False),
    ("accelerate.utils.other", logging.ERROR, True),
])
def test_the_terminal_keeps_the_projects_and_hydras_lines_and_any_error(logger, level, shown):
    from pneumo_exp.cli import ProjectLines

    record = logging.LogRecord(logger, level, __file__, 0, "a line", (), None)
    assert ProjectLines().filter(record) is shown


def test_building_a_random_init_preset_draws_no_progress_bar(tmp_path, capsys):
    from transformers.utils import logging as transformers_logging

    from pneumo_exp.classify.backbone import build_random
    from pneumo_exp.config import BackboneFamily

    architecture = {"text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                             "num_attention_heads": 2},
                    "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                               "num_attention_heads": 2, "patch_size": 8},
                    "projection_dim": 16}
    transformers_logging.enable_progress_bar()  # as a process starts, before any model is loaded
    try:
        build_random(BackboneFamily.clip, architecture, 32, tmp_path / "preset")
    finally:
        transformers_logging.disable_progress_bar()
    assert (tmp_path / "preset" / "config.json").is_file()
    assert "Writing model shards" not in capsys.readouterr().err
