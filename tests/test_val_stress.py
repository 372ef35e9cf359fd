"""bench/val_stress.py on a finished phantom run: its unshifted row is the run's own validation result."""

from __future__ import annotations

import json

import pytest
from conftest import bench_main, bench_module

from pneumo_exp.pipeline import run

pytestmark = pytest.mark.slow


def test_stress_table_reproduces_the_runs_validation_and_covers_every_shift(make_cfg, model_cache, tmp_path):
    cfg = make_cfg("dataset.patients_per_class=8", "dataset.test_patients_per_class=4", "trainer.epochs=2",
                   "trainer.batch_size=8", "trainer.bootstrap_samples=100")
    run(cfg)
    out = tmp_path / "stress.json"
    bench_main("val_stress", cfg.paths.output_dir, "--cache-dir", str(model_cache), "--out", str(out))
    table = json.loads(out.read_text())[cfg.paths.output_dir]
    assert list(table) == ["none", "gamma 0.7", "gamma 1.4", "contrast x0.75", "zoom in 15%", "zoom out 15%",
                           "blur 1px", "sharpen"]
    results = json.loads((tmp_path / "run" / "results.json").read_text())["metrics"]
    assert table["none"]["acc"] == pytest.approx(results["val/acc"], abs=1e-4)
    assert table["none"]["f1_macro"] == pytest.approx(results["val/f1_macro"], abs=1e-4)
    assert all(0 <= value <= 1 for row in table.values() for value in row.values())


def test_every_shift_changes_the_images():
    import torch

    val_stress = bench_module("val_stress")
    images = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    for name, shift in val_stress.SHIFTS.items():
        shifted = shift(images)
        assert shifted.shape == images.shape and (name == "none") == torch.equal(shifted, images), name
