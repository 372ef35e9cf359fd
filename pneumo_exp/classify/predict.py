"""`pneumo-exp predict`: class probabilities for new images from a trained run's best weights."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from pneumo_exp.classify.checkpoint import load_weights
from pneumo_exp.classify.model import build_classifier
from pneumo_exp.config import ClassifierMode, JobConfig, Precision, clip_config
from pneumo_exp.core.files import atomic_file
from pneumo_exp.core.training import fresh_accelerator
from pneumo_exp.data.augment import to_unit_float
from pneumo_exp.data.images import decode_grayscale, standardize_intensity
from pneumo_exp.data.manifest import Record
from pneumo_exp.errors import UserError
from pneumo_exp.labels import CLASSES
from pneumo_exp.validate import prediction_images


def load_trained(run_dir: Path, cache_dir: str):
    """The run's classifier with its best weights, and the run's config."""
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise UserError(f"{run_dir} holds no config.yaml", where="predict.run_dir",
                        fix="give the folder of a finished run")
    run_cfg = OmegaConf.load(config_file)
    classifier, peft_model = build_classifier(clip_config(run_cfg.clip_lora), cache_dir, seed=run_cfg.seed)
    mode = ClassifierMode(run_cfg.clip_lora.mode)
    if mode != ClassifierMode.zero_shot:
        load_weights(classifier, peft_model, mode, run_dir / "checkpoints" / "best")
    return classifier.eval(), run_cfg


def evaluation_accelerator(trainer, trained_precision: str | None = None):
    """An accelerator at a run's precision and device choice (`trainer.precision`, `trainer.cpu`): a model trained
    and tested under bf16 autocast gives other numbers in fp32, so every later evaluation runs under the same
    autocast. `trained_precision`: what the run's `auto` resolved to (its results.json), wherever it is read."""
    return fresh_accelerator(trained_precision or Precision(trainer.precision).value, getattr(trainer, "cpu", False))


def trained_precision(run_dir: Path) -> str | None:
    """The precision a finished run trained and tested at (results.json), None for runs that predate the record."""
    results = run_dir / "results.json"
    return json.loads(results.read_text()).get("precision") if results.is_file() else None


def load_as_trained(run_dir: Path, cache_dir: str):
    """The run's classifier with its best weights on the run's device, its config, and the accelerator whose
    autocast (`class_probabilities`) evaluates it as the run's own test did."""
    classifier, run_cfg = load_trained(run_dir, cache_dir)
    accelerator = evaluation_accelerator(run_cfg.trainer, trained_precision(run_dir))
    return classifier.to(accelerator.device), run_cfg, accelerator


@torch.no_grad()
def class_probabilities(classifier, images: torch.Tensor, accelerator) -> torch.Tensor:
    """(N, C) on the CPU for float (N, 1, H, W) images, as the run's test computed them: on its device, under its
    autocast, the softmax in fp32."""
    with accelerator.autocast():
        logits = classifier(images.to(accelerator.device))
    return logits.float().softmax(-1).cpu()


def write_predictions(records: list[Record], probabilities: torch.Tensor, path: Path) -> Path:
    with atomic_file(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", *[f"prob_{name}" for name in CLASSES], "prediction"])
        for record, row in zip(records, probabilities.tolist()):
            writer.writerow([record.path, record.label, *[f"{p:.6f}" for p in row],
                             CLASSES[int(np.argmax(row))]])
    return path


@torch.no_grad()
def predict(cfg: JobConfig, output_dir: Path) -> Path:
    files = prediction_images(Path(cfg.predict.input))  # checked, with predict.run_dir, by validate.check_plan
    classifier, run_cfg, accelerator = load_as_trained(Path(cfg.predict.run_dir), cfg.paths.cache_dir)
    resolution, intensity = run_cfg.dataset.resolution, run_cfg.dataset.get("intensity", "none")
    probabilities = []
    for start in range(0, len(files), cfg.trainer.eval_batch_size):
        batch = files[start:start + cfg.trainer.eval_batch_size]
        pixels = torch.from_numpy(np.stack([standardize_intensity(decode_grayscale(f, resolution), intensity)
                                            for f in batch]))
        probabilities.append(class_probabilities(classifier, to_unit_float(pixels), accelerator))
    records = [Record(path=str(f), label="", patient_id="", split="test") for f in files]
    target = Path(cfg.predict.output) if cfg.predict.output else output_dir / "predictions.csv"
    return write_predictions(records, torch.cat(probabilities), target)
