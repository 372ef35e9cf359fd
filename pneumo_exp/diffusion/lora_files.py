"""The LoRA stage's files: its resume checkpoint (`checkpoints/last/`: the LoRA tensors, the training state and,
with `keep=best_val_loss`, the LoRA of the lowest validation loss so far) and the final LoRA folder in diffusers
format with `lora_info.json`."""

from __future__ import annotations

from pathlib import Path

from pneumo_exp.core.checkpoint import load_lora_strictly, load_state_file, read_weights, save_state_file
from pneumo_exp.core.files import sha256_file, swap_folder, write_json_atomic
from pneumo_exp.diffusion.stable_diffusion import LORA_INFO_NAME, LORA_WEIGHT_NAME

CHECKPOINT_LORA = "lora.safetensors"
CHECKPOINT_STATE = "training_state.pt"
CHECKPOINT_BEST_LORA = "best_lora.safetensors"


def lora_weights(unet) -> dict:
    """A copy of the UNet's LoRA tensors, fp32 on the CPU (peft's names, as `load_lora_strictly` takes them)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().float().contiguous().cpu().clone() for k, v in get_peft_model_state_dict(unet).items()}


def save_checkpoint(folder: Path, unet, optimizer, scheduler, progress: dict, best_weights: dict | None = None) -> None:
    from safetensors.torch import save_file

    def fill(staging: Path) -> None:
        save_file(lora_weights(unet), staging / CHECKPOINT_LORA)
        if best_weights is not None:
            save_file(best_weights, staging / CHECKPOINT_BEST_LORA)
        save_state_file(staging / CHECKPOINT_STATE, optimizer, scheduler, progress)

    swap_folder(folder, fill)


def load_checkpoint(folder: Path, unet) -> dict:
    """Restore the LoRA weights strictly (every tensor must fit) and return the saved training state."""
    weights = read_weights(folder / CHECKPOINT_LORA)
    state = load_state_file(folder / CHECKPOINT_STATE)
    load_lora_strictly(unet, weights, str(folder / CHECKPOINT_LORA))
    return state


def load_best(folder: Path) -> dict | None:
    """The LoRA of the lowest validation loss the checkpoint kept, or None."""
    return read_weights(folder / CHECKPOINT_BEST_LORA) if (folder / CHECKPOINT_BEST_LORA).is_file() else None


def save_lora(folder: Path, unet, info: dict) -> Path:
    """The final LoRA in diffusers format (loadable with `pipeline.load_lora_weights(folder)`), with its alpha and
    rank in the file's metadata (without them diffusers would reload it at alpha = r) and lora_info.json."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    def fill(staging: Path) -> None:
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        layers = {k: v.detach().float().contiguous().cpu() for k, v in layers.items()}
        StableDiffusionPipeline.save_lora_weights(staging, unet_lora_layers=layers, safe_serialization=True,
                                                  unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
        write_json_atomic(staging / LORA_INFO_NAME,
                          {"file": LORA_WEIGHT_NAME, "sha256": sha256_file(staging / LORA_WEIGHT_NAME), **info})

    swap_folder(folder, fill)
    return folder
