"""One job, one identity: a finished job is reused and seeds are pooled only when the settings and everything the job
read (images, models, LoRAs by content, not by path) are the same; result-shaping keys name folders; a capped
validation is no result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_image

from pneumo_exp.core.files import write_json_atomic
from pneumo_exp.inputs import INPUTS_FILE, changed_inputs
from pneumo_exp.pipeline import check_resumable, finished_before, run
from pneumo_exp.report.collect import RunRecord, group_runs
from pneumo_exp.rundir import SUPERSEDED, job_folder_name, not_a_result, write_run_info
from pneumo_exp.validate import SettingError


def image_tree(root: Path) -> Path:
    """train/val/test, 3 classes, 2 patients of 2 images per class and split, each image its own shade."""
    shade = 0
    for split in ("train", "val", "test"):
        for label in ("NORMAL", "BACTERIA", "VIRUS"):
            for index in range(4):
                shade += 3
                write_image(root / split / label / f"p{index // 2}-{split}-{label}-{index}.png", shade)
    return root


def folder_job(make_cfg, root: Path, *overrides: str):
    return make_cfg("dataset=folder", f"dataset.root={root}", "dataset.resolution=64", "clip_lora.mode=zero_shot",
                    "trainer.bootstrap_samples=10", *overrides)


def test_a_finished_job_runs_again_when_an_image_changed_under_the_same_path(make_cfg, tmp_path):
    root = image_tree(tmp_path / "data")
    cfg = folder_job(make_cfg, root)
    folder = Path(cfg.paths.output_dir)
    run(cfg)
    inputs = json.loads((folder / INPUTS_FILE).read_text())
    assert {"images.train", "images.val", "images.test", "classifier"} <= set(inputs)
    first = (folder / "results.json").stat().st_mtime_ns

    run(folder_job(make_cfg, root))  # nothing changed: skipped
    assert (folder / "results.json").stat().st_mtime_ns == first

    write_image(root / "test" / "VIRUS" / "p1-test-VIRUS-3.png", 250)  # the same path, other pixels
    run(folder_job(make_cfg, root))
    assert (folder / "results.json").stat().st_mtime_ns != first  # ran again
    assert json.loads((folder / INPUTS_FILE).read_text())["images.test"] != inputs["images.test"]
    kept = list((folder / SUPERSEDED).iterdir())
    assert len(kept) == 1 and (kept[0] / "results.json").is_file()  # the old results are kept, out of the report


def test_a_moved_copy_of_the_same_images_is_the_same_job(make_cfg, tmp_path):
    import shutil

    root = image_tree(tmp_path / "data")
    cfg = folder_job(make_cfg, root)
    run(cfg)
    folder = Path(cfg.paths.output_dir)
    first = (folder / "results.json").stat().st_mtime_ns
    shutil.move(root, tmp_path / "moved")
    run(folder_job(make_cfg, tmp_path / "moved"))
    assert (folder / "results.json").stat().st_mtime_ns == first


def finished_job(make_cfg, inputs: dict) -> tuple:
    cfg = make_cfg("debug=smoke")
    folder = Path(cfg.paths.output_dir)
    write_run_info(cfg, folder)
    write_json_atomic(folder / INPUTS_FILE, inputs)
    write_json_atomic(folder / "results.json", {"metrics": {"test/acc": 0.5}})
    return cfg, folder


def test_a_lora_retrained_at_the_same_path_reruns_the_finished_job_and_refuses_to_resume_a_stopped_one(make_cfg):
    inputs = {"images.train": "a", "diffusion_lora": "1111"}
    retrained = {**inputs, "diffusion_lora": "2222"}
    cfg, folder = finished_job(make_cfg, inputs)
    assert finished_before(cfg, folder, inputs)
    assert changed_inputs(folder, retrained) == ["diffusion_lora"]
    check_resumable(make_cfg("debug=smoke", "resume=true"), folder, retrained)  # finished: it runs again instead
    assert not finished_before(cfg, folder, retrained)
    assert not (folder / "results.json").exists()  # set aside: the job runs again
    assert list((folder / SUPERSEDED).glob("*/results.json"))
    write_run_info(cfg, folder)
    write_json_atomic(folder / INPUTS_FILE, inputs)  # a stopped job (no results.json) of the old inputs
    with pytest.raises(SettingError, match="cannot resume.*its input diffusion_lora"):
        check_resumable(make_cfg("debug=smoke", "resume=true"), folder, retrained)


def test_rows_of_other_sources_in_the_dataset_are_part_of_its_fingerprint():
    from pneumo_exp.data.manifest import Record
    from pneumo_exp.inputs import split_fingerprint

    real = Record(path="a.png", label="NORMAL", patient_id="p", split="train", sha256="1" * 64)
    synthetic = Record(path="s.png", label="VIRUS", patient_id="s", split="train", source="synthetic", sha256="2" * 64)
    edited = Record(path="s.png", label="VIRUS", patient_id="s", split="train", source="synthetic", sha256="3" * 64)
    assert split_fingerprint([real, synthetic]) != split_fingerprint([real, edited])
    assert split_fingerprint([real]) == split_fingerprint([real])


def test_a_model_path_that_is_no_folder_is_named_by_its_key():
    from pneumo_exp.hub import ModelSourceError
    from pneumo_exp.inputs import model_fingerprint

    with pytest.raises(ModelSourceError, match=r"no folder here.*\(clip_lora.pretrained\)"):
        model_fingerprint("/no/such/dir/model", None, "config.json", "clip_lora.pretrained")


def test_a_staging_folder_beside_the_bases_is_never_taken_for_a_base(make_cfg, tmp_path):
    from pneumo_exp.config import job_config
    from pneumo_exp.data.manifest import Record
    from pneumo_exp.data.provenance import content_fingerprint
    from pneumo_exp.diffusion.bases import require_built_base
    from pneumo_exp.errors import UserError

    typed = job_config(make_cfg("diffusion_lora=cxr_small", f"diffusion_lora.pretrained={tmp_path / 'bases'}"))
    train = [Record(path="a.png", label="NORMAL", patient_id="p", split="train", sha256="1" * 64)]
    staging = tmp_path / "bases" / f"train-{content_fingerprint(train)}-0123abcd.x1y2.tmp"  # a pretraining's save
    staging.mkdir(parents=True)
    (staging / "model_index.json").write_text("{}")
    with pytest.raises(UserError, match="not been built yet"):
        require_built_base(typed.diffusion_lora, train)


def test_a_job_from_before_inputs_were_recorded_runs_again(make_cfg):
    cfg, folder = finished_job(make_cfg, {})
    (folder / INPUTS_FILE).unlink()
    assert not finished_before(cfg, folder, {"images.train": "a"})


def run_record(folder: Path, seed: int, inputs: dict | None, commit: str = "abc", split_by_commit: bool = False):
    config = {"experiment_name": "study", "seed": seed, "dataset": {"name": "phantom", "kind": "phantom"}}
    results = {"metrics": {"test/acc": 0.5}, "seed": seed}
    path = folder / f"seed={seed}"
    write_json_atomic(path / "results.json", results)
    return RunRecord(path=path, status="completed", overrides=["experiment=study", f"seed={seed}"], config=config,
                     results=results, inputs=inputs, commit=commit, split_by_commit=split_by_commit)


def test_the_report_pools_seeds_only_when_they_read_the_same_inputs(tmp_path):
    same = [run_record(tmp_path, seed, {"diffusion_lora": "1111"}) for seed in (0, 1)]
    assert len(group_runs(same)) == 1
    retrained = [*same, run_record(tmp_path, 2, {"diffusion_lora": "2222"})]
    groups = group_runs(retrained)
    assert len(groups) == 2 and any("inputs.diffusion_lora=2222" in key for _, key in groups)


def test_the_report_notes_seeds_of_two_code_versions_and_can_split_them(tmp_path):
    from pneumo_exp.report.statistics import aggregate
    from pneumo_exp.report.tables import group_notes

    runs = [run_record(tmp_path, 0, {}, "aaa"), run_record(tmp_path, 1, {}, "bbb")]
    (group,) = aggregate(runs, ["test/acc"])
    assert "seeds from 2 code versions (aaa, bbb" in group_notes(group)
    split = [run_record(tmp_path, seed, {}, commit, split_by_commit=True) for seed, commit in ((0, "aaa"), (1, "bbb"))]
    assert len(aggregate(split, ["test/acc"])) == 2


def test_generator_study_settings_name_their_own_folders():
    assert job_folder_name(["generator_study.images_per_class=100"]) != \
        job_folder_name(["generator_study.images_per_class=200"])
    assert job_folder_name(["logger=none", "paths.cache_dir=/x"]) == "defaults"


def test_report_settings_do_not_split_training_jobs(make_cfg):
    from pneumo_exp.rundir import changed_settings

    cfg = make_cfg("debug=smoke")
    folder = Path(cfg.paths.output_dir)
    write_run_info(cfg, folder)
    assert changed_settings(make_cfg("debug=smoke", "report.bootstrap_samples=10"), folder / "config.yaml") == []


def test_a_capped_validation_is_no_result():
    capped = {"val": {"evaluated": 8, "available": 40}}
    assert not_a_result(capped, None) == ["validation split capped to 8 of 40 images (trainer.max_eval_batches): "
                                          "the epoch was chosen on a part of it"]
    assert not_a_result({}, None) == []


def test_seeds_run_at_other_precisions_are_not_pooled(tmp_path):
    """trainer.precision=auto resolves per machine: a bf16 seed and an fp32 seed are two configurations."""
    runs = [run_record(tmp_path, seed, {}) for seed in (0, 1)]
    runs[0].results["precision"], runs[1].results["precision"] = "bf16", "no"
    assert len(group_runs(runs)) == 2
    runs[1].results["precision"] = "bf16"
    assert len(group_runs(runs)) == 1


def test_a_lora_is_refused_on_another_base_than_it_was_trained_on(tmp_path):
    from pneumo_exp.data.manifest import Record
    from pneumo_exp.data.provenance import check_trained_on_base, write_training_record
    from pneumo_exp.errors import UserError

    train = [Record(path="a.png", label="NORMAL", patient_id="p", split="train", sha256="1" * 64)]
    write_training_record(tmp_path, train, base="aaaa")
    check_trained_on_base(tmp_path, "aaaa", "diffusion_lora.trained_lora")
    with pytest.raises(UserError, match=r"another diffusion base \(aaaa\).*\(bbbb\)"):
        check_trained_on_base(tmp_path, "bbbb", "diffusion_lora.trained_lora")
    write_training_record(tmp_path, train)  # a LoRA recorded before the base was: nothing to compare
    check_trained_on_base(tmp_path, "bbbb", "diffusion_lora.trained_lora")
