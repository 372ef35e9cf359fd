"""The arms of the augmentation study: the count-matched real control (augmentation.source=duplicate_real), the
synthetic image bank that arms of one seed share, and the judge's filter (augmentation.filter)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, compose

from pneumo_exp.data import manifest
from pneumo_exp.data.manifest import LeakageError, Record
from pneumo_exp.diffusion import stable_diffusion
from pneumo_exp.errors import UserError
from pneumo_exp.labels import CLASSES
from pneumo_exp.pipeline import run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

SMOKE = ("debug=smoke", "logger=none")
ARM = (*SMOKE, "stages=[data,synthesize]", "diffusion_lora.generation.num_inference_steps=2")


@pytest.fixture(scope="module")
def generator_and_judge(tmp_path_factory, model_cache) -> Path:
    """One run on the smoke split: a LoRA (1 step) and a classifier trained on real images only (the judge)."""
    folder = tmp_path_factory.mktemp("generator_and_judge")
    run(compose([f"paths.output_dir={folder}", f"paths.cache_dir={model_cache}", *SMOKE,
                 "stages=[data,diffusion,classify]", "diffusion_lora.training.max_train_steps=1",
                 "diffusion_lora.training.validation_every=0"]))
    return folder


def arm(folder: Path, cache: Path, lora: str | Path, *overrides: str) -> Path:
    run(compose([f"paths.output_dir={folder}", f"paths.cache_dir={cache}", *ARM,
                 f"diffusion_lora.trained_lora={lora}", *overrides]))
    return folder


@pytest.fixture(scope="module")
def ratio_arm(tmp_path_factory, model_cache, generator_and_judge) -> Path:
    """The synthetic arm of the ratio strategy (0.5 x real per class): it fills the bank."""
    return arm(tmp_path_factory.mktemp("ratio_arm"), model_cache, generator_and_judge / "diffusion" / "lora",
               "augmentation=ratio", "augmentation.ratio=0.5")


def counts_override(counts: dict[str, int]) -> str:
    """Every class named: an override merges into the preset's counts."""
    return "augmentation.per_class_count={" + ", ".join(f"{label}: {counts.get(label, 0)}" for label in CLASSES) + "}"


def rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def added(folder: Path) -> list[Record]:
    return manifest.read_csv(folder / "synthetic" / "manifest.csv")


def no_generator(monkeypatch) -> None:
    """Reading a generator in any way fails the test."""
    from pneumo_exp import pipeline
    from pneumo_exp.diffusion import bases

    def refuse(*args, **kwargs):
        raise AssertionError("a generator was read")

    monkeypatch.setattr(stable_diffusion, "load_pipeline", refuse)
    monkeypatch.setattr(stable_diffusion, "check_lora_file", refuse)
    monkeypatch.setattr(bases, "run_base", refuse)
    monkeypatch.setattr(pipeline, "check_trained_within", refuse)


# ------------------------------------------------------------------------------- the count-matched control


def test_duplicate_real_adds_the_synthetic_arms_counts_as_repeats_of_real_training_images(
        tmp_path, model_cache, ratio_arm, monkeypatch):
    no_generator(monkeypatch)
    folder = arm(tmp_path / "duplicate", model_cache, tmp_path / "no-such-lora", "augmentation=duplicate_real")
    records = manifest.read_csv(folder / "manifest.csv")
    real_train = {(r.path, r.sha256, r.patient_id, r.label) for r in records
                  if r.source == "real" and r.split == "train"}
    repeats = [r for r in records if r.source == "duplicate"]
    assert repeats == added(folder)
    assert Counter(r.label for r in repeats) == Counter(r.label for r in added(ratio_arm))
    assert all((r.path, r.sha256, r.patient_id, r.label) in real_train and r.split == "train" for r in repeats)
    for label in {r.label for r in repeats}:  # fewer than the class's images: drawn without replacement
        assert len({r.path for r in repeats if r.label == label}) == sum(r.label == label for r in repeats)
    inputs = json.loads((folder / "inputs.json").read_text())
    assert not {"diffusion_base", "diffusion_lora"} & set(inputs)


def test_repeats_are_seeded_and_drawn_with_replacement_only_beyond_the_class():
    from pneumo_exp.diffusion.generate import duplicate_real

    real = [Record(path=f"/data/{label}-{i}.png", label=label, patient_id=f"p{i}", split="train", sha256=f"{label}{i}")
            for label in ("NORMAL", "VIRUS") for i in range(5)]
    counts = {"NORMAL": 3, "VIRUS": 12}
    first = duplicate_real(real, counts, seed=0)
    assert first == duplicate_real(list(reversed(real)), counts, seed=0)
    assert first != duplicate_real(real, counts, seed=1)
    normal = [r.path for r in first if r.label == "NORMAL"]
    assert len(normal) == len(set(normal)) == 3
    assert sum(r.label == "VIRUS" for r in first) == 12 and {r.source for r in first} == {"duplicate"}
    with pytest.raises(UserError, match="BACTERIA"):
        duplicate_real(real, {"BACTERIA": 1}, seed=0)


def test_the_leakage_checks_accept_repeats_of_training_images_only():
    real = [Record(path=f"/data/{split}.png", label="NORMAL", patient_id=split, split=split, sha256=split)
            for split in ("train", "val", "test")]
    manifest.validate(real + [replace(real[0], source="duplicate")] * 2)
    manifest.check_no_leakage(real + [replace(real[0], source="duplicate")] * 2)
    with pytest.raises(LeakageError, match="more than one split"):
        manifest.check_no_leakage(real + [replace(real[2], source="duplicate", split="train")])
    with pytest.raises(manifest.DatasetError, match="duplicate images belong to train only"):
        manifest.validate(real + [replace(real[2], source="duplicate")])


# ------------------------------------------------------------------------------------------ the bank


def test_two_synthetic_arms_of_one_seed_share_their_images(tmp_path, model_cache, ratio_arm, generator_and_judge,
                                                           monkeypatch):
    asked = Counter(r.label for r in added(ratio_arm))
    smaller = {label: n - 1 for label, n in asked.items() if n > 1}
    assert smaller, asked
    monkeypatch.setattr(stable_diffusion, "load_pipeline", lambda *a, **k: pytest.fail("the second arm drew images"))
    fixed = arm(tmp_path / "fixed", model_cache, generator_and_judge / "diffusion" / "lora",
                "augmentation=original_study", counts_override(smaller))
    first, second = rows(ratio_arm / "synthetic" / "generation.csv"), rows(fixed / "synthetic" / "generation.csv")
    assert len({row["bank_key"] for row in first + second}) == 1
    for label, count in smaller.items():
        assert [row["index"] for row in second if row["label"] == label] == [str(i) for i in range(count)]
        shared = [r.sha256 for r in added(ratio_arm) if r.label == label][:count]
        assert [r.sha256 for r in added(fixed) if r.label == label] == shared


def test_the_guidance_scale_is_part_of_the_bank_key(tmp_path, model_cache):
    from pneumo_exp.config import job_config
    from pneumo_exp.diffusion.bank import bank_key
    from pneumo_exp.diffusion.generate import run_generation

    def key(*overrides: str) -> str:
        cfg = job_config(compose([f"paths.output_dir={tmp_path}", f"paths.cache_dir={model_cache}", *SMOKE,
                                  *overrides]))
        return bank_key(run_generation(cfg, None).identity)

    assert key() == key("diffusion_lora.generation.batch_size=3")  # how it draws, not what
    assert key() != key("diffusion_lora.generation.guidance_scale=1.5")
    assert key() != key("seed=1")


FILL_A_BANK = """
import sys, time
from pathlib import Path
import numpy as np
from pneumo_exp.diffusion.bank import SyntheticBank

folder, name = Path(sys.argv[1]), sys.argv[2]

def draw(label, seeds):
    time.sleep(0.02)
    return np.stack([np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8) for seed in seeds])

bank = SyntheticBank(folder / "bank", seed=0, draw=draw, batch_size=2)
(folder / f"ready-{name}").touch()
while not (folder / "go").exists():
    time.sleep(0.01)
images = bank.images("VIRUS", 12)
print(bank.drawn["VIRUS"], ",".join(image.sha256 for image in images))
"""


@pytest.mark.xdist_group("subprocess")
def test_a_bank_filled_by_two_processes_at_once_holds_each_image_once(tmp_path):
    script = tmp_path / "fill.py"
    script.write_text(FILL_A_BANK)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    fillers = [subprocess.Popen([sys.executable, str(script), str(tmp_path), name], stdout=subprocess.PIPE,
                                text=True, env=env) for name in ("a", "b")]
    while not all((tmp_path / f"ready-{name}").exists() for name in ("a", "b")):
        assert all(filler.poll() is None for filler in fillers), "a filler stopped before filling"
        time.sleep(0.01)
    (tmp_path / "go").touch()
    outputs = [filler.communicate(timeout=120)[0].split() for filler in fillers]
    assert all(filler.returncode == 0 for filler in fillers)
    assert sum(int(drawn) for drawn, _ in outputs) == 12  # drawn once, by one of them
    assert outputs[0][1] == outputs[1][1]
    files = sorted(p.name for p in (tmp_path / "bank" / "VIRUS").iterdir())
    assert files == [f"{index:05d}.png" for index in range(12)]


# ------------------------------------------------------------------------------------------ the filter


def judge_probabilities(judge: Path, images: list[Record], cache: Path) -> np.ndarray:
    """The judge's probability of each image's class, as `pneumo-exp predict` computes it."""
    from pneumo_exp.classify.predict import class_probabilities, load_as_trained
    from pneumo_exp.data.augment import to_unit_float
    from pneumo_exp.data.images import decode_grayscale, standardize_intensity
    from pneumo_exp.labels import class_index

    classifier, run_cfg, accelerator = load_as_trained(judge, str(cache))
    pixels = np.stack([standardize_intensity(decode_grayscale(r.path, run_cfg.dataset.resolution),
                                             run_cfg.dataset.get("intensity", "none")) for r in images])
    probabilities = class_probabilities(classifier, to_unit_float(torch.from_numpy(pixels)), accelerator)
    return probabilities[torch.arange(len(images)), [class_index(r.label) for r in images]].numpy()


def test_the_filter_keeps_the_first_images_the_judge_accepts(tmp_path, model_cache, ratio_arm, generator_and_judge):
    from pneumo_exp.inputs import judge_fingerprint

    bank = {label: [r for r in added(ratio_arm) if r.label == label] for label in CLASSES}
    judged = {label: judge_probabilities(generator_and_judge, images, model_cache) for label, images in bank.items()}
    label = next(label for label, probabilities in judged.items() if np.argmax(probabilities) > 0)
    images, probabilities = bank[label], judged[label]
    best = int(np.argmax(probabilities))  # the first image with the class's highest probability
    threshold = (probabilities[best] + probabilities[:best].max()) / 2  # refuses every image before it
    lora = generator_and_judge / "diffusion" / "lora"
    only_one = ("augmentation=original_study", counts_override({label: 1}),
                f"augmentation.filter.judge_run={generator_and_judge}")
    folder = arm(tmp_path / "filtered", model_cache, lora, *only_one,
                 f"augmentation.filter.min_probability={float(threshold)}",
                 f"augmentation.filter.max_draws_factor={len(images)}")
    assert [r.sha256 for r in added(folder)] == [images[best].sha256]
    assert [row["index"] for row in rows(folder / "synthetic" / "generation.csv")] == [str(best)]
    report = json.loads((folder / "synthetic" / "filter.json").read_text())["per_class"][label]
    assert report == {"asked": 1, "judged": best + 1, "kept": 1, "acceptance_rate": 1 / (best + 1)}
    assert json.loads((folder / "inputs.json").read_text())["judge"] == judge_fingerprint(generator_and_judge)

    with pytest.raises(UserError, match=r"accepted 0 of the 1 .*augmentation.filter.max_draws_factor"):
        arm(tmp_path / "short", model_cache, lora, *only_one, "augmentation.filter.min_probability=1.0",
            "augmentation.filter.max_draws_factor=1")


def test_a_judge_that_saw_other_images_is_refused_before_any_work(tmp_path, model_cache, generator_and_judge):
    lora = generator_and_judge / "diffusion" / "lora"
    other_split = tmp_path / "judge_of_another_split"
    run(compose([f"paths.output_dir={other_split}", f"paths.cache_dir={model_cache}", *SMOKE,
                 "dataset.split_seed=1", "trainer.epochs=1"]))
    with pytest.raises(LeakageError, match="outside this run's training split.*augmentation.filter.judge_run"):
        arm(tmp_path / "judged_by_another_split", model_cache, lora, "augmentation=ratio",
            f"augmentation.filter.judge_run={other_split}")
    assert not (tmp_path / "judged_by_another_split" / "manifest.csv").exists()

    synthetic_judge = tmp_path / "synthetic_judge"
    shutil.copytree(generator_and_judge, synthetic_judge, ignore=shutil.ignore_patterns("checkpoints", "diffusion"))
    records = manifest.read_csv(synthetic_judge / "manifest.csv")
    trained_on = next(r for r in records if r.split == "train")
    manifest.write_csv(records + [replace(trained_on, path="/elsewhere/x.png", source="synthetic")],
                       synthetic_judge / "manifest.csv")
    with pytest.raises(UserError, match="trained on synthetic images"):
        arm(tmp_path / "judged_by_synthetic", model_cache, lora, "augmentation=ratio",
            f"augmentation.filter.judge_run={synthetic_judge}")
    assert not (tmp_path / "judged_by_synthetic" / "manifest.csv").exists()


class CountingBank:
    """Image i of a class is the number i; counts the calls that drew images."""

    def __init__(self):
        self.calls = []

    def images(self, label, stop, start=0):
        self.calls.append((start, stop))
        return list(range(start, stop))


class EveryTenthJudge:
    def prompted_probability(self, images):
        return [1.0 if image % 10 == 9 else 0.0 for image in images]


def test_a_low_acceptance_is_judged_in_few_batches_and_keeps_the_first_accepted_images():
    from pneumo_exp.config import SyntheticFilterConfig
    from pneumo_exp.evaluation.filtering import accepted_images

    bank = CountingBank()
    kept, judged = accepted_images(bank, EveryTenthJudge(), "NORMAL", 5,
                                   SyntheticFilterConfig(judge_run="j", min_probability=0.5, max_draws_factor=20))
    assert kept == [9, 19, 29, 39, 49] and judged == 50  # the first five accepted; 50 images to find them
    assert len(bank.calls) <= 4, bank.calls  # not one image at a time
