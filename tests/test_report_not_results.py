"""A capped or subset test is never a result: the report keeps such runs out of its tables, plots and comparisons
and lists them apart; the run says so on the command line and in W&B; the official split's reference rows appear
only beside runs tested on it; a run that would measure nothing is refused, and an unused val_fraction is noted."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import compose, write_image
from omegaconf import OmegaConf

from pneumo_exp.report import write_report
from pneumo_exp.report.published import ALWAYS_NORMAL, ORIGINAL_STUDY
from pneumo_exp.validate import SettingError

PHANTOM_TEST = (30, 30, 30)  # images per class of a phantom test split, not the official Kermany one


def write_completed_run(folder: Path, row: str, seed: int, correct: int, capped: dict | None = None,
                        limit_per_class: int | None = None) -> Path:
    """A completed paper-table job whose test split has PHANTOM_TEST images, `correct` of each class right."""
    config = {"task": "run", "stages": ["data", "classify"], "experiment_name": "paper_demo", "seed": seed,
              "dataset": {"name": "phantom", "kind": "phantom", "limit_per_class": limit_per_class},
              "paths": {"output_dir": str(folder), "cache_dir": "/tmp/cache"}}
    (folder / ".hydra").mkdir(parents=True)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    (folder / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml([f"experiment=paper_cpu/{row}",
                                                                         f"seed={seed}"]))
    confusion = [[correct if i == j else (n - correct if j == (i + 1) % 3 else 0) for j in range(3)]
                 for i, n in enumerate(PHANTOM_TEST)]
    accuracy = 3 * correct / sum(PHANTOM_TEST)
    results = {"metrics": {"test/acc": accuracy, "test/f1_macro": accuracy}, "confusion_matrix": {"test": confusion},
               "capped": capped or {}, "seed": seed}
    (folder / "results.json").write_text(json.dumps(results))
    return folder


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict:
    """original_study: seeds 0 and 1 tested in full, seed 2 on a capped test split (and far better);
    original_no_augmentation: two seeds of a subset run."""
    root = tmp_path_factory.mktemp("not_results") / "runs"
    full = [write_completed_run(root / f"full_{seed}", "original_study", seed, 20 + seed) for seed in (0, 1)]
    capped = write_completed_run(root / "capped", "original_study", 2, 30,
                                 capped={"test": {"evaluated": 90, "available": 624}})
    subset = [write_completed_run(root / f"subset_{seed}", "original_no_augmentation", seed, 25, limit_per_class=10)
              for seed in (0, 1)]
    return {"root": root, "full": full, "capped": capped, "subset": subset}


@pytest.fixture(scope="module")
def written(sweep) -> dict:
    from pneumo_exp.report import plots

    bars = {}
    original = plots.bars_png
    plots.bars_png = lambda stats, **lines: bars.update(stats=stats, **lines) or original(stats, **lines)
    try:
        paths = write_report(sweep["root"], sweep["root"].parent / "report", bootstrap_samples=50)
    finally:
        plots.bars_png = original
    return {"text": {name: path.read_text() for name, path in paths.items() if name.endswith((".md", ".csv", ".tex"))},
            "bars": bars}


def read_csv(text: str) -> list[dict]:
    return list(csv.DictReader(text.splitlines()))


def test_capped_and_subset_runs_are_kept_out_of_the_tables_plots_and_comparisons(written):
    (row,) = read_csv(written["text"]["table.csv"])
    assert row["configuration"] == "experiment=paper_cpu/original_study" and row["seeds"] == "0 1"
    assert float(row["test/acc_mean"]) == pytest.approx((20 + 21) / 60)  # the capped seed's 1.0 left out
    assert "original_no_augmentation" not in written["text"]["table.tex"]
    assert list(written["bars"]["stats"]) == ["experiment=paper_cpu/original_study"]
    (pair,) = [p for p in read_csv(written["text"]["pairs.csv"]) if p["b"] == "original_no_augmentation"]
    assert pair["status"] == "missing"


def test_they_are_listed_as_not_results_with_the_reason(sweep, written):
    for name in ("table.md", "failures.md"):
        section = written["text"][name].split("## Not results", 1)[1]
        assert "`capped` — " in section and "test split capped to 90 of 624 images" in section
        assert all(f"`{folder.name}` — " in section for folder in sweep["subset"])
        assert "dataset.limit_per_class=10" in section
    assert "3 not results" in written["text"]["table.md"]


def test_official_split_reference_rows_only_beside_runs_tested_on_it(written):
    text = written["text"]
    assert ALWAYS_NORMAL["name"] not in text["table.md"] + text["table.tex"]
    assert ORIGINAL_STUDY["name"] not in text["table.md"] and "original:" not in text["epochs.md"]
    assert "Original study" not in text["table.tex"] and "original study" not in written["bars"]["caption"]
    assert not written["bars"]["reference"]
    baseline = next(line for line in text["table.md"].splitlines()
                    if line.startswith("| always NORMAL, 3 classes (this test split: 30 NORMAL, 30 BACTERIA"))
    assert baseline.split(" | ")[3] == f"{1 / 3:.4f}"  # accuracy of always NORMAL on a balanced split
    assert "not every result here was tested on the official Kermany test split" in text["table.md"]


class FakeWandbRun:
    def __init__(self):
        self.summary = {}

    def log(self, row):
        pass

    def finish(self, exit_code=0):
        pass


def test_a_capped_test_is_marked_on_the_command_line_and_in_wandb(make_cfg, monkeypatch, capsys):
    from pneumo_exp.pipeline import run
    from pneumo_exp.tracking import RunLogger

    wandb_run = FakeWandbRun()
    monkeypatch.setattr(RunLogger, "_start_wandb", lambda self, cfg, job_type, run_name: wandb_run)
    run(make_cfg("debug=smoke", "clip_lora.mode=zero_shot", "trainer.max_eval_batches=1", "trainer.eval_batch_size=4",
                 "trainer.cap_test=true", logger="wandb"))
    assert "not a result: test split capped to 4 of 36 images" in capsys.readouterr().out
    assert "test split capped to 4 of 36 images" in wandb_run.summary["not_a_result"]


def test_no_validation_and_no_test_is_refused_before_any_work(make_cfg):
    from pneumo_exp.pipeline import run

    cfg = make_cfg("debug=smoke", "dataset.val_fraction=0", "trainer.evaluate_test=false")
    with pytest.raises(SettingError, match="nothing") as refused:
        run(cfg)
    assert refused.value.where == "dataset.val_fraction"
    assert not (Path(cfg.paths.output_dir) / "manifest.csv").exists()


def test_val_fraction_of_a_dataset_with_its_own_validation_split_is_noted(tmp_path):
    from pneumo_exp.config import job_config
    from pneumo_exp.data.prepare import prepare_data

    shade = iter(range(10, 250, 5))
    for split in ("train", "val", "test"):
        for label in ("NORMAL", "BACTERIA", "VIRUS"):
            for index in range(2):
                write_image(tmp_path / "tree" / split / label / f"{index}.png", next(shade))
    overrides = ["dataset=folder", f"dataset.root={tmp_path / 'tree'}", "dataset.val_fraction=0.3",
                 f"paths.output_dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    data = prepare_data(job_config(compose(overrides)).dataset, str(tmp_path / "cache"))
    assert [note for note in data.notes if "dataset.val_fraction=0.3 is not used" in note]
    (tmp_path / "tree" / "val").rename(tmp_path / "val_moved")
    data = prepare_data(job_config(compose(overrides)).dataset, str(tmp_path / "cache"))
    assert not [note for note in data.notes if "dataset.val_fraction" in note]
