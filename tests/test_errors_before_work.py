"""A user's mistake ends in one line `pneumo-exp: error: ...` naming the key or file, with no traceback, and a
setting that decides it is refused before any work: misspelt keys, prompts, task inputs, empty splits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Ran, write_image
from omegaconf import OmegaConf

from pneumo_exp import cli, pipeline
from pneumo_exp.data.manifest import Record, write_csv
from pneumo_exp.labels import CLASSES
from pneumo_exp.validate import SettingError

DIFFUSION_STAGES = "stages=[data,diffusion,synthesize,classify]"


@pytest.fixture
def no_work(monkeypatch):
    """Reading the dataset is the first work a run does: a check that comes later fails the test."""
    def work_started(*args, **kwargs):
        raise AssertionError("the job started work before refusing the setting")

    monkeypatch.setattr(pipeline, "prepare_data", work_started)


def assert_one_line(ran: Ran, *parts: str, expected_status: int = 2) -> None:
    assert len(ran.err) == 1 and "Traceback" not in ran.err[0], "\n".join(ran.err)
    assert ran.err[0].startswith("pneumo-exp: error: ")
    assert all(part in ran.err[0] for part in parts), ran.err[0]
    assert ran.status == expected_status


@pytest.mark.parametrize("override,parts", [
    ("trainer.epoch=2", ["trainer.epoch", "did you mean trainer.epochs?"]),
    ("traner.epochs=2", ["traner", "did you mean trainer.epochs?"]),
    ("optim.weight_decy=0.1", ["optim.weight_decy", "did you mean optim.weight_decay?"]),
    ("trainer.zzz=1", ["trainer.zzz", "pneumo-exp --cfg job"]),
    ("augmentation.per_class_ratio.VIRUS=2", ["augmentation.per_class_ratio.VIRUS",
                                              "+augmentation.per_class_ratio.VIRUS=2"]),
    ("trainer.epochs=abc", ["trainer.epochs", "abc"]),
    ("dataset=phantm", ["dataset=phantm", "did you mean dataset=phantom?"]),
    ("trainer.epochs=[", ["trainer.epochs=["]),
    ("dataset.root=/data", ["dataset.root is not a setting of the dataset", "dataset=folder or dataset=kermany"]),
])
def test_a_misspelt_key_or_value_names_the_closest_valid_one(command_line, tmp_path, override, parts):
    assert_one_line(command_line(override), *parts)
    assert not (tmp_path / "run").exists()


def test_a_multirun_over_experiments_names_the_group_its_first_config_lacks(command_line, tmp_path):
    """Hydra composes a multirun's first config without the swept options: an experiment's dataset is not there."""
    assert_one_line(command_line("-m", "experiment=augment_cpu/original_no_augmentation,augment_cpu/ratio_half",
                                 "dataset.root=/data"), "dataset.root", "dataset=kermany", "multirun")


@pytest.mark.parametrize("overrides,parts", [
    (["+trainer.epoch=2"], ["trainer.epoch", "did you mean trainer.epochs?"]),
    (["augmentation=ratio", "+augmentation.per_class_ratio.VIRUSS=2"],
     ["augmentation.per_class_ratio", "VIRUSS", "NORMAL, BACTERIA, VIRUS"]),
    (["augmentation=ratio", "augmentation.ratio=inf"], ["augmentation.ratio"]),
    ([DIFFUSION_STAGES, "~diffusion_lora.prompts.VIRUS"], ["diffusion_lora.prompts", "VIRUS"]),
    (["~clip_lora.prompts.VIRUS"], ["clip_lora.prompts", "VIRUS"]),
    (["+clip_lora.prompts.COVID=[a covid chest]"], ["clip_lora.prompts", "COVID"]),
    (["clip_lora.prompts.NORMAL=[a,b,c,d,e,f,g,h,i]"], ["clip_lora.prompts", "same number"]),
    (["diffusion_lora.training.cache_latents=true", "diffusion_lora.training.crop_min_side=0.9"],
     ["diffusion_lora.training.crop_min_side", "cache_latents"]),
    (["clip_lora=vit_b16", "clip_lora.pretrained=null"], ["clip_lora.pretrained", "architecture"]),
    (["stages=[data,synthesize,classify]", "diffusion_lora.trained_lora=not_trained/lora"],
     ["diffusion_lora.trained_lora", "not_trained/lora", "augment_cpu/generator"]),
])
def test_a_bad_setting_is_refused_before_any_work(command_line, no_work, tmp_path, overrides, parts):
    assert_one_line(command_line(*overrides), *parts)
    assert not (tmp_path / "run").exists()


def finished_run_folder(tmp_path):
    folder = tmp_path / "trained"
    folder.mkdir()
    (folder / "config.yaml").write_text("task: run\n")
    return folder


def text_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("not an image\n")
    return path


def images_and_a_text_file(folder: Path) -> Path:
    write_image(folder / "a.png")
    text_file(folder / "sub" / "b.png")
    return folder


def predicting(tmp: Path, given: Path) -> list[str]:
    return ["predict", f"predict.run_dir={finished_run_folder(tmp)}", f"predict.input={given}"]


@pytest.mark.parametrize("task_args,parts", [
    (lambda tmp: ["predict"], ["predict.run_dir"]),
    (lambda tmp: ["predict", f"predict.run_dir={tmp}", f"predict.input={tmp}"], ["predict.run_dir", "config.yaml"]),
    (lambda tmp: ["predict", f"predict.run_dir={finished_run_folder(tmp)}"], ["predict.input"]),
    (lambda tmp: predicting(tmp, tmp / "missing.png"), ["predict.input", "missing.png"]),
    (lambda tmp: predicting(tmp, text_file(tmp / "notes.txt")), ["predict.input", "notes.txt is not an image"]),
    (lambda tmp: predicting(tmp, text_file(tmp / "notes.png")), ["predict.input", "notes.png is not an image"]),
    (lambda tmp: predicting(tmp, text_file(tmp / "texts" / "notes.txt").parent),
     ["predict.input", "no .jpeg/.jpg/.png images in the folder", "texts"]),
    (lambda tmp: predicting(tmp, images_and_a_text_file(tmp / "images")), ["predict.input", "b.png is not an image"]),
    (lambda tmp: ["report"], ["report.input"]),
    (lambda tmp: ["report", f"report.input={tmp / 'missing'}"], ["report.input", "missing"]),
])
def test_a_task_without_its_inputs_is_refused_before_any_work(command_line, tmp_path, task_args, parts):
    assert_one_line(command_line(*task_args(tmp_path)), *parts)
    assert not (tmp_path / "run").exists()


def judge_run_folder(tmp: Path) -> Path:
    """What generator_study reads of its reference run before any work: a finished classifier run on real images
    with a validation split."""
    folder = tmp / "judge"
    folder.mkdir()
    (folder / "config.yaml").write_text("stages: [data, classify]\ndataset: {name: phantom}\n")
    (folder / "results.json").write_text("{}")
    write_csv([Record(path="a.png", label="NORMAL", patient_id="p0", split="val")], folder / "manifest.csv")
    return folder


@pytest.mark.parametrize("generators,parts", [
    ("[{base:random}]", ["generator_study.generators[0].name", "without a name"]),
    ("[{name:a},{base:random}]", ["generator_study.generators[1].name", "without a name"]),
    ("[{name:b,base:/no/such/folder}]", ["generator_study.generators[0].base", "no folder /no/such/folder"]),
    ("[{name:b,base:no-such-folder}]", ["generator_study.generators[0].base", "no folder no-such-folder"]),
    (lambda tmp: f"[{{name:b,base:{tmp}}}]", ["generator_study.generators[0].base", "no model_index.json"]),
])
def test_a_study_generator_without_a_name_or_a_base_folder_is_refused_before_any_work(
        command_line, monkeypatch, tmp_path, generators, parts):
    from pneumo_exp.evaluation import generator_study

    def study_started(*args, **kwargs):
        raise AssertionError("the study started before refusing its generator")

    monkeypatch.setattr(generator_study, "run_generator_study", study_started)
    generators = generators(tmp_path) if callable(generators) else generators
    assert_one_line(command_line("task=generator_study", f"generator_study.reference_run={judge_run_folder(tmp_path)}",
                                 f"generator_study.generators={generators}"), *parts)
    assert not (tmp_path / "run").exists()


def test_a_report_over_a_folder_without_runs_ends_in_one_line(command_line, tmp_path):
    (tmp_path / "sweep").mkdir()
    assert_one_line(command_line("report", f"report.input={tmp_path / 'sweep'}"), "no run folders", "report.input")


def test_an_empty_split_is_refused_before_the_training_stages(command_line, monkeypatch, tmp_path):
    for shade, (split, label, image) in enumerate((split, label, image) for split in ("train", "val")
                                                  for label in CLASSES for image in range(2)):
        write_image(tmp_path / "data" / split / label / f"{image}.png", shade=10 * shade)

    def training_started(*args, **kwargs):
        raise AssertionError("a training stage started before the empty split was refused")

    monkeypatch.setattr(pipeline, "run_training_stages", training_started)
    assert_one_line(command_line("dataset=folder", f"dataset.root={tmp_path / 'data'}",
                                 "dataset.resolution=${clip_lora.image_size}"), "test split is empty",
                    "dataset=folder", expected_status=1)


def test_a_sweep_objective_the_run_does_not_report_names_the_key():
    with pytest.raises(SettingError) as refused:
        cli.objective(OmegaConf.create({"sweep_objective": "val/f1"}), {"val/f1_macro": 0.5})
    assert refused.value.where == "sweep_objective" and "val/f1_macro" in str(refused.value)


@pytest.mark.slow
def test_a_misspelt_key_ends_in_one_line_from_the_installed_command(tmp_path):
    """The script pip installed, in a process of its own (the tests above run the command in this process)."""
    done = subprocess.run([str(Path(sys.executable).parent / "pneumo-exp"), "trainer.epoch=2",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "pneumo-exp: error: unknown key trainer.epoch: did you mean trainer.epochs?"]


def test_a_pipeline_whose_scheduler_predicts_samples_is_named_as_the_problem():
    from types import SimpleNamespace

    import torch
    from diffusers import DDPMScheduler

    from pneumo_exp.diffusion.train import latent_loss
    from pneumo_exp.errors import UserError

    components = SimpleNamespace(noise_scheduler=DDPMScheduler(prediction_type="sample"),
                                 vae=SimpleNamespace(dtype=torch.float32), source="some/pipeline")
    with pytest.raises(UserError) as refused:
        latent_loss(components, None, torch.zeros(1, 4, 8, 8), torch.zeros(1, 2, 8), torch.Generator())
    assert refused.value.where == "some/pipeline" and "'sample'" in str(refused.value)
