"""Settings of the diffusion stage: `diffusion_lora.training` and `diffusion_lora.generation`.

Plain dataclasses with defaults, typed fields of the config schema (`pneumo_exp.config.DiffusionConfig`); the
accessors below also accept plain mappings, for callers without a composed config. This module imports nothing
from the project (the schema imports it).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional


@dataclass
class DiffusionTrainingConfig:
    epochs: int = 5
    max_train_steps: Optional[int] = None  # optimizer steps; when set, it ends training (and overrides epochs)
    batch_size: int = 4  # per process and micro-batch
    grad_accum_steps: int = 1  # optimizer step every N micro-batches: effective batch = batch x N x processes
    lr: float = 1.0e-4
    weight_decay: float = 1.0e-2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1.0e-8
    warmup_ratio: float = 0.05  # share of optimizer steps with linear warm-up, then cosine decay to zero
    max_grad_norm: float = 1.0  # 0 turns clipping off
    min_snr_gamma: Optional[float] = None  # e.g. 5.0: min-SNR-gamma loss weighting; null = plain MSE
    noise_offset: float = 0.0
    crop_min_side: float = 0.9  # random square crops of side in [crop_min_side, 1] x image side; 1 = no crop
    cache_latents: bool = False  # VAE posteriors computed once per image before training (needs crop_min_side=1)
    gradient_checkpointing: bool = False  # UNet activations recomputed in the backward pass: less memory, slower
    precision: Optional[str] = None  # no | bf16 | fp16 (LoRA parameters stay fp32); null: trainer.precision
    seed: Optional[int] = None  # null: the run's top-level seed
    log_every: int = 10  # optimizer steps between loss rows in diffusion/metrics.jsonl (and W&B)
    validation_every: int = 500  # optimizer steps between validation grids (and one at the end); 0 = none
    validation_images_per_class: Optional[int] = None  # null: 4 on a GPU, 1 on the CPU
    validation_inference_steps: int = 20
    validation_guidance_scale: float = 7.5

    def validation_images(self, device_type: str) -> int:
        if self.validation_images_per_class is not None:
            return self.validation_images_per_class
        return 1 if device_type == "cpu" else 4

    def __post_init__(self) -> None:
        if self.precision is not None:
            _check_precision(self.precision, "diffusion_lora.training.precision")
        for name in ("batch_size", "grad_accum_steps", "log_every", "validation_images_per_class",
                     "validation_inference_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"diffusion_lora.training.{name} must be >= 1 (got {getattr(self, name)})")
        if not 0 < self.crop_min_side <= 1:
            raise ValueError(f"diffusion_lora.training.crop_min_side must be in (0, 1] (got {self.crop_min_side})")
        if self.max_train_steps is None and self.epochs < 1 or self.max_train_steps is not None \
                and self.max_train_steps < 1:
            raise ValueError("diffusion_lora.training: epochs (or max_train_steps, when set) must be >= 1")


@dataclass
class DiffusionGenerationConfig:
    num_inference_steps: int = 25  # DPM-Solver++ multistep
    guidance_scale: float = 7.5
    batch_size: int = 8
    seed: Optional[int] = None  # null: the run's top-level seed
    precision: str = "no"  # no | fp16 | bf16: the dtype of the pipeline's weights while sampling

    def __post_init__(self) -> None:
        _check_precision(self.precision, "diffusion_lora.generation.precision")
        if self.num_inference_steps < 1 or self.batch_size < 1:
            raise ValueError("diffusion_lora.generation: num_inference_steps and batch_size must be >= 1")


def _check_precision(value: str, key: str) -> None:
    if value not in ("no", "fp16", "bf16"):
        raise ValueError(f"{key} must be one of no, fp16, bf16 (got {value!r})")


def _from_mapping(schema, values: Any, key: str):
    if values is None:
        return schema()
    if isinstance(values, schema):
        return values
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(values, DictConfig):
            values = OmegaConf.to_container(values, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if not isinstance(values, dict):
        raise TypeError(f"{key}: expected a mapping, got {type(values).__name__}")
    known = {f.name for f in fields(schema)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{key}: unknown key(s) {unknown}; known: {sorted(known)}")
    return schema(**values)


def _block(diffusion_cfg, name: str):
    """The block, or None where the (possibly struct-mode) config has no such key."""
    if isinstance(diffusion_cfg, dict) or hasattr(diffusion_cfg, "__contains__"):
        return diffusion_cfg[name] if name in diffusion_cfg else None
    return getattr(diffusion_cfg, name, None)


def training_settings(diffusion_cfg) -> DiffusionTrainingConfig:
    """`diffusion_lora.training` as a dataclass (defaults where the config has no such block)."""
    return _from_mapping(DiffusionTrainingConfig, _block(diffusion_cfg, "training"), "diffusion_lora.training")


def generation_settings(diffusion_cfg) -> DiffusionGenerationConfig:
    """`diffusion_lora.generation` as a dataclass (defaults where the config has no such block)."""
    return _from_mapping(DiffusionGenerationConfig, _block(diffusion_cfg, "generation"), "diffusion_lora.generation")
