"""A fair instrument (issue 32): augmentation arms differ only in the images they add. Class weights count the real
images, synthetic images weigh `augmentation.synthetic_weight` in the loss, `trainer.max_steps` fixes the optimizer
steps whatever the image count, `augmentation.schedule=synthetic_then_real` spends the budget's first share on the
added images, and `trainer.precision=auto` resolves by the device; results.json records each."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import compose
from test_train_loop import frozen_training, phantom_split

from pneumo_exp.classify import train as classify_train
from pneumo_exp.classify.checkpoint import load_training_state
from pneumo_exp.classify.train import (
    SplitTensors,
    budget_phases,
    class_weights,
    train_and_evaluate,
    train_one_epoch,
    training_class_weights,
    training_objective,
)
from pneumo_exp.config import ClassWeightsFrom, Precision, job_config
from pneumo_exp.core import training as core_training
from pneumo_exp.core.history import epoch_rows, read_json_lines
from pneumo_exp.core.seeds import epoch_seed
from pneumo_exp.core.training import budget_epochs, fresh_accelerator, resolve_precision
from pneumo_exp.data.augment import to_unit_float
from pneumo_exp.data.phantom import phantom_records, render
from pneumo_exp.data.prepare import PreparedData, prepare_data
from pneumo_exp.errors import UserError
from pneumo_exp.labels import CLASSES, class_index
from pneumo_exp.tracking import RunLogger

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ADDED_PER_CLASS = {"NORMAL": 2, "BACTERIA": 10, "VIRUS": 18}  # skewed, to move class weights counted over all images
BUDGET = ["debug=smoke", "clip_lora=tiny_vit", "trainer.batch_size=16", "trainer.max_steps=10",
          "trainer.ema_decay=0.9", "trainer.precision=auto", "trainer.log_every_steps=1"]


def added_records(counts: dict[str, int], source: str = "synthetic") -> list:
    """Training images added to the real ones: phantom images of patients no split holds."""
    drawn = phantom_records(patients_per_class=max(counts.values(), default=1), test_patients_per_class=0,
                            images_per_patient=1, seed=7)
    return [dataclasses.replace(r, source=source, patient_id=f"added-{r.patient_id}")
            for label in CLASSES for r in [r for r in drawn if r.label == label][:counts.get(label, 0)]]


def with_added(real: SplitTensors, counts: dict[str, int], source: str = "synthetic") -> SplitTensors:
    added = added_records(counts, source)
    pixels = torch.from_numpy(np.stack([render(r.path, real.pixels.shape[-1]) for r in added]))
    labels = torch.tensor([class_index(r.label) for r in added])
    return SplitTensors(real.records + added, torch.cat([real.pixels, pixels]), torch.cat([real.labels, labels]))


# ------------------------------------------------------------------------------------------------ class weights


def test_class_weights_count_the_real_images_so_an_arm_with_added_images_weighs_classes_alike():
    real = phantom_split({"NORMAL": 12, "BACTERIA": 4, "VIRUS": 2})
    augmented = with_added(real, ADDED_PER_CLASS)
    by_real = training_class_weights(augmented, ClassWeightsFrom.real)
    assert torch.equal(by_real, training_class_weights(real, ClassWeightsFrom.real))
    assert torch.equal(by_real, class_weights(real.labels))
    by_all = training_class_weights(augmented, ClassWeightsFrom.real_and_added)
    assert torch.equal(by_all, class_weights(augmented.labels)) and not torch.allclose(by_all, by_real)


def test_a_split_without_real_images_is_weighed_by_its_own_class_counts():
    """The quality stage trains a classifier on synthetic images alone (its classification accuracy score)."""
    added = with_added(phantom_split({"NORMAL": 1, "BACTERIA": 1, "VIRUS": 1}), ADDED_PER_CLASS)
    synthetic = SplitTensors(added.records[3:], added.pixels[3:], added.labels[3:])
    assert torch.equal(training_class_weights(synthetic, ClassWeightsFrom.real), class_weights(synthetic.labels))


def test_the_sampler_draws_by_the_real_class_counts(make_cfg, monkeypatch):
    train = with_added(phantom_split({"NORMAL": 12, "BACTERIA": 4, "VIRUS": 2}), ADDED_PER_CLASS, "duplicate")
    cfg, _, model, optimizer, scheduler, accelerator = frozen_training(
        make_cfg, "trainer.class_balance=sampler", "trainer.batch_size=64")  # one step: the whole epoch's draw
    shards = []
    original = classify_train.optimizer_steps
    monkeypatch.setattr(classify_train, "optimizer_steps", lambda shard, *args: shards.append(shard) or
                        original(shard, *args))
    train_one_epoch(model, optimizer, scheduler, train, cfg, 1, accelerator, None, None)
    real_weights = class_weights(train.labels[: 12 + 4 + 2])
    expected = torch.multinomial(real_weights[train.labels], len(train.labels), replacement=True,
                                 generator=torch.Generator().manual_seed(epoch_seed(cfg.seed, 1)))
    assert torch.equal(shards[0], expected)


# --------------------------------------------------------------------------------------------- synthetic weight


def test_a_synthetic_weight_of_a_half_halves_a_synthetic_images_share_of_the_objective():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0]])
    labels = torch.tensor([class_index("NORMAL"), class_index("BACTERIA"), class_index("VIRUS")])
    losses = F.cross_entropy(logits, labels, reduction="none")
    weights = torch.tensor([1.0, 2.0, 4.0])
    real_real_synthetic = torch.tensor([1.0, 1.0, 0.5])
    expected = (1 * losses[0] + 2 * losses[1] + 0.5 * 4 * losses[2]) / (1 + 2 + 0.5 * 4)
    assert training_objective(logits, labels, weights, 0.0, real_real_synthetic).item() == pytest.approx(
        expected.item(), rel=1e-6)
    without_class_weights = (losses[0] + losses[1] + 0.5 * losses[2]) / 2.5
    assert training_objective(logits, labels, None, 0.0, real_real_synthetic).item() == pytest.approx(
        without_class_weights.item(), rel=1e-6)


def test_the_epoch_objective_weighs_synthetic_images_by_the_synthetic_weight(make_cfg):
    train = with_added(phantom_split({"NORMAL": 6, "BACTERIA": 4, "VIRUS": 2}), {"NORMAL": 2, "BACTERIA": 3,
                                                                                "VIRUS": 4})
    cfg, classifier, model, optimizer, scheduler, accelerator = frozen_training(
        make_cfg, "trainer.class_balance=weighted_loss", "augmentation.synthetic_weight=0.5", "trainer.batch_size=64")
    weights = training_class_weights(train, ClassWeightsFrom.real)
    metrics = train_one_epoch(model, optimizer, scheduler, train, cfg, 1, accelerator, weights, None)
    with torch.no_grad():
        losses = F.cross_entropy(classifier.eval()(to_unit_float(train.pixels)).float(), train.labels,
                                 reduction="none")
    synthetic = torch.tensor([r.source == "synthetic" for r in train.records])
    image_weights = weights[train.labels] * torch.where(synthetic, 0.5, 1.0)
    assert metrics["objective"] == pytest.approx(((image_weights * losses).sum() / image_weights.sum()).item(),
                                                 rel=1e-5)


# ----------------------------------------------------------------------------------- step budget and schedule


def test_a_step_budget_is_whole_passes_then_a_partial_one():
    assert budget_epochs(10, 4) == [4, 4, 2]
    assert budget_epochs(8, 4) == [4, 4]
    assert budget_epochs(3, 4) == [3]


def test_the_synthetic_then_real_schedule_needs_added_images(make_cfg):
    cfg = make_cfg("trainer.max_steps=4", "augmentation.schedule=synthetic_then_real")
    with pytest.raises(UserError) as refused:
        budget_phases(phantom_split({"NORMAL": 4, "BACTERIA": 4, "VIRUS": 4}), cfg.augmentation, 4)
    assert refused.value.where == "augmentation.schedule"


class BudgetRun:
    """A finished classify job on phantom data with `added` images appended to its training split; the optimizer
    steps its epochs drew (positions in the training split) and the loss weights each epoch got."""

    def __init__(self, folder: Path, cache: Path, added: dict[str, int], *overrides: str):
        cfg = job_config(compose([f"paths.output_dir={folder}", f"paths.cache_dir={cache}", "logger=none", *BUDGET,
                                  *overrides]))
        data = prepare_data(cfg.dataset, cfg.paths.cache_dir)
        data = PreparedData(data.records + added_records(added))
        self.folder, self.train_records = folder, data.split("train")
        self.steps: list[list[torch.Tensor]] = []
        self.loss_weights: list[torch.Tensor | None] = []
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(core_training, "read_cpuinfo", lambda: "flags\t: fpu sse avx2\n")  # precision=auto: no
            self._record_steps_and_weights(patch)
            with RunLogger(cfg, folder, job_type="classify", run_name="fair") as logger:
                train_and_evaluate(cfg, data, folder, logger)
        self.results = json.loads((folder / "results.json").read_text())
        self.rows = read_json_lines(folder / "metrics.jsonl")
        self.epochs = epoch_rows(self.rows)

    def _record_steps_and_weights(self, patch) -> None:
        optimizer_steps, one_epoch = classify_train.optimizer_steps, classify_train.train_one_epoch

        def recorded_steps(*args):
            steps = optimizer_steps(*args)
            self.steps.extend(torch.cat(micro_batches) for micro_batches in steps)
            return steps

        def recorded_epoch(*args):
            self.loss_weights.append(args[7])
            return one_epoch(*args)

        patch.setattr(classify_train, "optimizer_steps", recorded_steps)
        patch.setattr(classify_train, "train_one_epoch", recorded_epoch)

    def sources_of_step(self, step: int) -> set[str]:
        return {self.train_records[i].source for i in self.steps[step].tolist()}


@pytest.fixture(scope="module")
def arms(tmp_path_factory, model_cache) -> dict[str, BudgetRun]:
    """Two arms of one step budget: the real images alone, and with synthetic images added (a third more)."""
    folder = tmp_path_factory.mktemp("arms")
    return {"real": BudgetRun(folder / "real", model_cache, {}),
            "augmented": BudgetRun(folder / "augmented", model_cache, ADDED_PER_CLASS)}


def test_arms_of_different_sizes_run_the_same_optimizer_steps(arms):
    real, augmented = arms["real"], arms["augmented"]
    assert augmented.results["train_images"]["synthetic"] == sum(ADDED_PER_CLASS.values())
    assert len(real.epochs) == len(augmented.epochs)  # epochs as long as a pass over the real images: validated alike
    for arm in arms.values():
        assert arm.results["optimizer_steps"] == len(arm.steps) == 10
        passes = [row["train/optimizer_steps"] for row in arm.epochs]
        assert passes == budget_epochs(10, passes[0])  # whole passes, the last one partial, each validated
        assert all("val/f1_macro" in row for row in arm.epochs)
        assert arm.epochs[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # the cosine schedule ends with the budget
        average = load_training_state(arm.folder / "checkpoints" / "last")["weight_average"]
        assert average["updates"] == 10
        assert [row["step"] for row in arm.rows if "step" in row] == list(range(1, 11))  # counted over the run


def test_arms_with_the_same_real_images_train_and_record_the_same_class_weights(arms):
    real_labels = torch.tensor([class_index(r.label) for r in arms["real"].train_records])
    expected = dict(zip(CLASSES, class_weights(real_labels).tolist()))
    assert [arm.results["class_weights"] for arm in arms.values()] == [pytest.approx(expected)] * 2
    for arm in arms.values():
        assert all(weights.tolist() == pytest.approx(list(arm.results["class_weights"].values()))
                   for weights in arm.loss_weights)


def test_results_record_the_instrument(arms):
    results = arms["augmented"].results
    assert results["train_images"] == {"real": len(arms["real"].train_records),
                                       "synthetic": sum(ADDED_PER_CLASS.values()), "duplicate": 0}
    assert results["train_fraction"] == 1.0
    assert results["precision"] == "no"  # auto, on a CPU whose flags name no bf16 units


def test_a_step_budget_says_that_the_epoch_count_is_not_used(tmp_path, model_cache, caplog):
    with caplog.at_level(logging.INFO, logger="pneumo_exp.classify.train"):
        BudgetRun(tmp_path / "run", model_cache, {}, "trainer.max_steps=3")
    said = [record.getMessage() for record in caplog.records if "trainer.epochs" in record.getMessage()]
    assert len(said) == 1 and "is not used" in said[0]


def test_the_first_share_of_the_budget_draws_only_added_images(tmp_path, model_cache):
    run = BudgetRun(tmp_path / "run", model_cache, ADDED_PER_CLASS, "augmentation.schedule=synthetic_then_real",
                    "augmentation.pretrain_share=0.4")
    pretraining = round(0.4 * 10)
    assert len(run.steps) == run.results["optimizer_steps"] == 10
    assert all(run.sources_of_step(step) == {"synthetic"} for step in range(pretraining))
    assert all(run.sources_of_step(step) == {"real"} for step in range(pretraining, 10))
    learning_rates = [row["lr"] for row in run.epochs]  # one schedule over both phases: no second warm-up
    assert learning_rates == sorted(learning_rates, reverse=True) and learning_rates[-1] == pytest.approx(0, abs=1e-12)


# ------------------------------------------------------------------------------------------------- precision


CPU_WITHOUT_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n"


@pytest.mark.parametrize("flags, expected", [
    ("avx512_bf16", "bf16"), ("amx_bf16 amx_tile", "bf16"), ("avx512_fp16", "no")])
def test_auto_precision_is_bf16_only_on_a_cpu_that_computes_it(flags, expected):
    cpuinfo = f"processor\t: 0\nflags\t\t: fpu sse2 avx2 {flags}\nbugs\t\t: spectre_v1\n"
    assert resolve_precision("auto", cpu=True, cpuinfo=cpuinfo) == expected
    assert resolve_precision("auto", cpu=True, cpuinfo=CPU_WITHOUT_BF16) == "no"


@pytest.mark.parametrize("bf16_units", [True, False])
def test_auto_precision_on_a_gpu_asks_whether_it_computes_bf16(monkeypatch, bf16_units):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",  # emulated bf16 is "supported" on any GPU
                        lambda including_emulation=True: including_emulation or bf16_units)
    assert resolve_precision("auto", cpu=False, cpuinfo=CPU_WITHOUT_BF16) == ("bf16" if bf16_units else "no")
    assert resolve_precision("auto", cpu=True, cpuinfo=CPU_WITHOUT_BF16) == "no"  # trainer.cpu: the CPU decides


def test_a_named_precision_is_kept_and_the_accelerator_takes_auto(monkeypatch):
    assert [resolve_precision(p, cpu=True, cpuinfo="flags : amx_bf16") for p in ("no", "fp16", "bf16")] == [
        "no", "fp16", "bf16"]
    assert resolve_precision(Precision.no, cpu=True) == "no"
    monkeypatch.setattr(core_training, "read_cpuinfo", lambda: CPU_WITHOUT_BF16)
    assert fresh_accelerator("auto", cpu=True).mixed_precision == "no"
