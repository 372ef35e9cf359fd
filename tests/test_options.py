"""Options do what their names say: label smoothing stays uniform under class weights, a selection metric that no
epoch can maximise is refused before training, and models.json holds the commit each load actually read."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, compose, write_image

from pneumo_exp.labels import CLASSES, class_index

# ------------------------------------------------------------------------------------ label smoothing and weights


def test_smoothed_weighted_loss_equals_the_hand_computed_value():
    from pneumo_exp.classify.train import training_objective

    # softmax of [0, ln 2, 0] is [1/4, 1/2, 1/4]; smoothing 0.3 over 3 classes: the target is 0.8 / 0.1 / 0.1
    logits = torch.tensor([[0.0, math.log(2), 0.0]] * 2)
    labels = torch.tensor([class_index("NORMAL"), class_index("BACTERIA")])
    weights = torch.ones(len(CLASSES))
    weights[class_index("BACTERIA")] = 3.0
    normal_loss = 0.8 * math.log(4) + 0.1 * math.log(2) + 0.1 * math.log(4)  # 1.9 ln 2
    bacteria_loss = 0.1 * math.log(4) + 0.8 * math.log(2) + 0.1 * math.log(4)  # 1.2 ln 2
    expected = (1 * normal_loss + 3 * bacteria_loss) / (1 + 3)  # the weighted mean over images
    assert training_objective(logits, labels, weights, 0.3).item() == pytest.approx(expected, rel=1e-6)


def test_the_smoothed_target_is_uniform_whatever_the_class_weights():
    from pneumo_exp.classify.train import training_objective

    logits = torch.tensor([[0.3, -0.2, 0.5]], requires_grad=True)
    bacteria = torch.tensor([class_index("BACTERIA")])
    weights = torch.tensor([0.5, 4.0, 2.0])
    training_objective(logits, bacteria, weights, 0.1).backward()
    target = logits.softmax(-1).detach() - logits.grad  # the gradient of a cross-entropy is p - target
    expected = torch.full((1, 3), 0.1 / 3)
    expected[0, class_index("BACTERIA")] = 0.9 + 0.1 / 3
    assert torch.allclose(target, expected, atol=1e-6)


def test_the_epoch_objective_is_the_weighted_mean_of_uniformly_smoothed_losses(make_cfg):
    from test_train_loop import frozen_training, phantom_split

    from pneumo_exp.classify.train import class_weights, train_one_epoch
    from pneumo_exp.data.augment import to_unit_float

    train = phantom_split({"NORMAL": 12, "BACTERIA": 4, "VIRUS": 2})
    cfg, classifier, model, optimizer, scheduler, accelerator = frozen_training(
        make_cfg, "trainer.class_balance=weighted_loss", "trainer.label_smoothing=0.2", "trainer.batch_size=32")
    weights = class_weights(train.labels)
    metrics = train_one_epoch(model, optimizer, scheduler, train, cfg, 1, accelerator, weights, None)
    with torch.no_grad():
        log_probabilities = classifier.eval()(to_unit_float(train.pixels)).float().log_softmax(-1)
    targets = 0.8 * F.one_hot(train.labels, len(CLASSES)) + 0.2 / len(CLASSES)
    per_image = -(targets * log_probabilities).sum(-1)
    image_weights = weights[train.labels]
    expected = (image_weights * per_image).sum() / image_weights.sum()
    assert metrics["objective"] == pytest.approx(expected.item(), rel=1e-5)
