"""Sweep reports on fake run folders: grouping, statistics checked against the results.json files, outputs."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from pneumo_exp import report
from pneumo_exp.classify.metrics import paired_bootstrap_intervals
from pneumo_exp.errors import UserError
from pneumo_exp.report import compare, main_report, write_report
from pneumo_exp.report.collect import RunRecord, collect_runs, group_key, group_runs
from pneumo_exp.report.published import ALWAYS_NORMAL, ORIGINAL_STUDY
from pneumo_exp.report.statistics import DEFAULT_METRICS, EPOCH_METRICS, aggregate, summarize, t_quantile_975
from pneumo_exp.report.tables import latex_escape

EXPERIMENT = "lora_grid"
ALPHAS = (8, 16)
LRS = ("1e-4", "5e-5")
SEEDS = (0, 1, 2)
TEST_COUNTS = (234, 242, 148)  # the official Kermany test split
EPOCHS = 3
SWEEP = Path("multirun") / EXPERIMENT / "2026-01-05_10-00-00-000001"
RETRY_SWEEP = Path("multirun") / EXPERIMENT / "2026-01-06_09-30-00-000002" / "retry"  # nested one level deeper
PLOTS = ("curves.png", "confusion_test.png", "bars.png")
OUTPUT_FILES = {"table.md", "table.csv", "table.tex", "pairs.csv", "references.csv", "epochs.md", "failures.md",
                *PLOTS}


# ------------------------------------------------------------------------------------------- fake run folders

def confusion_metrics(confusion: np.ndarray) -> dict[str, float]:
    true_positive = np.diag(confusion).astype(float)
    recall = true_positive / confusion.sum(1)
    precision = true_positive / np.maximum(confusion.sum(0), 1)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0)
    metrics = {"acc": true_positive.sum() / confusion.sum(), "recall_macro": recall.mean(),
               "f1_macro": f1.mean()}
    for index, name in enumerate(("NORMAL", "BACTERIA", "VIRUS")):
        metrics[f"recall_{name}"], metrics[f"f1_{name}"] = recall[index], f1[index]
    return {key: float(value) for key, value in metrics.items()}


def fake_confusion(rng: np.random.Generator, skill: float, counts=TEST_COUNTS) -> np.ndarray:
    matrix = np.zeros((3, 3), dtype=int)
    for true, count in enumerate(counts):
        correct = rng.binomial(count, skill)
        wrong = rng.binomial(count - correct, 0.5)
        matrix[true, true] = correct
        matrix[true, (true + 1) % 3], matrix[true, (true + 2) % 3] = wrong, count - correct - wrong
    return matrix


def fake_epoch(rng: np.random.Generator, epoch: int, skill: float) -> dict:
    row: dict = {"epoch": epoch, "lr": 1e-4 / epoch}
    for split, counts in (("train", (60, 60, 60)), ("val", (12, 12, 12))):
        confusion = fake_confusion(rng, min(0.95, skill * (0.6 + 0.15 * epoch)), counts)
        row.update({f"{split}/{k}": v for k, v in confusion_metrics(confusion).items()})
        row.update({f"{split}/loss": 1.2 / epoch, f"{split}/ece": 0.1, f"{split}/auroc_macro": 0.8,
                    f"{split}/confusion_matrix": confusion.tolist()})
    return row


def resolved_config(experiment: str, seed: int, alpha: int, lr: str, output_dir: Path) -> dict:
    return {"task": "run", "stages": ["data", "classify"], "experiment_name": experiment, "seed": seed,
            "tags": [], "resume": False,
            "dataset": {"name": "phantom", "resolution": 64},
            "clip_lora": {"name": "tiny_vit", "mode": "lora", "lora": {"r": 8, "alpha": alpha, "dropout": 0.0}},
            "optim": {"name": "adamw", "lr": float(lr), "weight_decay": 0.01},
            "augmentation": {"name": "none"},
            "trainer": {"epochs": EPOCHS, "batch_size": 16},
            "logger": {"mode": "disabled"},
            "paths": {"output_dir": str(output_dir), "cache_dir": "/tmp/cache"}}


def write_yaml(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(payload)))


def write_job(folder: Path, overrides: list[str], config: dict, status: str, rng: np.random.Generator,
              skill: float = 0.7) -> None:
    """A job folder as pneumo-exp leaves it: completed, failed, or still running (one epoch logged)."""
    composed = json.loads(json.dumps(config))
    composed["paths"]["output_dir"] = "${hydra:runtime.output_dir}"  # .hydra/config.yaml is unresolved
    write_yaml(folder / ".hydra" / "config.yaml", composed)
    write_yaml(folder / ".hydra" / "overrides.yaml", overrides)
    write_yaml(folder / "config.yaml", config)
    (folder / "git.json").write_text('{"sha": null, "dirty": null}\n')
    write_yaml(folder / "wandb" / "offline-run-x" / "files" / "config.yaml", {"wandb_version": 1})  # not a run
    epochs = {"completed": EPOCHS, "failed": 0, "unfinished": 1}[status]
    rows = [fake_epoch(rng, epoch, skill) for epoch in range(1, epochs + 1)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if status == "failed":
        (folder / "failed.json").write_text(json.dumps({
            "error": "ValueError: optim.lr=0.1 made the loss non-finite at epoch 1, step 3\nsecond line",
            "traceback": "Traceback (most recent call last):\n  File \"train.py\", line 1\nValueError: ...",
            "overrides": overrides}))
    if status == "completed":
        write_results(folder, rng, skill, config["seed"])


def write_results(folder: Path, rng: np.random.Generator, skill: float, seed: int) -> None:
    results: dict = {"metrics": {}, "ci95": {}, "confusion_matrix": {}, "images": {"val": 36, "test": 624}}
    for split in ("val", "test"):
        confusion = fake_confusion(rng, skill)
        metrics = confusion_metrics(confusion)
        results["metrics"].update({f"{split}/{k}": v for k, v in metrics.items()})
        results["metrics"].update({f"{split}/auroc_macro": float(rng.uniform(0.8, 0.95)),
                                   f"{split}/ece": float(rng.uniform(0.02, 0.1)), f"{split}/loss": 0.7})
        results["ci95"].update({f"{split}/{k}": [v - float(rng.uniform(0.02, 0.04)), v + float(rng.uniform(0.02, 0.04))]
                                for k, v in metrics.items()})
        results["confusion_matrix"][split] = confusion.tolist()
    results.update(best_epoch=EPOCHS, mode="lora", seed=seed)
    (folder / "results.json").write_text(json.dumps(results, indent=2))


def override_dirname(overrides: list[str]) -> str:
    return ",".join(sorted(o for o in overrides if not o.startswith("experiment=")))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict:
    """root/multirun/...: 2 alphas x 2 lrs x 3 seeds completed, an all-failed configuration, a running job,
    plus outputs/baseline (one run, no overrides) and a `summary` job that trains nothing."""
    base = tmp_path_factory.mktemp("report")
    root = base / "runs"
    rng = np.random.default_rng(7)
    folders: dict[tuple[int, str], list[Path]] = {}
    number = 0
    write_yaml(root / SWEEP / "multirun.yaml", {"hydra": {"mode": "MULTIRUN"}})
    for alpha in ALPHAS:
        for lr in LRS:
            for seed in SEEDS:
                overrides = [f"experiment={EXPERIMENT}", f"clip_lora.lora.alpha={alpha}", f"optim.lr={lr}",
                             f"seed={seed}", "logger=none"]
                folder = root / SWEEP / f"{number}_{override_dirname(overrides)}"
                write_job(folder, overrides, resolved_config(EXPERIMENT, seed, alpha, lr, folder), "completed", rng,
                          skill=0.5 + alpha / 100 + (0.1 if lr == "1e-4" else 0.0))
                folders.setdefault((alpha, lr), []).append(folder)
                number += 1
    failed_overrides = [f"experiment={EXPERIMENT}", "clip_lora.lora.alpha=32", "optim.lr=0.1", "seed=0"]
    failed = root / RETRY_SWEEP / f"0_{override_dirname(failed_overrides)}"
    write_job(failed, failed_overrides, resolved_config(EXPERIMENT, 0, 32, "0.1", failed), "failed", rng)
    running_overrides = [f"experiment={EXPERIMENT}", "clip_lora.lora.alpha=8", "optim.lr=0.0001", "seed=3"]
    running = root / RETRY_SWEEP / f"1_{override_dirname(running_overrides)}"
    write_job(running, running_overrides, resolved_config(EXPERIMENT, 3, 8, "1e-4", running), "unfinished", rng)
    with (running / "metrics.jsonl").open("a") as handle:
        handle.write('{"epoch": 2, "train/acc": 0.6')  # being appended right now
    baseline = root / "outputs" / "baseline" / "2026-01-04_08-00-00-000000"
    write_job(baseline, [], resolved_config("baseline", 0, 16, "1e-4", baseline), "completed", rng)
    summary_job = root / "outputs" / "kermany_summary" / "2026-01-04_07-00-00-000000"
    summary_config = resolved_config("kermany_summary", 0, 16, "1e-4", summary_job) | {"task": "summary"}
    write_yaml(summary_job / ".hydra" / "config.yaml", summary_config)
    write_yaml(summary_job / "config.yaml", summary_config)
    return {"base": base, "root": root, "folders": folders, "failed": failed, "running": running,
            "baseline": baseline}


@pytest.fixture(scope="module")
def written(sweep) -> dict:
    output = sweep["base"] / "report_out"
    return {"paths": write_report(sweep["root"], output), "output": output}


def grid_key(alpha: int, lr: str) -> str:
    return f"clip_lora.lora.alpha={alpha},optim.lr={float(lr)!r}"


def direct_values(folders: list[Path], metric: str) -> list[float]:
    return [json.loads((folder / "results.json").read_text())["metrics"][metric] for folder in folders]


def direct_stats(values: list[float]) -> dict:
    mean, std = float(np.mean(values)), float(np.std(values, ddof=1))
    half_width = 0.95 / math.sqrt(2 * 0.975 * 0.025) * std / math.sqrt(len(values))  # t(0.975, 2 dof), closed form
    return {"mean": mean, "std": std, "ci_low": mean - half_width, "ci_high": mean + half_width}


def run_record(overrides: list[str], experiment: str = EXPERIMENT, seed: int = 0) -> RunRecord:
    return RunRecord(path=Path("job"), status="completed", overrides=overrides,
                     config={"experiment_name": experiment, "seed": seed})


# -------------------------------------------------------------------------------------------------------- tests

def test_collect_runs_finds_every_job_at_any_depth_with_its_status(sweep):
    runs = {run.path: run for run in collect_runs(sweep["root"])}
    assert len(runs) == 12 + 1 + 1 + 1  # grid, failed, running, baseline; not the summary job, wandb or .hydra
    assert sum(run.status == "completed" for run in runs.values()) == 13
    failed, running = runs[sweep["failed"]], runs[sweep["running"]]
    assert failed.status == "failed" and failed.results is None
    assert failed.error_line == "ValueError: optim.lr=0.1 made the loss non-finite at epoch 1, step 3"
    assert running.status == "unfinished" and len(running.history) == 1  # the half-written line is skipped
    completed = runs[sweep["folders"][(8, "1e-4")][1]]
    assert completed.seed == 1 and completed.value("clip_lora.lora.alpha") == 8 and len(completed.history) == 3
    assert completed.overrides[1:4] == ["clip_lora.lora.alpha=8", "optim.lr=1e-4", "seed=1"]
    assert completed.metrics["test/acc"] == direct_values([completed.path], "test/acc")[0]


def test_group_key_leaves_out_seed_and_non_settings_and_normalises_numbers():
    a = run_record(["experiment=lora_grid", "optim.lr=1e-4", "clip_lora.lora.alpha=8", "seed=1", "logger=none"])
    b = run_record(["clip_lora.lora.alpha=8", "+optim.lr=0.0001", "seed=2", "paths.cache_dir=/x"], seed=2)
    assert group_key(a) == group_key(b) == "clip_lora.lora.alpha=8,optim.lr=0.0001"
    assert group_key(a, ignore=()) == "clip_lora.lora.alpha=8,optim.lr=0.0001,seed=1"
    assert group_key(run_record([], experiment="baseline")) == "baseline"
    assert group_key(run_record(["seed=3"], experiment="baseline")) == "baseline"
    assert group_key(run_record(["experiment=demo"])) == "experiment=demo"  # a recipe other than the name


def test_aggregate_equals_statistics_computed_from_results_json(sweep):
    groups = {(g["experiment"], g["configuration"]): g for g in aggregate(collect_runs(sweep["root"]))}
    assert len(groups) == 4 + 1 + 1  # the grid, the all-failed configuration, the baseline
    for (alpha, lr), folders in sweep["folders"].items():
        group = groups[(EXPERIMENT, grid_key(alpha, lr))]
        assert group["n"] == 3 and group["seeds"] == [0, 1, 2]
        for metric in DEFAULT_METRICS:
            stats, expected = group["metrics"][metric], direct_stats(direct_values(folders, metric))
            for name, value in expected.items():
                assert stats[name] == pytest.approx(value, rel=1e-12, abs=1e-15), (metric, name)
            assert stats["ci_low"] < stats["mean"] < stats["ci_high"]
        assert "bootstrap_low" not in group["metrics"]["test/acc"]  # averaged per-run bounds are not a CI
    assert groups[(EXPERIMENT, grid_key(8, "1e-4"))]["unfinished"] == 1
    baseline = groups[("baseline", "baseline")]
    assert baseline["n"] == 1 and baseline["metrics"]["test/acc"]["ci_low"] is None


def test_aggregate_sorts_by_experiment_then_overrides_numerically(sweep):
    keys = [(g["experiment"], g["configuration"]) for g in aggregate(collect_runs(sweep["root"]))]
    assert keys == [("baseline", "baseline"),
                    (EXPERIMENT, grid_key(8, "5e-5")), (EXPERIMENT, grid_key(8, "1e-4")),
                    (EXPERIMENT, grid_key(16, "5e-5")), (EXPERIMENT, grid_key(16, "1e-4")),
                    (EXPERIMENT, "clip_lora.lora.alpha=32,optim.lr=0.1")]


def test_confidence_interval_contains_the_mean_and_narrows_with_more_seeds():
    rng = np.random.default_rng(0)
    widths = {}
    for n in (2, 3, 5, 10, 40):
        stats = summarize(0.8 + 0.02 * rng.standard_normal(n))
        assert stats["ci_low"] < stats["mean"] < stats["ci_high"]
        assert stats["ci_high"] - stats["mean"] == pytest.approx(
            t_quantile_975(n - 1) * stats["std"] / math.sqrt(n))
        widths[n] = (stats["ci_high"] - stats["ci_low"]) / stats["std"]  # spread taken out: t(n-1)/sqrt(n)
    assert list(widths.values()) == sorted(widths.values(), reverse=True)
    assert summarize([0.5, 0.5, 0.5])["ci_low"] == 0.5  # no spread, no width
    single = summarize([0.7])
    assert single["mean"] == 0.7 and single["std"] is None and single["ci_low"] is None
    assert summarize([0.7, float("nan"), None])["n"] == 1


@pytest.mark.parametrize("dof", [1, 2, 3, 7, 29, 35, 50, 90, 300])
def test_t_quantile_matches_numerical_integration(dof):
    x = np.linspace(0.0, t_quantile_975(dof), 400_001)
    density = math.exp(math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2)) / math.sqrt(dof * math.pi)
    cdf = 0.5 + np.trapezoid(density * (1 + x ** 2 / dof) ** (-(dof + 1) / 2), x)
    assert cdf == pytest.approx(0.975, abs=2e-5)


def markdown_row(text: str, first_cells: tuple[str, ...]) -> list[str]:
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        if tuple(cells[:len(first_cells)]) == first_cells:
            return cells
    raise AssertionError(f"no row {first_cells}")


def test_markdown_table_numbers_equal_the_results_json_files(sweep, written):
    table = (written["output"] / "table.md").read_text()
    for (alpha, lr), folders in sweep["folders"].items():
        cells = markdown_row(table, (EXPERIMENT, grid_key(alpha, lr)))
        assert cells[2] == "3"
        for cell, metric in zip(cells[3:], DEFAULT_METRICS):
            s = direct_stats(direct_values(folders, metric))
            assert cell == f"{s['mean']:.4f} ± {s['std']:.4f} [{s['ci_low']:.4f}, {s['ci_high']:.4f}]"
    assert markdown_row(table, (EXPERIMENT, grid_key(8, "1e-4")))[-1] == "1 unfinished"
    failed_row = markdown_row(table, (EXPERIMENT, "clip_lora.lora.alpha=32,optim.lr=0.1"))
    assert failed_row[2] == "0" and failed_row[3:3 + len(DEFAULT_METRICS)] == ["failed"] * len(DEFAULT_METRICS)
    baseline = direct_values([sweep["baseline"]], "test/acc")[0]
    assert markdown_row(table, ("baseline", "baseline"))[3] == f"{baseline:.4f}"
    published = markdown_row(table, (ORIGINAL_STUDY["name"],))
    assert published[3:6] == ["0.3750", "0.5000 ¹", "0.2727 ¹"]  # both published macro numbers are two-class
    assert "0.333" in table and "## Per-epoch training metrics" in table
    assert "## Bootstrap intervals" not in table


def test_csv_parses_back_to_the_exact_statistics(sweep, written):
    with (written["output"] / "table.csv").open(newline="") as handle:
        rows = {(row["experiment"], row["configuration"]): row for row in csv.DictReader(handle)}
    for (alpha, lr), folders in sweep["folders"].items():
        row = rows[(EXPERIMENT, grid_key(alpha, lr))]
        assert row["n"] == "3" and row["seeds"] == "0 1 2"
        assert row["unfinished"] == ("1" if (alpha, lr) == (8, "1e-4") else "0")
        for metric in DEFAULT_METRICS:
            for name, value in direct_stats(direct_values(folders, metric)).items():
                assert float(row[f"{metric}_{name}"]) == pytest.approx(value, rel=1e-12, abs=1e-15)
    failed = rows[(EXPERIMENT, "clip_lora.lora.alpha=32,optim.lr=0.1")]
    assert failed["status"] == "failed" and failed["failed"] == "1" and failed["test/acc_mean"] == ""


def test_latex_is_a_booktabs_tabular_with_escaped_text(written):
    tex = (written["output"] / "table.tex").read_text()
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex and "\\begin{tabular}" in tex
    assert "clip\\_lora.lora.alpha=8" in tex and "recall\\_macro" in tex and "$\\pm$" in tex
    body = tex.split("\\begin{tabular}", 1)[1]
    assert not re.search(r"(?<!\\)[_%]", body)
    assert "failed" in tex
    assert latex_escape("a_b 5% R&D #1 {x}") == "a\\_b 5\\% R\\&D \\#1 \\{x\\}"


def test_epochs_table_has_the_means_and_the_original_study_numbers(sweep, written):
    epochs = (written["output"] / "epochs.md").read_text()
    for number, published in ORIGINAL_STUDY["epochs"].items():
        for value in published.values():
            assert f"{value:.4f}" in epochs
        folders = sweep["folders"][(16, "5e-5")]
        histories = [[json.loads(line) for line in (f / "metrics.jsonl").read_text().splitlines()] for f in folders]
        cells = markdown_row(epochs, (EXPERIMENT, grid_key(16, "5e-5"), str(number)))
        expected = [np.mean([h[number - 1][m] for h in histories]) for m in EPOCH_METRICS]
        assert cells[3] == "3" and cells[4:7] == [f"{v:.4f}" for v in expected]
        assert cells[7:10] == [f"{published[m]:.4f}" for m in EPOCH_METRICS]
    assert "0.333" in epochs and "0.5" in epochs
    row = (EXPERIMENT, grid_key(16, "5e-5"), "2")
    assert markdown_row((written["output"] / "table.md").read_text(), row) == markdown_row(epochs, row)


def test_failures_are_listed_with_folder_overrides_and_error(sweep, written):
    failures = (written["output"] / "failures.md").read_text()
    failed_line = next(line for line in failures.splitlines() if sweep["failed"].name in line)
    assert "clip_lora.lora.alpha=32,optim.lr=0.1,seed=0" in failed_line
    assert failed_line.endswith("ValueError: optim.lr=0.1 made the loss non-finite at epoch 1, step 3")
    assert "second line" not in failures and "Traceback" not in failures
    running_line = next(line for line in failures.splitlines() if sweep["running"].name in line)
    assert "epochs logged: 1 of 3" in running_line
    assert failures in (written["output"] / "table.md").read_text()


def test_plots_are_valid_pngs(written):
    for name in PLOTS:
        with Image.open(written["output"] / name) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 200


def test_rewriting_replaces_files_and_writes_nothing_outside_the_output_folder(sweep, written):
    def snapshot() -> dict:
        return {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in sweep["base"].rglob("*")
                if path.is_file() and written["output"] not in path.parents}

    before = snapshot()
    first = (written["output"] / "table.md").read_text()
    paths = write_report(sweep["root"], written["output"])
    assert snapshot() == before
    assert {path.name for path in written["output"].iterdir()} == OUTPUT_FILES  # no temporary files left
    assert set(paths) == OUTPUT_FILES and all(path.parent == written["output"] for path in paths.values())
    assert (written["output"] / "table.md").read_text() == first


def test_main_report_returns_the_markdown_and_reference_can_be_left_out(sweep, tmp_path):
    text = main_report(sweep["root"], tmp_path / "a")
    assert text == (tmp_path / "a" / "table.md").read_text() and text.startswith("# Report")
    write_report(sweep["root"], tmp_path / "b", reference=False)
    plain = (tmp_path / "b" / "epochs.md").read_text() + (tmp_path / "b" / "table.md").read_text()
    assert "0.4894" not in plain and ORIGINAL_STUDY["name"] not in plain


def test_a_folder_without_runs_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no run folders"):
        write_report(tmp_path, tmp_path / "out")
    with pytest.raises(FileNotFoundError):
        collect_runs(tmp_path / "missing")


def test_damaged_files_and_repeated_seeds_are_reported_not_fatal(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "runs"
    for number in range(2):  # the same configuration and seed twice
        folder = root / f"{number}_optim.lr=1e-4"
        write_job(folder, ["optim.lr=1e-4", "seed=0"], resolved_config("again", 0, 8, "1e-4", folder), "completed",
                  rng)
    broken = root / "2_optim.lr=1e-3"
    write_job(broken, ["optim.lr=1e-3", "seed=0"], resolved_config("again", 0, 8, "1e-3", broken), "completed", rng)
    (broken / "results.json").write_text('{"metrics": {"test/acc": 0.')
    (broken / ".hydra" / "overrides.yaml").write_text("[unclosed")
    runs = {run.path.name: run for run in collect_runs(root)}
    assert runs[broken.name].status == "failed" and "results.json unreadable" in runs[broken.name].error_line
    assert runs[broken.name].overrides == []
    groups = aggregate(runs.values())
    assert {g["configuration"]: (g["n"], g["repeated_seeds"]) for g in groups} == {
        "optim.lr=0.0001": (1, [0]), "again": (0, [])}  # a repeated seed counts once; no overrides: experiment
    table = main_report(root, tmp_path / "out")
    assert "seed 0 run more than once" in table and "results.json unreadable" in table


# ----------------------------------------------------------------------------- reference rows and bars caption

def test_always_normal_row_is_the_three_class_constant_prediction(written):
    """234 / 242 / 148 official test images, all called NORMAL: the numbers by hand, three-class means."""
    f1_normal = 2 * (234 / 624) / (1 + 234 / 624)
    expected = {"test/acc": 234 / 624, "test/recall_macro": 1 / 3, "test/f1_macro": f1_normal / 3,
                "test/recall_VIRUS": 0.0}
    assert ALWAYS_NORMAL["test"]["test/f1_macro"] == pytest.approx(0.1818, abs=1e-4)
    table = (written["output"] / "table.md").read_text()
    cells = dict(zip(DEFAULT_METRICS, markdown_row(table, (ALWAYS_NORMAL["name"],))[3:]))
    assert cells == {m: f"{expected[m]:.4f}" if m in expected else "—" for m in DEFAULT_METRICS}
    assert "recall 0.5 and F1 0.2727 are two-class means" in table
    tex = (written["output"] / "table.tex").read_text()
    assert f"{expected['test/f1_macro']:.4f}" in tex and "always NORMAL, 3 classes" in tex


def test_bars_caption_says_the_published_numbers_are_two_class_means():
    from pneumo_exp.report import plots as report_plots

    stats = {"a": {"test/acc": {"mean": 0.8, "ci_low": 0.7, "ci_high": 0.9},
                   "test/f1_macro": {"mean": 0.7, "ci_low": None}}}
    references = report.bar_references()
    figure = report_plots.bars_figure(stats, ["a"], **references)
    title = figure.axes[0].get_title(loc="left").replace("\n", " ")
    assert "F1 0.2727 and recall 0.5 are two-class means" in title and "f1_macro 0.182" in title
    legend = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert "always NORMAL test/f1_macro 0.182" in legend and "original study test/f1_macro 0.2727" in legend


# ---------------------------------------------------------------------------------------- paired comparisons

PAPER_ROWS = {"original_study": 0.85, "original_no_augmentation": 0.55, "zero_shot": 0.35}
TEST_PATIENTS, IMAGES_PER_PATIENT = 30, 3


def write_paper_job(folder: Path, row: str, seed: int, rng: np.random.Generator) -> None:
    """A completed paper-table job whose results.json, predictions.csv and manifest.csv agree."""
    overrides = [f"experiment=paper_cpu/{row}", f"seed={seed}", "dataset=phantom", "experiment_name=paper_demo"]
    config = resolved_config("paper_demo", seed, 16, "1e-4", folder)
    write_job(folder, overrides, config, "unfinished", rng)  # the folder's config files; results written below
    patients = np.repeat([f"p{number}" for number in range(TEST_PATIENTS)], IMAGES_PER_PATIENT)
    labels = np.repeat(np.arange(TEST_PATIENTS) % 3, IMAGES_PER_PATIENT)
    right = rng.random(len(labels)) < PAPER_ROWS[row]
    predictions = np.where(right, labels, (labels + rng.integers(1, 3, len(labels))) % 3)
    names = ("NORMAL", "BACTERIA", "VIRUS")
    paths = [f"test/{names[label]}/{patient}_{number}.png" for number, (label, patient) in
             enumerate(zip(labels, patients))]
    with (folder / "predictions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "prob_NORMAL", "prob_BACTERIA", "prob_VIRUS", "prediction"])
        for path, label, prediction in zip(paths, labels, predictions):
            writer.writerow([path, names[label], 0.2, 0.2, 0.6, names[prediction]])
    with (folder / "manifest.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "patient_id", "split", "source", "sha256"])
        writer.writerow(["train/NORMAL/t.png", "NORMAL", "train0", "train", "real", "x"])
        for path, label, patient in zip(paths, labels, patients):
            writer.writerow([path, names[label], patient, "test", "real", "x"])
    confusion = np.zeros((3, 3), dtype=int)
    np.add.at(confusion, (labels, predictions), 1)
    results = {"metrics": {f"test/{k}": v for k, v in confusion_metrics(confusion).items()},
               "confusion_matrix": {"test": confusion.tolist()}, "seed": seed}
    (folder / "results.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def paper(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("paper") / "runs"
    rng = np.random.default_rng(11)
    for number, (row, seed) in enumerate((row, seed) for row in PAPER_ROWS for seed in SEEDS):
        write_paper_job(root / f"{number}_experiment=paper_cpu/{row},seed={seed}".replace("/", "-"), row, seed, rng)
    return {"root": root, "output": write_report(root, root.parent / "report")["table.md"].parent}


def job_folder(paper: dict, row: str, seed: int) -> Path:
    return next(p.parent for p in paper["root"].rglob("results.json")
                if f"{row},seed={seed}" in p.parent.name)


def predictions_of(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    with (folder / "predictions.csv").open(newline="") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda row: row["path"])
    return np.array([row["label"] for row in rows]), np.array([row["prediction"] for row in rows])


def paired_csv(paper: dict) -> dict:
    with (paper["output"] / "pairs.csv").open(newline="") as handle:
        return {(row["a"], row["b"], row["metric"]): row for row in csv.DictReader(handle)}


def test_seed_matched_t_interval_equals_scipys_paired_t_test(paper):
    from scipy import stats

    rows = paired_csv(paper)
    for metric in ("test/acc", "test/f1_macro"):
        a, b = ([json.loads((job_folder(paper, row, seed) / "results.json").read_text())["metrics"][metric]
                 for seed in SEEDS] for row in compare.AUGMENTATION_PAIR)
        interval = stats.ttest_rel(a, b).confidence_interval(0.95)
        row = rows[(*compare.AUGMENTATION_PAIR, metric)]
        assert row["status"] == "compared" and row["seeds"] == "0 1 2"
        assert float(row["difference"]) == pytest.approx(np.mean(np.subtract(a, b)), rel=1e-12)
        assert float(row["t_low"]) == pytest.approx(interval.low, rel=1e-9)
        assert float(row["t_high"]) == pytest.approx(interval.high, rel=1e-9)


def test_paired_bootstrap_is_centred_on_the_mean_seed_difference(paper):
    comparison = compare.compare_pair(*compare.AUGMENTATION_PAIR, group_runs(collect_runs(paper["root"])), 500)
    assert comparison["bootstrap_seeds"] == list(SEEDS)
    for values in comparison["metrics"].values():
        assert values["bootstrap_low"] < values["difference"] < values["bootstrap_high"]
    point = paired_bootstrap_intervals(
        [compare.aligned_predictions(*(RunRecord(job_folder(paper, row, seed), "completed", [], {})
                                      for row in compare.AUGMENTATION_PAIR)) for seed in SEEDS], samples=10)
    assert point["acc"]["difference"] == pytest.approx(comparison["metrics"]["test/acc"]["difference"], rel=1e-12)


def test_mcnemar_p_equals_a_hand_count_of_discordant_images(paper):
    rows = paired_csv(paper)
    reported = dict(item.split(":") for item in
                    rows[(*compare.AUGMENTATION_PAIR, "test/acc")]["mcnemar_image_level_p"].split())
    for seed in SEEDS:
        (labels, a), (_, b) = (predictions_of(job_folder(paper, row, seed)) for row in compare.AUGMENTATION_PAIR)
        a_only, b_only = int(np.sum((a == labels) & (b != labels))), int(np.sum((a != labels) & (b == labels)))
        smaller, n = min(a_only, b_only), a_only + b_only
        hand = min(1.0, 2 * sum(math.comb(n, k) for k in range(smaller + 1)) / 2 ** n)
        assert float(reported[str(seed)]) == pytest.approx(hand, rel=1e-9), seed
    assert compare.mcnemar(np.zeros(9, int), np.array([0] * 7 + [1] * 2), np.array([1] * 7 + [0] * 2))["p"] == \
        pytest.approx(2 * (1 + 9 + 36) / 512)


def test_augmentation_gain_is_claimed_only_with_every_ci_excluding_zero(paper):
    table = (paper["output"] / "table.md").read_text()
    gain = next(line for line in table.splitlines() if line.startswith("**Augmentation gain**"))
    assert "original_study − original_no_augmentation, seeds 0, 1, 2" in gain
    assert gain.count("original_study higher") == 2  # 0.85 against 0.55 correct: both CIs far above 0
    assert compare.verdict("A", "B", (0.01, 0.05), (-0.01, 0.03)) == compare.NO_DIFFERENCE
    assert compare.verdict("A", "B", (-0.05, -0.01), None) == "B higher"  # runs without predictions.csv
    assert compare.verdict("A", "B", None, (0.02, 0.04)).startswith(compare.NO_DIFFERENCE)  # one seed: no claim
    assert "## Paired comparisons" in table and "## Bootstrap intervals" not in table


def test_default_pairs_with_a_missing_side_are_listed_as_missing(paper):
    table = (paper["output"] / "table.md").read_text()
    for mode in ("linear_probe", "lora", "full"):
        assert markdown_row(table, (mode, "zero_shot"))[7] == f"missing: no completed runs of {mode}"


def test_explicit_pairs_missing_or_ambiguous_are_reported_not_fatal(paper, tmp_path):
    pairs = [["zero_shot", "original_study"], ["nothing_like_this", "zero_shot"], ["paper_demo", "zero_shot"],
             ["experiment=paper_cpu/original_study", "dataset=phantom,experiment=paper_cpu/zero_shot"]]
    table = main_report(paper["root"], tmp_path / "out", pairs=pairs, bootstrap_samples=200)
    assert "Augmentation gain" not in table
    assert markdown_row(table, ("zero_shot", "original_study"))[2] == "0 1 2"
    assert markdown_row(table, ("nothing_like_this", "zero_shot"))[7] == \
        "missing: no completed runs of nothing_like_this"
    assert markdown_row(table, ("paper_demo", "zero_shot"))[7] == "ambiguous: paper_demo matches 3 configurations"
    assert markdown_row(table, ("experiment=paper_cpu/original_study",))[2] == "0 1 2"
    with pytest.raises(UserError, match="report.pairs"):
        main_report(paper["root"], tmp_path / "bad", pairs=["original_study"])


def test_a_report_of_an_unrelated_sweep_has_no_comparison_section(written):
    assert "## Paired comparisons" not in (written["output"] / "table.md").read_text()


def test_report_task_takes_pairs_from_the_command_line(paper, make_cfg, tmp_path, capsys):
    from pneumo_exp.pipeline import run

    run(make_cfg("task=report", f"report.input={paper['root']}", f"report.output={tmp_path / 'cli'}",
                 "report.pairs=[[original_study,zero_shot]]", "report.bootstrap_samples=100"))
    table = (tmp_path / "cli" / "table.md").read_text()
    assert markdown_row(table, ("original_study", "zero_shot"))[2] == "0 1 2"
    assert "no completed runs of lora" not in table and table in capsys.readouterr().out


def test_latex_table_carries_the_augmentation_gain_and_bad_settings_are_named(paper, tmp_path):
    tex = (paper["output"] / "table.tex").read_text()
    gain = next(line for line in tex.splitlines() if "Augmentation gain" in line)
    assert "original\\_study higher" in gain and "**" not in gain and "−" not in gain
    with pytest.raises(UserError, match="report.bootstrap_samples"):
        main_report(paper["root"], tmp_path / "out", bootstrap_samples=0)
