"""The Kermany dataset in its Kaggle, Mendeley and class-folder layouts, plain or zipped, and bad input of each kind."""

import logging
import shutil
import stat
import time
import zipfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from conftest import empty_folder, write_image
from PIL import Image

from pneumo_exp.core.files import sha256_file
from pneumo_exp.data.kermany import (
    DatasetError,
    find_layout,
    kermany_records,
    label_from_name,
    patient_key,
    split_group,
)
from pneumo_exp.data.zip_import import EXTRACTION_MARKER, extract_zip
from pneumo_exp.labels import CLASSES

REAL_DATA = Path(__file__).resolve().parents[2] / "shared/data/kermany-224"

NORMALS = ["IM-0115-0001", "IM-0115-0002", "NORMAL2-IM-0012-0001"]
BACTERIA = ["person1_bacteria_1", "person2_bacteria_3"]
VIRUSES = ["person1_virus_6", "person3_virus_8_1"]


def write_split(folder: Path, class_stems: dict[str, list[str]], suffix: str) -> None:
    for class_name, stems in class_stems.items():
        for shade, stem in enumerate(stems):
            write_image(folder / class_name / f"{stem}{suffix}", shade * 10)


def make_kaggle(root: Path) -> Path:
    """root/chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}: 7 train + 2 val + 3 test images."""
    base = root / "chest_xray"
    write_split(base / "train", {"NORMAL": NORMALS, "PNEUMONIA": BACTERIA + VIRUSES}, ".jpeg")
    write_split(base / "val", {"NORMAL": ["NORMAL2-IM-1427-0001"], "PNEUMONIA": ["person1946_bacteria_4874"]}, ".jpeg")
    write_split(base / "test", {"NORMAL": ["IM-0001-0001"], "PNEUMONIA": ["person100_bacteria_475",
                                                                          "person5_virus_10"]}, ".jpeg")
    return root


def make_mendeley(root: Path) -> Path:
    """root/chest_xray/{train,test}/{NORMAL,PNEUMONIA} with macOS archive junk around it."""
    base = root / "chest_xray"
    write_split(base / "train", {"NORMAL": NORMALS, "PNEUMONIA": BACTERIA + VIRUSES}, ".jpeg")
    write_split(base / "test", {"NORMAL": ["IM-0001-0001"], "PNEUMONIA": ["person100_bacteria_475",
                                                                          "person5_virus_10"]}, ".jpeg")
    (root / "__MACOSX" / "chest_xray" / "train" / "NORMAL").mkdir(parents=True)
    (root / "__MACOSX" / "chest_xray" / "train" / "NORMAL" / "._IM-0115-0001.jpeg").write_bytes(b"\x00\x05junk")
    (base / ".DS_Store").write_bytes(b"junk")
    (base / "train" / "PNEUMONIA" / ".DS_Store").write_bytes(b"junk")
    (base / "train" / "PNEUMONIA" / "._person1_bacteria_1.jpeg").write_bytes(b"\x00\x05junk")
    return root


def make_class_folders(root: Path) -> Path:
    """root/{train,test}/{NORMAL,BACTERIA,VIRUS} like shared/data/kermany-224."""
    write_split(root / "train", {"NORMAL": NORMALS, "BACTERIA": BACTERIA, "VIRUS": VIRUSES}, ".jpg")
    write_split(root / "test", {"NORMAL": ["IM-0001-0001"], "BACTERIA": ["person100_bacteria_475"],
                                "VIRUS": ["person5_virus_10"]}, ".jpg")
    return root


def zip_folder(folder: Path, zip_path: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(zip_path, "w") as archive:
        for path in sorted(folder.rglob("*")):
            archive.write(path, prefix + path.relative_to(folder).as_posix())
    return zip_path


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {str(p): (sha256_file(p), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def split_counts(records) -> Counter:
    return Counter((r.split, r.label) for r in records)


EXPECTED_SMALL = Counter({("train", "NORMAL"): 3, ("train", "BACTERIA"): 2, ("train", "VIRUS"): 2,
                          ("test", "NORMAL"): 1, ("test", "BACTERIA"): 1, ("test", "VIRUS"): 1})


# --- names ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, label, key", [
    ("person123_bacteria_456.jpeg", "BACTERIA", "person123_bacteria"),
    ("person123_virus_457.jpeg", "VIRUS", "person123_virus"),  # numbered per class: two different children
    ("person447_virus_921_1.jpg", "VIRUS", "person447_virus"),
    ("IM-0115-0001.jpeg", "NORMAL", "IM-0115"),
    ("IM-0429-0001-0002.jpg", "NORMAL", "IM-0429"),
    ("NORMAL2-IM-0012-0001.jpeg", "NORMAL", "NORMAL2-IM-0012"),
    ("NORMAL2-IM-0173-0001-0002.jpeg", "NORMAL", "NORMAL2-IM-0173"),
    ("some/folder/IM-0115-0001", "NORMAL", "IM-0115"),
])
def test_patient_key(name, label, key):
    assert patient_key(name, label) == key


@pytest.mark.parametrize("name, label", [("scan_0001.jpeg", "NORMAL"), ("IM-0115-0001.jpeg", "VIRUS"),
                                         ("person1_bacteria_1.jpeg", "NORMAL"), ("patient7_virus_2.png", "VIRUS")])
def test_unrecognised_names_name_the_file_and_the_patterns(name, label):
    with pytest.raises(DatasetError, match="unrecognised") as error:
        patient_key(name, label)
    assert name in str(error.value) and "personN_bacteria_K" in str(error.value) and "IM-XXXX" in str(error.value)


@pytest.mark.parametrize("name, folder, label", [
    ("IM-0115-0001.jpeg", "NORMAL", "NORMAL"), ("person1_bacteria_1.jpeg", "PNEUMONIA", "BACTERIA"),
    ("person1_VIRUS_6.jpeg", "pneumonia", "VIRUS"), ("person1_bacteria_1.jpg", "BACTERIA", "BACTERIA"),
    ("person1_virus_6.jpg", "VIRUS", "VIRUS"),
])
def test_label_from_name(name, folder, label):
    assert label_from_name(name, folder) == label


@pytest.mark.parametrize("name, folder, problem", [
    ("person1_virus_6.jpg", "BACTERIA", "says VIRUS"), ("person1_bacteria_1.jpg", "VIRUS", "says BACTERIA"),
    ("person1_virus_6.jpg", "NORMAL", "says VIRUS"), ("IM-0001-0001.jpg", "VIRUS", "lacks"),
    ("person1_1.jpeg", "PNEUMONIA", "neither _bacteria_ nor _virus_"), ("x.jpg", "COVID", "unknown class folder"),
])
def test_label_from_name_mismatches(name, folder, problem):
    with pytest.raises(DatasetError, match=problem) as error:
        label_from_name(name, folder)
    assert name in str(error.value)


# --- layouts ----------------------------------------------------------------------------------------------------

def test_kaggle_layout_folds_val_into_train(tmp_path, caplog):
    root = make_kaggle(tmp_path / "kaggle")
    with caplog.at_level(logging.INFO, logger="pneumo_exp.data.kermany"):
        records, messages = kermany_records(root)
    assert "Kaggle layout" in caplog.text and messages == []
    assert find_layout(root).name == "kaggle"
    assert split_counts(records) == EXPECTED_SMALL + Counter({("train", "NORMAL"): 1, ("train", "BACTERIA"): 1})
    val_records = [r for r in records if "/val/" in r.path]
    assert len(val_records) == 2 and {r.split for r in val_records} == {"train"}
    assert {r.split for r in records} == {"train", "test"}


def test_records_carry_labels_patients_and_hashes(tmp_path):
    records, _ = kermany_records(make_kaggle(tmp_path / "kaggle"))
    by_name = {Path(r.path).name: r for r in records}
    assert by_name["person3_virus_8_1.jpeg"].label == "VIRUS"
    assert by_name["person3_virus_8_1.jpeg"].patient_id == "person3_virus"
    assert by_name["person1_bacteria_1.jpeg"].patient_id == "person1_bacteria"
    assert split_group(by_name["person1_bacteria_1.jpeg"].patient_id) == split_group(
        by_name["person1_virus_6.jpeg"].patient_id) == "person1"
    assert by_name["NORMAL2-IM-0012-0001.jpeg"].patient_id == "NORMAL2-IM-0012"
    assert all(r.sha256 == sha256_file(r.path) and r.source == "real" for r in records)
    assert all(Path(r.path).is_absolute() for r in records)


def test_mendeley_layout_ignores_macos_junk(tmp_path):
    root = make_mendeley(tmp_path / "mendeley")
    records, messages = kermany_records(root)
    assert find_layout(root).name == "mendeley"
    assert split_counts(records) == EXPECTED_SMALL and messages == []
    assert not any("__MACOSX" in r.path or Path(r.path).name.startswith(".") for r in records)


def test_class_folder_layout(tmp_path):
    root = make_class_folders(tmp_path / "kermany-224")
    records, messages = kermany_records(root)
    assert find_layout(root).name == "class-folders"
    assert split_counts(records) == EXPECTED_SMALL and messages == []


def test_root_may_be_chest_xray_itself_or_its_parent(tmp_path):
    root = make_kaggle(tmp_path / "kaggle")
    from_parent, _ = kermany_records(root)
    from_inside, _ = kermany_records(root / "chest_xray")
    assert from_parent == from_inside


def test_order_is_sorted_and_deterministic(tmp_path):
    root = make_kaggle(tmp_path / "kaggle")
    records, _ = kermany_records(root)
    key = [(("train", "test").index(r.split), CLASSES.index(r.label), r.path) for r in records]
    assert key == sorted(key)
    assert kermany_records(root)[0] == records


def test_source_is_never_modified(tmp_path):
    root = make_mendeley(tmp_path / "mendeley")
    before = snapshot(root)
    kermany_records(root)
    assert snapshot(root) == before


# --- zips -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("maker, layout", [(make_kaggle, "kaggle"), (make_mendeley, "mendeley"),
                                           (make_class_folders, "class-folders")])
def test_zip_of_each_layout(tmp_path, maker, layout):
    folder = maker(tmp_path / "src")
    zip_path = zip_folder(folder, tmp_path / "data.zip")
    zip_before = snapshot(tmp_path)
    records, messages = kermany_records(zip_path, extract_dir=tmp_path / "cache")
    plain, _ = kermany_records(folder)
    assert messages == [] and split_counts(records) == split_counts(plain)
    extracted = extract_zip(zip_path, tmp_path / "cache")
    assert extracted.parent == tmp_path / "cache" and find_layout(extracted).name == layout
    assert all(r.path.startswith(str(extracted)) for r in records)
    assert not list(extracted.rglob("__MACOSX")) and not list(extracted.rglob("._*"))
    assert {k: v for k, v in snapshot(tmp_path).items() if "cache" not in k} == zip_before


@pytest.mark.parametrize("prefix", ["ChestXRay2017/", "download/"])
def test_zip_with_a_wrapper_folder(tmp_path, prefix):
    zip_path = zip_folder(make_mendeley(tmp_path / "src"), tmp_path / "wrapped.zip", prefix=prefix)
    records, _ = kermany_records(zip_path, extract_dir=tmp_path / "cache")
    assert split_counts(records) == EXPECTED_SMALL


def test_second_extraction_reuses_and_overwrites_nothing(tmp_path):
    zip_path = zip_folder(make_class_folders(tmp_path / "src"), tmp_path / "data.zip")
    first = extract_zip(zip_path, tmp_path / "cache")
    before = {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for p in first.rglob("*")}
    time.sleep(0.01)
    second = extract_zip(zip_path, tmp_path / "cache")
    assert second == first
    assert {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for p in second.rglob("*")} == before
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.name]  # no staging folder left behind


def test_incomplete_earlier_extraction_is_left_alone(tmp_path):
    zip_path = zip_folder(make_class_folders(tmp_path / "src"), tmp_path / "data.zip")
    target = extract_zip(zip_path, tmp_path / "cache")
    victim = next(target.rglob("*.jpg"))
    victim.unlink()
    before = snapshot(target)
    with pytest.raises(DatasetError, match="not a complete extraction") as error:
        extract_zip(zip_path, tmp_path / "cache")
    assert str(target) in str(error.value)
    assert snapshot(target) == before


def test_foreign_folder_at_the_target_is_not_overwritten(tmp_path):
    zip_path = zip_folder(make_class_folders(tmp_path / "src"), tmp_path / "data.zip")
    target = tmp_path / "cache" / sha256_file(zip_path)[:16]
    target.mkdir(parents=True)
    (target / "mine.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="not a complete extraction"):
        extract_zip(zip_path, tmp_path / "cache")
    assert (target / "mine.txt").read_text() == "keep me" and not (target / EXTRACTION_MARKER).exists()


def malicious_zip(path: Path, member: str, symlink: bool = False) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("chest_xray/train/NORMAL/IM-0001-0001.jpeg", b"fine")
        info = zipfile.ZipInfo(member)
        if symlink:
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
        else:
            archive.writestr(info, b"evil")
    return path


@pytest.mark.parametrize("member, symlink, problem", [
    ("../evil.jpg", False, r"'\.\.'"), ("chest_xray/../../evil.jpg", False, r"'\.\.'"),
    ("..\\evil.jpg", False, r"'\.\.'"), ("/tmp/evil.jpg", False, "absolute"),
    ("chest_xray/train/NORMAL/link.jpeg", True, "symbolic link"),
])
def test_malicious_zip_members_are_refused_and_nothing_is_written(tmp_path, member, symlink, problem):
    work = tmp_path / "work"
    zip_path = malicious_zip(tmp_path / "evil.zip", member, symlink)
    with pytest.raises(DatasetError, match=problem) as error:
        kermany_records(zip_path, extract_dir=work / "cache")
    assert repr(member) in str(error.value)
    assert not work.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.zip"]


def test_duplicate_zip_member_is_refused(tmp_path):
    zip_path = tmp_path / "twice.zip"
    with zipfile.ZipFile(zip_path, "w") as archive, pytest.warns(UserWarning, match="Duplicate name"):
        archive.writestr("train/NORMAL/IM-0001-0001.jpg", b"one")
        archive.writestr("train/NORMAL/IM-0001-0001.jpg", b"two")
    with pytest.raises(DatasetError, match="more than once"):
        extract_zip(zip_path, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_failed_extraction_leaves_nothing_behind(tmp_path):
    zip_path = tmp_path / "damaged.zip"
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("train/NORMAL/IM-0001-0001.jpg", b"A" * 1000)
    data = bytearray(zip_path.read_bytes())
    data[data.index(b"A" * 1000) + 500] = ord("B")  # the member's CRC no longer matches
    zip_path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="IM-0001-0001.jpg"):
        extract_zip(zip_path, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_not_a_zip(tmp_path):
    path = tmp_path / "data.zip"
    path.write_text("not a zip")
    with pytest.raises(DatasetError, match="valid .zip") as error:
        kermany_records(path, extract_dir=tmp_path / "cache")
    assert str(path) in str(error.value)


# --- bad input --------------------------------------------------------------------------------------------------

def test_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="absent"):
        kermany_records(tmp_path / "absent")


def test_unrecognised_layout_says_what_was_looked_for_and_found(tmp_path):
    write_image(tmp_path / "data" / "train" / "COVID" / "a.jpg")
    write_image(tmp_path / "data" / "test" / "COVID" / "b.jpg")
    with pytest.raises(DatasetError, match="no recognised Kermany layout") as error:
        kermany_records(tmp_path / "data")
    assert "NORMAL+PNEUMONIA" in str(error.value) and "train/ has COVID" in str(error.value)


def test_folder_without_splits(tmp_path):
    write_image(tmp_path / "data" / "images" / "a.jpg")
    write_image(tmp_path / "data" / "other" / "b.jpg")
    with pytest.raises(DatasetError, match="found: .*images, other"):
        kermany_records(tmp_path / "data")


def test_empty_class_folder(tmp_path):
    root = make_class_folders(tmp_path / "data")
    empty_folder(root / "test" / "VIRUS")
    (root / "test" / "VIRUS" / ".DS_Store").write_bytes(b"junk")  # junk does not count
    with pytest.raises(DatasetError, match="empty class folder") as error:
        kermany_records(root)
    assert str(root / "test" / "VIRUS") in str(error.value)


def test_name_disagreeing_with_its_class_folder(tmp_path):
    root = make_class_folders(tmp_path / "data")
    write_image(root / "train" / "BACTERIA" / "person9_virus_20.jpg")
    with pytest.raises(DatasetError, match="says VIRUS but the file is in a BACTERIA folder") as error:
        kermany_records(root)
    assert "person9_virus_20.jpg" in str(error.value)


def test_pneumonia_file_without_token(tmp_path):
    root = make_kaggle(tmp_path / "data")
    write_image(root / "chest_xray" / "train" / "PNEUMONIA" / "person9_20.jpeg")
    with pytest.raises(DatasetError, match="person9_20.jpeg"):
        kermany_records(root)
    records, messages = kermany_records(root, skip_bad_images=True)
    assert len(messages) == 1 and "person9_20.jpeg" in messages[0]
    assert len(records) == 12


def test_unrecognised_names_error_or_skip(tmp_path):
    root = make_class_folders(tmp_path / "data")
    write_image(root / "train" / "NORMAL" / "scan-7.jpg")
    write_image(root / "test" / "VIRUS" / "child4_virus_1.jpg")
    with pytest.raises(DatasetError, match="2 bad file") as error:
        kermany_records(root)
    assert "scan-7.jpg" in str(error.value) and "child4_virus_1.jpg" in str(error.value)
    records, messages = kermany_records(root, skip_bad_images=True)
    assert split_counts(records) == EXPECTED_SMALL
    assert len(messages) == 2 and all(m.startswith("skipped ") for m in messages)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name, damage, problem", [
    ("IM-0200-0001.jpg", lambda p: p.write_bytes(b""), "empty file"),
    ("IM-0201-0001.jpg", truncate, "truncated"),
    ("IM-0202-0001.jpg", lambda p: p.write_text("I am text"), "not an image"),
    ("notes.txt", lambda p: p.write_text("I am text"), "not an image file"),
    ("IM-0203-0001", lambda p: p.write_text("no suffix"), "not an image file"),
])
def test_bad_files_error_or_skip(tmp_path, name, damage, problem):
    root = make_class_folders(tmp_path / "data")
    bad = root / "train" / "NORMAL" / name
    bad.write_bytes((root / "train" / "NORMAL" / "IM-0115-0001.jpg").read_bytes())
    damage(bad)
    with pytest.raises(DatasetError, match=problem) as error:
        kermany_records(root)
    assert str(bad) in str(error.value)
    records, messages = kermany_records(root, skip_bad_images=True)
    assert split_counts(records) == EXPECTED_SMALL
    assert len(messages) == 1 and str(bad) in messages[0] and problem in messages[0]


def test_without_image_checks_only_empty_files_are_caught(tmp_path):
    root = make_class_folders(tmp_path / "data")
    truncate(write_image(root / "train" / "NORMAL" / "IM-0201-0001.jpg"))
    records, _ = kermany_records(root, check_images=False)
    assert len(records) == 11
    (root / "train" / "NORMAL" / "IM-0200-0001.jpg").touch()
    with pytest.raises(DatasetError, match="empty file"):
        kermany_records(root, check_images=False)


def test_class_folder_with_only_bad_files(tmp_path):
    root = make_class_folders(tmp_path / "data")
    for path in (root / "test" / "VIRUS").iterdir():
        path.write_bytes(b"")
    with pytest.raises(DatasetError, match="no usable image") as error:
        kermany_records(root, skip_bad_images=True)
    assert str(root / "test" / "VIRUS") in str(error.value)


def test_unexpected_subfolder_in_a_class_folder(tmp_path):
    root = make_class_folders(tmp_path / "data")
    write_image(root / "train" / "NORMAL" / "more" / "IM-0300-0001.jpg")
    with pytest.raises(DatasetError, match="unexpected folder") as error:
        kermany_records(root)
    assert str(root / "train" / "NORMAL" / "more") in str(error.value)


# --- the real dataset -------------------------------------------------------------------------------------------

@pytest.mark.realdata
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"{REAL_DATA} is absent")
def test_real_kermany_224(capsys):
    before = REAL_DATA.stat().st_mtime_ns
    start = time.perf_counter()
    records, messages = kermany_records(REAL_DATA)
    seconds = time.perf_counter() - start
    counts = split_counts(records)
    assert messages == []
    assert [counts["train", c] for c in CLASSES] == [1349, 2538, 1345]
    assert [counts["test", c] for c in CLASSES] == [234, 242, 148]
    assert REAL_DATA.stat().st_mtime_ns == before
    # The official split shares patient keys between train and test (pneumonia personN numbers): report, not fail.
    patients = defaultdict(set)
    for record in records:
        patients[record.split, record.label].add(record.patient_id)
    shared = {(a, b): len(patients["train", a] & patients["test", b]) for a in CLASSES for b in CLASSES}
    with capsys.disabled():
        print(f"\nkermany_records checked {len(records)} real images in {seconds:.1f} s; patient keys shared "
              f"train x test: {', '.join(f'{a}x{b}={n}' for (a, b), n in shared.items() if n)}")


# --- zip bombs --------------------------------------------------------------------------------------------------

def bomb_zip(path: Path, mebibytes: int = 4) -> Path:
    """A few kilobytes that inflate to `mebibytes` MiB of zeros: a ratio of about 1000."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("train/NORMAL/IM-0001-0001.jpg", b"\0" * (mebibytes << 20))
    return path


@pytest.mark.parametrize("limits, setting", [
    ({"max_extract_bytes": 1 << 20}, "dataset.max_extract_bytes"),
    ({"max_compression_ratio": 100}, "dataset.max_compression_ratio"),
])
def test_zip_bomb_is_refused_before_anything_is_written(tmp_path, limits, setting):
    zip_path = bomb_zip(tmp_path / "bomb.zip")
    assert zip_path.stat().st_size < 20_000
    with pytest.raises(DatasetError, match=setting) as error:
        kermany_records(zip_path, extract_dir=tmp_path / "cache", **limits)
    assert str(zip_path) in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.zip"]


def test_zip_larger_than_the_free_disk_is_refused(tmp_path, monkeypatch):
    zip_path = bomb_zip(tmp_path / "bomb.zip", mebibytes=2)
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(free=1 << 20))
    with pytest.raises(DatasetError, match="free") as error:
        extract_zip(zip_path, tmp_path / "cache" / "deeper", max_compression_ratio=10_000)
    assert str(zip_path) in str(error.value) and "dataset.extract_dir" in str(error.value)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("skip", [False, True])
def test_class_folder_whose_files_are_all_unusable_gives_each_reason(tmp_path, skip):
    root = make_class_folders(tmp_path / "data")
    folder = root / "test" / "VIRUS"
    for path in folder.iterdir():
        path.unlink()
    write_image(folder / "scan-1.jpg")
    (folder / "person7_virus_1.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match="no usable image") as error:
        kermany_records(root, skip_bad_images=skip)
    message = str(error.value)
    assert str(folder) in message
    assert "scan-1.jpg: name lacks the _virus_ token" in message and "person7_virus_1.jpg: empty file" in message
    assert skip or "skipped" not in message


def test_tiny_images_are_refused_or_skipped(tmp_path):
    root = make_class_folders(tmp_path / "data")
    tiny = root / "train" / "NORMAL" / "IM-0400-0001.jpg"
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(tiny)
    with pytest.raises(DatasetError, match="IM-0400-0001.jpg: image is 16x16"):
        kermany_records(root)
    records, messages = kermany_records(root, skip_bad_images=True)
    assert split_counts(records) == EXPECTED_SMALL and len(messages) == 1 and "minimum of 32" in messages[0]
    assert len(kermany_records(root, min_image_side=16)[0]) == 11
