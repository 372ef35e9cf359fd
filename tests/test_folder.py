"""Any labelled folder: split/class trees with aliases, CSV manifests, and bad input."""

import csv
import os
from collections import Counter
from pathlib import Path

import pytest
from conftest import empty_folder, write_image

from pneumo_exp.core.files import sha256_file
from pneumo_exp.data.folder import folder_records
from pneumo_exp.data.kermany import DatasetError

ALIASES = {"bacterial": "BACTERIA", "Viral": "VIRUS"}


def make_tree(root: Path) -> Path:
    """train/val/test with class folders in mixed case and alias names; 2 images per class folder."""
    for split in ("train", "Val", "test"):
        for class_folder in ("normal", "Bacterial", "VIRAL"):
            for index in range(2):
                write_image(root / split / class_folder / f"{split}-{class_folder}-{index}.png", 40 * index)
    (root / "train" / "normal" / ".DS_Store").write_bytes(b"junk")
    return root


def write_manifest(path: Path, rows: list[dict], columns=("path", "label", "patient_id", "split")) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def make_manifest(root: Path) -> Path:
    write_image(root / "images" / "a.png")
    write_image(root / "images" / "b.jpg", 50)
    write_image(root / "elsewhere.png", 200)
    rows = [{"path": "images/a.png", "label": "NORMAL", "patient_id": "p1", "split": "train"},
            {"path": "images/b.jpg", "label": "bacterial", "patient_id": "p1", "split": "train"},
            {"path": str(root / "elsewhere.png"), "label": "virus", "patient_id": "p2", "split": "test"}]
    return write_manifest(root / "manifest.csv", rows)


# --- trees ------------------------------------------------------------------------------------------------------

def test_tree_with_case_insensitive_classes_and_aliases(tmp_path):
    records, messages = folder_records(make_tree(tmp_path / "data"), class_aliases=ALIASES)
    assert messages == []
    assert Counter((r.split, r.label) for r in records) == {(s, c): 2 for s in ("train", "val", "test")
                                                            for c in ("NORMAL", "BACTERIA", "VIRUS")}
    first = records[0]
    assert first.patient_id == "train/normal/train-normal-0.png" and first.sha256 == sha256_file(first.path)
    assert records == folder_records(tmp_path / "data", class_aliases=ALIASES)[0]


def test_unknown_class_folder_names_the_folder(tmp_path):
    root = make_tree(tmp_path / "data")
    with pytest.raises(DatasetError, match="not a known class") as error:
        folder_records(root)  # no aliases: "Bacterial" is unknown
    assert "Bacterial" in str(error.value)


def test_pneumonia_folder_points_to_kermany_records(tmp_path):
    write_image(tmp_path / "data" / "train" / "PNEUMONIA" / "person1_bacteria_1.jpeg")
    with pytest.raises(DatasetError, match="kermany_records"):
        folder_records(tmp_path / "data")


def test_two_folders_for_one_class(tmp_path):
    write_image(tmp_path / "data" / "train" / "VIRUS" / "a.png")
    write_image(tmp_path / "data" / "train" / "viral" / "b.png")
    with pytest.raises(DatasetError, match="both class VIRUS"):
        folder_records(tmp_path / "data", class_aliases=ALIASES)


@pytest.mark.parametrize("aliases, problem", [({"covid": "COVID"}, "not one of"), ({"normal": "VIRUS"}, "contradicts")])
def test_bad_aliases(tmp_path, aliases, problem):
    with pytest.raises(ValueError, match=problem):
        folder_records(make_tree(tmp_path / "data"), class_aliases=aliases)


def test_missing_root_and_missing_splits(tmp_path):
    with pytest.raises(DatasetError, match="absent"):
        folder_records(tmp_path / "absent")
    write_image(tmp_path / "flat" / "NORMAL" / "a.png")
    with pytest.raises(DatasetError, match="no split folders .* found NORMAL|no split folders .* found normal"):
        folder_records(tmp_path / "flat")


def test_empty_class_folder(tmp_path):
    root = make_tree(tmp_path / "data")
    empty_folder(root / "test" / "VIRAL")
    with pytest.raises(DatasetError, match="empty class folder") as error:
        folder_records(root, class_aliases=ALIASES)
    assert str(root / "test" / "VIRAL") in str(error.value)


@pytest.mark.parametrize("name, content, problem", [
    ("zero.png", b"", "empty file"), ("text.jpg", b"plain text", "not an image"),
    ("notes.txt", b"plain text", "not an image file"),
])
def test_tree_bad_files_error_or_skip(tmp_path, name, content, problem):
    root = make_tree(tmp_path / "data")
    bad = root / "Val" / "normal" / name
    bad.write_bytes(content)
    with pytest.raises(DatasetError, match=problem) as error:
        folder_records(root, class_aliases=ALIASES)
    assert str(bad) in str(error.value)
    records, messages = folder_records(root, class_aliases=ALIASES, skip_bad_images=True)
    assert len(records) == 18 and len(messages) == 1 and str(bad) in messages[0]


def test_tree_truncated_image(tmp_path):
    root = make_tree(tmp_path / "data")
    bad = write_image(root / "train" / "normal" / "cut.jpg")
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(DatasetError, match="truncated") as error:
        folder_records(root, class_aliases=ALIASES)
    assert "cut.jpg" in str(error.value)


def test_tree_source_unchanged(tmp_path):
    root = make_tree(tmp_path / "data")
    before = {p: (sha256_file(p), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}
    folder_records(root, class_aliases=ALIASES)
    assert {p: (sha256_file(p), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()} == before


# --- manifests --------------------------------------------------------------------------------------------------

def test_manifest_resolves_paths_and_aliases(tmp_path):
    records, messages = folder_records(manifest=make_manifest(tmp_path), class_aliases=ALIASES)
    assert messages == []
    assert [(Path(r.path).name, r.label, r.patient_id, r.split) for r in records] == [
        ("a.png", "NORMAL", "p1", "train"), ("b.jpg", "BACTERIA", "p1", "train"),
        ("elsewhere.png", "VIRUS", "p2", "test")]
    assert all(Path(r.path).is_absolute() and r.sha256 == sha256_file(r.path) for r in records)


def test_manifest_paths_resolve_against_the_csv_not_the_working_directory(tmp_path, monkeypatch):
    make_manifest(tmp_path / "ds")
    monkeypatch.chdir(tmp_path)
    records, _ = folder_records(manifest=Path("ds/manifest.csv"), class_aliases=ALIASES)
    assert records[0].path == str(tmp_path / "ds" / "images" / "a.png")


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def rewrite(csv_path: Path, row_index: int, **changes) -> None:
    rows = read_rows(csv_path)
    rows[row_index].update(changes)
    write_manifest(csv_path, rows, columns=tuple(rows[0]))


@pytest.mark.parametrize("changes, problem", [
    ({"label": "COVID"}, "row 3 .*label 'COVID'"), ({"split": "holdout"}, "row 3 .*split 'holdout'"),
    ({"patient_id": ""}, "row 3 .*empty patient_id"), ({"path": ""}, "row 3: empty path"),
    ({"path": "images/a.png"}, "row 3 .*repeats the file of row 2"),
])
def test_manifest_row_errors_name_the_row(tmp_path, changes, problem):
    manifest = make_manifest(tmp_path)
    rewrite(manifest, 1, **changes)
    with pytest.raises(ValueError, match=problem) as error:
        folder_records(manifest=manifest, class_aliases=ALIASES, skip_bad_images=True)
    assert str(manifest) in str(error.value)


@pytest.mark.parametrize("changes, problem", [
    ({"path": "images/missing.png"}, "does not exist"), ({"sha256": "ab" * 32}, "sha256 is"),
])
def test_manifest_file_errors_name_row_and_file_or_skip(tmp_path, changes, problem):
    manifest = make_manifest(tmp_path)
    rows = [dict(row, sha256="") for row in read_rows(manifest)]
    write_manifest(manifest, rows, columns=("path", "label", "patient_id", "split", "sha256"))
    rewrite(manifest, 1, **changes)
    with pytest.raises(DatasetError, match=problem) as error:
        folder_records(manifest=manifest, class_aliases=ALIASES)
    assert "row 3" in str(error.value) and str(manifest) in str(error.value)
    records, messages = folder_records(manifest=manifest, class_aliases=ALIASES, skip_bad_images=True)
    assert len(records) == 2 and len(messages) == 1 and "row 3" in messages[0]


def test_manifest_bad_image_file(tmp_path):
    manifest = make_manifest(tmp_path)
    (tmp_path / "images" / "b.jpg").write_text("not an image")
    with pytest.raises(DatasetError, match="not an image") as error:
        folder_records(manifest=manifest, class_aliases=ALIASES)
    assert "b.jpg" in str(error.value)


def test_manifest_matching_sha256_is_accepted(tmp_path):
    manifest = make_manifest(tmp_path)
    rows = [dict(row, sha256=sha256_file(tmp_path / "images" / "a.png").upper() if i == 0 else "")
            for i, row in enumerate(read_rows(manifest))]
    write_manifest(manifest, rows, columns=("path", "label", "patient_id", "split", "sha256"))
    records, _ = folder_records(manifest=manifest, class_aliases=ALIASES)
    assert len(records) == 3


def test_manifest_structure_errors(tmp_path):
    with pytest.raises(DatasetError, match="absent.csv"):
        folder_records(manifest=tmp_path / "absent.csv")
    no_label = write_manifest(tmp_path / "no_label.csv", [], columns=("path", "patient_id", "split"))
    with pytest.raises(DatasetError, match="missing column.*label"):
        folder_records(manifest=no_label)
    empty = write_manifest(tmp_path / "empty.csv", [])
    with pytest.raises(DatasetError, match="no rows"):
        folder_records(manifest=empty)


@pytest.mark.parametrize("kwargs", [{}, {"root": "a", "manifest": "b.csv"}])
def test_exactly_one_source(kwargs):
    with pytest.raises(ValueError, match="exactly one"):
        folder_records(**kwargs)


@pytest.mark.parametrize("check_images", [True, False])
def test_fifo_is_not_a_regular_file(tmp_path, check_images):
    root = make_tree(tmp_path / "data")
    fifo = root / "train" / "normal" / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(DatasetError, match="pipe.png: not a regular file"):
        folder_records(root, class_aliases=ALIASES, check_images=check_images)
    manifest = make_manifest(tmp_path / "m")
    rewrite(manifest, 0, path=str(fifo))
    with pytest.raises(DatasetError, match="pipe.png: not a regular file"):
        folder_records(manifest=manifest, class_aliases=ALIASES, check_images=check_images)


def test_manifest_whose_rows_are_all_skipped_gives_each_reason(tmp_path):
    manifest = make_manifest(tmp_path)
    for row in range(3):
        rewrite(manifest, row, path=f"images/missing-{row}.png")
    with pytest.raises(DatasetError, match="no usable row") as error:
        folder_records(manifest=manifest, class_aliases=ALIASES, skip_bad_images=True)
    assert all(f"row {row + 2}: " in str(error.value) and f"missing-{row}.png" in str(error.value) for row in range(3))
