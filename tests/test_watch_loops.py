"""Loops you can watch: the optimizer step's gradient norm in both trainers' rows, one non-finite-loss watch that
reads the device only where a loop logs (a nan loss still stops every trainer before its next checkpoint), and the
classifier's step rows (`trainer.log_every_steps`), which a resumed run rewrites and the report leaves out."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import RecordedRows, compose
from test_train_loop import frozen_training, phantom_split

from pneumo_exp.classify.train import epoch_randomness, train_one_epoch
from pneumo_exp.config import ClassBalance
from pneumo_exp.core.history import read_json_lines
from pneumo_exp.core.training import NonFiniteLossError, fresh_accelerator, optimizer_step
from pneumo_exp.data.augment import to_unit_float
from pneumo_exp.data.cache import load_pixels
from pneumo_exp.data.phantom import phantom_records
from pneumo_exp.labels import class_index

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# the classifier at a few seconds: 2 epochs of 3 steps
QUICK = ["debug=smoke", "trainer.max_steps_per_epoch=3"]
TIMINGS = {"train/step_seconds", "train/images_per_second"}


# ------------------------------------------------------------------------------------------- gradient norm


@pytest.mark.parametrize("max_grad_norm", [0.0, 1e-3, 100.0])
def test_the_optimizer_step_returns_the_gradient_norm_before_clipping(max_grad_norm):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1, bias=False)
    inputs, targets = torch.randn(8, 3), torch.randn(8)
    weight, lr = model.weight.detach().clone().view(3), 0.1
    # by hand: each micro-batch of 4 has loss mean((x w - t)^2), gradient 2/4 x^T (x w - t); the step averages them
    gradients = [2 / 4 * x.T @ (x @ weight - t) for x, t in zip(inputs.split(4), targets.split(4), strict=True)]
    expected = torch.linalg.vector_norm((gradients[0] + gradients[1]) / 2).item()
    accelerator = fresh_accelerator("no", cpu=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)

    def loss_of(indices: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(model(inputs[indices]).squeeze(-1), targets[indices])

    step = optimizer_step(accelerator, model, optimizer, scheduler, list(torch.arange(8).split(4)), loss_of,
                          model.parameters(), max_grad_norm)
    assert step.grad_norm.item() == pytest.approx(expected, rel=1e-5)
    applied = torch.linalg.vector_norm(weight - model.weight.detach().view(3)).item() / lr
    assert applied == pytest.approx(min(expected, max_grad_norm) if max_grad_norm else expected, rel=1e-3)


def hand_gradient_norm(classifier, pixels: torch.Tensor, labels: torch.Tensor) -> float:
    classifier.zero_grad()
    F.cross_entropy(classifier(to_unit_float(pixels)).float(), labels).backward()
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in classifier.parameters()
                                                 if p.grad is not None]))
    classifier.zero_grad()
    return norm.item()


def test_the_classifier_logs_the_gradient_norm_per_epoch_and_per_step_row(make_cfg):
    train = phantom_split({"NORMAL": 6, "BACTERIA": 6, "VIRUS": 6})
    cfg, classifier, model, optimizer, scheduler, accelerator = frozen_training(  # weights that cannot move
        make_cfg, "trainer.class_balance=none", "trainer.batch_size=9", "trainer.log_every_steps=1")
    step_rows = []
    metrics = train_one_epoch(model, optimizer, scheduler, train, cfg, 1, accelerator, None, None, step_rows.append)
    order, _ = epoch_randomness(cfg.seed, 1, 0, train.labels, ClassBalance.none)
    batches = order.split(9)
    norms = [hand_gradient_norm(classifier, train.pixels[batch], train.labels[batch]) for batch in batches]
    assert [row["step"] for row in step_rows] == [1, 2]
    assert [row["train_step/grad_norm"] for row in step_rows] == pytest.approx(norms, rel=1e-4)
    assert metrics["grad_norm"] == pytest.approx(np.mean(norms), rel=1e-4)
    with torch.no_grad():
        losses = [F.cross_entropy(classifier(to_unit_float(train.pixels[batch])).float(), train.labels[batch]).item()
                  for batch in batches]
    assert [row["train_step/loss"] for row in step_rows] == pytest.approx(losses, rel=1e-4)
    assert all("epoch" not in row and row["train_step/epoch"] == 1 for row in step_rows)


# ---------------------------------------------------------------------------------------------- diffusion


def phantom_images():
    from pneumo_exp.diffusion.train import TrainingImages

    records = phantom_records(patients_per_class=2, test_patients_per_class=0, images_per_patient=2)
    return TrainingImages(torch.from_numpy(np.stack([load_pixels(r, 64) for r in records])),
                          torch.tensor([class_index(r.label) for r in records]))


def diffusion_config(output: Path, cache: Path, **training):
    cfg = compose([f"paths.output_dir={output}", f"paths.cache_dir={cache}", "logger=none", "trainer.cpu=true"])
    settings = {"batch_size": 2, "lr": 2e-3, "warmup_ratio": 0.0, "validation_every": 0, "crop_min_side": 1.0,
                **training}
    for key, value in settings.items():
        cfg.diffusion_lora.training[key] = value
    return cfg


@pytest.mark.slow
def test_the_diffusion_rows_carry_the_gradient_norm_of_their_steps(model_cache, tmp_path, monkeypatch):
    from pneumo_exp.diffusion import train

    norms = []

    def recording(*args, **kwargs):
        step = optimizer_step(*args, **kwargs)
        norms.append(step.grad_norm.item())
        return step

    monkeypatch.setattr(train, "optimizer_step", recording)
    rows = RecordedRows()
    train.train_diffusion_lora(diffusion_config(tmp_path, model_cache, max_train_steps=3, log_every=2),
                               phantom_images(), tmp_path, logger=rows)
    logged = [row["diffusion/grad_norm"] for row in rows if "diffusion/grad_norm" in row]
    assert len(norms) == 3 and all(norm > 0 for norm in norms)
    assert logged == pytest.approx([np.mean(norms[:2]), norms[2]], rel=1e-6)


def count_project_reads(monkeypatch) -> list[int]:
    """Counts the reads of a tensor's value (a device-to-host synchronisation on a GPU) that pneumo_exp's own code
    makes; AdamW's reads of its step counters are left out (they live on the CPU, whatever the device)."""
    calls = [0]
    for name in ("item", "tolist", "__bool__", "__float__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            calls[0] += f"{os.sep}pneumo_exp{os.sep}" in sys._getframe(1).f_code.co_filename
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return calls


@pytest.mark.slow
def test_the_diffusion_loop_reads_the_device_only_when_it_logs(model_cache, tmp_path, monkeypatch):
    from pneumo_exp.diffusion.train import train_diffusion_lora

    reads = {}
    for steps in (2, 5):
        cfg = diffusion_config(tmp_path / str(steps), model_cache, max_train_steps=steps, log_every=100)
        data = phantom_images()
        with monkeypatch.context() as patch:
            calls = count_project_reads(patch)
            train_diffusion_lora(cfg, data, tmp_path / str(steps))
        reads[steps] = calls[0]
    assert reads[5] == reads[2], reads


@pytest.mark.slow
def test_a_nan_diffusion_loss_stops_before_the_epochs_checkpoint(model_cache, tmp_path, monkeypatch):
    from pneumo_exp.diffusion import train

    plain, calls = train.latent_loss, [0]

    def nan_from_the_second_step(*args, **kwargs):
        calls[0] += 1
        return plain(*args, **kwargs) * (float("nan") if calls[0] >= 2 else 1.0)

    monkeypatch.setattr(train, "latent_loss", nan_from_the_second_step)
    cfg = diffusion_config(tmp_path, model_cache, max_train_steps=4, log_every=100)
    with pytest.raises(NonFiniteLossError, match="diffusion loss became non-finite at step 2") as stopped:
        train.train_diffusion_lora(cfg, phantom_images(), tmp_path)
    assert calls[0] == 4  # found where the loop logs (its last step), not by a read in every step
    assert "diffusion_lora.training.lr" in stopped.value.where
    assert not (tmp_path / "diffusion" / "checkpoints").exists()


# ----------------------------------------------------------------------------------------------- pretraining


@pytest.mark.slow
def test_a_nan_pretraining_loss_stops_before_the_next_checkpoint_and_rows_carry_gradient_norms(tmp_path,
                                                                                             model_cache,
                                                                                             monkeypatch):
    from test_pretrain import config, pretrain

    from pneumo_exp.diffusion import pretrain as pretraining
    from pneumo_exp.diffusion.pretrain import PretrainingState

    plain, calls = pretraining.latent_loss, [0]

    def nan_from_unet_step_7(*args, **kwargs):
        calls[0] += 1
        return plain(*args, **kwargs) * (float("nan") if calls[0] >= 7 else 1.0)

    monkeypatch.setattr(pretraining, "latent_loss", nan_from_unet_step_7)
    cfg = config(tmp_path, model_cache, "diffusion_lora.pretraining.checkpoint_every=5",
                 "diffusion_lora.pretraining.log_every=5", steps=(10, 15))
    rows = RecordedRows()
    with pytest.raises(NonFiniteLossError, match="the unet loss became non-finite at pretraining step 7"):
        pretrain(cfg, rows)
    assert calls[0] == 10  # the watch is read at the row of step 10, before the checkpoint of step 10
    (state_folder,) = Path(cfg.diffusion_lora.pretrained).glob("train-*.state")  # the split's base, in progress
    state = PretrainingState(state_folder.with_suffix(""), "")
    assert (state.progress()["phase"], state.progress()["step"]) == ("unet", 5)
    vae_norms = [row["pretrain/vae_grad_norm"] for row in rows if "pretrain/vae_grad_norm" in row]
    assert len(vae_norms) == 2 and all(np.isfinite(vae_norms)) and min(vae_norms) > 0
    assert [row["pretrain/unet_step"] for row in rows if "pretrain/unet_grad_norm" in row] == [5]


# ---------------------------------------------------------------------------------------------- step rows


def test_log_every_steps_is_refused_below_one(make_cfg):
    from pneumo_exp.validate import SettingError, check_settings

    check_settings(make_cfg("trainer.log_every_steps=1"))
    with pytest.raises(SettingError) as refused:
        check_settings(make_cfg("trainer.log_every_steps=0"))
    assert refused.value.where == "trainer.log_every_steps"


@pytest.mark.slow
def test_step_rows_survive_a_resume_and_the_report_reads_only_the_epoch_rows(make_cfg, tmp_path, monkeypatch):
    from pneumo_exp.pipeline import run
    from pneumo_exp.report import write_report
    from pneumo_exp.report.collect import collect_runs
    from pneumo_exp.tracking import RunLogger

    straight, resumed = tmp_path / "runs" / "straight", tmp_path / "runs" / "resumed"
    settings = [*QUICK, "trainer.log_every_steps=2"]
    run(make_cfg(*settings, f"paths.output_dir={straight}"))

    class Crash(Exception):
        pass

    log_row = RunLogger.log_row

    def crash_in_epoch_two(self, row):
        if row.get("train_step/epoch") == 2:
            raise Crash
        log_row(self, row)

    with monkeypatch.context() as patch:
        patch.setattr(RunLogger, "log_row", crash_in_epoch_two)
        with pytest.raises(Crash):
            run(make_cfg(*settings, f"paths.output_dir={resumed}"))
    run(make_cfg(*settings, f"paths.output_dir={resumed}", "resume=true"))

    rows = read_json_lines(resumed / "metrics.jsonl")
    without_timings = [{key: value for key, value in row.items() if key not in TIMINGS} for row in rows]
    assert without_timings == [{key: value for key, value in row.items() if key not in TIMINGS}
                               for row in read_json_lines(straight / "metrics.jsonl")]
    assert [(row.get("epoch"), row.get("step")) for row in rows] == [(None, 2), (1, None), (None, 5), (2, None)]
    epochs = [row for row in rows if "epoch" in row]
    results = json.loads((resumed / "results.json").read_text())
    assert results["best_epoch"] == max(epochs, key=lambda row: row["val/f1_macro"])["epoch"]

    runs = collect_runs(tmp_path / "runs")
    assert len(runs) == 2 and all([row["epoch"] for row in run.history] == [1, 2] for run in runs)
    report = write_report(tmp_path / "runs", tmp_path / "report")
    assert f"{epochs[1]['train/acc']:.4f}" in report["epochs.md"].read_text()  # both runs' epoch 2, step rows aside
