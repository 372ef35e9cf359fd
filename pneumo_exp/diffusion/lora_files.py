"""The LoRA stage's files: its resume checkpoint (`checkpoints/last/`: the LoRA tensors and the training state) and
the final LoRA folder in diffusers format with `lora_info.json`."""

from __future__ import annotations

from pathlib import Path

from pneumo_exp.core.checkpoint import load_lora_strictly, load_state_file, read_weights, save_state_file
from pneumo_exp.core.files import sha256_file, swap_folder, write_json_atomic
from pneumo_exp.diffusion.stable_diffusion import LORA_INFO_NAME, LORA_WEIGHT_NAME

CHECKPOINT_LORA = "lora.safetensors"
CHECKPOINT_STATE = "training_state.pt"


def save_checkpoint(folder: Path, unet, optimizer, scheduler, progress: dict) -> None:
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    def fill(staging: Path) -> None:
        weights = {k: v.detach().float().contiguous().cpu() for k, v in get_peft_model_state_dict(unet).items()}
        save_file(weights, staging / CHECKPOINT_LORA)
        save_state_file(staging / CHECKPOINT_STATE, optimizer, scheduler, progress)

    swap_folder(folder, fill)


def load_checkpoint(folder: Path, unet) -> dict:
    """Restore the LoRA weights strictly (every tensor must fit) and return the saved training state."""
    weights = read_weights(folder / CHECKPOINT_LORA)
    state = load_state_file(folder / CHECKPOINT_STATE)
    load_lora_strictly(unet, weights, str(folder / CHECKPOINT_LORA))
    return state


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
