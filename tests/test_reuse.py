"""A finished or stopped job is reused only if it really is the same job: a setting the stored config lacks counts
as its schema default, the process count shapes the result, and the report pools only runs of the same settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pneumo_exp.core.files import write_json_atomic
from pneumo_exp.pipeline import finished_before, run
from pneumo_exp.report.collect import RunRecord
from pneumo_exp.report.statistics import aggregate
from pneumo_exp.rundir import changed_settings, write_run_info
from pneumo_exp.validate import SettingError

# Keys added to the schema after runs were made, each with a value a recipe may now set.
NEWER_KEYS = {"trainer.label_smoothing": "0.1", "dataset.intensity": "equalize", "trainer.cap_test": "true",
              "trainer.ema_decay": "0.9"}


def store_without(cfg, key: str, folder: Path) -> Path:
    """config.yaml as a run made before `key` existed left it."""
    stored = OmegaConf.to_container(cfg, resolve=True)
    group, name = key.split(".")
    del stored[group][name]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(stored)))
    return folder / "config.yaml"


@pytest.mark.parametrize("key", NEWER_KEYS)
def test_a_key_missing_from_the_stored_config_counts_as_its_schema_default(make_cfg, tmp_path, key):
    stored_file = store_without(make_cfg("debug=smoke"), key, tmp_path / "old")
    assert changed_settings(make_cfg("debug=smoke"), stored_file) == []
    assert changed_settings(make_cfg("debug=smoke", f"{key}={NEWER_KEYS[key]}"), stored_file) == [key]


def test_a_finished_job_of_an_edited_recipe_is_not_skipped(make_cfg):
    cfg = make_cfg("debug=smoke")
    folder = Path(cfg.paths.output_dir)
    store_without(cfg, "trainer.label_smoothing", folder)
    write_json_atomic(folder / "results.json", {"metrics": {}})
    assert finished_before(cfg, folder)
    with pytest.raises(SettingError, match="trainer.label_smoothing"):
        finished_before(make_cfg("debug=smoke", "trainer.label_smoothing=0.1"), folder)


def test_a_finished_job_with_another_process_count_is_not_reused(make_cfg, monkeypatch):
    cfg = make_cfg("debug=smoke")
    folder = Path(cfg.paths.output_dir)
    write_run_info(cfg, folder)
    write_json_atomic(folder / "results.json", {"metrics": {}})  # written before the count was recorded: one
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert finished_before(cfg, folder)
    write_json_atomic(folder / "results.json", {"metrics": {}, "processes": 2})
    with pytest.raises(SettingError, match="process"):
        finished_before(cfg, folder)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert finished_before(cfg, folder)


def test_results_record_the_process_count(make_cfg):
    cfg = make_cfg("debug=smoke", "clip_lora.mode=zero_shot")
    run(cfg)
    assert json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())["processes"] == 1


def run_record(folder: Path, seed: int, trainer: dict, results: dict | None = None) -> RunRecord:
    """A completed seed of one recipe file (the same overrides), with the trainer settings it resolved to."""
    folder = folder / f"seed={seed}"
    config = {"experiment_name": "paper_demo", "seed": seed, "dataset": {"name": "phantom", "kind": "phantom"},
              "trainer": trainer, "paths": {"output_dir": str(folder)}}
    results = {"metrics": {"test/acc": 0.5 + seed / 10}, "seed": seed, **(results or {})}
    write_json_atomic(folder / "results.json", results)
    return RunRecord(path=folder, status="completed", overrides=["experiment=paper_cpu/lora", f"seed={seed}"],
                     config=config, results=results)


def test_the_report_pools_runs_of_the_same_resolved_settings_only(tmp_path):
    """Seeds of an edited recipe file share their overrides but not their settings: they are not pooled, and the
    configuration names the key that differs; a key an older run lacks counts as its default."""
    same = aggregate([run_record(tmp_path / "same", 0, {"epochs": 3}),
                      run_record(tmp_path / "same", 1, {"epochs": 3, "label_smoothing": 0.0})])
    assert [group["n"] for group in same] == [2]
    edited = aggregate([run_record(tmp_path / "edited", 0, {"epochs": 3}),
                        run_record(tmp_path / "edited", 1, {"epochs": 3, "label_smoothing": 0.1})])
    assert [group["n"] for group in edited] == [1, 1]
    assert all("trainer.label_smoothing=" in group["configuration"] for group in edited)
    launched = aggregate([run_record(tmp_path / "launched", 0, {"epochs": 3}),
                          run_record(tmp_path / "launched", 1, {"epochs": 3}, {"processes": 2})])
    assert sorted(group["configuration"].rsplit(",", 1)[-1] for group in launched) == ["processes=1", "processes=2"]
