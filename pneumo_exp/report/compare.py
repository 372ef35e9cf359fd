"""Paired comparisons of two configurations over the runs both completed, paired by seed and, where both arms were
replicated over the same generators, by generator replicate: the Student-t CI over the replicated units (the
generator means of the paired differences where two or more generators were trained, else the seeds), then,
conditional on the trained models, a paired patient-level bootstrap CI over the test split and an exact
patient-clustered McNemar p per run pair and over them together. Test images are paired by the sha256 of their bytes
(from each run's manifest.csv), so runs that read the dataset from another folder still pair; where they tested
different images, the comparison says so. An augmentation study's gains (`study_gains`): each arm against the `none`
and `duplicate_real` arms of the same real fraction."""

from __future__ import annotations

import contextlib
import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pneumo_exp.classify.metrics import paired_bootstrap_intervals
from pneumo_exp.errors import UserError
from pneumo_exp.labels import CLASSES
from pneumo_exp.report.collect import (
    COMPLETED,
    RunRecord,
    group_runs,
    newest_per_unit,
    override_parts,
    parse_override,
)
from pneumo_exp.report.statistics import (
    ONE_GENERATOR,
    finite,
    metric_title,
    replicated_summary,
    replication_text,
    sign_flip_p,
    unit_label,
)

# Pairs of configurations compared when `report.pairs` is not given: (A, B) reports A - B.
AUGMENTATION_PAIR = ("original_study", "original_no_augmentation")
DEFAULT_PAIRS = (AUGMENTATION_PAIR, ("linear_probe", "zero_shot"), ("lora", "zero_shot"), ("full", "zero_shot"))
PAIR_METRICS = ("test/acc", "test/f1_macro")
NO_DIFFERENCE = "no difference shown"
PATIENT_LEVEL, IMAGE_LEVEL = "patient", "image"  # the units McNemar's test takes as independent
CONDITIONAL = "conditional on the trained models (which test patients were drawn), not on the recipe"
# The augmentation study (experiment=augment_study/<arm>): the arms every other arm's gain is measured against, the
# order of its rows, and recipes of the study that are no arm.
GAIN_REFERENCES = ("none", "duplicate_real")
GAIN_METRICS = ("test/acc", "test/f1_macro")
ARM_ORDER = ("none", "duplicate_real", "mix", "filtered", "synthetic_then_real")
NOT_ARMS = ("judge",)

Units = dict[tuple[str | None, Any], RunRecord]  # {(generator replicate, seed): its newest completed run}


def check_pairs(pairs: Any) -> list[tuple[str, str]]:
    """`report.pairs` as a list of (A, B) configuration selectors."""
    if not isinstance(pairs, (list, tuple)) or not all(
            isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) and x for x in pair)
            for pair in pairs):
        raise UserError(f"report.pairs={pairs!r} is not a list of [A, B] pairs", where="report.pairs",
                        fix="give e.g. report.pairs=[[original_study,original_no_augmentation],[lora,zero_shot]]")
    return [(str(a), str(b)) for a, b in pairs]


def matches(selector: str, experiment: str, key: str) -> bool:
    """`name`: a recipe (`experiment=paper/NAME`, or the full recipe path) or an experiment_name;
    `key=value[,key=value]`: a configuration holding all of those overrides."""
    parts = set(override_parts(key))
    if "=" in selector:
        wanted = {"=".join(parse_override(part)) for part in override_parts(selector)}
        return wanted <= parts
    recipes = [part.split("=", 1)[1] for part in parts if part.startswith("experiment=")]
    return experiment == selector or any(r == selector or r.endswith("/" + selector) for r in recipes)


def select_configuration(selector: str, groups: dict[tuple[str, str], list[RunRecord]]) -> list[tuple[str, str]]:
    return [name for name in groups if matches(selector, *name)]


@dataclass(frozen=True)
class TestedImage:
    path: str
    label: int
    prediction: int
    patient: str | None  # from manifest.csv; None where it does not list the image
    sha256: str  # of the image's bytes, from manifest.csv; "" where it does not give one


@dataclass(frozen=True)
class SeedPairing:
    """One seed's two runs matched image by image, or the reason they could not be."""
    key: str  # what matched the images: "sha256", or "path" where a manifest.csv gives no sha256
    reason: str = ""  # why the images could not be matched; "" when they were
    arrays: tuple | None = None  # (targets, predictions_a, predictions_b, patients or None) over the matched images
    images: tuple[str, ...] = ()  # the matching keys, in the arrays' order: the units of an image-level test


def read_test_predictions(folder: Path) -> list[TestedImage] | None:
    """A run's test images from predictions.csv, each with its patient and sha256 from manifest.csv;
    None without readable predictions."""
    index = {name: number for number, name in enumerate(CLASSES)}
    try:
        with (folder / "predictions.csv").open(newline="") as handle:
            rows = [(row["path"], index[row["label"]], index[row["prediction"]]) for row in csv.DictReader(handle)]
    except (OSError, KeyError, csv.Error):
        return None
    described = manifest_test_rows(folder)
    return [TestedImage(path, label, prediction, *described.get(path, (None, ""))) for path, label, prediction in rows]


def manifest_test_rows(folder: Path) -> dict[str, tuple[str, str]]:
    """{path: (patient_id, sha256)} of the test rows of a run's manifest.csv; empty without a readable one."""
    with contextlib.suppress(OSError, KeyError, csv.Error):
        with (folder / "manifest.csv").open(newline="") as handle:
            return {row["path"]: (row["patient_id"], row.get("sha256") or "") for row in csv.DictReader(handle)
                    if row["split"] == "test"}
    return {}


def matching_keys(images: list[TestedImage], key: str) -> dict[str, TestedImage]:
    """Each image under its path, or under its sha256 numbered among copies of the same bytes (in patient, then
    path order, which a moved dataset folder keeps)."""
    if key == "path":
        return {image.path: image for image in images}
    copies: dict[str, int] = {}
    keyed = {}
    for image in sorted(images, key=lambda image: (image.patient or "", image.path)):
        copies[image.sha256] = copies.get(image.sha256, -1) + 1
        keyed[f"{image.sha256}#{copies[image.sha256]}"] = image
    return keyed


def pair_runs(run_a: RunRecord, run_b: RunRecord, a: str = "A", b: str = "B") -> SeedPairing:
    """The two runs' test results matched image by image: by sha256 where both manifests give every image's,
    else by path; patients from A's manifest."""
    tested_a, tested_b = read_test_predictions(run_a.path), read_test_predictions(run_b.path)
    for name, tested in ((a, tested_a), (b, tested_b)):
        if not tested:
            return SeedPairing("", f"no test predictions.csv from {name}")
    key = "sha256" if all(image.sha256 for image in tested_a + tested_b) else "path"
    keyed_a, keyed_b = matching_keys(tested_a, key), matching_keys(tested_b, key)
    if keyed_a.keys() != keyed_b.keys():
        shared = len(keyed_a.keys() & keyed_b.keys())
        return SeedPairing(key, f"{a} tested {len(keyed_a)} images, {b} {len(keyed_b)}, {shared} in both")
    keys = sorted(keyed_a)
    relabelled = sum(keyed_a[k].label != keyed_b[k].label for k in keys)
    if relabelled:
        return SeedPairing(key, f"{relabelled} images carry another label in {a} than in {b}")
    patients = [keyed_a[k].patient for k in keys]
    arrays = (np.array([keyed_a[k].label for k in keys]), np.array([keyed_a[k].prediction for k in keys]),
              np.array([keyed_b[k].prediction for k in keys]), None if None in patients else np.array(patients))
    return SeedPairing(key, arrays=arrays, images=tuple(keys))


def aligned_predictions(run_a: RunRecord, run_b: RunRecord) -> tuple[np.ndarray, ...] | None:
    """(targets, predictions_a, predictions_b, patients or None) over the test images both runs predicted;
    None when predictions are missing or the two runs were tested on different images."""
    return pair_runs(run_a, run_b).arrays


def discordance(targets: np.ndarray, predictions_a: np.ndarray, predictions_b: np.ndarray,
                units: np.ndarray) -> dict[str, int]:
    """Per unit (patient, or image): the images only A got right minus those only B got right."""
    differences = (predictions_a == targets).astype(int) - (predictions_b == targets).astype(int)
    totals: dict[str, int] = {}
    for unit, difference in zip(np.asarray(units).astype(str), differences):
        totals[unit] = totals.get(unit, 0) + int(difference)
    return totals


def mcnemar(targets: np.ndarray, predictions_a: np.ndarray, predictions_b: np.ndarray,
            units: np.ndarray | None = None) -> dict:
    """McNemar's test with `units` (patient ids) as the independent units: exact, by flipping the sign of each
    unit's discordance (`statistics.sign_flip_p`); each image is its own unit without them (McNemar's exact test).
    a_only, b_only: images only A, only B got right; image_level_p: the exact test taking images as independent."""
    right_a, right_b = predictions_a == targets, predictions_b == targets
    by_image = discordance(targets, predictions_a, predictions_b, np.arange(len(targets)))
    by_unit = by_image if units is None else discordance(targets, predictions_a, predictions_b, units)
    return {"a_only": int(np.sum(right_a & ~right_b)), "b_only": int(np.sum(~right_a & right_b)),
            "level": IMAGE_LEVEL if units is None else PATIENT_LEVEL, "p": sign_flip_p(by_unit.values()),
            "image_level_p": sign_flip_p(by_image.values())}


def mcnemar_over_seeds(paired: dict[int, SeedPairing], level: str, per_seed: dict[int, dict]) -> dict:
    """One test of the seeds together: each unit's discordance summed over the seeds and its sign flipped as a whole.
    The seeds test the same patients, so their p values are not independent and are not combined by Fisher's or
    Stouffer's method. `per_seed`: each seed's `mcnemar`, for the image counts."""
    summed: dict[str, int] = {}
    for pairing in paired.values():
        for unit, difference in discordance(*pairing.arrays[:3], seed_units(pairing, level)).items():
            summed[unit] = summed.get(unit, 0) + difference
    return {"seeds": list(paired), "level": level, "a_only": sum(test["a_only"] for test in per_seed.values()),
            "b_only": sum(test["b_only"] for test in per_seed.values()), "units": len(summed),
            "p": sign_flip_p(summed.values())}


def seed_units(pairing: SeedPairing, level: str) -> np.ndarray:
    return pairing.arrays[3] if level == PATIENT_LEVEL else np.array(pairing.images)


def pairing_summary(pairings: dict[int, SeedPairing]) -> dict:
    """key (what matched the images), seeds (those paired), unpaired {seed: reason}, images and patients of the
    first paired seed's test split (patients None where unknown)."""
    paired = [pairing for pairing in pairings.values() if not pairing.reason]
    arrays = paired[0].arrays if paired else None
    return {"key": next((pairing.key for pairing in paired + list(pairings.values()) if pairing.key), ""),
            "seeds": [seed for seed, pairing in pairings.items() if not pairing.reason],
            "unpaired": {seed: pairing.reason for seed, pairing in pairings.items() if pairing.reason},
            "images": len(arrays[0]) if arrays else 0,
            "patients": len(set(arrays[3])) if arrays and arrays[3] is not None else None}


def pairing_text(comparison: dict) -> str:
    """What the bootstrap and McNemar compared: the note beside a compared pair's verdict."""
    pairing = comparison["pairing"]
    seeds_of: dict[str, list[str]] = {}
    for seed, reason in pairing["unpaired"].items():
        seeds_of.setdefault(reason, []).append(str(seed))
    unpaired = "; ".join(f"seed{'s' if len(seeds) > 1 else ''} {' '.join(seeds)}: {reason}"
                         for reason, seeds in seeds_of.items())
    if not pairing["seeds"]:
        return f"not paired: the verdict rests on the t CI alone ({unpaired})"
    patients = (f"{pairing['patients']} patients" if pairing["patients"] is not None else
                "patients unknown (not in manifest.csv): no bootstrap, McNemar image-level")
    seeds = f" in seeds {' '.join(map(str, pairing['seeds']))}" if unpaired else ""
    text = f"paired by {pairing['key']}{seeds}: {pairing['images']} images, {patients}"
    return text + (f"; in the t CI only, not paired: {unpaired}" if unpaired else "")


def verdict(a: str, b: str, over_units: tuple[float, float] | None,
            over_patients: tuple[float, float] | None) -> str:
    """A difference is claimed only with a CI over the replicated units (2 or more seeds, or generators) that
    excludes 0, and the patient bootstrap's CI, where there is one, excluding 0 on the same side."""
    if over_units is None:
        return f"{NO_DIFFERENCE} (one seed: no CI over seeds)"
    intervals = [over_units] + ([over_patients] if over_patients is not None else [])
    if all(low > 0 for low, _ in intervals):
        return f"{a} higher"
    if all(high < 0 for _, high in intervals):
        return f"{b} higher"
    return NO_DIFFERENCE


def compare_pair(a: str, b: str, groups: dict[tuple[str, str], list[RunRecord]], samples: int) -> dict:
    """a, b, status (compared | missing | ambiguous), reason, seeds, units (the paired runs, `unit_label`),
    generators (those the pair is replicated over), replication (which units the CI is over, then `unmeasured`),
    unmeasured (the arms whose one generator's variability is not measured), metrics {name: n, level, units,
    difference, t_low, t_high, bootstrap_low, bootstrap_high, verdict}, bootstrap_seeds (the units bootstrapped),
    pairing (`pairing_summary`), mcnemar {unit: `mcnemar`} and mcnemar_all_seeds (`mcnemar_over_seeds`, None without
    a paired unit)."""
    comparison: dict[str, Any] = {"a": a, "b": b, "status": "missing", "reason": "", "seeds": [], "units": [],
                                  "generators": [], "replication": "", "unmeasured": [], "metrics": {},
                                  "bootstrap_seeds": [], "pairing": {}, "mcnemar": {}, "mcnemar_all_seeds": None}
    arms = {}
    for name in (a, b):
        selected = select_configuration(name, groups)
        if len(selected) > 1:
            return comparison | {"status": "ambiguous", "reason": f"{name} matches {len(selected)} configurations"}
        arms[name] = completed_units(groups[selected[0]]) if selected else {}
        if not arms[name]:
            return comparison | {"reason": f"no completed runs of {name}"}
    paired_runs = unit_pairs(arms[a], arms[b])
    if not paired_runs:
        return comparison | {"reason": unpaired_reason(a, b, arms[a], arms[b])}
    by_label = {unit_label(unit): runs for unit, runs in paired_runs.items()}
    pairings = {label: pair_runs(*runs, a, b) for label, runs in by_label.items()}
    paired = {label: pairing for label, pairing in pairings.items() if not pairing.reason}
    with_patients = [label for label, pairing in paired.items() if pairing.arrays[3] is not None]
    bootstrap = paired_bootstrap_intervals([paired[label].arrays for label in with_patients], samples=samples) \
        if with_patients else {}
    metrics = {metric: metric_difference(a, b, paired_runs, metric, bootstrap.get(metric_title(metric), {}).get("ci"))
               for metric in PAIR_METRICS}
    level = PATIENT_LEVEL if len(with_patients) == len(paired) else IMAGE_LEVEL
    per_unit = {label: mcnemar(*pairing.arrays[:3], seed_units(pairing, level)) for label, pairing in paired.items()}
    return comparison | {"status": "compared", "seeds": sorted({seed for _, seed in paired_runs}),
                         "units": list(by_label), "generators": sorted({g for g, _ in paired_runs if g is not None}),
                         "replication": pair_replication(arms, paired_runs), "unmeasured": unmeasured(arms),
                         "metrics": metrics,
                         "bootstrap_seeds": with_patients, "pairing": pairing_summary(pairings), "mcnemar": per_unit,
                         "mcnemar_all_seeds": mcnemar_over_seeds(paired, level, per_unit) if paired else None}


def completed_units(members: list[RunRecord]) -> Units:
    completed = newest_per_unit([run for run in members if run.status == COMPLETED])
    return {run.unit: run for run in completed if run.seed is not None}


def unit_pairs(units_a: Units, units_b: Units) -> dict[tuple[str | None, Any], tuple[RunRecord, RunRecord]]:
    """The runs of A and B paired by seed, and by generator replicate where both arms were replicated over
    generators: an arm with one generator (or none) pairs with each generator of the other. Keyed by (the
    generator the pair is replicated over, None when neither arm has several; seed)."""
    several_a, several_b = (len({generator for generator, _ in units}) > 1 for units in (units_a, units_b))
    pairs = {}
    for (generator_a, seed), run_a in units_a.items():
        for (generator_b, seed_b), run_b in units_b.items():
            if seed_b == seed and (generator_a == generator_b or not (several_a and several_b)):
                generator = generator_a if several_a else generator_b if several_b else None
                pairs[(generator, seed)] = (run_a, run_b)
    return dict(sorted(pairs.items(), key=lambda item: (item[0][1], str(item[0][0]))))


def unpaired_reason(a: str, b: str, units_a: Units, units_b: Units) -> str:
    if {seed for _, seed in units_a} & {seed for _, seed in units_b}:
        return f"{a} and {b} were replicated over different generators: no pair of runs to compare"
    return f"no seed completed in both {a} and {b}"


def unmeasured(arms: dict[str, Units]) -> list[str]:
    """`<arm> has one generator: its variability is not measured`, for each arm read from one generator."""
    return [f"{name} has {ONE_GENERATOR}" for name, units in arms.items()
            if len({generator for generator, _ in units}) == 1 and next(iter(units))[0] is not None]


def pair_replication(arms: dict[str, Units], pairs: dict) -> str:
    """`replication_text` of the paired units, then each arm whose one generator's variability is not measured."""
    return "; ".join([replication_text(pairs), *unmeasured(arms)])


def metric_difference(a: str, b: str, runs: dict[tuple[str | None, Any], tuple[RunRecord, RunRecord]], metric: str,
                      bootstrap: list[float] | None) -> dict:
    """The paired differences' mean and t CI over the replicated units (`replicated_summary`) beside the patient
    bootstrap's CI, and the verdict."""
    differences = replicated_summary({unit: difference(run_a, run_b, metric) for unit, (run_a, run_b) in runs.items()})
    over_units = (differences["ci_low"], differences["ci_high"]) if differences["ci_low"] is not None else None
    return {"n": differences["n"], "level": differences["level"], "units": differences["units"],
            "difference": differences["mean"], "t_low": differences["ci_low"], "t_high": differences["ci_high"],
            "bootstrap_low": bootstrap[0] if bootstrap else None, "bootstrap_high": bootstrap[1] if bootstrap else None,
            "verdict": verdict(a, b, over_units, tuple(bootstrap) if bootstrap else None)}


def difference(run_a: RunRecord, run_b: RunRecord, metric: str) -> float | None:
    value_a, value_b = run_a.metrics.get(metric), run_b.metrics.get(metric)
    return value_a - value_b if is_number(value_a) and is_number(value_b) else None


def is_number(value: Any) -> bool:
    return bool(finite([value]))


def compare_pairs(runs: Iterable[RunRecord], pairs: Sequence[tuple[str, str]] | None, samples: int) -> list[dict]:
    """Explicit pairs are all reported (missing ones as missing); of the default pairs, those with a run of
    either side, so that a report of an unrelated sweep has no comparison section."""
    groups = group_runs(runs)
    if pairs is not None:
        return [compare_pair(a, b, groups, samples) for a, b in check_pairs(pairs)]
    present = [(a, b) for a, b in DEFAULT_PAIRS
               if select_configuration(a, groups) or select_configuration(b, groups)]
    return [compare_pair(a, b, groups, samples) for a, b in present]


# ------------------------------------------------------------------------------------------- augmentation study

def is_study(runs: Iterable[RunRecord]) -> bool:
    """Runs of the augmentation study (experiment=augment_study/<arm>), or of several real fractions."""
    runs = list(runs)
    return any(run.in_study for run in runs) or len({run.train_fraction for run in runs}) > 1


def study_gains(runs: Iterable[RunRecord]) -> list[dict]:
    """One row per configuration (real fraction and arm) in fraction, then arm order: fraction, arm, label (the arm,
    with its other overrides where two configurations share a fraction and arm), configuration, seeds, generators,
    replication, metrics {name: `replicated_summary`} and gains {reference arm: {"replication", "metrics"
    {name: `replicated_summary` of the paired differences}} or {"reason"}}, against each arm of GAIN_REFERENCES at the
    same fraction."""
    configurations = {key: units for (_, key), members in group_runs(runs).items()
                      if (units := completed_units(members)) and first(units).arm not in NOT_ARMS}
    rows = [gain_row(key, units, configurations) for key, units in configurations.items()]
    labels = [(row["fraction"], row["arm"]) for row in rows]
    for row in rows:
        if labels.count((row["fraction"], row["arm"])) > 1:
            row["label"] = f"{row['arm']} ({other_overrides(row['configuration']) or row['configuration']})"
    return sorted(rows, key=lambda row: (row["fraction"], arm_order(row["arm"]), row["label"]))


def first(units: Units) -> RunRecord:
    return next(iter(units.values()))


def gain_row(key: str, units: Units, configurations: dict[str, Units]) -> dict:
    run = first(units)
    return {"fraction": run.train_fraction, "arm": run.arm, "label": run.arm, "configuration": key,
            "seeds": sorted({seed for _, seed in units}),
            "generators": sorted({generator for generator, _ in units if generator is not None}),
            "replication": replication_text(units),
            "metrics": {metric: replicated_summary({unit: r.metrics.get(metric) for unit, r in units.items()})
                        for metric in GAIN_METRICS},
            "gains": {reference: gain_over(run, units, reference, configurations) for reference in GAIN_REFERENCES
                      if run.arm != reference}}


def gain_over(run: RunRecord, units: Units, reference: str, configurations: dict[str, Units]) -> dict:
    """The paired gain over the `reference` arm of the same real fraction, or the reason there is none."""
    matching = [other for other in configurations.values()
                if first(other).arm == reference and first(other).train_fraction == run.train_fraction]
    if len(matching) != 1:
        return {"reason": f"{len(matching) or 'no'} {reference} configurations at fraction {run.train_fraction:g}"}
    pairs = unit_pairs(units, matching[0])
    if not pairs:
        return {"reason": unpaired_reason(run.arm, reference, units, matching[0])}
    return {"replication": pair_replication({run.arm: units, reference: matching[0]}, pairs),
            "metrics": {metric: replicated_summary({unit: difference(a, b, metric) for unit, (a, b) in pairs.items()})
                        for metric in GAIN_METRICS}}


def other_overrides(key: str) -> str:
    """A configuration's overrides but the arm and the real fraction."""
    return ",".join(part for part in override_parts(key)
                    if not part.startswith(("experiment=", "dataset.train_fraction=")))


def arm_order(arm: str) -> tuple[int, str]:
    return (ARM_ORDER.index(arm), "") if arm in ARM_ORDER else (len(ARM_ORDER), arm)
