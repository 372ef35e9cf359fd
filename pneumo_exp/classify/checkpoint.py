"""Saving and loading what a classifier run trains, in formats other tools read.

lora: the peft adapter folder (`adapter_config.json`, `adapter_model.safetensors`); full: `clip.safetensors`;
linear_probe: `head.safetensors`. Loading is strict: a missing or unexpected tensor is an error, never ignored.
Training state (optimizer, scheduler, RNG, history) sits beside the weights in `training_state.pt`.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pneumo_exp.config import ClassifierMode
from pneumo_exp.errors import UserError

ADAPTER_DIR = "adapter"
FULL_FILE = "clip.safetensors"
HEAD_FILE = "head.safetensors"
STATE_FILE = "training_state.pt"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, damaged or does not fit the run; the message names the file."""


def save_weights(classifier, peft_model, mode: ClassifierMode, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if mode == ClassifierMode.lora:
        peft_model.save_pretrained(folder / ADAPTER_DIR)
    elif mode == ClassifierMode.full:
        save_file({k: v.detach().contiguous() for k, v in classifier.clip.state_dict().items()}, folder / FULL_FILE)
    elif mode == ClassifierMode.linear_probe:
        save_file({"class_embeddings": classifier.class_embeddings.detach().contiguous()}, folder / HEAD_FILE)


def _read(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        return load_file(path)
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"checkpoint file {path} cannot be read: {error}") from None


def load_weights(classifier, peft_model, mode: ClassifierMode, folder: Path) -> None:
    folder = Path(folder)
    if mode == ClassifierMode.lora:
        from peft import set_peft_model_state_dict

        weights = _read(folder / ADAPTER_DIR / "adapter_model.safetensors")
        result = set_peft_model_state_dict(peft_model, weights)
        missing_lora = [k for k in result.missing_keys if "lora_" in k]
        if result.unexpected_keys or missing_lora:
            raise CheckpointError(f"adapter in {folder / ADAPTER_DIR} does not fit the model: "
                                  f"unexpected {result.unexpected_keys[:3]}, missing {missing_lora[:3]}")
    elif mode == ClassifierMode.full:
        try:
            classifier.clip.load_state_dict(_read(folder / FULL_FILE), strict=True)
        except RuntimeError as error:
            raise CheckpointError(f"{folder / FULL_FILE} does not fit the model: {error}") from None
    elif mode == ClassifierMode.linear_probe:
        head = _read(folder / HEAD_FILE)
        if set(head) != {"class_embeddings"} or head["class_embeddings"].shape != classifier.class_embeddings.shape:
            raise CheckpointError(f"{folder / HEAD_FILE} does not hold class embeddings of shape "
                                  f"{tuple(classifier.class_embeddings.shape)}")
        with torch.no_grad():
            classifier.class_embeddings.copy_(head["class_embeddings"])


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def write_folder_atomic(target: Path, fill) -> None:
    """Build a folder with `fill(staging)` and swap it in: a crash leaves the old folder or the new one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent))
    try:
        fill(staging)
        old = target.with_name(target.name + ".old")
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(target, old)
        os.rename(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_checkpoint(folder: Path, classifier, peft_model, mode: ClassifierMode, optimizer, scheduler,
                    progress: dict) -> None:
    def fill(staging: Path) -> None:
        save_weights(classifier, peft_model, mode, staging)
        torch.save({"optimizer": optimizer.state_dict() if optimizer is not None else None, "scheduler": scheduler.state_dict(), "rng": rng_state(),
                    **progress}, staging / STATE_FILE)

    write_folder_atomic(folder, fill)


def load_training_state(folder: Path) -> dict:
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"cannot resume: {path} is missing")
    return torch.load(path, map_location="cpu", weights_only=False)
