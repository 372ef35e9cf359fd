"""Stable Diffusion for grayscale chest X-rays: where the pipeline comes from, how it loads, how it samples.

The base model is a hub id or a local folder (`diffusion_lora.pretrained`), or the `tiny` preset: a random-init
Stable-Diffusion-shaped pipeline built once from `diffusion_lora.architecture` into the cache and then loaded
through the same `from_pretrained(folder)` code as a real one. Grayscale images enter the 3-channel VAE by channel
replication and leave it as the mean of the three channels, as uint8.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pneumo_exp.core.files import sha256_file
from pneumo_exp.core.presets import MAX_TEXT_TOKENS, character_tokenizer, model_source
from pneumo_exp.errors import UserError
from pneumo_exp.hub import cannot_load, note_loaded

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes
LORA_INFO_NAME = "lora_info.json"
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # by trainer.precision


class LoraFileError(UserError, RuntimeError):
    """A LoRA file that is missing, unreadable, or does not fit the pipeline."""


# --------------------------------------------------------------------------------------- source


def pipeline_source(diffusion_cfg, cache_dir: str | os.PathLike) -> str:
    """The configured hub id or folder, or the random-init preset saved once under `cache_dir/models`."""
    return model_source("diffusion_lora", diffusion_cfg, int(diffusion_cfg.resolution), cache_dir, "sd",
                        "model_index.json", build_tiny_pipeline)


def _group_count(channels: list[int]) -> int:
    """The largest GroupNorm group count (<= 32) that divides every channel width."""
    return max(g for g in range(1, 33) if all(c % g == 0 for c in channels))


def build_tiny_pipeline(architecture: dict, resolution: int, folder: Path) -> None:
    """Save a randomly initialised Stable Diffusion pipeline (UNet, VAE, CLIP text encoder, character tokenizer,
    DDPM scheduler) as a folder that `StableDiffusionPipeline.from_pretrained` loads."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    _quiet_libraries()
    unet_channels = list(architecture.get("unet_channels", [32, 64]))
    vae_channels = list(architecture.get("vae_channels", [32, 64]))
    text_hidden = int(architecture.get("text_hidden_size", 32))
    latent_channels = int(architecture.get("latent_channels", 4))
    if len(unet_channels) < 2:
        raise ValueError(f"diffusion_lora.architecture.unet_channels needs >= 2 widths, got {unet_channels}")
    vae_scale = 2 ** (len(vae_channels) - 1)
    latent_size = resolution // vae_scale
    down_factor = 2 ** (len(unet_channels) - 1)
    if resolution % vae_scale or latent_size % down_factor:
        raise ValueError(f"diffusion_lora.resolution={resolution} does not fit the architecture: the VAE divides "
                         f"it by {vae_scale} and the UNet the latent by {down_factor}")

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
        block_out_channels=unet_channels, layers_per_block=int(architecture.get("unet_layers_per_block", 1)),
        down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (len(unet_channels) - 1),
        up_block_types=["CrossAttnUpBlock2D"] * (len(unet_channels) - 1) + ["UpBlock2D"],
        cross_attention_dim=text_hidden, attention_head_dim=int(architecture.get("unet_attention_heads", 4)),
        norm_num_groups=_group_count(unet_channels))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=vae_channels,
        down_block_types=["DownEncoderBlock2D"] * len(vae_channels),
        up_block_types=["UpDecoderBlock2D"] * len(vae_channels), layers_per_block=1,
        norm_num_groups=_group_count(vae_channels), sample_size=resolution,
        mid_block_add_attention=bool(architecture.get("vae_mid_attention", True)))
    tokenizer = character_tokenizer()
    tokenizer.model_max_length = MAX_TEXT_TOKENS
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=text_hidden, intermediate_size=2 * text_hidden, projection_dim=text_hidden,
        num_hidden_layers=int(architecture.get("text_layers", 2)),
        num_attention_heads=int(architecture.get("text_heads", 4)),
        max_position_embeddings=MAX_TEXT_TOKENS, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", steps_offset=1, clip_sample=False,
                              prediction_type="epsilon")
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(folder)


# --------------------------------------------------------------------------------------- loading


@dataclass
class SDComponents:
    """The parts training needs, loaded one by one as diffusers' train_text_to_image_lora.py does."""
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object
    source: str


def _cannot_load(source: str, revision: str | None, error: Exception) -> FileNotFoundError:
    return cannot_load("diffusion_lora.pretrained", source, revision, error,
                       "the diffusers layout: model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/")


def _quiet_libraries() -> None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()


def native_resolution(source: str, revision: str | None = None) -> int:
    """The image side the base model was trained at: UNet sample_size x the VAE's scale factor, from the two
    config files alone (no weights are loaded)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    _quiet_libraries()
    try:
        unet = UNet2DConditionModel.load_config(source, subfolder="unet", revision=revision)
        vae = AutoencoderKL.load_config(source, subfolder="vae", revision=revision)
    except (OSError, ValueError) as error:
        raise _cannot_load(source, revision, error) from None
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def check_resolution(diffusion_cfg, source: str) -> int:
    """The base model's native resolution; a different `diffusion_lora.resolution` is refused unless
    `diffusion_lora.allow_non_native_resolution` (the original study ran the 768 px SD2 at 512 px)."""
    native, resolution = native_resolution(source, diffusion_cfg.revision), int(diffusion_cfg.resolution)
    if resolution != native and not diffusion_cfg.allow_non_native_resolution:
        raise UserError(f"diffusion_lora.resolution={resolution} is not the native resolution of {source} "
                        f"({native} px: UNet sample_size x VAE scale factor)", where="diffusion_lora.resolution",
                        fix=f"set diffusion_lora.resolution={native}, or diffusion_lora.allow_non_native_resolution"
                            f"=true to train at {resolution} px anyway")
    return native


def load_components(source: str, revision: str | None = None, dtype: torch.dtype = torch.float32) -> SDComponents:
    """The frozen modules are loaded directly in `dtype` (the LoRA added later trains in fp32)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    _quiet_libraries()
    try:
        components = SDComponents(
            tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", revision=revision),
            text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder", revision=revision,
                                                       dtype=dtype),
            vae=AutoencoderKL.from_pretrained(source, subfolder="vae", revision=revision, torch_dtype=dtype),
            unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet", revision=revision, torch_dtype=dtype),
            noise_scheduler=DDPMScheduler.from_pretrained(source, subfolder="scheduler", revision=revision),
            source=source)
    except (OSError, ValueError) as error:
        raise _cannot_load(source, revision, error) from None
    note_loaded(source, revision, "model_index.json")
    return components


def sampling_scheduler(scheduler_config):
    """DPM-Solver++ (2nd order, multistep) built from the base model's scheduler config."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(scheduler_config)


def pipeline_from_components(components: SDComponents, unet: torch.nn.Module | None = None):
    """A sampling pipeline sharing the given (possibly LoRA-carrying) modules."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
        unet=unet if unet is not None else components.unet,
        scheduler=sampling_scheduler(components.noise_scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def load_pipeline(source: str, lora: str | os.PathLike | None = None, device: str | torch.device | None = None,
                  dtype: torch.dtype = torch.float32, revision: str | None = None):
    """`StableDiffusionPipeline.from_pretrained(source)` with the DPM-Solver++ scheduler and, if given, a LoRA."""
    from diffusers import StableDiffusionPipeline

    _quiet_libraries()
    try:
        pipeline = StableDiffusionPipeline.from_pretrained(source, safety_checker=None, feature_extractor=None,
                                                           requires_safety_checker=False, dtype=dtype,
                                                           revision=revision)
    except (OSError, ValueError) as error:
        raise _cannot_load(source, revision, error) from None
    note_loaded(source, revision, "model_index.json")
    pipeline.scheduler = sampling_scheduler(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    if lora is not None:
        load_lora(pipeline, lora)
    return pipeline.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


# ------------------------------------------------------------------------------------------ LoRA


def lora_weights_file(lora: str | os.PathLike) -> Path:
    """The LoRA weights file: `lora` itself, or the diffusers-named file inside the folder `lora`."""
    path = Path(lora)
    if not path.exists():
        raise LoraFileError(f"LoRA {path} does not exist (expected a folder holding {LORA_WEIGHT_NAME}, "
                            f"as the diffusion training writes it, or such a file)")
    file = path / LORA_WEIGHT_NAME if path.is_dir() else path
    if not file.is_file():
        raise LoraFileError(f"LoRA weights file {file} does not exist")
    return file


def check_lora_file(lora: str | os.PathLike) -> tuple[Path, str]:
    """(file, sha256) of a readable LoRA file whose hash matches its lora_info.json, when there is one."""
    from safetensors import safe_open

    file = lora_weights_file(lora)
    try:
        with safe_open(str(file), framework="pt") as handle:
            names = list(handle.keys())
    except Exception as error:  # safetensors raises its own types for a truncated or foreign file
        raise LoraFileError(f"LoRA weights file {file} cannot be read: {error}") from None
    if not names or not all("lora" in name for name in names):
        raise LoraFileError(f"LoRA weights file {file} holds no LoRA tensors")
    digest = sha256_file(file)
    info = file.parent / LORA_INFO_NAME
    if info.is_file():
        expected = json.loads(info.read_text()).get("sha256")
        if expected and expected != digest:
            raise LoraFileError(f"LoRA weights file {file} has sha256 {digest[:12]}..., but {info} records "
                                f"{expected[:12]}...: the file was changed or is corrupt")
    return file, digest


def load_lora(pipeline, lora: str | os.PathLike, adapter_name: str = "trained") -> str:
    """Load a LoRA into the pipeline's UNet, strictly: every tensor in the file must land in the model.
    Returns the file's sha256."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    file, digest = check_lora_file(lora)
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # silences "no LoRA keys for CLIPTextModel": this LoRA is UNet-only
    try:
        pipeline.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=adapter_name)
    except Exception as error:
        raise LoraFileError(f"LoRA weights file {file} does not fit the pipeline: {error}") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    pipeline.unet.eval()  # the injected LoRA layers come in training mode: their dropout would stay active
    expected = len(load_file(file))
    loaded = len(get_peft_model_state_dict(pipeline.unet, adapter_name=adapter_name))
    if loaded != expected:
        raise LoraFileError(f"LoRA weights file {file}: only {loaded} of its {expected} tensors fit the UNet")
    return digest


# ---------------------------------------------------------------------------------------- pixels


def to_vae_input(images: torch.Tensor) -> torch.Tensor:
    """float (B, 1, H, W) in [0, 1] -> (B, 3, H, W) in [-1, 1] (grayscale replicated)."""
    return (images * 2.0 - 1.0).expand(-1, 3, -1, -1)


def to_grayscale_uint8(images: np.ndarray) -> np.ndarray:
    """float (B, H, W, 3) in [0, 1] (the pipeline's `output_type="np"`) -> uint8 (B, H, W)."""
    gray = np.clip(images.astype(np.float64).mean(axis=-1), 0.0, 1.0)
    return np.round(gray * 255.0).astype(np.uint8)


@torch.no_grad()
def sample(pipeline, prompt: str, seeds: list[int], steps: int, guidance: float, resolution: int) -> np.ndarray:
    """One uint8 (len(seeds), R, R) batch, image i drawn from its own generator seeded with seeds[i]."""
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    output = pipeline(prompt=[prompt] * len(seeds), height=resolution, width=resolution,
                      num_inference_steps=steps, guidance_scale=guidance, generator=generators, output_type="np")
    return to_grayscale_uint8(output.images)


def grid_image(rows: dict[str, np.ndarray], label_width: int = 80):
    """A PIL image with one row per class (name on the left) of uint8 (N, R, R) images."""
    from PIL import Image, ImageDraw

    size = max((images.shape[-1] for images in rows.values()), default=16)
    columns = max((len(images) for images in rows.values()), default=1)
    canvas = Image.new("L", (label_width + columns * size, len(rows) * size), color=0)
    draw = ImageDraw.Draw(canvas)
    for row, (label, images) in enumerate(rows.items()):
        draw.text((4, row * size + size // 2 - 6), label, fill=255)
        for column, image in enumerate(images):
            canvas.paste(Image.fromarray(image), (label_width + column * size, row * size))
    return canvas
