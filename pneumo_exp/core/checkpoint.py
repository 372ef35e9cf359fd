"""Training-state files beside a checkpoint's weights: optimizer, scheduler, random generators and the stage's
progress, made of tensors, numbers, strings, lists and dicts only, so that they load with
`torch.load(weights_only=True)`: a run folder from elsewhere cannot run code on `resume=true`."""

from __future__ import annotations

import logging
import os
import pickle
import warnings
from pathlib import Path

import torch

from pneumo_exp.core.seeds import restore_rng, rng_state
from pneumo_exp.errors import UserError

log = logging.getLogger(__name__)

START_AFRESH = "run again with resume=false (trains from epoch 1 in the same folder), or delete the run folder"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, damaged or does not fit the run; the message names the file."""


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors checkpoint file; a missing or damaged file is a CheckpointError naming it."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError("checkpoint file is missing", where=str(path), fix=START_AFRESH)
    try:
        return load_file(path)
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"checkpoint file is damaged or truncated ({error})", where=str(path),
                              fix=START_AFRESH) from None


def load_lora_strictly(model, weights: dict[str, torch.Tensor], where: str) -> None:
    """Put LoRA `weights` into a peft-carrying `model`: every tensor must land and every LoRA tensor be given."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, weights)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise CheckpointError(f"the LoRA does not fit the model (unexpected {result.unexpected_keys[:3]}, "
                              f"missing {missing[:3]})", where=where, fix=START_AFRESH)


def save_state_file(path: str | os.PathLike, optimizer, scheduler, progress: dict) -> None:
    """`optimizer` None: the optimizer's moments are not kept (the state file stays small)."""
    torch.save({"optimizer": optimizer.state_dict() if optimizer is not None else None,
                "scheduler": scheduler.state_dict(), "rng": rng_state(), **progress}, path)


def load_state_file(path: str | os.PathLike) -> dict:
    """A training state saved by `save_state_file`, loaded without unpickling anything but tensors and plain
    values."""
    path = Path(path)
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


def restore_training(state: dict, optimizer, scheduler, where: str | os.PathLike) -> None:
    """Optimizer moments (when the state holds them), schedule and random generators as the checkpoint left them."""
    if state["optimizer"] is None:
        log.warning("%s holds no optimizer state (trainer.save_optimizer_state=false): the optimizer "
                    "restarts its moments; weights, schedule and random streams resume", where)
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng(state["rng"])


def last_checkpoint(folder: str | os.PathLike) -> Path:
    """`folder` (e.g. checkpoints/last), or `folder.old` when a crash came between the two renames of a save."""
    folder = Path(folder)
    old = folder.with_name(folder.name + ".old")
    return old if not folder.is_dir() and old.is_dir() else folder
