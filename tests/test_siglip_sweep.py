"""The backbone sweep: experiment=sweep/backbones as a real multirun (shrunk to 2 backbones x 2 seeds), and a report
that pairs the two backbones at one setting."""

from __future__ import annotations

import csv

import pytest
from conftest import REPO, compose
from test_sweep import output_of

pytestmark = pytest.mark.slow


def test_the_sweep_grid_is_backbone_by_alpha_by_lr_by_seed():
    from omegaconf import OmegaConf

    params = OmegaConf.load(REPO / "experiments" / "sweep" / "backbones.yaml").hydra.sweeper.params
    assert {key: len(str(value).split(",")) for key, value in params.items()} == {
        "clip_lora": 2, "clip_lora.lora.alpha": 3, "optim.lr": 2, "seed": 3}
    for backbone, side in (("tiny_siglip", 64), ("medsiglip_448", 448)):
        assert compose(["experiment=sweep/backbones", f"clip_lora={backbone}"]).dataset.resolution == side


def test_a_backbone_sweep_reports_a_pair_of_backbones(tmp_path, model_cache, command_line):
    sweep = tmp_path / "sweep"
    output_of(command_line("-m", "experiment=sweep/backbones", "clip_lora=tiny_vit,tiny_siglip",
                           "clip_lora.lora.alpha=16", "optim.lr=3e-3", "seed=0,1", "debug=smoke", "trainer.epochs=1",
                           f"hydra.sweep.dir={sweep}", f"paths.cache_dir={model_cache}"))
    assert len([job for job in sweep.iterdir() if (job / "results.json").is_file()]) == 4
    pair = '[["clip_lora=tiny_siglip,clip_lora.lora.alpha=16,optim.lr=3e-3","clip_lora=tiny_vit,optim.lr=0.003"]]'
    output_of(command_line("report", f"report.input={sweep}", f"report.output={tmp_path / 'report'}",
                           f"report.pairs={pair}", "report.bootstrap_samples=50",
                           f"hydra.run.dir={tmp_path / 'report_job'}"))
    with (tmp_path / "report" / "pairs.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {row["metric"] for row in rows} == {"test/acc", "test/f1_macro"}
    assert all(row["status"] == "compared" and row["seeds"] == "0 1" for row in rows), rows
    assert rows[0]["a"].startswith("clip_lora=tiny_siglip") and rows[0]["b"].startswith("clip_lora=tiny_vit")
