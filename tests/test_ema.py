"""The weight average: its arithmetic, the swap in and out of a model, and its state for resuming."""

from __future__ import annotations

import pytest
import torch

from pneumo_exp.core.ema import WeightAverage
from pneumo_exp.validate import check_plan


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))


def set_all(net: torch.nn.Module, value: float) -> None:
    with torch.no_grad():
        for tensor in [*net.parameters(), net[1].running_mean, net[1].running_var]:
            tensor.fill_(value)


def test_average_follows_the_decay_and_its_warm_up():
    net = model()
    set_all(net, 0.0)
    average = WeightAverage(net, decay=0.9)
    set_all(net, 1.0)
    expected = 0.0
    for update in range(1, 30):
        average.update(net)
        decay = min(0.9, (1 + update) / (10 + update))
        expected = decay * expected + (1 - decay)
    for name in average.names:
        assert torch.allclose(average.average[name], torch.full_like(average.average[name], expected)), name
    assert "1.running_mean" in average.names and "1.num_batches_tracked" not in average.names


def test_applied_swaps_the_average_in_and_puts_the_live_weights_back():
    net = model()
    set_all(net, 0.0)
    average = WeightAverage(net, decay=0.5)
    set_all(net, 2.0)
    with average.applied(net):
        assert net[0].weight.eq(0).all() and net[1].running_var.eq(0).all()
    assert net[0].weight.eq(2).all() and net[1].running_var.eq(2).all()


def test_frozen_parameters_are_left_out_and_state_round_trips():
    net = model()
    net[0].weight.requires_grad_(False)
    average = WeightAverage(net, decay=0.99)
    assert "0.weight" not in average.names
    average.update(net)
    restored = WeightAverage(net, decay=0.99)
    restored.load_state_dict(average.state_dict())
    assert restored.updates == 1
    assert all(torch.equal(restored.average[name], average.average[name]) for name in average.names)
    moved = average.state_dict()
    moved["average"] = {name: tensor.double() for name, tensor in moved["average"].items()}
    restored.load_state_dict(moved)  # a checkpoint read on another device or dtype lands where the average lives
    assert all(restored.average[name].dtype == torch.float32 for name in restored.names)
    with pytest.raises(KeyError, match="lacks"):
        WeightAverage(model(), decay=0.99).load_state_dict(average.state_dict())


@pytest.mark.parametrize("override, message", [
    ("trainer.ema_decay=1.0", "trainer.ema_decay"),
    ("trainer.label_smoothing=1.0", "trainer.label_smoothing"),
    ("trainer.augment_settings.crop_scale=[0.9,0.5]", "trainer.augment_settings.crop_scale"),
    ("trainer.augment_settings.max_gamma=0.5", "trainer.augment_settings.max_gamma"),
])
def test_bad_averaging_or_augmentation_settings_are_refused_by_key(make_cfg, override, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        check_plan(make_cfg(override))
