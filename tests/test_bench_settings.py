"""The benchmarks say what they measure: each runs at the settings it reports (the preset's, the recipe's), compares
like with like, and reports each run's own peak memory. Nothing here times anything."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import bench_module, compose

# ------------------------------------------------------------------------------------------------ bench_real_size


def test_real_size_throughput_trains_sd_lora_at_the_presets_batch_and_accumulation(tmp_path):
    bench = bench_module("bench_real_size")
    models = {"clip": tmp_path / "clip", "sd2": tmp_path / "sd2"}
    preset = compose(["experiment=paper/original_study"]).diffusion_lora.training
    overrides = bench.section_overrides(models, tmp_path / "data", cpu=True, extra=[])
    assert bench.sd_lora_settings(overrides["throughput"]) == {"batch_size": preset.batch_size,
                                                               "grad_accum_steps": preset.grad_accum_steps}
    assert bench.sd_lora_settings(overrides["rows"]) == {"batch_size": 1, "grad_accum_steps": 1}  # toy rows
    asked = bench.section_overrides(models, tmp_path / "data", cpu=True, extra=["diffusion_lora.training.batch_size=2"])
    assert bench.sd_lora_settings(asked["throughput"])["batch_size"] == 2  # what the user asks for wins


def diffusion_history(folder: Path, steps: list[tuple[float, int]]) -> Path:
    """A diffusion stage's metrics.jsonl logged every step: (seconds, images) of each, an epoch row after two."""
    rows = []
    for number, (seconds, images) in enumerate(steps, start=1):
        rows.append({"diffusion/step": number, "diffusion/step_seconds": seconds,
                     "diffusion/images_per_second": images / seconds})
        if number % 2 == 0:
            rows.append({"diffusion/step": number, "diffusion/epoch_loss": 0.1})
    (folder / "diffusion").mkdir(parents=True)
    (folder / "diffusion" / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def test_diffusion_rates_time_full_steps_after_the_first(tmp_path):
    bench = bench_module("bench_real_size")
    history = diffusion_history(tmp_path, [(5.0, 16), (1.0, 16), (0.25, 4), (1.5, 16)])  # warm-up, full, last, full
    assert bench.diffusion_rates(history, full_step_images=16) == pytest.approx(
        {"steps_timed": 2, "steps_per_second": 2 / 2.5, "images_per_second": 32 / 2.5, "images_per_step": 16})


def test_diffusion_rates_without_a_full_step_say_what_the_steps_held(tmp_path):
    bench = bench_module("bench_real_size")
    history = diffusion_history(tmp_path, [(5.0, 8), (1.0, 8), (0.5, 4)])  # fewer images than one full step
    assert bench.diffusion_rates(history, full_step_images=16) == pytest.approx(
        {"steps_timed": 2, "steps_per_second": 2 / 1.5, "images_per_second": 12 / 1.5, "images_per_step": 6})


# ------------------------------------------------------------------------------------------------ bench_precision


def test_precision_bench_times_the_recipes_own_training_step(tmp_path, model_cache, monkeypatch):
    from pneumo_exp.classify.train import class_weights

    bench = bench_module("bench_precision")
    calls = []
    monkeypatch.setattr(bench, "train_one_epoch", lambda *args: calls.append(args) or {"step_seconds": 1.0})
    recipe = compose(["experiment=kermany_cpu"])
    for precision, accelerate_precision in (("fp32", "no"), ("bf16", "bf16")):
        cfg = bench.recipe_config("kermany_cpu", 64, precision, model_cache)
        assert bench.epoch_step_seconds(cfg, "nchw", steps=2) == 1.0
        model, optimizer, scheduler, train, run_cfg, epoch, accelerator, weights, average = calls[-1]
        assert accelerator.mixed_precision == accelerate_precision
        assert len(train.labels) == 2 * recipe.trainer.batch_size * recipe.trainer.grad_accum_steps
        assert weights is not None and weights.tolist() == class_weights(train.labels).tolist()  # weighted_loss
        assert (average is not None) == (recipe.trainer.ema_decay > 0)
        assert average is None or average.decay == recipe.trainer.ema_decay
        assert optimizer.param_groups[0]["lr"] == recipe.optim.lr
        assert optimizer.param_groups[0]["weight_decay"] == recipe.optim.weight_decay
        assert run_cfg.trainer == {**recipe.trainer, "precision": run_cfg.trainer.precision, "cpu": True}
    step = bench.step_settings(cfg)
    assert (step["augment"], step["label_smoothing"], step["class_balance"]) == (
        recipe.trainer.augment, recipe.trainer.label_smoothing, "weighted_loss")


# ------------------------------------------------------------------------------------------------- bench_kermany


def test_kermany_peak_memory_is_each_runs_own(tmp_path):
    bench = bench_module("bench_kermany")
    big = [sys.executable, "-c", "block = bytearray(300 * 2 ** 20); block[::4096] = b'x' * len(block[::4096])"]
    small = [sys.executable, "-c", "print('small')"]
    code, _, big_kib = bench.run_measured(big, tmp_path / "big.log")
    assert code == 0 and big_kib > 300 * 1024
    code, _, small_kib = bench.run_measured(small, tmp_path / "small.log")
    assert code == 0 and small_kib < 100 * 1024  # not the larger peak of the run before, nor the bench's own
    assert (tmp_path / "small.log").read_text() == "small\n"
    failing = [sys.executable, "-c", "raise SystemExit(3)"]
    assert bench.run_measured(failing, tmp_path / "failing.log")[0] == 3
