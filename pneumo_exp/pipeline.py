"""The task function: run the stages named in the config, in order, inside one run folder.

data (manifest, splits, summary) -> diffusion (LoRA on the training split) -> synthesize (synthetic training
images, per `augmentation`) -> classify (train, validate, test once) -> quality (synthetic vs real images in the
trained classifier's feature space). One W&B run covers the whole job. The composed config is checked
(`validate.check_plan`) and converted to typed objects (`config.job_config`) once, when the job starts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from pneumo_exp.config import AugmentationSource, JobConfig, job_config
from pneumo_exp.core.files import write_atomic, write_json_atomic
from pneumo_exp.data import manifest
from pneumo_exp.data.prepare import PreparedData, check_splits_filled, prepare_data
from pneumo_exp.data.provenance import check_trained_on_base, check_trained_within, write_training_record
from pneumo_exp.errors import UserError
from pneumo_exp.inputs import INPUTS_FILE, changed_inputs, draws_images, job_inputs, model_fingerprint, reads_generator
from pneumo_exp.rundir import (
    changed_settings,
    is_main_process,
    job_folder_name,
    not_a_result,
    override_key,
    process_count,
    recorded_processes,
    set_aside_outputs,
    shapes_result,
    write_run_info,
)
from pneumo_exp.summary import format_summary
from pneumo_exp.tracking import RunLogger
from pneumo_exp.validate import SettingError, check_plan, check_selection_split

log = logging.getLogger(__name__)

START_AFRESH = ("start a new run (another hydra.run.dir or sweep_name), or delete the folder to run this job "
                "again from the start")


def check_resumable(cfg: JobConfig, output_dir: Path, inputs: dict[str, str] | None = None) -> None:
    """resume=true continues the same experiment: any setting that shapes the result, and any input a training job
    read (`inputs`), must be unchanged."""
    stored_file = output_dir / "config.yaml"
    if not cfg.resume or not stored_file.is_file():
        return
    changed = changed_settings(cfg, stored_file)
    stopped = not (output_dir / "results.json").is_file()  # a finished job with other inputs runs again instead
    if inputs is not None and stopped and (output_dir / INPUTS_FILE).is_file():
        changed += [f"its input {name}" for name in changed_inputs(output_dir, inputs)]
    if changed:
        raise SettingError(f"cannot resume: the run was started with other settings for {', '.join(changed)}",
                           where=str(stored_file), fix="resume with the same settings, or " + START_AFRESH)


def finished_before(cfg: JobConfig, output_dir: Path, inputs: dict[str, str] | None = None) -> bool:
    """A finished job (results.json) is skipped only when it ran with the same settings and, given `inputs`, read
    the same inputs; other settings are refused. A finished job whose inputs changed (a LoRA retrained at the same
    path, another base) runs again: its outputs are first set aside in the folder's `.superseded/`."""
    if cfg.task != "run" or not (output_dir / "results.json").is_file():
        return False
    stored_file = output_dir / "config.yaml"
    if not stored_file.is_file():
        raise UserError("the folder holds results but no config.yaml, so they cannot be matched to this job",
                        where=str(output_dir), fix=START_AFRESH)
    changed = changed_settings(cfg, stored_file)
    processes = recorded_processes(json.loads((output_dir / "results.json").read_text()))
    if processes != process_count():
        changed.append(f"the process count ({processes}, now {process_count()})")
    if changed:
        raise SettingError(f"the folder holds a finished job with other settings for {', '.join(changed)}",
                           where=str(output_dir), fix=START_AFRESH)
    other_inputs = changed_inputs(output_dir, inputs) if inputs is not None else []
    if other_inputs:
        if is_main_process():
            kept = set_aside_outputs(output_dir)
            log.warning("the finished job in %s read other inputs (%s): running it again; its outputs are kept in "
                        "%s", output_dir, ", ".join(other_inputs), kept)
        return False
    return True


def finished_before_on_every_rank(cfg: JobConfig, output_dir: Path, inputs: dict[str, str] | None) -> bool:
    """`finished_before`, decided by the main process first (it sets old outputs aside), then by the others on what
    it left, so every rank of a launched run skips or reruns alike."""
    from accelerate import PartialState

    state = PartialState(cpu=cfg.trainer.cpu)  # as the trainer's Accelerator will ask for it: it keeps this state
    if not is_main_process():
        state.wait_for_everyone()
    finished = finished_before(cfg, output_dir, inputs)
    if is_main_process():
        state.wait_for_everyone()
    return finished


OTHER_TASKS = ("predict", "report", "dashboard", "generator_study")


def run(composed: DictConfig) -> dict[str, float]:
    """Returns the run's metrics (empty until a training stage runs), so sweepers can optimise them."""
    check_plan(composed)
    try:
        cfg = job_config(composed)
    except MissingMandatoryValue as error:
        raise SettingError("no value given", where=error.full_key, fix=f"set {error.full_key}=...") from None
    output_dir = Path(cfg.paths.output_dir)
    if cfg.task in OTHER_TASKS:
        check_resumable(cfg, output_dir)
        start_job(cfg, output_dir)
        return run_other_task(cfg, output_dir)

    if cfg.task == "run" and draws_images(cfg) and "diffusion" not in cfg.stages:
        require_trained_lora(cfg.diffusion_lora.trained_lora)  # before the data: it needs no images
    data = prepare_data(cfg.dataset, cfg.paths.cache_dir)
    job = cfg
    if cfg.task == "run" and {"diffusion", "synthesize"} & set(cfg.stages):
        job = with_checked_generator(cfg, data)
    inputs = job_inputs(job, data) if cfg.task == "run" else None
    check_resumable(cfg, output_dir, inputs)
    if finished_before_on_every_rank(cfg, output_dir, inputs):
        finished = output_dir / "results.json"
        log.info("%s exists with the same settings and inputs: this job finished before, skipping it", finished)
        return flat_metrics(json.loads(finished.read_text()))
    start_job(cfg, output_dir)
    if inputs is not None:
        write_json_atomic(output_dir / INPUTS_FILE, inputs)
    manifest.write_csv(data.records, output_dir / "manifest.csv")
    if data.skipped:
        write_atomic(output_dir / "skipped.txt", "\n".join(data.skipped) + "\n")
    if is_main_process():
        print(format_summary(data, cfg.dataset.name), flush=True)
    if cfg.task == "summary" or list(cfg.stages) == ["data"]:
        return {}
    if cfg.task == "run" and "classify" in cfg.stages:
        check_splits_filled(data, cfg.dataset.name)
        check_selection_split(cfg, [r.label for r in data.split("val")])

    if cfg.task == "pretrain_diffusion":
        pretrain_diffusion(cfg, data, output_dir)
        return {}

    with RunLogger(job, output_dir, job_type="-".join(cfg.stages), run_name=run_name(cfg),
                   enabled=is_main_process()) as logger:
        return run_training_stages(job, data, output_dir, logger)


def start_job(cfg: JobConfig, output_dir: Path) -> None:
    (output_dir / "failed.json").unlink(missing_ok=True)  # left by an earlier failed try of this job
    write_run_info(cfg, output_dir)


def with_checked_generator(cfg: JobConfig, data: PreparedData) -> JobConfig:
    """The job's settings with the diffusion base it draws from resolved (`diffusion.bases.run_base`), refused,
    like a LoRA from another run or a filter's judge, unless trained only on images of this run's training split.
    A job that reads no generator (augmentation.source=duplicate_real without the diffusion stage) is left as it is."""
    if not reads_generator(cfg):
        return cfg
    from pneumo_exp.diffusion.bases import run_base

    train = real_training_images(data)
    job = replace(cfg, diffusion_lora=run_base(cfg.diffusion_lora, train))
    if draws_images(cfg) and "diffusion" not in cfg.stages:
        check_trained_on_base(cfg.diffusion_lora.trained_lora, base_fingerprint(job), "diffusion_lora.trained_lora")
        check_trained_within(cfg.diffusion_lora.trained_lora, train, "LoRA", "diffusion_lora.trained_lora")
    if draws_images(cfg) and cfg.augmentation.filter.judge_run:
        from pneumo_exp.evaluation.filtering import check_judge

        check_judge(Path(cfg.augmentation.filter.judge_run), data)
    return job


def base_fingerprint(cfg: JobConfig) -> str:
    """The content of the diffusion base the job draws from or trains on (its settings' base resolved)."""
    from pneumo_exp.diffusion.stable_diffusion import pipeline_source

    return model_fingerprint(pipeline_source(cfg.diffusion_lora, cfg.paths.cache_dir), cfg.diffusion_lora.revision,
                             "model_index.json", "diffusion_lora.pretrained")


def real_training_images(data: PreparedData) -> list:
    return [r for r in data.split("train") if r.source == "real"]


def run_other_task(cfg: JobConfig, output_dir: Path) -> dict[str, float]:
    if cfg.task == "predict":
        from pneumo_exp.classify.predict import predict

        print(f"predictions written to {predict(cfg, output_dir)}", flush=True)
    elif cfg.task == "report":
        from pneumo_exp.report import main_report

        target = Path(cfg.report.output or Path(cfg.report.input) / "report")
        print(main_report(cfg.report.input, target, cfg.report.pairs, cfg.report.bootstrap_samples,
                          cfg.report.split_by_commit, cfg.report.replicate_keys), flush=True)
        print(f"report written to {target}", flush=True)
        if is_main_process():
            from pneumo_exp.report.wandb_run import log_report_run

            run_folder = log_report_run(cfg, Path(cfg.report.input), target)
            if run_folder is not None:
                print(f"W&B run 'report' ({cfg.logger.mode.value}) in {run_folder}", flush=True)
    elif cfg.task == "dashboard":
        from pneumo_exp.dashboard import main_dashboard

        print(main_dashboard(cfg), flush=True)
    else:
        from pneumo_exp.evaluation.generator_study import run_generator_study

        print(run_generator_study(cfg, output_dir), flush=True)
        print(f"generator study written to {output_dir / 'generator_study.md'} (and .json)", flush=True)
    return {}


def pretrain_diffusion(cfg: JobConfig, data: PreparedData, output_dir: Path) -> Path:
    """The preset's base model, pretrained from scratch on the real training split (main process only)."""
    from pneumo_exp.diffusion.pretrain import pretrain_base, pretraining_images

    images = pretraining_images(data, int(cfg.diffusion_lora.resolution), cfg.paths.cache_dir)
    with RunLogger(cfg, output_dir, job_type="pretrain_diffusion",
                   run_name=f"pretrain-{cfg.diffusion_lora.name}") as logger:
        folder = pretrain_base(cfg, images, output_dir, logger)
    print(f"pretrained base: {folder} (model card: {folder / 'README.md'})", flush=True)
    return folder


def run_training_stages(cfg: JobConfig, data: PreparedData, output_dir: Path, logger: RunLogger) -> dict:
    if is_main_process():
        from pneumo_exp.core.files import remove_stale_staging

        for folder in (output_dir / "checkpoints", output_dir / "diffusion" / "checkpoints", output_dir / "diffusion"):
            remove_stale_staging(folder)
    lora_folder = cfg.diffusion_lora.trained_lora
    if "diffusion" in cfg.stages:
        lora_folder = train_diffusion(cfg, data, output_dir, logger)
    if "synthesize" in cfg.stages:
        data = add_synthetic(cfg, data, lora_folder, output_dir)
    metrics: dict[str, float] = {}
    if "classify" in cfg.stages:
        from pneumo_exp.classify.train import train_and_evaluate

        metrics = train_and_evaluate(cfg, data, output_dir, logger)
        if is_main_process():
            capped = json.loads((output_dir / "results.json").read_text())["capped"]
            print(format_metrics(metrics, not_a_result(capped, cfg.dataset.limit_per_class)), flush=True)
    if "quality" in cfg.stages and is_main_process():
        from pneumo_exp.evaluation.quality_stage import format_quality, run_quality

        print(format_quality(run_quality(cfg, data, output_dir, logger)), flush=True)
    if is_main_process():
        record_loaded_models(cfg, output_dir)
    return metrics


def record_loaded_models(cfg: JobConfig, output_dir: Path) -> None:
    """models.json: the hub commit or local folder hash of each base model the stages loaded."""
    from pneumo_exp.hub import record_model

    if reads_generator(cfg):
        from pneumo_exp.diffusion.stable_diffusion import pipeline_source

        record_model(output_dir, "diffusion", pipeline_source(cfg.diffusion_lora, cfg.paths.cache_dir),
                     cfg.diffusion_lora.revision, marker="model_index.json")
    if "classify" in cfg.stages:
        from pneumo_exp.classify.model import backbone_source

        record_model(output_dir, "classifier", backbone_source(cfg.clip_lora, cfg.paths.cache_dir),
                     cfg.clip_lora.revision, marker="config.json")


def train_diffusion(cfg: JobConfig, data: PreparedData, output_dir: Path, logger: RunLogger) -> str:
    """The diffusion LoRA, trained on real training images only, cached at the diffusion resolution; the real
    validation images score its validation loss."""
    from pneumo_exp.diffusion.train import train_diffusion_lora, training_images

    train = real_training_images(data)
    validation = [r for r in data.split("val") if r.source == "real"]
    images = training_images(train, validation, cfg.diffusion_lora.resolution, cfg.paths.cache_dir,
                             progress=is_main_process())
    lora_folder = train_diffusion_lora(cfg, images, output_dir, logger=logger)
    if is_main_process():
        write_training_record(lora_folder, train, base=base_fingerprint(cfg))
    return str(lora_folder)


def require_trained_lora(folder: str) -> None:
    if not (Path(folder) / "lora_info.json").is_file():
        raise SettingError(f"no trained LoRA at {folder}", where="diffusion_lora.trained_lora",
                           fix="train one first with the diffusion stage (the augmentation study's: pneumo-exp "
                               "experiment=augment_cpu/generator dataset.root=...) and name its diffusion/lora folder")


ADDED_IMAGES = {"synthetic": "synthetic training images", "duplicate": "repeated real training images"}


def add_synthetic(cfg: JobConfig, data: PreparedData, lora_folder: str, output_dir: Path) -> PreparedData:
    """Added images (synthetic, or repeats of real ones for the count-matched control) join the training split,
    never validation or test; the manifest is rewritten."""
    from collections import Counter

    from accelerate import PartialState

    from pneumo_exp.diffusion.generate import SYNTHETIC_DIR

    if is_main_process():  # one process draws; the others read its manifest
        write_added_images(cfg, real_training_images(data), lora_folder, output_dir)
    PartialState(cpu=cfg.trainer.cpu).wait_for_everyone()  # as the trainer will ask for it: the state is kept
    added = manifest.read_csv(output_dir / SYNTHETIC_DIR / "manifest.csv")
    records = data.records + added
    manifest.validate(records, where="manifest with added images")
    manifest.check_no_leakage(records, where="manifest with added images")
    manifest.write_csv(records, output_dir / "manifest.csv")
    for source, described in ADDED_IMAGES.items():
        counts = Counter(r.label for r in added if r.source == source)
        if is_main_process() and counts:
            print(f"{described}: {dict(counts)}", flush=True)
    return PreparedData(records=records, skipped=data.skipped, notes=data.notes)


def write_added_images(cfg: JobConfig, real_train: list, lora_folder: str, output_dir: Path) -> None:
    """`output_dir/synthetic/` per `augmentation`: repeats of real images, filtered drawings, or drawings."""
    from collections import Counter

    if cfg.augmentation.source == AugmentationSource.duplicate_real:
        from pneumo_exp.diffusion.generate import duplicate_for_run

        duplicate_for_run(cfg, real_train, output_dir)
        return
    real_counts = dict(Counter(r.label for r in real_train))
    if cfg.augmentation.filter.judge_run:
        from pneumo_exp.evaluation.filtering import filter_for_run

        filter_for_run(cfg, lora_folder, real_counts, output_dir)
    else:
        from pneumo_exp.diffusion.generate import synthesize_for_run

        synthesize_for_run(cfg, lora_folder, real_counts, output_dir)


def run_name(cfg: JobConfig) -> str:
    """The overrides that shape this job's result (as in a sweep's job folder name), or the experiment name."""
    from hydra.core.hydra_config import HydraConfig

    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    return job_folder_name(overrides) if any(shapes_result(override_key(o)) for o in overrides) else cfg.experiment_name


def flat_metrics(results: dict) -> dict[str, float]:
    return {k: v for k, v in results.get("metrics", {}).items() if isinstance(v, float)}


def format_metrics(metrics: dict[str, float], not_a_result_reasons: Sequence[str] = ()) -> str:
    """The headline metrics per split, then why the test metrics are no result (a capped or subset test)."""
    from pneumo_exp.classify.metrics import HEADLINE as names

    lines = [f"{'split':<6}" + "".join(f"{name:>14}" for name in names)]
    for split in [split for split in ("val", "test") if any(key.startswith(f"{split}/") for key in metrics)]:
        lines.append(f"{split:<6}" + "".join(f"{metrics.get(f'{split}/{name}', float('nan')):>14.4f}"
                                             for name in names))
    lines += [f"not a result: {reason}" for reason in not_a_result_reasons]
    return "\n".join(lines)
