"""Training augmentations on batched tensors: random zoom in or out, shift, small rotation, brightness, contrast
and gamma.

One affine warp per image (zoom, shift and rotation together) keeps it a single `grid_sample` call; what a zoom out
or a rotation uncovers is black, as at the edge of a radiograph. The ranges are `trainer.augment_settings`
(`pneumo_exp.config.AugmentSettings`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pneumo_exp.config import AugmentSettings


def to_unit_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W) -> float (B, 1, H, W) in [0, 1]."""
    return pixels.unsqueeze(1).float().div_(255.0)


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def affine_warp(images: torch.Tensor, theta: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
    """theta (B, 2, 3) maps output coordinates to input ones, both in [-1, 1]."""
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


def scale_contrast(images: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Stretch each image's pixels about its own mean (factor < 1 flattens); not clamped."""
    mean = images.mean(dim=(2, 3), keepdim=True)
    return (images - mean) * factor + mean


def random_augment(images: torch.Tensor, settings: AugmentSettings, generator: torch.Generator) -> torch.Tensor:
    """images: float (B, 1, H, W) in [0, 1]; returns the same shape."""
    batch = images.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:  # drawn on the CPU generator, used on the images' device
        return (low + (high - low) * torch.rand(batch, generator=generator)).to(images.device)

    scale = uniform(*settings.crop_scale).sqrt()  # side length of the crop relative to the image
    angle = uniform(-settings.max_rotation_degrees, settings.max_rotation_degrees) * math.pi / 180
    shift_x = uniform(-1, 1) * (1 - scale)
    shift_y = uniform(-1, 1) * (1 - scale)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1)
    warped = affine_warp(images, theta)

    contrast = uniform(1 - settings.contrast, 1 + settings.contrast).view(-1, 1, 1, 1)
    brightness = uniform(-settings.brightness, settings.brightness).view(-1, 1, 1, 1)
    adjusted = (scale_contrast(warped, contrast) + brightness).clamp_(0.0, 1.0)
    if settings.max_gamma > 1:
        log_gamma = math.log(settings.max_gamma)
        adjusted = adjusted.pow(uniform(-log_gamma, log_gamma).exp().view(-1, 1, 1, 1))
    return adjusted
