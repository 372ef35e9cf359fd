"""Shared test fixtures: configs composed with Hydra's compose API, shrunk, with their own folders."""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import importlib.util
import io
import os
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
from omegaconf import OmegaConf

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
# pytest-xdist workers share the cores: each gets its share of torch threads (set before torch is imported), and so
# do the processes it starts. Tests that start several processes each run in the group "subprocess", one at a time.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // WORKERS)))

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
REAL_DATA = REPO.parent / "shared" / "data" / "kermany-224"

requires_real_data = pytest.mark.skipif(not (REAL_DATA / "train").is_dir(),
                                        reason=f"real dataset not found at {REAL_DATA}")


def pytest_collection_finish(session):
    """A full garbage collection (accelerate's free_memory, each stage's release) walks every object alive, and the
    libraries' own objects, imported once per worker, never become garbage: import them, then freeze them out of
    the walk. Objects a test creates are collected as before."""
    import accelerate  # noqa: F401
    import matplotlib.pyplot  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPModel, SiglipModel  # noqa: F401

    gc.collect()
    gc.freeze()


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items):
    """The tests that use a module-scoped fixture of their own module (a trained run, a sweep) run on one worker,
    so that it is built once: they form the group named after their module, unless they are in a group already."""
    for item in items:
        module = item.nodeid.split("::")[0]
        shared = any(definitions[-1].scope == "module" and definitions[-1].baseid == module
                     for definitions in item._fixtureinfo.name2fixturedefs.values())
        if shared and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(module))


def write_image(path: Path, shade: int = 100) -> Path:
    """A 32x32 grey PNG or JPEG (by the suffix) of one shade, its folders made."""
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((32, 32), shade, dtype=np.uint8)).save(path)
    return path


def empty_folder(folder: Path) -> Path:
    for path in folder.iterdir():
        path.unlink()
    return folder


def stop_in_diffusion_epoch_two(train, cfg, data, output_dir: Path) -> None:
    """Run a diffusion trainer until its logger sees epoch 2, where a crash stops it."""
    class Crash(Exception):
        pass

    def crash_in_epoch_two(row):
        if row["diffusion/epoch"] == 2:
            raise Crash

    with pytest.raises(Crash):
        train(cfg, data, output_dir, logger=RecordedRows(on_row=crash_in_epoch_two))


RUN_FOLDER_KEYS = ("paths.output_dir", "paths.cache_dir")


@functools.cache
def composed(overrides: tuple[str, ...]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from pneumo_exp.config import register_schemas

    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def compose(overrides: list[str] | None = None):
    """The config Hydra composes from `overrides`. Composing takes about 0.3 s and most tests differ only in their
    folders, so each distinct list of the other overrides is composed once and copied; the folders (the last value
    given for each) are set on the copy."""
    folders, others = {}, []
    for override in overrides or []:
        key, _, value = override.partition("=")
        if key in RUN_FOLDER_KEYS:
            folders[key] = value
        else:
            others.append(override)
    cfg = copy.deepcopy(composed(tuple(others)))
    for key, value in folders.items():
        OmegaConf.update(cfg, key, value)
    return cfg


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine: two torch threads that wait for each other are many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """One cache for the session: random-init presets and decoded images are built once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def make_cfg(tmp_path, model_cache):
    """Compose the config with overrides; outputs go to tmp_path/run, W&B off unless asked."""

    def make(*overrides: str, logger: str = "none"):
        return compose([f"paths.output_dir={tmp_path / 'run'}", f"paths.cache_dir={model_cache}",
                        f"logger={logger}", *overrides])

    return make


class Ran(NamedTuple):
    status: int
    out: str
    err: list[str]  # the lines of stderr


@pytest.fixture
def command_line(monkeypatch, capsys, tmp_path, model_cache):
    """Runs `pneumo-exp ARGS` in this process, as from a shell (no interpreter start, no imports again). Unless ARGS
    set them: W&B off, the session's cache, the run folder tmp_path/run."""

    def run(*args: str) -> Ran:
        given = {arg.partition("=")[0] for arg in args}
        defaults = {"logger": "none", "paths.cache_dir": model_cache, "hydra.run.dir": tmp_path / "run"}
        status = exit_status_in_process(monkeypatch, *args, *(f"{key}={value}" for key, value in defaults.items()
                                                              if key not in given))
        captured = capsys.readouterr()
        return Ran(status, captured.out, captured.err.strip().splitlines())

    return run


def exit_status_in_process(monkeypatch, *args: str) -> int:
    """`pneumo-exp ARGS` run by its entry point in this process; its exit status."""
    from pneumo_exp import cli

    monkeypatch.setattr(sys, "argv", ["pneumo-exp", *args])
    try:
        cli.main()
    except SystemExit as exited:
        return 0 if exited.code is None else exited.code
    return 0


def bench_module(name: str):
    """bench/<name>.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_main(name: str, *argv: str) -> str:
    """`python bench/<name>.py ARGV` in this process (the libraries are imported here already): what it printed.
    A script that sets torch's thread count for itself leaves this process's as it was."""
    import torch

    threads, printed = torch.get_num_threads(), io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            bench_module(name).main(list(argv))
    finally:
        torch.set_num_threads(threads)
    return printed.getvalue()


class RecordedRows(list):
    """A RunLogger stand-in that keeps the metrics rows a stage logs, in order; `on_row` sees each row first (a
    test crashes a run at a chosen row with it)."""

    def __init__(self, on_row=None):
        super().__init__()
        self.on_row = on_row

    def log_metrics(self, row: dict) -> None:
        if self.on_row is not None:
            self.on_row(row)
        self.append(row)

    def log_images(self, images: dict) -> None:
        pass
