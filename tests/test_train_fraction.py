"""dataset.train_fraction: a nested, class-stratified share of the training split, whole patients, validation and
test untouched, said in the summary; and what it means for a generator trained on one share."""

from __future__ import annotations

from collections import Counter, defaultdict
from itertools import count
from pathlib import Path

import pytest
from conftest import write_image

from pneumo_exp.data import manifest
from pneumo_exp.data.kermany import split_group
from pneumo_exp.data.manifest import LeakageError, Record
from pneumo_exp.data.phantom import phantom_records
from pneumo_exp.data.prepare import PreparedData, prepare_data
from pneumo_exp.data.provenance import check_trained_within, write_training_record
from pneumo_exp.data.splits import carve_validation, keep_training_fraction
from pneumo_exp.labels import CLASSES
from pneumo_exp.summary import format_summary
from pneumo_exp.validate import SettingError


def prepared(make_cfg, *overrides: str) -> PreparedData:
    cfg = make_cfg("debug=smoke", *overrides)  # phantom: 8 patients per class of 3 images each, 7 left after val
    return prepare_data(cfg.dataset, cfg.paths.cache_dir)


def training(data: PreparedData) -> list[Record]:
    return data.split("train")


def images_per_class(records: list[Record]) -> Counter:
    return Counter(record.label for record in records)


def patients_of_many_sizes() -> list[Record]:
    """Per class, 12 training patients of 1 to 4 images, and 2 test patients."""
    return [Record(f"{split}/{label}/{p}_{i}.png", label, f"{split}-{label}-{p}", split)
            for split, patients in (("train", 12), ("test", 2)) for label in CLASSES
            for p in range(patients) for i in range(p % 4 + 1)]


@pytest.mark.parametrize("split_seed", [0, 1])
def test_a_smaller_fraction_lies_inside_a_larger_one_for_each_split_seed(make_cfg, split_seed):
    subsets = [set(training(prepared(make_cfg, f"dataset.split_seed={split_seed}", f"dataset.train_fraction={f}")))
               for f in (0.25, 0.5, 1)]
    assert subsets[0] < subsets[1] < subsets[2]


def test_each_class_keeps_about_its_share_of_the_training_images(make_cfg):
    full = images_per_class(training(prepared(make_cfg)))
    for fraction in (0.25, 0.5, 0.75):
        kept = images_per_class(training(prepared(make_cfg, f"dataset.train_fraction={fraction}")))
        for label in CLASSES:  # within half a patient (3 images) of the share
            assert abs(kept[label] - fraction * full[label]) <= 1.5, (fraction, label, kept, full)


def test_whole_patients_are_kept_or_dropped_and_no_patient_leaks():
    rows = patients_of_many_sizes()
    images_of = Counter(r.patient_id for r in rows)
    for fraction in (0.2, 0.5, 0.8):
        kept = keep_training_fraction(rows, fraction, seed=0)
        assert 0 < len(kept) < len(rows)
        assert all(n == images_of[p] for p, n in Counter(r.patient_id for r in kept).items())
        assert manifest.leaking_patients(kept) == {}


def test_validation_and_test_are_those_of_the_whole_training_split(make_cfg):
    full = prepared(make_cfg)
    half = prepared(make_cfg, "dataset.train_fraction=0.5")
    assert set(training(half)) < set(training(full))
    assert half.split("val") == full.split("val")
    assert half.split("test") == full.split("test")
    manifest.check_no_leakage(half.records)


def test_a_fraction_of_one_keeps_the_data_as_it_was(make_cfg):
    whole = prepared(make_cfg, "dataset.train_fraction=1")
    as_before = carve_validation(phantom_records(patients_per_class=8, test_patients_per_class=4), 0.15, seed=0)
    assert whole.records == as_before
    assert whole.notes == []
    rows = patients_of_many_sizes()
    assert keep_training_fraction(rows, 1.0, seed=0) is rows


def test_the_subset_is_fixed_by_the_split_seed(make_cfg):
    assert prepared(make_cfg, "dataset.train_fraction=0.5") == prepared(make_cfg, "dataset.train_fraction=0.5")
    rows = patients_of_many_sizes()
    assert keep_training_fraction(rows, 0.5, seed=0) == keep_training_fraction(rows, 0.5, seed=0)
    assert keep_training_fraction(rows, 0.5, seed=0) != keep_training_fraction(rows, 0.5, seed=1)


def test_synthetic_training_records_are_kept():
    drawn = [Record(f"synthetic/{label}.png", label, f"synthetic-{label}", "train", source="synthetic")
             for label in CLASSES]
    rows = patients_of_many_sizes()
    kept = keep_training_fraction(rows + drawn, 0.5, seed=0)
    assert kept[-len(drawn):] == drawn
    assert len(kept) < len(rows)


def test_a_fraction_that_leaves_a_class_without_a_patient_is_refused_naming_the_key(make_cfg):
    with pytest.raises(SettingError) as refused:
        prepared(make_cfg, "dataset.train_fraction=0.05")  # 1 of 21 images per class: under half a patient
    message = str(refused.value)
    assert "\n" not in message
    assert "(dataset.train_fraction)" in message and "keeps no training patient of class NORMAL" in message
    assert "use at least 0.072" in message  # 3 / (2 * 21), rounded up
    assert training(prepared(make_cfg, "dataset.train_fraction=0.072"))


def test_the_summary_says_how_much_was_kept_and_that_it_is_a_real_result(make_cfg):
    full = training(prepared(make_cfg))
    half = prepared(make_cfg, "dataset.train_fraction=0.5")
    patients = [len({r.patient_id for r in records}) for records in (training(half), full)]
    text = format_summary(half, "phantom")
    assert (f"note: train_fraction: dataset.train_fraction=0.5 keeps whole patients, about 0.5 of each class's "
            f"training images (nested for split_seed=0): {len(training(half))} of {len(full)} training images, "
            f"{patients[0]} of {patients[1]} patients; validation and test are complete, so this is a real result"
            ) in text


def make_kermany_tree(root: Path) -> Path:
    """A {train,test}/{NORMAL,BACTERIA,VIRUS} tree where persons 1-8 have both a bacterial and a viral image,
    persons 9-14 only bacterial ones, 15-20 only viral ones; every image of its own shade."""
    shades = count(1)
    names = {"NORMAL": [f"IM-{n:04d}-0001" for n in range(1, 15)],
             "BACTERIA": [f"person{n}_bacteria_{n}" for n in range(1, 15)],
             "VIRUS": [f"person{n}_virus_{n}" for n in [*range(1, 9), *range(15, 21)]]}
    for label, stems in names.items():
        for stem in stems:
            write_image(root / "train" / label / f"{stem}.jpg", next(shades))
    for label, stem in (("NORMAL", "IM-0100-0001"), ("BACTERIA", "person100_bacteria_1"),
                        ("VIRUS", "person101_virus_1")):
        write_image(root / "test" / label / f"{stem}.jpg", next(shades))
    return root


def test_a_kermany_person_stays_whole_across_classes(make_cfg, tmp_path):
    root = make_kermany_tree(tmp_path / "kermany")
    configs = (make_cfg("dataset=kermany", f"dataset.root={root}", "dataset.val_fraction=0",
                        f"dataset.train_fraction={fraction}") for fraction in (1, 0.5))
    full, half = (prepare_data(cfg.dataset, str(tmp_path / "cache")) for cfg in configs)
    kept = set(training(half))
    images_per_group = defaultdict(set)
    for record in training(full):
        images_per_group[split_group(record.patient_id)].add(record)
    assert all(images <= kept or not images & kept for images in images_per_group.values())
    assert 0 < len(kept) < len(training(full))


def test_a_generator_trained_on_a_smaller_share_may_serve_a_larger_one_but_not_the_reverse(make_cfg, tmp_path):
    quarter, half = (training(prepared(make_cfg, f"dataset.train_fraction={f}")) for f in (0.25, 0.5))
    write_training_record(tmp_path / "on_quarter", quarter)
    write_training_record(tmp_path / "on_half", half)
    check_trained_within(tmp_path / "on_quarter", half, "LoRA", "diffusion_lora.lora")
    with pytest.raises(LeakageError, match="outside this run's training split"):
        check_trained_within(tmp_path / "on_half", quarter, "LoRA", "diffusion_lora.lora")
