"""Saving and loading what a classifier run trains, in formats other tools read.

lora: the peft adapter folder (`adapter_config.json`, `adapter_model.safetensors`); full: `clip.safetensors`;
linear_probe: `head.safetensors`. Loading is strict: a missing or unexpected tensor is an error, never ignored.
Training state (optimizer, scheduler, RNG, history) sits beside the weights in `training_state.pt`, made of tensors,
numbers, strings, lists and dicts only, so that it loads with `torch.load(weights_only=True)`: a run folder from
elsewhere cannot run code on `resume=true`.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import warnings
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


START_AFRESH = "run again with resume=false (trains from epoch 1 in the same folder), or delete the run folder"


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
        raise CheckpointError("checkpoint file is missing", where=str(path), fix=START_AFRESH)
    try:
        return load_file(path)
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"checkpoint file is damaged or truncated ({error})", where=str(path),
                              fix=START_AFRESH) from None


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
    """The torch, numpy and python generators' states as tensors and plain numbers."""
    bit_generator, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"bit_generator": bit_generator, "keys": torch.from_numpy(keys.astype(np.int64)),
                      "position": int(position), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
            "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64),
                       "gauss_next": gauss_next}}


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["bit_generator"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["state"].tolist()), python_state["gauss_next"]))


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


def load_state_file(path: Path) -> dict:
    """A training state saved by `torch.save`, loaded without unpickling anything but tensors and plain values."""
    import pickle

    if not path.is_file():
        raise CheckpointError("cannot resume: the training state is missing", where=str(path), fix=START_AFRESH)
    try:
        with warnings.catch_warnings():  # torch warns about the legacy format of a plain pickle before refusing it
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError("cannot resume: the training state holds objects other than tensors and plain values, "
                              "and loading it could run code, so it was not loaded (a state written before pneumo-exp "
                              "loaded states without pickle looks the same)", where=str(path),
                              fix=START_AFRESH) from None
    except Exception as error:  # torch's zip reader and unpickler raise many types for a damaged file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"cannot resume: the training state is damaged or truncated ({reason})",
                              where=str(path), fix=START_AFRESH) from None


def load_training_state(folder: Path) -> dict:
    return load_state_file(Path(folder) / STATE_FILE)


def remove_stale_staging(folder: Path) -> None:
    """Staging folders (`best.XXXX.tmp`, `last.XXXX.tmp`) that a killed process left behind in `folder`."""
    for staging in Path(folder).glob("*.tmp"):
        if staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
