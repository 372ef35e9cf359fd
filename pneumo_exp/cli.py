"""`pneumo-exp`: the command line. Every setting is a Hydra override; a leading command word sets `task`."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pneumo_exp.config import register_schemas

COMMANDS = ("run", "summary")
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")  # the repository's conf/ (editable install)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def hydra_entry(cfg: DictConfig) -> dict[str, float]:
    from pneumo_exp.pipeline import run  # heavy imports after Hydra has parsed the command line

    return run(cfg)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
        sys.argv = [sys.argv[0], f"task={sys.argv[1]}", *sys.argv[2:]]
    register_schemas()
    hydra_entry()


if __name__ == "__main__":
    main()
