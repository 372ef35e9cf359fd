"""A small residual CNN that can stand in for CLIP's vision transformer when training from scratch.

It answers the call CLIP makes on its vision tower (pixel_values in, `pooler_output` out), so CLIP's projection,
text side and scaled-cosine logits stay as they are. BatchNorm makes it learn from scratch in a few dozen steps
(with GroupNorm every image started at the same embedding for ~200 steps). Weights and activations are kept
channels-last: on CPU that trains faster than the default layout, most of all under bf16 autocast
(`bench/bench_precision.py`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling


def norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels)


class ResidualBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = norm(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          norm(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(y)) + self.shortcut(x))


class ConvVisionTower(nn.Module):
    memory_format = torch.channels_last  # of weights and activations; bench/bench_precision.py compares the default

    def __init__(self, widths: list[int], blocks_per_stage: int, hidden_size: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, stride=2, padding=1, bias=False), norm(widths[0]),
                                  nn.ReLU())
        stages, channels = [], widths[0]
        for index, width in enumerate(widths):
            blocks = [ResidualBlock(channels, width, stride=1 if index == 0 else 2)]
            blocks += [ResidualBlock(width, width, stride=1) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(channels, hidden_size)
        self.to(memory_format=self.memory_format)

    def train(self, mode: bool = True) -> ConvVisionTower:
        """BatchNorm layers update their statistics only when their own weights train: with the tower frozen or
        adapted by LoRA, the statistics stay those of the base weights, so a saved adapter reproduces the model."""
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.train(mode and module.weight.requires_grad)
        return self

    def forward(self, pixel_values: torch.Tensor, **_) -> BaseModelOutputWithPooling:
        features = self.stages(self.stem(pixel_values.contiguous(memory_format=self.memory_format)))
        pooled = self.head(features.mean(dim=(2, 3)))
        return BaseModelOutputWithPooling(last_hidden_state=features, pooler_output=pooled)
