"""The task function: run the stages named in the config, in order, inside one run folder."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from pneumo_exp.data.prepare import prepare_data
from pneumo_exp.rundir import write_run_info, write_text_atomic
from pneumo_exp.summary import format_summary

log = logging.getLogger(__name__)

KNOWN_STAGES = ("data",)


def run(cfg: DictConfig) -> dict[str, float]:
    """Returns the run's metrics (empty until a training stage runs), so sweepers can optimise them."""
    output_dir = Path(cfg.paths.output_dir)
    unknown = [stage for stage in cfg.stages if stage not in KNOWN_STAGES]
    if unknown:
        raise ValueError(f"stages: unknown stage(s) {unknown}; known: {list(KNOWN_STAGES)}")
    write_run_info(cfg, output_dir)

    data = prepare_data(cfg.dataset, cfg.paths.cache_dir, output_dir)
    if data.skipped:
        write_text_atomic(output_dir / "skipped.txt", "\n".join(data.skipped) + "\n")
    print(format_summary(data, cfg.dataset.name), flush=True)
    log.info("manifest written to %s", output_dir / "manifest.csv")
    if cfg.task == "summary":
        return {}
    return {}
