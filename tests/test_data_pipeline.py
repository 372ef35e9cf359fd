"""Manifest, patient-grouped splits, the decoded-image cache, tensor augmentations, prepare_data and the CLI."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import REAL_DATA, requires_real_data

from pneumo_exp.config import AugmentSettings
from pneumo_exp.data import manifest
from pneumo_exp.data.augment import random_augment, to_unit_float
from pneumo_exp.data.cache import open_or_build
from pneumo_exp.data.manifest import LeakageError, Record
from pneumo_exp.data.phantom import phantom_records
from pneumo_exp.data.prepare import prepare_data
from pneumo_exp.data.splits import carve_validation
from pneumo_exp.errors import UserError


def records(**kwargs) -> list[Record]:
    return phantom_records(**{"patients_per_class": 20, "test_patients_per_class": 5, "images_per_patient": 3,
                              **kwargs})


def test_manifest_round_trip_and_fingerprint(tmp_path):
    rows = records()
    path = manifest.write_csv(rows, tmp_path / "m" / "manifest.csv")
    assert manifest.read_csv(path) == rows
    assert manifest.fingerprint(rows) == manifest.fingerprint(manifest.read_csv(path))
    assert not list((tmp_path / "m").glob("*.tmp"))


@pytest.mark.parametrize("change,message", [({"label": "COVID"}, "label 'COVID'"), ({"split": "dev"}, "split 'dev'"),
                                            ({"patient_id": ""}, "empty patient_id"),
                                            ({"source": "synthetic", "split": "val"}, "train only")])
def test_bad_manifest_rows_are_named(tmp_path, change, message):
    rows = records()
    rows[3] = replace(rows[3], **change)
    path = manifest.write_csv(rows, tmp_path / "manifest.csv")
    with pytest.raises(ValueError, match=message) as error:
        manifest.read_csv(path)
    assert "row 5" in str(error.value) and str(path) in str(error.value)


def test_manifest_missing_column_is_named(tmp_path):
    (tmp_path / "m.csv").write_text("path,label,split\nx.png,NORMAL,train\n")
    with pytest.raises(ValueError, match="missing column.*patient_id"):
        manifest.read_csv(tmp_path / "m.csv")


def test_leakage_check_fails_loudly():
    rows = records()
    rows[0] = replace(rows[0], split="test")  # one image of a training patient moved to test
    with pytest.raises(LeakageError, match="1 patient"):
        manifest.check_no_leakage(rows)


def test_the_same_image_in_two_splits_is_leakage_even_under_another_patient():
    rows = records()
    test_row = next(r for r in rows if r.split == "test")
    rows.append(replace(test_row, path="renamed.png", patient_id="someone-else", split="train"))
    with pytest.raises(LeakageError, match="identical image"):
        manifest.check_no_leakage(rows)


def test_validation_is_grouped_by_patient_stratified_and_seeded():
    rows = records()
    split = carve_validation(rows, 0.2, seed=0)
    assert manifest.leaking_patients(split) == {}
    val = Counter(r.label for r in split if r.split == "val")
    assert set(val.values()) == {12}  # 4 of 20 patients per class, 3 images each
    assert [r.split for r in carve_validation(rows, 0.2, seed=0)] == [r.split for r in split]
    assert [r.split for r in carve_validation(rows, 0.2, seed=1)] != [r.split for r in split]
    assert [r for r in split if r.split == "test"] == [r for r in rows if r.split == "test"]


def test_validation_groups_can_be_coarser_than_patients():
    rows = [Record(f"{p}_{c}_{i}.jpg", c, f"person{p}_{c.lower()}", "train")
            for p in range(30) for c in ("BACTERIA", "VIRUS") for i in range(2)]
    split = carve_validation(rows, 0.3, seed=0, group_of=lambda pid: pid.rsplit("_", 1)[0])
    sides: dict[str, set] = {}
    for r in split:
        sides.setdefault(r.patient_id.rsplit("_", 1)[0], set()).add(r.split)
    assert all(len(s) == 1 for s in sides.values())
    assert any(r.split == "val" for r in split)


def test_bad_val_fraction_is_refused():
    with pytest.raises(UserError, match="val_fraction"):
        carve_validation(records(), 1.5, seed=0)


def test_cache_miss_then_hit_and_content_keys(tmp_path):
    rows = records(patients_per_class=3, test_patients_per_class=1, images_per_patient=1)
    first = open_or_build(rows, 32, tmp_path, progress=False)
    again = open_or_build(rows, 32, tmp_path, progress=False)
    assert first.built and not again.built and first.folder == again.folder
    assert np.array_equal(np.asarray(first.pixels), np.asarray(again.pixels))
    assert open_or_build(rows, 48, tmp_path, progress=False).built  # another resolution
    changed = [replace(rows[0], sha256="0" * 64), *rows[1:]]
    assert open_or_build(changed, 32, tmp_path, progress=False).built  # same path, new content
    assert not list(tmp_path.glob("images/*.tmp"))


def test_intensity_standardisation_has_its_own_cache_and_reaches_every_split(tmp_path):
    from pneumo_exp.data.cache import load_pixels
    from pneumo_exp.data.images import standardize_intensity

    rows = records(patients_per_class=2, test_patients_per_class=1, images_per_patient=1)
    raw = open_or_build(rows, 32, tmp_path, progress=False)
    equalized = open_or_build(rows, 32, tmp_path, progress=False, intensity="equalize")
    assert equalized.built and equalized.folder != raw.folder
    assert {r.split for r in rows} == {"train", "test"}
    for record in rows:
        expected = standardize_intensity(load_pixels(record, 32), "equalize")
        assert np.array_equal(equalized.pixels[equalized.rows_of([record])[0]], expected)
    assert not np.array_equal(np.asarray(raw.pixels), np.asarray(equalized.pixels))


def test_cache_rows_follow_the_requested_records(tmp_path):
    rows = records(patients_per_class=2, test_patients_per_class=0, images_per_patient=1)
    cache = open_or_build(rows, 32, tmp_path, progress=False)
    reversed_rows = cache.rows_of(rows[::-1])
    assert list(reversed_rows) == list(range(len(rows)))[::-1]
    with pytest.raises(KeyError, match="not in the cache"):
        cache.rows_of([replace(rows[0], path="phantom:missing")])


def test_augmentations_keep_shape_range_and_are_seeded():
    images = to_unit_float(torch.randint(0, 256, (6, 40, 40), dtype=torch.uint8))
    first = random_augment(images, AugmentSettings(), torch.Generator().manual_seed(0))
    second = random_augment(images, AugmentSettings(), torch.Generator().manual_seed(0))
    assert first.shape == images.shape and first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, second) and not torch.equal(first, images)


def test_zoom_out_shows_a_black_border_and_gamma_bends_mid_tones():
    grey = torch.full((4, 1, 32, 32), 0.5)
    still = dict(max_rotation_degrees=0.0, brightness=0.0, contrast=0.0)
    zoomed = random_augment(grey, AugmentSettings(crop_scale=(2.0, 2.0), **still), torch.Generator().manual_seed(0))
    black = zoomed.eq(0).float().mean(dim=(1, 2, 3))  # the image covers half the view, wherever it is shifted
    assert torch.allclose(black, torch.full_like(black, 0.5), atol=0.1) and zoomed.max() == 0.5
    bent = random_augment(grey, AugmentSettings(crop_scale=(1.0, 1.0), max_gamma=2.0, **still),
                          torch.Generator().manual_seed(0))
    levels = bent[:, 0, 16, 16]
    assert levels.min() >= 0.5 ** 2 - 1e-6 and levels.max() <= 0.5 ** 0.5 + 1e-6  # gamma within [1/2, 2]
    assert levels.unique().numel() == 4  # one gamma per image


def test_prepare_data_on_phantom_writes_a_clean_manifest(make_cfg, tmp_path):
    cfg = make_cfg()
    data = prepare_data(cfg.dataset, cfg.paths.cache_dir, tmp_path)
    assert {r.split for r in data.records} == {"train", "val", "test"}
    assert manifest.read_csv(tmp_path / "manifest.csv") == data.records


def test_folder_dataset_needs_exactly_one_source(make_cfg):
    cfg = make_cfg("dataset=folder")
    with pytest.raises(ValueError, match="exactly one of dataset.root"):
        prepare_data(cfg.dataset, cfg.paths.cache_dir)


def test_help_explains_the_commands_and_groups(command_line):
    done = command_line("--help")
    assert done.status == 0
    for text in ("pneumo-exp summary", "clip_lora", "diffusion_lora", "augmentation", "experiment", "debug"):
        assert text in done.out


def test_summary_command_prints_counts_and_the_leakage_check(command_line, tmp_path):
    done = command_line("summary", f"hydra.run.dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}")
    assert done.status == 0, done.err[-20:]
    assert "leakage check: OK" in done.out and "patients" in done.out
    assert (tmp_path / "manifest.csv").is_file() and (tmp_path / "git.json").is_file()


@requires_real_data
@pytest.mark.realdata
def test_real_data_official_counts_and_no_leakage(make_cfg, tmp_path):
    from pneumo_exp.data.kermany import split_group

    cfg = make_cfg("dataset=kermany", f"dataset.root={REAL_DATA}")
    data = prepare_data(cfg.dataset, cfg.paths.cache_dir, tmp_path)
    per_split = manifest.counts(data.records)
    official_train = {label: per_split["train"][label] + per_split["val"][label] for label in per_split["train"]}
    assert official_train == {"NORMAL": 1349, "BACTERIA": 2538, "VIRUS": 1345}
    assert per_split["test"] == {"NORMAL": 234, "BACTERIA": 242, "VIRUS": 148}
    manifest.check_no_leakage(data.records)
    sides: dict[str, set] = {}
    for r in data.records:
        if r.split != "test":
            sides.setdefault(split_group(r.patient_id), set()).add(r.split)
    assert all(len(s) == 1 for s in sides.values())  # personN numbers never straddle train and val
    assert 0.13 < sum(per_split["val"].values()) / sum(official_train.values()) < 0.17


def write_tree(root, images_per_split: dict[str, int]):
    """{split}/{class}/{i}.png with the same stems in every split: 0.png, 1.png, ... (distinct pixels)."""
    from PIL import Image

    for split_index, (split, count) in enumerate(images_per_split.items()):
        for class_index, label in enumerate(("NORMAL", "BACTERIA", "VIRUS")):
            (root / split / label).mkdir(parents=True)
            for index in range(count):
                shade = (split_index * 90 + class_index * 30 + index) % 256
                Image.fromarray(np.full((32, 32), shade, dtype=np.uint8)).save(root / split / label / f"{index}.png")
    return root


def test_folder_tree_with_colliding_stems_keeps_every_test_image_in_test(make_cfg, tmp_path):
    root = write_tree(tmp_path / "tree", {"train": 10, "test": 5})
    cfg = make_cfg("dataset=folder", f"dataset.root={root}", "dataset.val_fraction=0.3")
    data = prepare_data(cfg.dataset, cfg.paths.cache_dir)
    per_split = manifest.counts(data.records)
    assert sum(per_split["test"].values()) == 15 and all(r.path.startswith(str(root / "test"))
                                                         for r in data.split("test"))
    assert sum(per_split["val"].values()) == 9 and all("/train/" in r.path for r in data.split("val"))
    assert len({r.patient_id for r in data.records}) == len(data.records)  # each image its own patient
    assert any("no patient ids: give a manifest with patient_id" in note for note in data.notes)


def test_leakage_in_the_official_split_is_refused_whichever_patients_validation_takes(make_cfg, tmp_path):
    from PIL import Image

    rows = ["path,label,patient_id,split"]
    for index, (label, patient, split) in enumerate([("NORMAL", "p1", "train"), ("NORMAL", "p1", "test"),
                                                     ("NORMAL", "p2", "train"), ("BACTERIA", "p3", "train"),
                                                     ("BACTERIA", "p4", "test"), ("VIRUS", "p5", "train"),
                                                     ("VIRUS", "p6", "test")]):
        Image.fromarray(np.full((32, 32), index * 20, dtype=np.uint8)).save(tmp_path / f"{index}.png")
        rows.append(f"{index}.png,{label},{patient},{split}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    for seed in range(6):  # some seeds carve p1 into val: its test image must not follow it there unnoticed
        cfg = make_cfg("dataset=folder", f"dataset.manifest={tmp_path / 'm.csv'}", "dataset.val_fraction=0.5",
                       f"dataset.split_seed={seed}")
        with pytest.raises(LeakageError, match="p1 in test\\+train") as error:
            prepare_data(cfg.dataset, cfg.paths.cache_dir)
        assert "official split" in str(error.value)


def test_carving_moves_only_training_records():
    rows = [Record(f"{split}/{i}.png", "NORMAL", f"p{i}", split) for split in ("train", "test") for i in range(10)]
    split = carve_validation(rows, 0.5, seed=0)
    assert [r for r in split if r.path.startswith("test/")] == [r for r in rows if r.split == "test"]
    assert {r.split for r in split if r.path.startswith("train/")} == {"train", "val"}


def patients_of_many_sizes() -> list[Record]:
    """Per split and class, 6 patients holding 1, 2, 3, 4, 1, 2 images."""
    return [Record(f"{split}/{label}/{p}_{i}.png", label, f"{split}-{label}-{p}", split)
            for split in ("train", "val", "test") for label in ("NORMAL", "BACTERIA", "VIRUS")
            for p in range(6) for i in range(p % 4 + 1)]


def test_limit_per_class_keeps_whole_patients_within_the_limit_deterministically():
    from pneumo_exp.data.splits import limit_per_class

    rows = patients_of_many_sizes()
    subset = limit_per_class(rows, 5, seed=0)
    assert set(subset) < set(rows)  # only drops records: every kept record keeps its split
    per_split = manifest.counts(subset)
    assert all(1 <= n <= 5 for split in per_split.values() for n in split.values())
    images_of = Counter(r.patient_id for r in rows)
    assert all(n == images_of[p] for p, n in Counter(r.patient_id for r in subset).items())  # whole patients
    assert manifest.leaking_patients(subset) == {}
    assert limit_per_class(rows, 5, seed=0) == subset
    assert limit_per_class(rows, 5, seed=1) != subset
    assert limit_per_class(rows, 1000, seed=0) == rows


def test_a_class_whose_patients_are_all_larger_than_the_limit_keeps_one_patient():
    from pneumo_exp.data.splits import limit_per_class

    rows = [Record(f"{p}_{i}.png", "NORMAL", f"p{p}", "train") for p in range(3) for i in range(4)]
    assert len({r.patient_id for r in limit_per_class(rows, 2, seed=0)}) == 1


def test_limit_per_class_is_applied_after_the_split_and_said_in_the_summary(make_cfg, tmp_path):
    from pneumo_exp.summary import format_summary, summary_table

    full = prepare_data(make_cfg().dataset, str(tmp_path / "cache"))
    cfg = make_cfg("dataset.limit_per_class=4")  # phantom: 3 images per patient, so one patient per class and split
    data = prepare_data(cfg.dataset, str(tmp_path / "cache"))
    assert set(data.records) < set(full.records)
    assert all(n == 3 for split in manifest.counts(data.records).values() for n in split.values())
    manifest.check_no_leakage(data.records)
    text = format_summary(data, "phantom")
    assert summary_table(data)["train"] == {"NORMAL": 3, "BACTERIA": 3, "VIRUS": 3, "total": 9, "patients": 3}
    assert "subset: dataset.limit_per_class=4" in text


def test_limit_per_class_must_be_positive(make_cfg):
    cfg = make_cfg("dataset.limit_per_class=0")
    with pytest.raises(UserError, match="dataset.limit_per_class"):
        prepare_data(cfg.dataset, cfg.paths.cache_dir)


@pytest.mark.parametrize("overrides, where", [
    (["dataset=kermany", "dataset.root=/absent/chest_xray"], "/absent/chest_xray"),
    (["dataset=folder", "dataset.root=/absent/tree"], "/absent/tree"),
    (["dataset=folder", "dataset.manifest=/absent/m.csv"], "/absent/m.csv"),
    (["dataset=folder"], "dataset.root"),
    (["dataset=folder", "dataset.root=/absent/tree", "+dataset.class_aliases={covid: COVID}"],
     "dataset.class_aliases"),
    (["dataset.patients_per_class=0"], "dataset.patients_per_class"),
    (["dataset.images_per_patient=0"], "dataset.images_per_patient"),
])
def test_data_errors_the_user_can_fix_say_where_and_what_to_do(make_cfg, overrides, where):
    cfg = make_cfg(*overrides)
    with pytest.raises(UserError) as error:
        prepare_data(cfg.dataset, cfg.paths.cache_dir)
    assert where in error.value.where and error.value.fix


def test_manifest_file_errors_say_where_and_what_to_do(tmp_path):
    with pytest.raises(UserError) as error:
        manifest.read_csv(tmp_path / "absent.csv")
    assert error.value.where == f"manifest {tmp_path / 'absent.csv'}" and error.value.fix
    rows = records()
    rows[3] = replace(rows[3], label="COVID")
    path = manifest.write_csv(rows, tmp_path / "manifest.csv")
    with pytest.raises(UserError) as error:
        manifest.read_csv(path)
    assert error.value.where == f"manifest {path}" and "row 5" in error.value.what and error.value.fix
