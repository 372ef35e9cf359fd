"""Saving and loading what a classifier run trains, in formats other tools read.

lora: the peft adapter folder (`adapter_config.json`, `adapter_model.safetensors`); full: `clip.safetensors`;
linear_probe: `head.safetensors`. Loading is strict: a missing or unexpected tensor is an error, never ignored.
Training state (optimizer, scheduler, RNG, history) sits beside the weights in `training_state.pt`
(`core/checkpoint.py`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from pneumo_exp.config import ClassifierMode
from pneumo_exp.core.checkpoint import (
    CheckpointError,
    load_lora_strictly,
    load_state_file,
    read_weights,
    save_state_file,
)
from pneumo_exp.core.files import swap_folder

ADAPTER_DIR = "adapter"
FULL_FILE = "clip.safetensors"
HEAD_FILE = "head.safetensors"
STATE_FILE = "training_state.pt"


def save_weights(classifier, peft_model, mode: ClassifierMode, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if mode == ClassifierMode.lora:
        peft_model.save_pretrained(folder / ADAPTER_DIR)
    elif mode == ClassifierMode.full:
        save_file({k: v.detach().contiguous() for k, v in classifier.clip.state_dict().items()}, folder / FULL_FILE)
    elif mode == ClassifierMode.linear_probe:
        save_file({"class_embeddings": classifier.class_embeddings.detach().contiguous()}, folder / HEAD_FILE)


def load_weights(classifier, peft_model, mode: ClassifierMode, folder: Path) -> None:
    folder = Path(folder)
    if mode == ClassifierMode.lora:
        weights = read_weights(folder / ADAPTER_DIR / "adapter_model.safetensors")
        load_lora_strictly(peft_model, weights, str(folder / ADAPTER_DIR))
    elif mode == ClassifierMode.full:
        try:
            classifier.clip.load_state_dict(read_weights(folder / FULL_FILE), strict=True)
        except RuntimeError as error:
            raise CheckpointError(f"{folder / FULL_FILE} does not fit the model: {error}") from None
    elif mode == ClassifierMode.linear_probe:
        head = read_weights(folder / HEAD_FILE)
        if set(head) != {"class_embeddings"} or head["class_embeddings"].shape != classifier.class_embeddings.shape:
            raise CheckpointError(f"{folder / HEAD_FILE} does not hold class embeddings of shape "
                                  f"{tuple(classifier.class_embeddings.shape)}")
        with torch.no_grad():
            classifier.class_embeddings.copy_(head["class_embeddings"])


def save_checkpoint(folder: Path, classifier, peft_model, mode: ClassifierMode, optimizer, scheduler,
                    progress: dict) -> None:
    def fill(staging: Path) -> None:
        save_weights(classifier, peft_model, mode, staging)
        save_state_file(staging / STATE_FILE, optimizer, scheduler, progress)

    swap_folder(folder, fill)


def load_training_state(folder: Path) -> dict:
    return load_state_file(Path(folder) / STATE_FILE)
