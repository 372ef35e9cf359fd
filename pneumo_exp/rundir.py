"""What every run folder holds besides Hydra's `.hydra/`: the resolved config and the code version."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def is_main_process() -> bool:
    """Rank 0 of a launched run (torchrun / accelerate launch set RANK), or a plain process."""
    return int(os.environ.get("RANK", "0")) == 0


def git_version() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    try:
        return {"sha": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as handle:
        handle.write(text)
    os.replace(handle.name, path)
    return path


def write_json_atomic(path: str | os.PathLike, payload: Any) -> Path:
    return write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def write_run_info(cfg: DictConfig, output_dir: str | os.PathLike) -> None:
    output_dir = Path(output_dir)
    write_text_atomic(output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    write_json_atomic(output_dir / "git.json", git_version())


def build_folder_once(folder: str | os.PathLike, marker: str, build: Callable[[Path], None]) -> Path:
    """Make `folder` with `build(staging)` unless `folder/marker` exists; the staging folder is renamed into place,
    so a crash leaves nothing half-built and, of two processes building the same thing, the first rename wins."""
    folder = Path(folder)
    if (folder / marker).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", suffix=".tmp", dir=folder.parent))
    try:
        build(staging)
        os.rename(staging, folder)
    except OSError:
        if not (folder / marker).is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
