"""Fidelity as the field measures it: how close a set of images (an arm: a generator's draw, or real validation
images) comes to the real training images, in one feature space (here a classifier's image embedding):

- precision, recall, density and coverage with k = 5 nearest neighbours (Kynkäänniemi et al. 2019; Naeem et al.
  2020): how much of the arm lies on the real manifold, and how much of the real manifold the arm covers;
- a classifier two-sample test: an L2-regularised logistic regression on the features, trained to tell real
  training images from the arm's, scored by the AUROC of out-of-fold predictions (stratified folds, so every score
  comes from a model that never saw the image), with a DeLong 95 % CI; 0.5 means the classifier cannot tell;
- FID and KID at matched sizes: both grow as a set shrinks, so every arm is cut to the same number of images per
  class before they are computed, and only arms of equal size are compared.

And the statistics over repeated draws of a generator: the Student-t 95 % CI of a metric's mean over the draws,
and the paired CI of the difference between two generators (draw i of each paired; they share their seeds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from pneumo_exp.evaluation.quality import EXACT, feature_quality
from pneumo_exp.labels import CLASSES

NEIGHBOURS = 5  # k of precision, recall, density and coverage, as Naeem et al. and CheXGenBench use
FOLDS = 5
L2_PENALTY = 1.0e-2  # on the mean log-loss, over standardised features
LEVEL = 0.95


# ------------------------------------------------------------------------ precision, recall, density, coverage


def neighbour_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) distance from each point to its k-th nearest other point of the same set."""
    distances = torch.cdist(features.double(), features.double(), compute_mode=EXACT)
    distances.fill_diagonal_(math.inf)
    return distances.kthvalue(k, dim=1).values


def precision_recall_density_coverage(real: torch.Tensor, arm: torch.Tensor, k: int = NEIGHBOURS) -> dict:
    """precision: the share of the arm inside some real image's k-NN ball; recall: the share of real images inside
    some arm image's ball; density: how many real balls hold an arm image, on average, over k (about 1 for
    an arm from the real distribution); coverage: the share of real images whose own ball holds an arm image.
    Each set needs more than k images; otherwise the values are None and `note` says why."""
    if min(len(real), len(arm)) <= k:
        return {"precision": None, "recall": None, "density": None, "coverage": None,
                "note": f"needs more than k={k} images in each set, got {len(real)} real and {len(arm)}"}
    real_radii, arm_radii = neighbour_radii(real, k), neighbour_radii(arm, k)
    arm_to_real = torch.cdist(arm.double(), real.double(), compute_mode=EXACT)  # (M, N)
    in_real_balls = arm_to_real <= real_radii[None, :]
    return {"precision": float(in_real_balls.any(dim=1).double().mean()),
            "recall": float((arm_to_real <= arm_radii[:, None]).any(dim=0).double().mean()),
            "density": float(in_real_balls.sum(dim=1).double().mean() / k),
            "coverage": float((arm_to_real.min(dim=0).values <= real_radii).double().mean())}


# ------------------------------------------------------------------------------- classifier two-sample test


def auroc_with_interval(positive: np.ndarray, negative: np.ndarray, level: float = LEVEL) -> dict:
    """AUROC of scores of positives over negatives (ties count half) and DeLong's CI (DeLong et al. 1988),
    clipped to [0, 1]; with perfect separation its width is 0."""
    wins = (positive[:, None] > negative[None, :]) + 0.5 * (positive[:, None] == negative[None, :])
    auroc = float(wins.mean())
    variance = wins.mean(axis=1).var(ddof=1) / len(positive) + wins.mean(axis=0).var(ddof=1) / len(negative)
    half_width = float(stats.norm.ppf(0.5 + level / 2) * math.sqrt(variance))
    return {"auroc": auroc, "ci_low": max(0.0, auroc - half_width), "ci_high": min(1.0, auroc + half_width)}


def fit_logistic(features: torch.Tensor, labels: torch.Tensor, l2: float = L2_PENALTY):
    """A logistic regression on features standardised with the training rows' mean and std: a scoring function."""
    mean, std = features.mean(dim=0), features.std(dim=0).clamp_min(1e-8)
    inputs = (features - mean) / std
    weights = torch.zeros(features.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights, bias], max_iter=200, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(inputs @ weights + bias, labels)
        loss = loss + 0.5 * l2 * weights.square().sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    weights, bias = weights.detach(), bias.detach()
    return lambda rows: ((rows - mean) / std) @ weights + bias


def grouped_folds(features: torch.Tensor, labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold index of every row. Identical rows (a copy and its original) share a fold, so no copy is scored by a
    model that saw its twin under the other label; the groups of each kind (real only, arm only, both) are dealt to
    the folds in a seeded order, in turn, so every fold holds both labels."""
    groups = torch.unique(features, dim=0, return_inverse=True)[1].numpy()
    kind = {group: labels[groups == group].min() + labels[groups == group].max() for group in np.unique(groups)}
    rng = np.random.default_rng(seed)
    order = [group for value in (0, 1, 2) for group in rng.permutation([g for g, k in kind.items() if k == value])]
    fold_of_group = {group: position % folds for position, group in enumerate(order)}
    return np.array([fold_of_group[group] for group in groups])


def two_sample_auroc(real: torch.Tensor, arm: torch.Tensor, folds: int = FOLDS, seed: int = 0) -> dict:
    """How well a logistic regression tells the arm's images (positives) from real ones: the AUROC, with DeLong's
    CI, of its out-of-fold scores over `folds` stratified folds (fewer where a set is smaller)."""
    folds = min(folds, len(real), len(arm))
    if folds < 2:
        return {"auroc": None, "ci_low": None, "ci_high": None,
                "note": f"needs 2 or more images in each set, got {len(real)} real and {len(arm)}"}
    features = torch.cat([real, arm]).double()
    labels = np.r_[np.zeros(len(real)), np.ones(len(arm))]
    fold_of = grouped_folds(features, labels, folds, seed)
    scores = np.empty(len(labels))
    for fold in range(folds):
        held_out = fold_of == fold
        score = fit_logistic(features[~held_out], torch.from_numpy(labels[~held_out]))
        scores[held_out] = score(features[held_out]).numpy()
    return {**auroc_with_interval(scores[labels == 1], scores[labels == 0]), "folds": folds}


# ------------------------------------------------------------------------------------------ one arm


def matched_rows(count: int, size: int, seed: int) -> np.ndarray:
    """`size` of `count` rows drawn without replacement, in their order."""
    return np.sort(np.random.default_rng(seed).choice(count, size=size, replace=False))


def set_fidelity(real: torch.Tensor, arm: torch.Tensor, real_sample: torch.Tensor, num_features: int,
                 kid_subset_size: int, kid_subsets: int, seed: int) -> dict:
    """Every fidelity number of one arm against one real set; `real_sample`: real images as many as the arm's,
    the two-sample test's negatives."""
    distances = feature_quality(real, arm, num_features, kid_subset_size, kid_subsets, seed)
    row = {"images": len(arm), "real_images": len(real), "fid": distances["fid"], "kid_mean": distances["kid_mean"],
           "kid_std": distances["kid_std"], **precision_recall_density_coverage(real, arm)}
    notes = [f"FID: {distances['fid_note']}"] if "fid_note" in distances else []
    notes += [f"precision/recall/density/coverage: {row.pop('note')}"] if "note" in row else []
    test = two_sample_auroc(real_sample, arm, seed=seed)
    row.update(c2st_auroc=test["auroc"], c2st_ci_low=test["ci_low"], c2st_ci_high=test["ci_high"])
    notes += [f"two-sample test: {test['note']}"] if "note" in test else []
    return {**row, "notes": notes} if notes else row


@dataclass
class RealReference:
    """The real training images' features, and how many images of each class every arm is cut to (the same for
    every arm, so FID and KID, which grow as sets shrink, compare)."""
    features: torch.Tensor  # (N, D) real training images
    labels: np.ndarray  # (N,) class indices
    sizes: dict[str, int]  # class -> images per arm; classes left out are not measured
    num_features: int
    kid_subset_size: int = 50
    kid_subsets: int = 100
    seed: int = 0

    def negatives(self, index: int, size: int) -> torch.Tensor:
        """The two-sample test's real images of a class: the same seeded subset for every arm."""
        rows = np.flatnonzero(self.labels == index)
        return self.features[rows[matched_rows(len(rows), size, self.seed)]]

    def measure(self, features: torch.Tensor, labels: np.ndarray, seed: int) -> dict:
        """Per class and overall (the classes pooled; the real set keeps its own class mix, the arms all share
        `sizes`): the arm's images cut to `sizes` with `seed`, measured by `set_fidelity`."""
        per_class, arm_rows, negatives = {}, [], []
        for label, size in self.sizes.items():
            index = CLASSES.index(label)
            rows = np.flatnonzero(labels == index)
            if len(rows) < size:
                raise ValueError(f"the arm has {len(rows)} {label} images, fewer than the matched size {size}")
            arm_rows.append(rows[matched_rows(len(rows), size, seed)])
            negatives.append(self.negatives(index, size))
            per_class[label] = set_fidelity(self.features[self.labels == index], features[arm_rows[-1]],
                                            negatives[-1], self.num_features, self.kid_subset_size,
                                            self.kid_subsets, seed)
        measured = np.isin(self.labels, [CLASSES.index(label) for label in self.sizes])
        overall = set_fidelity(self.features[measured], features[np.concatenate(arm_rows)], torch.cat(negatives),
                               self.num_features, self.kid_subset_size, self.kid_subsets, seed)
        return {"per_class": per_class, "overall": overall}


def matched_sizes(*counts: dict[str, int]) -> dict[str, int]:
    """Per class, the fewest images any arm has (classes every arm has, in CLASSES order)."""
    return {label: min(count[label] for count in counts) for label in CLASSES
            if all(count.get(label, 0) > 0 for count in counts)}


def measured_in(feature_space: str, preprocessing: str, sizes: dict[str, int]) -> dict:
    """What every fidelity number of a report was measured in, as its JSON and markdown state it."""
    return {"feature_space": feature_space, "preprocessing": preprocessing, "images_per_arm": sizes,
            "neighbours": NEIGHBOURS, "two_sample_test": f"L2-regularised logistic regression ({L2_PENALTY:g}) on "
            f"standardised features, real training images against the arm's, AUROC of out-of-fold scores over "
            f"{FOLDS} folds (an exact copy in the fold of its original) with DeLong's {100 * LEVEL:g} % CI (of no "
            f"width where the scores separate the sets completely)",
            "matched": "every arm cut at random to images_per_arm of each class; FID, KID, precision, recall, "
                       "density and coverage against all real training images of the class (overall: of the "
                       "measured classes); the two-sample test against as many real training images"}


# ------------------------------------------------------------------------------------ over draws


def t_interval(values, level: float = LEVEL) -> dict:
    """n, mean, sample std and the Student-t CI of the mean over the finite values; std and CI need n >= 2."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    summary = {"n": len(finite), "mean": float(np.mean(finite)) if finite else None, "std": None, "ci_low": None,
               "ci_high": None}
    if len(finite) >= 2:
        summary["std"] = float(np.std(finite, ddof=1))
        half_width = float(stats.t.ppf(0.5 + level / 2, len(finite) - 1)) * summary["std"] / math.sqrt(len(finite))
        summary["ci_low"], summary["ci_high"] = summary["mean"] - half_width, summary["mean"] + half_width
    return summary


def paired_difference(first: list, second: list) -> dict:
    """`t_interval` of second - first over the pairs where both are finite, and what it shows: `above 0`,
    `below 0`, `no difference shown` (the CI holds 0), or `no interval` (fewer than 2 pairs)."""
    differences = [b - a for a, b in zip(first, second, strict=True)
                   if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    summary = t_interval(differences)
    if summary["ci_low"] is None:
        return {**summary, "verdict": "no interval"}
    verdict = "above 0" if summary["ci_low"] > 0 else "below 0" if summary["ci_high"] < 0 else "no difference shown"
    return {**summary, "verdict": verdict}
