"""Problems the user can fix end in one line naming the file or key, before any work; no code runs from a run
folder; checkpoints and logs cannot mislead; every JSON file is strict."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch

from pneumo_exp.classify.checkpoint import load_training_state
from pneumo_exp.core.checkpoint import CheckpointError
from pneumo_exp.core.files import write_json_atomic
from pneumo_exp.core.seeds import restore_rng, rng_state
from pneumo_exp.errors import UserError
from pneumo_exp.pipeline import finished_before, run
from pneumo_exp.rundir import folder_value, job_folder_name, write_run_info
from pneumo_exp.validate import SettingError, check_plan


@pytest.mark.parametrize("override,key", [
    ("trainer.epochs=0", "trainer.epochs"),
    ("trainer.batch_size=0", "trainer.batch_size"),
    ("trainer.grad_accum_steps=0", "trainer.grad_accum_steps"),
    ("trainer.eval_batch_size=0", "trainer.eval_batch_size"),
    ("optim.lr=-1", "optim.lr"),
    ("optim.warmup_ratio=1.0", "optim.warmup_ratio"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("dataset.resolution=8", "dataset.resolution"),
    ("dataset.val_fraction=1.5", "dataset.val_fraction"),
    ("clip_lora.image_size=0", "clip_lora.image_size"),
    ("diffusion_lora.resolution=60", "diffusion_lora.resolution"),
    ("trainer.bootstrap_samples=0", "trainer.bootstrap_samples"),
    ("augmentation.ratio=-1", "augmentation.ratio"),
    ("augmentation.per_class_count.VIRUS=-5", "augmentation.per_class_count.VIRUS"),
    ("diffusion_lora.training.epochs=0", "diffusion_lora.training.epochs"),
    ("diffusion_lora.training.lr=0", "diffusion_lora.training.lr"),
    ("diffusion_lora.training.grad_accum_steps=0", "diffusion_lora.training.grad_accum_steps"),
    ("diffusion_lora.generation.num_inference_steps=0", "diffusion_lora.generation.num_inference_steps"),
    ("diffusion_lora.generation.guidance_scale=-1", "diffusion_lora.generation.guidance_scale"),
    ("optim.betas=[0.9,1.5]", "optim.betas"),
    ("trainer.selection_metric=val/ece", "trainer.selection_metric"),
    ("dataset.intensity=clahe", "dataset.intensity"),
])
def test_bad_values_are_refused_naming_the_key(make_cfg, override, key):
    with pytest.raises(SettingError) as refused:
        check_plan(make_cfg(override))
    assert refused.value.where == key


def test_a_study_base_that_cannot_be_loaded_is_named_by_its_generators_key(make_cfg):
    """A hub id passes the checks before work; when the study cannot load it, the key is the one the user set."""
    from pneumo_exp.config import job_config
    from pneumo_exp.data.prepare import PreparedData
    from pneumo_exp.evaluation.generator_study import checked_sources

    generators = "generator_study.generators=[{name:b,base:nobody/no-such-model}]"
    cfg = job_config(make_cfg("task=generator_study", generators))
    with pytest.raises(UserError) as refused:
        checked_sources(cfg, PreparedData(records=[]))
    assert refused.value.where == "generator_study.generators[0].base"
    assert "nobody/no-such-model" in str(refused.value) and "\n" not in str(refused.value)


def test_max_train_steps_replaces_diffusion_epochs(make_cfg):
    check_plan(make_cfg("diffusion_lora.training.epochs=0", "diffusion_lora.training.max_train_steps=3"))


def test_a_bad_value_ends_in_one_line_and_leaves_no_run_folder(command_line, monkeypatch, tmp_path):
    done = command_line("experiment=demo", "trainer.epochs=0")
    assert done.status == 2
    assert done.err == ["pneumo-exp: error: bad value 0 (trainer.epochs): use 1 or more"]
    assert not (tmp_path / "run").exists()

    monkeypatch.setenv("PNEUMO_EXP_DEBUG", "1")
    with pytest.raises(SettingError) as shown:  # with its traceback
        command_line("experiment=demo", "optim.lr=-1")
    assert shown.value.where == "optim.lr"


@pytest.mark.slow
def test_a_malicious_training_state_is_refused_and_never_runs(command_line, tmp_path):
    common = ["experiment=demo", "debug=smoke", "trainer.epochs=1"]
    assert command_line(*common).status == 0
    state_file = tmp_path / "run" / "checkpoints" / "last" / "training_state.pt"
    marker = tmp_path / "payload_ran"
    state_file.write_bytes(pickle.dumps({"optimizer": WritesAFile(str(marker))}))
    (tmp_path / "run" / "results.json").unlink()

    done = command_line(*common, "resume=true")
    assert done.status == 1
    assert len(done.err) == 1 and done.err[0].startswith("pneumo-exp: error: cannot resume")
    assert str(state_file) in done.err[0] and "resume=false" in done.err[0]
    assert not marker.exists()
    assert "Traceback" in next((tmp_path / "run").glob("*.log")).read_text()  # the details are in the job log


class WritesAFile:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_damaged_training_state_names_the_file_and_how_to_start_afresh(tmp_path):
    folder = tmp_path / "last"
    folder.mkdir()
    torch.save({"epoch": 1, "rng": rng_state()}, folder / "training_state.pt")
    (folder / "training_state.pt").write_bytes((folder / "training_state.pt").read_bytes()[:300])
    with pytest.raises(CheckpointError) as refused:
        load_training_state(folder)
    assert refused.value.where == str(folder / "training_state.pt")
    assert "damaged or truncated" in str(refused.value) and "resume=false" in refused.value.fix


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    torch.save({"rng": rng_state()}, tmp_path / "state.pt")
    expected = (torch.rand(3), np.random.standard_normal(3), [random.random() for _ in range(3)])
    restore_rng(torch.load(tmp_path / "state.pt", weights_only=True)["rng"])
    again = (torch.rand(3), np.random.standard_normal(3), [random.random() for _ in range(3)])
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


@pytest.mark.slow
def test_a_restart_from_epoch_one_rewrites_metrics_and_cleans_staging(make_cfg):
    cfg = make_cfg("debug=smoke")
    run(cfg)
    folder = Path(cfg.paths.output_dir)
    assert not list(folder.glob("checkpoints/*.tmp"))  # removed once each save completed
    import shutil

    shutil.rmtree(folder / "checkpoints" / "last")  # `last` gone, `best` remains
    (folder / "checkpoints" / "last.k1ll3d.tmp").mkdir()  # what a killed save leaves
    (folder / "results.json").unlink()
    run(make_cfg("debug=smoke", "resume=true"))
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
    assert not list(folder.glob("checkpoints/*.tmp"))


def test_json_files_are_strict(tmp_path):
    path = write_json_atomic(tmp_path / "x.json", {"fid": math.nan, "values": [1.0, math.inf, -math.inf],
                                                   "nested": {"kid": (math.nan, 2)}})

    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    assert json.loads(path.read_text(), parse_constant=refuse) == {"fid": None, "values": [1.0, None, None],
                                                                   "nested": {"kid": [None, 2]}}


def test_job_folders_name_every_setting_and_shorten_paths():
    a = job_folder_name(["dataset=folder", "dataset.root=/data/sets/A", "logger=none", "paths.cache_dir=/c"])
    b = job_folder_name(["dataset=folder", "dataset.root=/data/other/A", "logger=none", "paths.cache_dir=/c"])
    assert a != b and a.startswith("dataset.root=A-") and a.endswith(",dataset=folder")
    assert job_folder_name(["optim.lr=1e-3", "clip_lora.lora.alpha=8", "resume=true", "sweep_name=x"]) == \
        "clip_lora.lora.alpha=8,optim.lr=1e-3"
    assert job_folder_name(["trainer.cpu=true"]) == "trainer.cpu=true"
    assert folder_value("x" * 100) != folder_value("x" * 99) and len(folder_value("x" * 100)) < 40


def test_job_folder_names_stay_within_the_file_systems_limit():
    """The paper demo's overrides made a name over 255 bytes (OSError: File name too long)."""
    common = ["dataset=phantom", "clip_lora=tiny", "dataset.resolution=64", "trainer.batch_size=16",
              "augmentation.per_class_count={NORMAL:30,VIRUS:30}", "diffusion_lora.training.max_train_steps=3",
              "diffusion_lora.training.validation_every=0", "diffusion_lora.generation.num_inference_steps=2"]
    names = {job_folder_name([f"experiment=paper_cpu/{row}", f"seed={seed}", *common])
             for row in ("original_study", "original_no_augmentation") for seed in (0, 1)}
    assert len(names) == 4
    assert all(len(name.encode()) <= 200 for name in names)
    assert all(name.startswith("augmentation.per_class_count=") for name in names)


def test_a_finished_job_is_skipped_only_with_the_same_settings(make_cfg):
    cfg = make_cfg("debug=smoke")
    folder = Path(cfg.paths.output_dir)
    write_run_info(cfg, folder)
    write_json_atomic(folder / "results.json", {"metrics": {}})
    assert finished_before(make_cfg("debug=smoke", "resume=true", logger="wandb"), folder)
    with pytest.raises(SettingError, match="optim.lr") as refused:
        finished_before(make_cfg("debug=smoke", "optim.lr=0.5"), folder)
    assert refused.value.where == str(folder)
    with pytest.raises(UserError, match="dataset.val_fraction"):
        finished_before(make_cfg("debug=smoke", "dataset.val_fraction=0.3"), folder)


def test_history_files_are_strict_json_and_read_back_as_nan(tmp_path):
    from pneumo_exp.core.history import json_line, read_json_lines

    path = tmp_path / "metrics.jsonl"
    path.write_text(json_line({"epoch": 1, "val/auroc_macro": math.nan, "val/acc": 0.5}) + '{"epoch": 2, "val/a')

    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    assert json.loads(path.read_text().splitlines()[0], parse_constant=refuse)["val/auroc_macro"] is None
    (row,) = read_json_lines(path)  # the line cut short by a writer still running is skipped
    assert row["epoch"] == 1 and math.isnan(row["val/auroc_macro"]) and row["val/acc"] == 0.5


def test_a_setting_added_after_a_run_started_is_not_a_change(make_cfg, tmp_path):
    """A run folder from before a new schema key (here trainer.cap_test) still resumes and still counts as done."""
    from omegaconf import OmegaConf

    from pneumo_exp.rundir import changed_settings

    cfg = make_cfg("debug=smoke")
    stored = OmegaConf.to_container(cfg, resolve=True)
    del stored["trainer"]["cap_test"]
    stored_file = tmp_path / "config.yaml"
    stored_file.write_text(OmegaConf.to_yaml(OmegaConf.create(stored)))
    assert changed_settings(cfg, stored_file) == []
    assert changed_settings(make_cfg("debug=smoke", "trainer.epochs=7"), stored_file) == ["trainer.epochs"]


def test_val_fraction_zero_is_allowed():
    """A split without validation (val_fraction=0) is what the splitter allows; validation must not refuse it."""
    from conftest import compose

    from pneumo_exp.validate import check_settings

    check_settings(compose(["dataset.val_fraction=0"]))


def test_a_refused_job_removes_only_what_hydra_made(tmp_path):
    from pneumo_exp.cli import remove_unused_run_folder

    users = tmp_path / "logs"
    (users / ".hydra").mkdir(parents=True)
    (users / "cli.log").write_text("ours")
    (users / "mine.log").write_text("the user's")
    remove_unused_run_folder(users, "cli")
    assert (users / "mine.log").read_text() == "the user's"

    ours = tmp_path / "run"
    (ours / ".hydra").mkdir(parents=True)
    (ours / "cli.log").write_text("ours")
    remove_unused_run_folder(ours, "cli")
    assert not ours.exists()
