"""The task function: run the stages named in the config, in order, inside one run folder."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig

from pneumo_exp.data.prepare import prepare_data
from pneumo_exp.rundir import write_run_info, write_text_atomic
from pneumo_exp.summary import format_summary

log = logging.getLogger(__name__)

KNOWN_STAGES = ("data", "classify")


def run(cfg: DictConfig) -> dict[str, float]:
    """Returns the run's metrics (empty until a training stage runs), so sweepers can optimise them."""
    output_dir = Path(cfg.paths.output_dir)
    unknown = [stage for stage in cfg.stages if stage not in KNOWN_STAGES]
    if unknown:
        raise ValueError(f"stages: unknown stage(s) {unknown}; known: {list(KNOWN_STAGES)}")
    write_run_info(cfg, output_dir)
    if cfg.task == "predict":
        from pneumo_exp.classify.predict import predict

        print(f"predictions written to {predict(cfg, output_dir)}", flush=True)
        return {}

    data = prepare_data(cfg.dataset, cfg.paths.cache_dir, output_dir)
    if data.skipped:
        write_text_atomic(output_dir / "skipped.txt", "\n".join(data.skipped) + "\n")
    print(format_summary(data, cfg.dataset.name), flush=True)
    log.info("manifest written to %s", output_dir / "manifest.csv")
    if cfg.task == "summary":
        return {}
    metrics: dict[str, float] = {}
    if "classify" in cfg.stages:
        from pneumo_exp.classify.train import train_and_evaluate

        metrics.update(train_and_evaluate(cfg, data, output_dir, run_name=run_name(cfg)))
        if int(os.environ.get("RANK", "0")) == 0:
            print(format_metrics(metrics), flush=True)
    return metrics


def run_name(cfg: DictConfig) -> str:
    """The overrides that distinguish this job (Hydra's override_dirname), or the experiment name."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized() and HydraConfig.get().job.override_dirname:
        return HydraConfig.get().job.override_dirname
    return cfg.experiment_name


def format_metrics(metrics: dict[str, float]) -> str:
    names = ("acc", "recall_macro", "f1_macro", "balanced_acc", "auroc_macro", "ece")
    lines = [f"{'split':<6}" + "".join(f"{name:>14}" for name in names)]
    for split in ("val", "test"):
        lines.append(f"{split:<6}" + "".join(f"{metrics.get(f'{split}/{name}', float('nan')):>14.4f}"
                                             for name in names))
    return "\n".join(lines)
