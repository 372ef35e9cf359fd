"""End-to-end classifier runs on phantom data: learning, resume after a kill, W&B files, modes, errors, launch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose

from pneumo_exp import wandb_offline
from pneumo_exp.core.history import read_json_lines
from pneumo_exp.core.training import NonFiniteLossError
from pneumo_exp.pipeline import run

pytestmark = pytest.mark.slow

# The learning test's budget: the demo recipe, which a broken loss or frozen weights cannot pass.
LEARN = ["experiment=demo"]
TIMINGS = {"train/step_seconds", "train/images_per_second"}


def run_dir(cfg) -> Path:
    return Path(cfg.paths.output_dir)


def test_tiny_classifier_learns_far_above_chance(make_cfg):
    cfg = make_cfg(*LEARN)
    metrics = run(cfg)
    history = read_json_lines(run_dir(cfg) / "metrics.jsonl")
    assert len(history) == cfg.trainer.epochs
    best_val = max(row["val/acc"] for row in history)
    assert best_val >= 0.75, f"validation accuracy {best_val:.3f}: chance is 0.333"
    assert metrics["test/acc"] >= 0.6, metrics
    assert history[-1]["train/loss"] < history[0]["train/loss"]


def test_real_data_recipe_runs_a_few_steps_on_phantom_data(make_cfg):
    """experiment=kermany_cpu as it is (small preset, 128 px, augmentation ranges, weight average), shrunk, in fp32:
    its bf16 costs ~13x on a CPU without bf16 units, and bf16 runs are tested on their own."""
    cfg = make_cfg("experiment=kermany_cpu", "dataset=phantom", "debug=smoke", "trainer.max_steps_per_epoch=2",
                   "trainer.precision=no")
    assert cfg.trainer.ema_decay > 0 and cfg.clip_lora.name == "small"
    run(cfg)
    history = read_json_lines(run_dir(cfg) / "metrics.jsonl")
    assert [row["epoch"] for row in history] == [1, 2]
    assert {"val_live/f1_macro", "val/f1_macro"} <= set(history[0])
    results = json.loads((run_dir(cfg) / "results.json").read_text())
    validated = history[results["best_epoch"] - 1]  # the averaged weights were validated, kept and tested
    assert results["metrics"]["val/ece"] == pytest.approx(validated["val/ece"], abs=1e-6)


def test_a_validation_only_run_never_evaluates_the_test_split(make_cfg, monkeypatch):
    from pneumo_exp.classify import train

    evaluated = []
    real_evaluate = train.evaluate
    monkeypatch.setattr(train, "evaluate", lambda model, split, cfg, accelerator, desc:
                        evaluated.append(desc) or real_evaluate(model, split, cfg, accelerator, desc))
    cfg = make_cfg("debug=smoke", "trainer.evaluate_test=false", "dataset.intensity=equalize")
    metrics = run(cfg)
    assert evaluated and not [desc for desc in evaluated if desc.startswith("test")], evaluated
    assert metrics and not [key for key in metrics if key.startswith("test/")]
    folder = run_dir(cfg)
    assert (folder / "predictions_val.csv").is_file() and (folder / "confusion_val.png").is_file()
    assert not (folder / "predictions.csv").exists() and not (folder / "confusion_test.png").exists()


def test_a_final_fit_without_validation_keeps_and_tests_the_last_epoch(make_cfg):
    """dataset.val_fraction=0: train + val is fitted for the epochs chosen beforehand; nothing is selected."""
    cfg = make_cfg("debug=smoke", "dataset.val_fraction=0", "trainer.epochs=3", "trainer.ema_decay=0.9")
    metrics = run(cfg)
    folder = run_dir(cfg)
    history = read_json_lines(folder / "metrics.jsonl")
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert not [key for row in history for key in row if key.startswith("val")]
    results = json.loads((folder / "results.json").read_text())
    assert results["best_epoch"] == 3 and set(results["images"]) == {"test"}
    assert metrics["test/acc"] == results["metrics"]["test/acc"] and "val/acc" not in metrics
    from safetensors.torch import load_file

    kept, last = (load_file(folder / "checkpoints" / name / "clip.safetensors") for name in ("best", "last"))
    assert kept.keys() == last.keys() and not all(torch.equal(kept[k], last[k]) for k in kept)  # the average


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, model_cache) -> Path:
    """One finished smoke run of the ViT preset, for the tests that only read it."""
    folder = tmp_path_factory.mktemp("smoke_run")
    run(compose([f"paths.output_dir={folder}", f"paths.cache_dir={model_cache}", "logger=none", "debug=smoke",
                 "clip_lora=tiny_vit"]))
    return folder


def test_run_folder_holds_every_artifact(smoke_run):
    folder = smoke_run
    for name in ["config.yaml", "git.json", "manifest.csv", "metrics.jsonl", "results.json", "predictions.csv",
                 "confusion_test.png", "curves.png", "checkpoints/best/adapter/adapter_model.safetensors",
                 "checkpoints/last/training_state.pt"]:
        assert (folder / name).is_file(), name
    results = json.loads((folder / "results.json").read_text())
    low, high = results["ci95"]["test/acc"]
    assert low <= results["metrics"]["test/acc"] <= high
    header = (folder / "predictions.csv").read_text().splitlines()[0]
    assert header == "path,label,prob_NORMAL,prob_BACTERIA,prob_VIRUS,prediction"
    assert len((folder / "predictions.csv").read_text().splitlines()) == 1 + results["images"]["test"]


@pytest.mark.parametrize("mode", ["zero_shot", "linear_probe", "lora", "full"])
def test_every_mode_runs(make_cfg, mode):
    cfg = make_cfg("debug=smoke", f"clip_lora.mode={mode}")
    metrics = run(cfg)
    assert 0.0 <= metrics["test/acc"] <= 1.0
    has_checkpoints = (run_dir(cfg) / "checkpoints").exists()
    assert has_checkpoints == (mode != "zero_shot")


@pytest.mark.parametrize("preset", ["tiny_vit", "tiny"])
def test_gradient_accumulation_balanced_sampler_and_bf16_run(make_cfg, preset):
    cfg = make_cfg("debug=smoke", f"clip_lora={preset}", "clip_lora.mode=lora", "trainer.grad_accum_steps=3",
                   "trainer.class_balance=sampler", "trainer.precision=bf16")
    run(cfg)
    assert len(read_json_lines(run_dir(cfg) / "metrics.jsonl")) == 2


@pytest.mark.parametrize("crash", [False, True])
def test_the_wandb_run_ends_marked_failed_exactly_when_the_job_raised(make_cfg, monkeypatch, crash):
    from pneumo_exp import pipeline
    from pneumo_exp.tracking import RunLogger

    exit_codes = []

    class WandbRun:
        summary = {}

        def log(self, row):
            pass

        def finish(self, exit_code=0):
            exit_codes.append(exit_code)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(RunLogger, "_start_wandb", lambda self, cfg, job_type, run_name: WandbRun())
    if crash:
        monkeypatch.setattr(pipeline, "run_training_stages", interrupted)
    cfg = make_cfg("debug=smoke", "clip_lora.mode=zero_shot", logger="wandb")
    if crash:
        with pytest.raises(KeyboardInterrupt):
            run(cfg)
    else:
        run(cfg)
    assert exit_codes == [1 if crash else 0]


def test_wandb_offline_run_holds_per_epoch_train_and_val_metrics(make_cfg):
    cfg = make_cfg("debug=smoke", logger="wandb")
    run(cfg)
    run_files = wandb_offline.run_files(run_dir(cfg))
    assert len(run_files) == 1
    logged = [row for row in wandb_offline.history(run_files[0]) if "epoch" in row]
    on_disk = read_json_lines(run_dir(cfg) / "metrics.jsonl")
    assert [row["epoch"] for row in logged] == [1, 2]
    for wandb_row, file_row in zip(logged, on_disk):
        for split in ("train", "val"):
            for metric in ("acc", "recall_macro", "f1_macro"):
                assert wandb_row[f"{split}/{metric}"] == pytest.approx(file_row[f"{split}/{metric}"])


def test_non_finite_loss_stops_with_a_clear_message(make_cfg, monkeypatch):
    from pneumo_exp.classify import model

    monkeypatch.setattr(model.PromptClassifier, "forward", lambda self, images: torch.full(
        (len(images), 3), float("nan"), requires_grad=True))
    with pytest.raises(NonFiniteLossError, match="epoch 1, step 1"):
        run(make_cfg("debug=smoke"))


def cli(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    return subprocess.Popen([sys.executable, "-m", "pneumo_exp.cli", *args], cwd=kwargs.get("cwd", REPO), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: int = 300) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return output


def without_timings(history: list[dict]) -> list[dict]:
    """Rows without the wall-clock throughput, which no two runs share."""
    return [{key: value for key, value in row.items() if key not in TIMINGS} for row in history]


@pytest.mark.xdist_group("subprocess")
def test_resume_after_a_kill_reaches_the_same_final_metrics(tmp_path, model_cache, command_line):
    """Only the killed run needs a process of its own; the uninterrupted and the resumed run are this one's."""
    common = ["experiment=demo", "logger=none", f"paths.cache_dir={model_cache}", "trainer.epochs=4",
              "dataset.patients_per_class=10", "trainer.bootstrap_samples=100", "trainer.ema_decay=0.9"]
    assert command_line(*common, f"hydra.run.dir={tmp_path / 'straight'}").status == 0

    killed = tmp_path / "killed"
    process = cli(*common, f"hydra.run.dir={killed}")
    deadline = time.time() + 300
    while len(read_json_lines(killed / "metrics.jsonl")) < 2 and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "results.json").exists()
    resumed_run = command_line(*common, f"hydra.run.dir={killed}", "resume=true")
    assert resumed_run.status == 0, resumed_run.err[-20:]

    straight = without_timings(read_json_lines(tmp_path / "straight" / "metrics.jsonl"))
    resumed = without_timings(read_json_lines(killed / "metrics.jsonl"))
    assert [row["epoch"] for row in resumed] == [1, 2, 3, 4]
    assert resumed == straight
    assert (json.loads((killed / "results.json").read_text())["metrics"]
            == json.loads((tmp_path / "straight" / "results.json").read_text())["metrics"])


def test_predict_command_writes_the_same_csv_columns(command_line, smoke_run, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    from pneumo_exp.data.phantom import phantom_records, render

    for record in phantom_records(patients_per_class=1, test_patients_per_class=0, images_per_patient=1)[:3]:
        Image.fromarray(render(record.path, 96)).save(images / f"{record.label}.png")
    output = tmp_path / "new_predictions.csv"
    done = command_line("predict", f"predict.run_dir={smoke_run}", f"predict.input={images}",
                        f"predict.output={output}")
    assert done.status == 0, done.err[-20:]
    lines = output.read_text().splitlines()
    assert lines[0] == "path,label,prob_NORMAL,prob_BACTERIA,prob_VIRUS,prediction"
    assert len(lines) == 4


@pytest.mark.xdist_group("subprocess")
def test_accelerate_launch_two_processes_matches_one(tmp_path, model_cache, command_line):
    """Two CPU processes (gloo) with the per-process batch halved see the same images per optimizer step
    (7 full steps of 8 images: no ragged last batch that one process would split differently; the ViT preset,
    since BatchNorm statistics of the conv tower are per process, as in any DDP run)."""
    same_work = ["debug=smoke", "clip_lora=tiny_vit", "logger=wandb", "logger.mode=offline",
                 f"paths.cache_dir={model_cache}", "trainer.augment=false", "trainer.class_balance=none",
                 "trainer.cpu=true", "trainer.max_steps_per_epoch=7"]
    assert command_line(*same_work, "trainer.batch_size=8", f"hydra.run.dir={tmp_path / 'one'}").status == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    launch = subprocess.run([str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu",
                             "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                             "--dynamo_backend", "no", "-m", "pneumo_exp.cli", *same_work,
                             "trainer.batch_size=4", f"hydra.run.dir={tmp_path / 'two'}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert launch.returncode == 0, launch.stdout[-2000:] + launch.stderr[-3000:]
    one = read_json_lines(tmp_path / "one" / "metrics.jsonl")
    two = read_json_lines(tmp_path / "two" / "metrics.jsonl")
    assert len(two) == len(one) == 2
    assert len(wandb_offline.run_files(tmp_path / "two")) == 1
    for a, b in zip(one, two):
        for key in ("train/loss", "val/loss", "val/acc", "val/f1_macro"):
            assert b[key] == pytest.approx(a[key], abs=2e-3), key


def test_loss_curves_are_unweighted_and_the_objective_is_logged_apart(smoke_run):
    assert compose(["debug=smoke"]).trainer.class_balance == "weighted_loss"
    for row in read_json_lines(smoke_run / "metrics.jsonl"):
        assert {"train/loss", "train/objective", "val/loss", "train/step_seconds",
                "train/images_per_second"} <= set(row)


@pytest.mark.parametrize("preset", ["tiny_vit", "tiny"])
def test_bf16_validation_in_results_equals_the_selected_epoch(make_cfg, preset):
    """Training validates and test_best re-evaluates with the same numerics (autocast over fp32 weights)."""
    cfg = make_cfg("debug=smoke", f"clip_lora={preset}", "trainer.precision=bf16", "trainer.epochs=3")
    run(cfg)
    results = json.loads((run_dir(cfg) / "results.json").read_text())
    selected = read_json_lines(run_dir(cfg) / "metrics.jsonl")[results["best_epoch"] - 1]
    validation = {key: value for key, value in results["metrics"].items() if key.startswith("val/")}
    assert validation and all(key in selected for key in validation)
    assert validation == {key: selected[key] for key in validation}


def test_the_training_clip_is_freed_before_the_test_model_is_built(make_cfg, monkeypatch):
    import gc
    import weakref

    from pneumo_exp.classify import train

    built, alive_at_next_build = [], []
    original = train.build_classifier

    def recording(*args, **kwargs):
        gc.collect()
        alive_at_next_build.extend(ref() is not None for ref in built)
        classifier, peft_model = original(*args, **kwargs)
        built.append(weakref.ref(classifier.clip))
        return classifier, peft_model

    monkeypatch.setattr(train, "build_classifier", recording)
    run(make_cfg("debug=smoke", "clip_lora=tiny_vit", "trainer.ema_decay=0.9"))
    gc.collect()
    assert len(built) == 2 and alive_at_next_build == [False]
    assert [ref() for ref in built] == [None, None]


def test_evaluation_cap_limits_validation_and_says_when_the_test_split_was_capped(make_cfg):
    cfg = make_cfg("debug=smoke", "trainer.max_eval_batches=1", "trainer.eval_batch_size=4")
    run(cfg)
    results = json.loads((run_dir(cfg) / "results.json").read_text())
    assert results["images"]["val"] == 4 and results["images"]["test"] == 3 * 4 * 3  # 4 test patients x 3 images
    assert set(results["capped"]) == {"val"} and results["capped"]["val"]["evaluated"] == 4
    for row in read_json_lines(run_dir(cfg) / "metrics.jsonl"):
        assert sum(map(sum, row["val/confusion_matrix"])) == 4

    capped_test = make_cfg("debug=smoke", "trainer.max_eval_batches=1", "trainer.eval_batch_size=4",
                           "trainer.cap_test=true", f"paths.output_dir={run_dir(cfg).parent / 'capped_test'}")
    run(capped_test)
    results = json.loads((run_dir(capped_test) / "results.json").read_text())
    assert results["images"]["test"] == 4 and results["capped"]["test"] == {"evaluated": 4, "available": 36}


def test_non_finite_loss_mid_epoch_stops_before_any_checkpoint_is_written(make_cfg, monkeypatch):
    from pneumo_exp.classify import model

    original, calls = model.PromptClassifier.forward, [0]

    def nan_from_the_third_call(self, images):
        calls[0] += 1
        logits = original(self, images)
        return logits * float("nan") if calls[0] >= 3 else logits

    monkeypatch.setattr(model.PromptClassifier, "forward", nan_from_the_third_call)
    cfg = make_cfg("debug=smoke")
    with pytest.raises(NonFiniteLossError, match="epoch 1, step 3"):
        run(cfg)
    assert not (run_dir(cfg) / "checkpoints").exists()


def test_without_optimizer_state_resume_restarts_the_optimizer_and_says_so(make_cfg, caplog):
    from pneumo_exp.classify.checkpoint import load_training_state

    cfg = make_cfg("debug=smoke", "trainer.save_optimizer_state=false")
    run(cfg)
    assert load_training_state(run_dir(cfg) / "checkpoints" / "last")["optimizer"] is None
    (run_dir(cfg) / "results.json").unlink()
    with caplog.at_level("WARNING"):
        run(make_cfg("debug=smoke", "trainer.save_optimizer_state=false", "resume=true"))
    assert "optimizer state" in caplog.text
    assert len(read_json_lines(run_dir(cfg) / "metrics.jsonl")) == 2
