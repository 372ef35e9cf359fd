"""How close synthetic images come to the real ones, per class: FID and KID (torchmetrics) in the feature space of a
caller-given encoder (e.g. a chest-X-ray model: Inception features say little about radiographs), and each
synthetic image's distance to its nearest real image in that space (a memorisation check: copies of training
images sit much closer to a real image than real images sit to each other).

`feature`: an nn.Module mapping float (B, 1, S, S) images in [0, 1] to (B, D) features.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import nn

from pneumo_exp.data.augment import resize, to_unit_float
from pneumo_exp.labels import CLASSES

EXACT = "donot_use_mm_for_euclid_dist"  # cdist without the matrix-product shortcut: a copy is at distance 0


class _Encoder(nn.Module):
    """The caller's encoder on inputs resized to `image_size`, as float64 (N, D) features."""

    def __init__(self, encoder: nn.Module, image_size: int):
        super().__init__()
        self.encoder, self.image_size = encoder, image_size

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(resize(images, self.image_size)).flatten(1).double()


class _Precomputed(nn.Module):
    """What torchmetrics calls as its feature extractor: features are computed once, beforehand, and passed in as
    the "images"; `num_features` spares torchmetrics probing the module with a 299 px RGB image."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _as_tensor(pixels) -> torch.Tensor:
    pixels = pixels if isinstance(pixels, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(pixels))
    if pixels.dtype != torch.uint8 or pixels.ndim != 3:
        raise ValueError(f"images must be uint8 (N, H, W), got {tuple(pixels.shape)} {pixels.dtype}")
    return pixels


def _features(encoder: _Encoder, pixels: torch.Tensor, batch_size: int, num_features: int) -> torch.Tensor:
    if len(pixels) == 0:
        return torch.zeros(0, num_features, dtype=torch.float64)
    features = torch.cat([encoder(to_unit_float(batch)) for batch in pixels.split(batch_size)])
    if features.shape[1] != num_features:
        raise ValueError(f"the feature module gives {features.shape[1]} features, not num_features={num_features}")
    return features


def encode(pixels, feature: nn.Module, num_features: int, image_size: int = 64, batch_size: int = 64) -> torch.Tensor:
    """float64 (N, num_features) features of uint8 (N, H, W) images resized to `image_size`, `batch_size` at a time."""
    return _features(_Encoder(feature, image_size).eval(), _as_tensor(pixels), batch_size, num_features)


def nearest_real_distances(real_features: torch.Tensor, synthetic_features: torch.Tensor) -> torch.Tensor:
    """(M,) Euclidean distance from each synthetic feature vector to its nearest real one."""
    return torch.cdist(synthetic_features.double(), real_features.double(), compute_mode=EXACT).min(dim=1).values


def real_to_real_distances(real_features: torch.Tensor) -> torch.Tensor:
    """(N,) distance from each real image to its nearest other real image: the scale the above is judged on."""
    distances = torch.cdist(real_features.double(), real_features.double(), compute_mode=EXACT)
    distances.fill_diagonal_(math.inf)
    return distances.min(dim=1).values


def diversity(features: torch.Tensor) -> float:
    """Mean pairwise distance between images of one set."""
    if len(features) < 2:
        return math.nan
    distances = torch.cdist(features.double(), features.double())
    return float(distances.sum() / (len(features) * (len(features) - 1)))


def fid_shortfall(real: int, synthetic: int, num_features: int) -> str | None:
    """Why FID cannot be computed for sets of these sizes, or None. FID compares the two sets' feature covariances;
    from N <= D images in D dimensions a covariance is singular and the distance it gives is no number to report."""
    if min(real, synthetic) > num_features:
        return None
    return (f"too few images: FID needs more images than the {num_features} feature dimensions in each set, got "
            f"{real} real and {synthetic} synthetic")


def class_quality(real_pixels, synthetic_pixels, feature: nn.Module, num_features: int, image_size: int = 64,
                  kid_subset_size: int = 50, kid_subsets: int = 100, batch_size: int = 64, seed: int = 0,
                  copy_fraction: float = 0.25) -> dict:
    """FID, KID (mean, std), diversity relative to the real images, nearest-real-neighbour distances, and the
    likely copies (synthetic images `copy_fraction` x closer to a real one than real images are to each other) for
    one class's real and synthetic images. The encoder sees at most `batch_size` images at a time."""
    return feature_quality(encode(real_pixels, feature, num_features, image_size, batch_size),
                           encode(synthetic_pixels, feature, num_features, image_size, batch_size), num_features,
                           kid_subset_size, kid_subsets, seed, copy_fraction)


def feature_quality(real_features: torch.Tensor, synthetic_features: torch.Tensor, num_features: int,
                    kid_subset_size: int = 50, kid_subsets: int = 100, seed: int = 0,
                    copy_fraction: float = 0.25) -> dict:
    """`class_quality` from features already computed (`encode`).

    FID is None, with the reason in `fid_note`, where a set has no more images than features (`fid_shortfall`);
    KID, an unbiased polynomial-kernel estimate that inverts no covariance, is computed from 2 images per set."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    result = {"real": len(real_features), "synthetic": len(synthetic_features), "fid": None, "kid_mean": math.nan,
              "kid_std": math.nan}
    shortfall = fid_shortfall(len(real_features), len(synthetic_features), num_features)
    if shortfall:
        result["fid_note"] = shortfall
    else:
        fid = FrechetInceptionDistance(feature=_Precomputed(num_features))
        fid.update(real_features, real=True)
        fid.update(synthetic_features, real=False)
        result["fid"] = float(fid.compute())
    if len(real_features) >= 2 and len(synthetic_features) >= 2:
        with warnings.catch_warnings():  # "KID keeps all features in memory": they are (N, D), computed above
            warnings.simplefilter("ignore", UserWarning)
            kid = KernelInceptionDistance(feature=_Precomputed(num_features), subsets=kid_subsets,
                                          subset_size=min(kid_subset_size, len(real_features),
                                                          len(synthetic_features)))
        kid.update(real_features, real=True)
        kid.update(synthetic_features, real=False)
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # KID draws random subsets
            kid_mean, kid_std = kid.compute()
        result["kid_mean"], result["kid_std"] = float(kid_mean), float(kid_std)
    if len(real_features) and len(synthetic_features):
        nearest = nearest_real_distances(real_features, synthetic_features)
        result.update(nn_mean=float(nearest.mean()), nn_min=float(nearest.min()),
                      nn_median=float(nearest.median()), nn_max=float(nearest.max()))
        if len(real_features) >= 2:
            result["real_nn_median"] = float(real_to_real_distances(real_features).median())
        result["diversity_synthetic_over_real"] = diversity(synthetic_features) / diversity(real_features)
        result["likely_copies"] = int((nearest < copy_fraction * result.get("real_nn_median", math.nan)).sum())
    return result


def quality_report(real: dict[str, object], synthetic: dict[str, object], feature: nn.Module, num_features: int,
                   **options) -> dict[str, dict]:
    """`class_quality` for every class present in both `real` and `synthetic` ({class: uint8 (N, H, W)})."""
    return {label: class_quality(real[label], synthetic[label], feature, num_features, **options)
            for label in CLASSES if label in real and label in synthetic}
