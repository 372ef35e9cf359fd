"""The training epoch at unit size: what it logs, how it draws randomness per rank, and what it reads to the host."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pneumo_exp.classify.model import build_classifier, trainable_parameters
from pneumo_exp.classify.train import (
    SplitTensors,
    class_weights,
    epoch_randomness,
    shard_of,
    train_one_epoch,
)
from pneumo_exp.config import ClassBalance, Precision
from pneumo_exp.core.training import fresh_accelerator
from pneumo_exp.data.augment import to_unit_float
from pneumo_exp.data.phantom import phantom_records, render
from pneumo_exp.labels import CLASSES, class_index


def phantom_split(counts: dict[str, int], size: int = 64) -> SplitTensors:
    """Phantom images with the given number per class (imbalanced on purpose)."""
    records = phantom_records(patients_per_class=max(counts.values()), test_patients_per_class=0,
                              images_per_patient=1)
    chosen = [r for label in CLASSES for r in [r for r in records if r.label == label][:counts[label]]]
    pixels = torch.from_numpy(np.stack([render(r.path, size) for r in chosen]))
    return SplitTensors(chosen, pixels, torch.tensor([class_index(r.label) for r in chosen]))


def frozen_training(make_cfg, *overrides: str):
    """tiny_vit (no BatchNorm, no dropout) with lr 0 under plain SGD: the weights cannot move during the epoch."""
    cfg = make_cfg("clip_lora=tiny_vit", "trainer.cpu=true", "trainer.augment=false", *overrides)
    classifier, _ = build_classifier(cfg.clip_lora, cfg.paths.cache_dir, seed=cfg.seed)
    accelerator = fresh_accelerator(Precision(cfg.trainer.precision).value, cfg.trainer.cpu)
    optimizer = torch.optim.SGD(trainable_parameters(classifier), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer = accelerator.prepare(classifier, optimizer)
    return cfg, classifier, model, optimizer, scheduler, accelerator


def test_train_loss_is_the_unweighted_cross_entropy_and_the_weighted_objective_is_kept_apart(make_cfg):
    train = phantom_split({"NORMAL": 12, "BACTERIA": 4, "VIRUS": 2})
    cfg, classifier, model, optimizer, scheduler, accelerator = frozen_training(
        make_cfg, "trainer.class_balance=weighted_loss", "trainer.batch_size=32")  # one batch: the whole set
    weights = class_weights(train.labels)
    metrics = train_one_epoch(model, optimizer, scheduler, train, cfg, 1, accelerator, weights, None)
    with torch.no_grad():
        logits = classifier.eval()(to_unit_float(train.pixels)).float()
    assert metrics["loss"] == pytest.approx(F.cross_entropy(logits, train.labels).item(), rel=1e-5)
    assert metrics["objective"] == pytest.approx(
        F.cross_entropy(logits, train.labels, weight=weights).item(), rel=1e-5)
    assert metrics["objective"] != pytest.approx(metrics["loss"], rel=1e-3)  # the weights matter on this split


def test_label_smoothing_moves_a_share_of_each_target_onto_every_class(make_cfg):
    train = phantom_split({"NORMAL": 6, "BACTERIA": 6, "VIRUS": 6})
    cfg, classifier, model, optimizer, scheduler, accelerator = frozen_training(
        make_cfg, "trainer.class_balance=none", "trainer.label_smoothing=0.3", "trainer.batch_size=32")
    metrics = train_one_epoch(model, optimizer, scheduler, train, cfg, 1, accelerator, None, None)
    with torch.no_grad():
        log_probabilities = classifier.eval()(to_unit_float(train.pixels)).float().log_softmax(-1)
    targets = 0.7 * F.one_hot(train.labels, len(CLASSES)) + 0.3 / len(CLASSES)
    assert metrics["objective"] == pytest.approx(-(targets * log_probabilities).sum(-1).mean().item(), rel=1e-5)
    assert metrics["loss"] == pytest.approx(F.nll_loss(log_probabilities, train.labels).item(), rel=1e-5)


def test_epoch_throughput_is_reported_per_step_and_per_image(make_cfg):
    train = phantom_split({"NORMAL": 4, "BACTERIA": 4, "VIRUS": 4})
    cfg, _, model, optimizer, scheduler, accelerator = frozen_training(make_cfg, "trainer.batch_size=4")
    metrics = train_one_epoch(model, optimizer, scheduler, train, cfg, 1, accelerator, None, None)
    steps = 3
    assert metrics["step_seconds"] > 0
    assert metrics["images_per_second"] * metrics["step_seconds"] * steps == pytest.approx(len(train.labels))


def count_host_reads(monkeypatch) -> list[int]:
    """Counts the calls that copy a tensor's value to Python (a device-to-host synchronisation on a GPU)."""
    calls = [0]
    for name in ("item", "tolist", "__bool__", "__float__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            calls[0] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return calls


def test_the_training_loop_does_not_read_the_device_every_step(make_cfg, monkeypatch):
    train = phantom_split({"NORMAL": 8, "BACTERIA": 8, "VIRUS": 8})
    reads = {}
    for steps in (2, 6):
        cfg, _, model, optimizer, scheduler, accelerator = frozen_training(
            make_cfg, "trainer.batch_size=4", f"trainer.max_steps_per_epoch={steps}")
        with monkeypatch.context() as patch:
            calls = count_host_reads(patch)
            train_one_epoch(model, optimizer, scheduler, train, cfg, 1, accelerator, None, None)
        reads[steps] = calls[0]
    assert reads[6] == reads[2], reads


def test_every_rank_draws_its_own_augmentation_and_dropout_but_shares_the_sample_order():
    labels = torch.arange(30) % 3
    drawn = []
    for rank in (0, 1):
        order, generator = epoch_randomness(seed=1, epoch=2, process_index=rank, labels=labels,
                                            balance=ClassBalance.none)
        drawn.append((order, torch.rand(8, generator=generator), torch.rand(8)))
    (order_0, augmentation_0, dropout_0), (order_1, augmentation_1, dropout_1) = drawn
    assert torch.equal(order_0, order_1)
    assert not torch.equal(augmentation_0, augmentation_1)
    assert not torch.equal(dropout_0, dropout_1)
    # rank 0 draws what a single-process run always drew, so one-process results and resumes are unchanged
    assert torch.equal(order_0, torch.randperm(30, generator=torch.Generator().manual_seed(1 * 100_003 + 2)))
    again, generator = epoch_randomness(seed=1, epoch=2, process_index=1, labels=labels, balance=ClassBalance.none)
    assert torch.equal(again, order_1) and torch.equal(torch.rand(8, generator=generator), augmentation_1)


@pytest.mark.parametrize("processes", [2, 3])
def test_rank_shards_partition_the_epoch_into_equal_parts(processes):
    order = torch.randperm(31, generator=torch.Generator().manual_seed(0))
    shards = [shard_of(order, rank, processes) for rank in range(processes)]
    assert len({len(shard) for shard in shards}) == 1
    together = torch.cat(shards).tolist()
    assert len(set(together)) == len(together) == 31 // processes * processes
