"""Fidelity numbers pinned where the answer is known: a set against itself or a second sample of its distribution
(precision, recall, coverage about 1, density about 1, two-sample AUROC about 0.5), against a far cluster (all 0,
AUROC 1), a copy of the real set (AUROC exactly 0.5: no copy is scored by a model that saw its original), FID at
matched sizes (the size bias gone), and the intervals over draws and over paired draws."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pneumo_exp.evaluation.fidelity import (
    NEIGHBOURS,
    RealReference,
    matched_sizes,
    paired_difference,
    precision_recall_density_coverage,
    t_interval,
    two_sample_auroc,
)
from pneumo_exp.evaluation.quality import feature_quality

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DIMENSIONS = 16


def gaussian(count: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(count, DIMENSIONS, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


def test_a_set_against_itself_or_its_own_distribution_is_real_looking():
    real = gaussian(200, 0)
    itself = precision_recall_density_coverage(real, real.clone())
    assert (itself["precision"], itself["recall"], itself["coverage"]) == (1.0, 1.0, 1.0)
    assert itself["density"] == pytest.approx((NEIGHBOURS + 1) / NEIGHBOURS)  # each ball also holds its centre
    same = precision_recall_density_coverage(real, gaussian(200, 1))
    assert min(same["precision"], same["recall"], same["coverage"]) > 0.8 and 0.8 < same["density"] < 1.2, same
    test = two_sample_auroc(real, gaussian(200, 1))
    assert test["ci_low"] < 0.5 < test["ci_high"] and abs(test["auroc"] - 0.5) < 0.06, test


def test_a_copy_of_the_real_set_is_scored_by_no_model_that_saw_its_original():
    """Without copies kept in one fold, a copy's original trains the model under the other label, and the copies
    score far below 0.5 (about 0.26 here)."""
    real = gaussian(200, 0)
    assert two_sample_auroc(real, real.clone())["auroc"] == 0.5
    half_copies = two_sample_auroc(real, torch.cat([real[:100], gaussian(100, 1)]))
    assert half_copies["ci_low"] < 0.5 < half_copies["ci_high"], half_copies


def test_a_far_cluster_is_told_apart_and_covers_nothing():
    real, far = gaussian(200, 0), gaussian(150, 1, shift=20.0)
    assert precision_recall_density_coverage(real, far) == {"precision": 0.0, "recall": 0.0, "density": 0.0,
                                                            "coverage": 0.0}
    test = two_sample_auroc(real, far)
    assert test["auroc"] == 1.0 and test["ci_low"] > 0.9 and test["folds"] == 5


def test_sets_too_small_say_so_instead_of_a_number():
    assert precision_recall_density_coverage(gaussian(20, 0), gaussian(NEIGHBOURS, 1))["recall"] is None
    assert "needs 2 or more" in two_sample_auroc(gaussian(20, 0), gaussian(1, 1))["note"]


def test_fid_at_matched_sizes_compares_a_small_and_a_large_arm_of_one_distribution():
    """FID grows as a set shrinks: 40 and 1000 images of the training images' own distribution score about 19x
    apart unmatched, and alike once both are cut to 40."""
    real, labels = gaussian(2000, 0), np.zeros(2000, dtype=np.int64)
    small, large = gaussian(40, 1), gaussian(1000, 2)
    unmatched = [feature_quality(real, arm, DIMENSIONS, kid_subsets=10)["fid"] for arm in (small, large)]
    assert unmatched[0] > 5 * unmatched[1]
    sizes = matched_sizes({"NORMAL": 40}, {"NORMAL": 1000})
    assert sizes == {"NORMAL": 40}
    reference = RealReference(real, labels, sizes, DIMENSIONS, kid_subsets=10)
    matched = [reference.measure(arm, np.zeros(len(arm), dtype=np.int64), seed=0)["overall"] for arm in (small, large)]
    assert [row["images"] for row in matched] == [40, 40]
    assert 1 / 1.5 < matched[0]["fid"] / matched[1]["fid"] < 1.5, matched


def test_every_arm_is_cut_to_the_classes_and_sizes_all_arms_share():
    assert matched_sizes({"NORMAL": 5, "VIRUS": 3}, {"NORMAL": 2, "VIRUS": 7, "BACTERIA": 4}) == {"NORMAL": 2,
                                                                                                 "VIRUS": 3}
    real = torch.cat([gaussian(30, 0), gaussian(30, 1, shift=5.0)])
    reference = RealReference(real, np.r_[np.zeros(30), np.full(30, 2)].astype(np.int64), {"NORMAL": 8, "VIRUS": 8},
                              DIMENSIONS, kid_subset_size=4, kid_subsets=5)
    arm = torch.cat([gaussian(12, 2), gaussian(10, 3, shift=5.0)])
    measured = reference.measure(arm, np.r_[np.zeros(12), np.full(10, 2)].astype(np.int64), seed=0)
    assert set(measured["per_class"]) == {"NORMAL", "VIRUS"} and measured["overall"]["images"] == 16
    assert measured["per_class"]["NORMAL"]["real_images"] == 30 and measured["overall"]["real_images"] == 60
    assert measured["overall"]["fid"] is None and "FID: too few images" in measured["overall"]["notes"][0]
    with pytest.raises(ValueError, match="fewer than the matched size"):
        reference.measure(arm[:5], np.zeros(5, dtype=np.int64), seed=0)


def test_two_draws_give_a_t_interval_and_a_paired_difference_decides_only_where_it_excludes_zero():
    two = t_interval([1.0, 3.0])
    assert two["mean"] == 2.0 and two["ci_low"] == pytest.approx(2 - 12.7062, abs=1e-3)
    one = t_interval([1.0, None, math.nan])
    assert one["n"] == 1 and one["ci_low"] is None
    assert paired_difference([1.0, 2.0, 3.0], [2.0, 3.1, 4.2])["verdict"] == "above 0"
    assert paired_difference([1.0, 2.0, 3.0], [0.5, 1.4, 2.6])["verdict"] == "below 0"
    assert paired_difference([1.0, 2.0], [2.0, 1.5])["verdict"] == "no difference shown"
    assert paired_difference([1.0], [2.0])["verdict"] == "no interval"
