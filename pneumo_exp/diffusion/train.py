"""LoRA fine-tuning of Stable Diffusion on the training split, one LoRA for all classes, conditioned on each
class's prompt. The recipe of diffusers' examples/text_to_image/train_text_to_image_lora.py:

VAE, text encoder and UNet frozen; LoRA layers added to the UNet's attention projections (kept in fp32 under mixed
precision); per batch: VAE-encode the images (latent sample x scaling factor), add noise at random timesteps,
let the UNet predict the noise (or v) conditioned on the class prompt, MSE to that target (optionally min-SNR-gamma
weighted); AdamW, cosine schedule with warm-up, gradient clipping, gradient accumulation with accelerate.

Validation, on real validation images: a denoising loss at fixed noise and fixed timesteps (the same in every call
and every run, so it compares across steps and runs; `diffusion/val_loss`) at the start, every `validation_every`
steps and at the end, and `training.keep=best_val_loss` saves the LoRA of its lowest value instead of the last.

Reads top to bottom: images to model input, LoRA set-up, the loss, the validation loss and grids, the loop
(checkpoints and the saved LoRA are written by `lora_files.py`). Everything lands under `output_dir/diffusion/`:
`lora/` (the LoRA in diffusers format + lora_info.json), `checkpoints/last/` (resume state, each epoch),
`samples/step_XXXXX.png` (fixed-seed validation grids) and `metrics.jsonl` (loss, gradient norm and learning rate
every `log_every` steps, and the validation loss).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pneumo_exp.config import DiffusionConfig, DiffusionTrainingConfig, JobConfig, plain
from pneumo_exp.core.checkpoint import last_checkpoint, load_lora_strictly, restore_training
from pneumo_exp.core.files import atomic_file
from pneumo_exp.core.history import HistoryFile
from pneumo_exp.core.seeds import derived_seed, image_seed, seeded_generator
from pneumo_exp.core.training import (
    DeviceMeans,
    NonFiniteLossError,  # noqa: F401  (what the watch raises, for callers)
    NonFiniteWatch,
    fresh_accelerator,
    optimizer_step,
    optimizer_steps,
    optimizer_steps_per_epoch,
    progress_bar,
    resolve_precision,
    shard_of,
)
from pneumo_exp.data.augment import resize, to_unit_float
from pneumo_exp.data.manifest import Record
from pneumo_exp.diffusion.lora_files import load_best, load_checkpoint, lora_weights, save_checkpoint, save_lora
from pneumo_exp.diffusion.stable_diffusion import (
    WEIGHT_DTYPES,
    SDComponents,
    check_resolution,
    grid_image,
    load_components,
    pipeline_from_components,
    pipeline_source,
    sample,
    to_vae_input,
)
from pneumo_exp.errors import UserError
from pneumo_exp.labels import CLASSES
from pneumo_exp.tracking import RunLogger
from pneumo_exp.validate import check_cached_latents, check_class_prompts

log = logging.getLogger(__name__)

STAGE_DIR = "diffusion"
MAX_UPSAMPLING = 1.5  # training images enlarged more than this from their source files: a warning


# ------------------------------------------------------------------------------------------ data


@dataclass
class TrainingImages:
    pixels: torch.Tensor  # uint8 (N, R, R), training split only
    labels: torch.Tensor  # int64 (N,), indices into CLASSES
    source_sides: list[int | None] | None = None  # shorter side of each original file; None: rendered at any size
    validation_pixels: torch.Tensor | None = None  # uint8 (M, R, R): real validation images, for the validation loss
    validation_labels: torch.Tensor | None = None  # int64 (M,)


def training_images(train: list[Record], validation: list[Record], resolution: int, cache_dir: str,
                    progress: bool = True) -> TrainingImages:
    """The real training records' images (and the validation records', for the validation loss only) cached at
    `resolution`, each split in its own cache."""
    from pneumo_exp.data.cache import open_or_build
    from pneumo_exp.labels import class_index

    def pixels_and_labels(records: list[Record]) -> tuple[torch.Tensor, torch.Tensor]:
        cache = open_or_build(records, resolution, cache_dir, progress=progress)
        return (torch.from_numpy(cache.pixels[cache.rows_of(records)].copy()),
                torch.tensor([class_index(r.label) for r in records], dtype=torch.int64))

    pixels, labels = pixels_and_labels(train)
    held_out = pixels_and_labels(validation) if validation else (None, None)
    return TrainingImages(pixels, labels, source_image_sides(train), *held_out)


def source_image_sides(records) -> list[int | None]:
    """The shorter side of each record's original file, read from its header (the cache holds resized copies);
    None for phantom images, which are rendered at whatever size is asked."""
    from PIL import Image

    from pneumo_exp.data.phantom import is_phantom_key

    sides = []
    for record in records:
        if is_phantom_key(record.path):
            sides.append(None)
            continue
        with Image.open(record.path) as image:
            sides.append(min(image.size))
    return sides


def upsampling(source_sides: list[int | None] | None, resolution: int) -> dict | None:
    """How much training enlarges the source images: resolution / median shorter side."""
    sides = [side for side in source_sides or [] if side]
    if not sides:
        return None
    median = float(np.median(sides))
    return {"source_side_median": round(median) if median.is_integer() else median,
            "source_side_min": int(min(sides)), "factor": round(resolution / median, 3)}


def random_crops(pixels: torch.Tensor, resolution: int, min_side: float, generator: torch.Generator) -> torch.Tensor:
    """uint8 (B, R, R) -> float (B, 1, res, res) in [0, 1]: a random square crop of side in [min_side, 1] x R,
    resized. No flips and no rotations: a chest X-ray has a side (the heart is on the patient's left)."""
    size = pixels.shape[-1]
    if min_side >= 1:
        return resize(to_unit_float(pixels), resolution)
    crops = []
    for image in pixels:
        fraction = min_side + (1.0 - min_side) * torch.rand((), generator=generator).item()
        side = max(1, min(size, round(size * fraction)))
        top, left = (int(torch.randint(0, size - side + 1, (), generator=generator)) for _ in range(2))
        crops.append(resize(to_unit_float(image[None, top:top + side, left:left + side]), resolution))
    return torch.cat(crops)


# ------------------------------------------------------------------------------------------ LoRA


def add_lora(components: SDComponents, lora_spec) -> None:
    """Freeze VAE, text encoder and UNet; add one trainable LoRA adapter ("default") to the UNet."""
    from peft import LoraConfig

    for module in (components.vae, components.text_encoder, components.unet):
        module.requires_grad_(False)
    components.unet.add_adapter(LoraConfig(
        r=int(lora_spec.r), lora_alpha=float(lora_spec.alpha), lora_dropout=float(lora_spec.dropout),
        target_modules=list(lora_spec.target_modules), init_lora_weights="gaussian"))


def lora_parameters(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in unet.parameters() if p.requires_grad]


@torch.no_grad()
def encode_prompts(components: SDComponents, prompts: dict[str, str], device) -> torch.Tensor:
    """(C, L, D) text-encoder states of each class's prompt, classes in CLASSES order (the text encoder is frozen,
    so they are computed once). Tokenised as the pipeline does: padded to the tokenizer's max length."""
    check_class_prompts(prompts, "diffusion_lora.prompts")
    tokens = components.tokenizer([prompts[label] for label in CLASSES], padding="max_length", truncation=True,
                                  max_length=components.tokenizer.model_max_length, return_tensors="pt")
    return components.text_encoder(tokens.input_ids.to(device), return_dict=False)[0]


@torch.no_grad()
def latent_distributions(components: SDComponents, images: torch.Tensor, device) -> torch.Tensor:
    """The VAE posterior's parameters (mean and log-variance, (B, 2C, h, w)) of float (B, 1, H, W) images."""
    vae = components.vae
    return vae.encode(to_vae_input(images).to(device, vae.dtype)).latent_dist.parameters


@torch.no_grad()
def cache_latent_distributions(components: SDComponents, pixels: torch.Tensor, resolution: int, batch_size: int,
                               device) -> torch.Tensor:
    """Every training image's posterior parameters, computed once (on the CPU between steps)."""
    return torch.cat([latent_distributions(components, random_crops(batch, resolution, 1.0, None), device).cpu()
                      for batch in pixels.split(batch_size)])


def sample_latents(components: SDComponents, parameters: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    return DiagonalGaussianDistribution(parameters).sample(generator=generator) * components.vae.config.scaling_factor


def diffusion_loss(components: SDComponents, unet, images: torch.Tensor, encoder_states: torch.Tensor,
                   generator: torch.Generator, min_snr_gamma: float | None = None,
                   noise_offset: float = 0.0) -> torch.Tensor:
    """The latent denoising loss of one batch. images: float (B, 1, H, W) in [0, 1]; encoder_states: (B, L, D).
    All randomness (latent sample, noise, timesteps) comes from `generator` (a CPU generator)."""
    parameters = latent_distributions(components, images, encoder_states.device)
    return latent_loss(components, unet, sample_latents(components, parameters, generator), encoder_states,
                       generator, min_snr_gamma, noise_offset)


def latent_loss(components: SDComponents, unet, latents: torch.Tensor, encoder_states: torch.Tensor,
                generator: torch.Generator, min_snr_gamma: float | None = None,
                noise_offset: float = 0.0) -> torch.Tensor:
    """`diffusion_loss` from latents already sampled and scaled."""
    from diffusers.training_utils import compute_snr

    scheduler = components.noise_scheduler
    device = encoder_states.device
    batch = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(device)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((batch, latents.shape[1], 1, 1), generator=generator,
                                                   dtype=latents.dtype).to(device)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator).to(device)
    errors = denoising_errors(components, unet, latents, noise, timesteps, encoder_states)
    if min_snr_gamma is None:
        return errors.mean()
    snr = compute_snr(scheduler, timesteps)
    weights = torch.clamp(snr, max=min_snr_gamma)
    weights = weights / snr if scheduler.config.prediction_type == "epsilon" else weights / (snr + 1)
    return (errors * weights).mean()


def denoising_errors(components: SDComponents, unet, latents: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor, encoder_states: torch.Tensor) -> torch.Tensor:
    """(B,) mean squared error of the UNet's prediction of its target (the noise or v) for latents noised with
    `noise` at `timesteps`."""
    scheduler = components.noise_scheduler
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    elif scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise UserError(f"the scheduler predicts {scheduler.config.prediction_type!r}, which LoRA training does not "
                        "support", where=str(components.source),
                        fix="use a Stable Diffusion pipeline whose scheduler predicts epsilon or v_prediction")
    prediction = unet(noisy_latents, timesteps, encoder_states.to(components.vae.dtype), return_dict=False)[0]
    return F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


# ------------------------------------------------------------------------------------ validation loss


VALIDATION_SEED = 0  # the validation latents, noise and timesteps: one draw for every run, so losses compare


@dataclass
class ValidationProblem:
    """Real validation images as the denoiser is scored on them, drawn once: latents (posterior samples), noise,
    timesteps spread evenly over the schedule, and the class of each."""
    latents: torch.Tensor  # (M, C, h, w), on the CPU
    noise: torch.Tensor
    timesteps: torch.Tensor  # (M,)
    labels: torch.Tensor  # (M,) indices into CLASSES

    def __len__(self) -> int:
        return len(self.labels)


@torch.no_grad()
def validation_problem(components: SDComponents, pixels: torch.Tensor, labels: torch.Tensor, resolution: int,
                       batch_size: int, device) -> ValidationProblem:
    """uint8 (M, R, R) validation images at `resolution` (no crop), noised from VALIDATION_SEED."""
    parameters = cache_latent_distributions(components, pixels, resolution, batch_size, device)
    generator = seeded_generator(VALIDATION_SEED)
    latents = sample_latents(components, parameters, generator)
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype)
    total = components.noise_scheduler.config.num_train_timesteps
    spread = ((torch.arange(len(labels)) + 0.5) * total / len(labels)).long()
    return ValidationProblem(latents, noise, spread[torch.randperm(len(labels), generator=generator)], labels)


@torch.no_grad()
def validation_loss(components: SDComponents, unet, problem: ValidationProblem, class_states: torch.Tensor,
                    batch_size: int) -> float:
    """The mean denoising error (plain MSE: no min-SNR weight, no noise offset) of `unet`, in eval mode, over the
    problem; class_states: (C, L, D) text-encoder states of the class prompts."""
    was_training = unet.training
    unet.eval()
    device, total = class_states.device, 0.0
    for rows in torch.arange(len(problem)).split(batch_size):
        errors = denoising_errors(components, unet, problem.latents[rows].to(device), problem.noise[rows].to(device),
                                  problem.timesteps[rows].to(device), class_states[problem.labels[rows].to(device)])
        total += float(errors.sum())
    unet.train(was_training)
    return total / len(problem)


@dataclass
class ValidationLosses:
    """The validation losses logged so far: the last, the lowest and its step, and (with `keep=best_val_loss`) the
    LoRA of that step."""
    last: float | None = None
    best: float = math.inf
    best_step: int | None = None
    best_weights: dict[str, torch.Tensor] | None = None

    def record(self, step: int, loss: float, unet, keep_weights: bool) -> None:
        self.last = loss
        if loss < self.best:
            self.best, self.best_step = loss, step
            self.best_weights = lora_weights(unet) if keep_weights else None

    def progress(self) -> dict:
        return {"last": self.last, "best": self.best, "best_step": self.best_step}


# ------------------------------------------------------------------------------- validation grids


def save_validation_grid(components: SDComponents, unet, settings: DiffusionTrainingConfig, prompts: dict,
                         seed: int, resolution: int, path: Path, accelerator, images_per_class: int) -> Path:
    """One row per class of images drawn from fixed seeds: the same noise at every step, so grids compare."""
    was_training = unet.training
    unet.eval()
    pipeline = pipeline_from_components(components, unet=unet)
    with accelerator.autocast():
        rows = {label: sample(pipeline, prompts[label],
                              [image_seed(seed, label, i) for i in range(images_per_class)],
                              settings.validation_inference_steps, settings.validation_guidance_scale, resolution)
                for label in CLASSES}
    unet.train(was_training)
    with atomic_file(path, "wb") as handle:
        grid_image(rows).save(handle, format="PNG")
    return path


# -------------------------------------------------------------------------------------------- loop


def train_diffusion_lora(cfg: JobConfig, train_images: TrainingImages, output_dir: str | os.PathLike,
                         logger: RunLogger | None = None, components: SDComponents | None = None) -> Path:
    """Train the LoRA and return the folder of the saved LoRA (`output_dir/diffusion/lora`).

    `train_images`: the training split only. `logger`: gets every metrics row (`log_metrics`) and validation grid
    (`log_images`) on the main process. `components`: already loaded base components to train in place (default:
    loaded from the configured source); afterwards they hold the saved LoRA, in eval mode. Resumes from
    `output_dir/diffusion/checkpoints/last` when `cfg.resume` is true. Whatever the stage loaded (UNet, optimizer,
    accelerator state) is freed when it returns.
    """
    from accelerate.utils.memory import clear_device_cache

    try:
        return _train(cfg, train_images, output_dir, logger, components)
    finally:
        clear_device_cache(garbage_collection=True)  # the prepared UNet and the Accelerator hold each other


def warn_about_upsampling(data: TrainingImages, resolution: int) -> dict | None:
    """Training images enlarged to the diffusion resolution teach the LoRA interpolation blur: a warning. Returns
    `upsampling` of the source files (recorded in lora_info.json)."""
    enlarged = upsampling(data.source_sides, resolution)
    if enlarged and enlarged["factor"] > MAX_UPSAMPLING:
        log.warning("diffusion LoRA: the source images (median shorter side %s px) are upsampled %.3gx to "
                    "diffusion_lora.resolution=%d: the LoRA learns interpolation blur; use larger source images",
                    enlarged["source_side_median"], enlarged["factor"], resolution)
    if data.pixels.shape[-1] < resolution:
        log.warning("diffusion LoRA: training images are %d px, below diffusion_lora.resolution=%d: they are "
                    "upsampled (cache them at the diffusion resolution instead)", data.pixels.shape[-1], resolution)
    return enlarged


def components_to_train(components: SDComponents | None, source: str, diffusion_cfg: DiffusionConfig,
                        settings: DiffusionTrainingConfig, seed: int, weight_dtype: torch.dtype,
                        device) -> SDComponents:
    """The base components (loaded unless given) with a fresh LoRA on the UNet, initialised from `seed`: frozen
    weights in `weight_dtype` on `device`, the LoRA in fp32."""
    from diffusers.training_utils import cast_training_params

    components = components or load_components(source, diffusion_cfg.revision, dtype=weight_dtype)
    torch.manual_seed(seed)  # the LoRA's gaussian initialisation
    add_lora(components, diffusion_cfg.lora)
    for module in (components.vae, components.text_encoder, components.unet):
        module.to(device, **({} if weight_dtype == torch.float32 else {"dtype": weight_dtype}))
    cast_training_params(components.unet, dtype=torch.float32)
    if settings.gradient_checkpointing:
        components.unet.enable_gradient_checkpointing()
    return components


def check_keep(settings: DiffusionTrainingConfig, data: TrainingImages) -> bool:
    """Whether the LoRA of the lowest validation loss is kept; refused where there are no validation images."""
    if settings.keep == "best_val_loss" and data.validation_pixels is None:
        raise UserError("keeping the LoRA of the lowest validation loss needs validation images, and none were given",
                        where="diffusion_lora.training.keep",
                        fix="use keep=last, or give the run a validation split (dataset.val_fraction > 0)")
    return settings.keep == "best_val_loss"


def record_lora_settings(logger: RunLogger | None, settings: dict) -> None:
    """The LoRA's rank, alpha, effective scale and learning rate in the W&B run's config, under `diffusion_lora_run`."""
    run = getattr(logger, "run", None)  # a RunLogger's W&B run; None without W&B (or for a stand-in logger)
    if run is not None:
        run.config.update({"diffusion_lora_run": settings}, allow_val_change=True)


def _train(cfg: JobConfig, data: TrainingImages, output_dir: str | os.PathLike, logger: RunLogger | None,
           components: SDComponents | None) -> Path:
    from diffusers.optimization import get_scheduler

    diffusion_cfg = cfg.diffusion_lora
    settings = diffusion_cfg.training
    seed = int(cfg.seed if settings.seed is None else settings.seed)
    resolution = int(diffusion_cfg.resolution)
    prompts = plain(diffusion_cfg.prompts)
    check_cached_latents(settings)  # refused before any work by validate.py; here for callers of the trainer
    keep_best = check_keep(settings, data)
    source = components.source if components is not None else pipeline_source(diffusion_cfg, cfg.paths.cache_dir)
    native = check_resolution(diffusion_cfg, source)
    enlarged = warn_about_upsampling(data, resolution)
    stage_dir = Path(output_dir) / STAGE_DIR
    spec = diffusion_cfg.lora
    lora_settings = {"r": int(spec.r), "alpha": float(spec.alpha), "scale": float(spec.alpha) / int(spec.r),
                     "lr": float(settings.lr)}

    precision = resolve_precision(settings.precision or cfg.trainer.precision, cfg.trainer.cpu)
    accelerator = fresh_accelerator(precision, cfg.trainer.cpu)
    is_main = accelerator.is_main_process
    components = components_to_train(components, source, diffusion_cfg, settings, seed, WEIGHT_DTYPES[precision],
                                     accelerator.device)
    class_states = encode_prompts(components, prompts, accelerator.device)
    latent_cache = cache_latent_distributions(components, data.pixels, resolution, settings.batch_size,
                                              accelerator.device) if settings.cache_latents else None
    problem = None
    if is_main and data.validation_pixels is not None:
        problem = validation_problem(components, data.validation_pixels, data.validation_labels, resolution,
                                     settings.batch_size, accelerator.device)

    steps_per_epoch = max(1, optimizer_steps_per_epoch(len(data.labels), accelerator.num_processes,
                                                       settings.batch_size, settings.grad_accum_steps))
    total_steps = settings.max_train_steps or settings.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    optimizer = torch.optim.AdamW(lora_parameters(components.unet), lr=settings.lr, betas=tuple(settings.betas),
                                  weight_decay=settings.weight_decay, eps=settings.eps)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=int(settings.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    unet, optimizer = accelerator.prepare(components.unet, optimizer)
    raw_unet = accelerator.unwrap_model(unet)

    if is_main:
        stage_dir.mkdir(parents=True, exist_ok=True)
        record_lora_settings(logger, lora_settings)
    history = HistoryFile(stage_dir / "metrics.jsonl", enabled=is_main)

    def log_row(row: dict) -> None:
        history.append(row)
        if is_main and logger is not None:
            logger.log_metrics(row)

    global_step, start_epoch = 0, 1
    losses = ValidationLosses()
    checkpoint_dir = last_checkpoint(stage_dir / "checkpoints" / "last")
    if cfg.resume and checkpoint_dir.is_dir():
        state = load_checkpoint(checkpoint_dir, raw_unet)
        restore_training(state, optimizer, scheduler, checkpoint_dir)
        global_step, start_epoch = state["global_step"], state["epoch"] + 1
        history.restart(state["history"])
        losses = ValidationLosses(**state.get("validation", {}), best_weights=load_best(checkpoint_dir))
        log.info("diffusion LoRA resumed from %s after epoch %d (step %d)", checkpoint_dir, state["epoch"],
                 global_step)
    else:
        history.restart([])
    log.info("diffusion LoRA: %d images, %s (batch %d x accumulation %d x %d processes), r=%s alpha=%s (scale %.4g)"
             "%s", len(data.labels), step_plan(total_steps, epochs, steps_per_epoch, settings.max_train_steps),
             settings.batch_size, settings.grad_accum_steps, accelerator.num_processes, spec.r, spec.alpha,
             lora_settings["scale"], ", latents cached" if latent_cache is not None else "")
    validation_images = DiffusionTrainingConfig.validation_images(settings, accelerator.device.type)

    def log_validation_loss() -> None:
        """On the main process: the validation loss of the LoRA now, logged and offered to `losses`."""
        if problem is not None:
            with accelerator.autocast():
                loss = validation_loss(components, raw_unet, problem, class_states, settings.batch_size)
            log_row({"diffusion/step": global_step, "diffusion/val_loss": loss})
            losses.record(global_step, loss, raw_unet, keep_best)

    def validate() -> None:
        if not is_main:
            return
        log_validation_loss()
        if settings.validation_every > 0:
            path = save_validation_grid(components, raw_unet, settings, prompts, seed, resolution,
                                        stage_dir / "samples" / f"step_{global_step:05d}.png", accelerator,
                                        validation_images)
            if logger is not None:
                logger.log_images({"diffusion/samples": path})

    def batch_latents(indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if latent_cache is not None:
            return sample_latents(components, latent_cache[indices].to(accelerator.device), generator)
        images = random_crops(data.pixels[indices], resolution, settings.crop_min_side, generator)
        return sample_latents(components, latent_distributions(components, images, accelerator.device), generator)

    def loss_of(indices: torch.Tensor) -> torch.Tensor:
        states = class_states[data.labels[indices].to(class_states.device)]
        return latent_loss(components, unet, batch_latents(indices, draws), states, draws, settings.min_snr_gamma,
                           settings.noise_offset)

    watch = NonFiniteWatch(accelerator.device, "diffusion loss",
                           "diffusion_lora.training.lr, diffusion_lora.training.precision",
                           "lower diffusion_lora.training.lr or use precision bf16 instead of fp16")
    if is_main and global_step == 0:
        log_validation_loss()  # the base model's (the LoRA starts as a no-op)
    unet.train()
    for epoch in range(start_epoch, epochs + 1):
        if global_step >= total_steps:
            break
        torch.manual_seed(derived_seed(seed, epoch, accelerator.process_index))  # LoRA dropout
        order = torch.randperm(len(data.labels), generator=seeded_generator(seed, epoch))  # shared by every process
        shard = shard_of(order, accelerator.process_index, accelerator.num_processes)
        steps = optimizer_steps(shard, settings.batch_size, settings.grad_accum_steps)[: total_steps - global_step]
        draws = seeded_generator(seed, epoch, accelerator.process_index, 1)  # crops, noise, timesteps: per process
        epoch_means, window = DeviceMeans(), DeviceMeans()  # read only when a row is logged
        window_steps, window_images, window_start = 0, 0, time.perf_counter()
        bar = progress_bar(steps, f"diffusion LoRA epoch {epoch}/{epochs}", accelerator)
        for step_index, micro_batches in enumerate(bar):
            step = optimizer_step(accelerator, unet, optimizer, scheduler, micro_batches, loss_of,
                                  lora_parameters(raw_unet), settings.max_grad_norm)
            global_step += 1
            watch.observe(step.losses, global_step)
            for means in (epoch_means, window):
                means.add("loss", torch.stack(step.losses).mean())
            window.add("grad_norm", step.grad_norm)
            window_steps += 1
            window_images += sum(map(len, micro_batches)) * accelerator.num_processes
            if window_steps >= settings.log_every or step_index == len(steps) - 1:  # always before a checkpoint
                watch.check(accelerator)
                seconds, means = time.perf_counter() - window_start, window.pop(accelerator)
                bar.set_postfix(loss=f"{means['loss']:.4f}")
                log_row({"diffusion/step": global_step, "diffusion/epoch": epoch, "diffusion/loss": means["loss"],
                         "diffusion/grad_norm": means["grad_norm"], "diffusion/lr": scheduler.get_last_lr()[0],
                         "diffusion/step_seconds": seconds / window_steps,
                         "diffusion/images_per_second": window_images / seconds})
                window_steps, window_images = 0, 0
            if settings.validation_every > 0 and global_step % settings.validation_every == 0:
                validate()
            if not window_steps:
                window_start = time.perf_counter()  # the next window's time leaves out logging and grids
        log_row({"diffusion/step": global_step, "diffusion/epoch": epoch,
                 "diffusion/epoch_loss": epoch_means.pop(accelerator)["loss"]})
        accelerator.wait_for_everyone()
        if is_main:
            save_checkpoint(stage_dir / "checkpoints" / "last", raw_unet, optimizer, scheduler,
                            {"epoch": epoch, "global_step": global_step, "history": history.rows,
                             "validation": losses.progress()}, best_weights=losses.best_weights)

    accelerator.wait_for_everyone()
    raw_unet.eval()
    lora_folder = stage_dir / "lora"
    if is_main:
        if settings.validation_every == 0 or global_step % settings.validation_every:
            validate()
        kept_step = global_step
        if keep_best and losses.best_weights is not None:
            load_lora_strictly(raw_unet, losses.best_weights, "the LoRA of the lowest validation loss")
            kept_step = losses.best_step
        save_lora(lora_folder, raw_unet, {
            "base": source, "resolution": resolution, "native_resolution": native, "upsampling": enlarged,
            "prompts": prompts, **lora_settings, "dropout": float(spec.dropout),
            "target_modules": list(spec.target_modules), "steps": global_step, "images": len(data.labels),
            "seed": seed, "kept": {"rule": settings.keep, "step": kept_step},
            "validation": None if problem is None else {"images": len(problem), "last_loss": losses.last,
                                                        "best_loss": losses.best, "best_step": losses.best_step},
            "training": plain(settings)})
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    return lora_folder


def step_plan(total_steps: int, epochs: int, steps_per_epoch: int, max_train_steps: int | None) -> str:
    """The run's length as the log states it: the capped count when max_train_steps ends training early."""
    if max_train_steps and max_train_steps < epochs * steps_per_epoch:
        return (f"{total_steps} optimizer steps (max_train_steps={max_train_steps}; an epoch has "
                f"{steps_per_epoch})")
    return f"{epochs} epochs x {steps_per_epoch} optimizer steps"
