"""A small Stable-Diffusion-shaped base pretrained from scratch on the training split (`task=pretrain_diffusion`).

The preset's architecture (`diffusion_lora.architecture`) is built with random weights, then trained in two
phases on the real training images only: the VAE (reconstruction + a small KL term), then the UNet and the text
encoder together (latent noise prediction conditioned on the class prompts of `diffusion_lora.prompts`, with the
empty prompt for a share of the examples so that classifier-free guidance works). The UNet phase logs the
validation denoising loss of the moving-average weights (`pretrain/unet_val_loss`, the LoRA stage's
`diffusion.train.validation_loss`: real validation images at fixed noise and timesteps, so it compares across steps
and pretrainings) at its start, with every sample grid and at its end. The result is a diffusers folder
for the training split (`diffusion/bases.py`: one per split under `diffusion_lora.pretrained`) that
`StableDiffusionPipeline.from_pretrained(folder)` loads, with a model card (`model_card.json`, `README.md`,
`samples.png`) and `training_split.json`, the sha256 of every image it saw (`data/provenance.py`).

A killed pretraining resumes from `<folder>.state/` when the same command runs again with the same settings.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pneumo_exp.config import DiffusionConfig, DiffusionPretrainingConfig, JobConfig, plain
from pneumo_exp.core.checkpoint import load_state_file, read_weights, restore_training, save_state_file
from pneumo_exp.core.ema import WeightAverage
from pneumo_exp.core.files import atomic_file, build_folder_once, swap_folder, write_atomic, write_json_atomic
from pneumo_exp.core.history import HistoryFile
from pneumo_exp.core.seeds import image_seed, seeded_generator
from pneumo_exp.core.training import DeviceMeans, NonFiniteWatch, OptimizerStep, fresh_accelerator, optimizer_step
from pneumo_exp.data.augment import to_unit_float
from pneumo_exp.data.manifest import Record
from pneumo_exp.data.provenance import content_fingerprint, write_training_record
from pneumo_exp.diffusion.bases import MODEL_CARD, settings_key, split_base_folder
from pneumo_exp.diffusion.stable_diffusion import (
    SDComponents,
    build_tiny_pipeline,
    grid_image,
    load_components,
    pipeline_from_components,
    sample,
    to_vae_input,
)
from pneumo_exp.diffusion.train import (
    cache_latent_distributions,
    latent_loss,
    sample_latents,
    validation_loss,
    validation_problem,
)
from pneumo_exp.errors import UserError
from pneumo_exp.labels import CLASSES

log = logging.getLogger(__name__)

PHASES = ("vae", "unet")


@dataclass
class PretrainingImages:
    train: torch.Tensor  # uint8 (N, R, R): the real training split
    labels: torch.Tensor  # int64 (N,), indices into CLASSES
    validation: torch.Tensor  # uint8 (M, R, R): real validation images, scored by the VAE and the validation loss
    fingerprint: str  # content fingerprint of the training split
    class_counts: dict[str, int] = field(default_factory=dict)
    train_records: list[Record] = field(default_factory=list)  # what `train` holds, for the training record
    validation_labels: torch.Tensor | None = None  # int64 (M,); None: no validation loss


# --------------------------------------------------------------------------------------------- state


class PretrainingState:
    """`<target>.state/`: the random-init model (`init/`) and the last checkpoint (`checkpoint/`) of a pretraining
    in progress, keyed by `settings_key`; removed once the base is written."""

    def __init__(self, target: Path, key: str):
        self.folder = target.with_name(target.name + ".state")
        self.key = key

    def initial_model(self, architecture: dict, resolution: int) -> Path:
        key_file = self.folder / "key.txt"
        if self.folder.is_dir() and (not key_file.is_file() or key_file.read_text().strip() != self.key):
            log.warning("%s holds a pretraining of other settings: it is discarded", self.folder)
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomic(key_file, self.key + "\n")
        return build_folder_once(self.folder / "init", "model_index.json",
                                 lambda staging: build_tiny_pipeline(architecture, resolution, staging))

    @property
    def checkpoint(self) -> Path:
        return self.folder / "checkpoint"

    def save(self, modules: dict[str, torch.nn.Module], average: WeightAverage | None, optimizer, scheduler,
             progress: dict) -> None:
        from safetensors.torch import save_file

        def fill(staging: Path) -> None:
            weights = {f"{name}.{key}": value.detach().float().contiguous().cpu()
                       for name, module in modules.items() for key, value in module.state_dict().items()}
            if average is not None:
                weights.update({f"average.{key}": value.contiguous() for key, value in average.average.items()})
            save_file(weights, staging / "weights.safetensors")
            save_state_file(staging / "training_state.pt", optimizer, scheduler,
                            {**progress, "average_updates": average.updates if average else 0})

        swap_folder(self.checkpoint, fill)

    def load(self, modules: dict[str, torch.nn.Module], average: WeightAverage | None, optimizer,
             scheduler) -> dict:
        weights = read_weights(self.checkpoint / "weights.safetensors")
        state = load_state_file(self.checkpoint / "training_state.pt")
        for name, module in modules.items():
            module.load_state_dict({key[len(name) + 1:]: value for key, value in weights.items()
                                    if key.startswith(name + ".")})
        if average is not None:
            average.load_state_dict({"updates": state["average_updates"],
                                     "average": {key[len("average."):]: value for key, value in weights.items()
                                                 if key.startswith("average.")}})
        restore_training(state, optimizer, scheduler, self.checkpoint)
        return state

    def progress(self) -> dict:
        """What the last checkpoint recorded besides weights and optimizer (phase, step, history, wall seconds,
        VAE results), or {} when there is none."""
        if not (self.checkpoint / "training_state.pt").is_file():
            return {}
        state = load_state_file(self.checkpoint / "training_state.pt")
        return {key: value for key, value in state.items() if key not in ("optimizer", "scheduler", "rng")}


# ---------------------------------------------------------------------------------------------- loop


def batch_indices(count: int, batch_size: int, step: int, seed: int, phase: str) -> torch.Tensor:
    """The images of optimizer step `step`: epochs of seeded permutations, so a resumed run draws the same."""
    per_epoch = max(1, count // batch_size)
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(count, generator=seeded_generator(seed, PHASES.index(phase), epoch))
    return order[position * batch_size:(position + 1) * batch_size]


def cosine_schedule(optimizer, warmup_steps: int, total_steps: int):
    from diffusers.optimization import get_scheduler

    return get_scheduler("cosine", optimizer, num_warmup_steps=min(warmup_steps, total_steps // 10),
                         num_training_steps=total_steps)


class LossRows:
    """A phase's loss and gradient norm, averaged over `log_every` steps on the device, as rows of the history (and
    W&B); its non-finite-loss watch is read with each row and before each checkpoint (`check`)."""

    def __init__(self, name: str, total: int, log_every: int, history: HistoryFile, logger, accelerator):
        self.name, self.total, self.log_every, self.history, self.logger = name, total, log_every, history, logger
        self.accelerator, self.means, self.window_steps = accelerator, DeviceMeans(), 0
        self.watch = NonFiniteWatch(accelerator.device, f"the {name} loss", f"diffusion_lora.pretraining.{name}_lr",
                                    f"lower diffusion_lora.pretraining.{name}_lr")

    def record(self, step: int, result: OptimizerStep, lr: float, bar) -> None:
        self.watch.observe(result.losses, step)
        self.means.add("loss", result.losses[0])
        self.means.add("grad_norm", result.grad_norm)
        self.window_steps += 1
        if self.window_steps >= self.log_every or step == self.total:
            self.check()
            means, self.window_steps = self.means.pop(self.accelerator), 0
            bar.set_postfix(loss=f"{means['loss']:.4f}")
            row = {f"pretrain/{self.name}_step": step, f"pretrain/{self.name}_loss": means["loss"],
                   f"pretrain/{self.name}_lr": lr, f"pretrain/{self.name}_grad_norm": means["grad_norm"]}
            self.history.append(row)
            if self.logger is not None:
                self.logger.log_metrics(row)

    def check(self) -> None:
        self.watch.check(self.accelerator, "pretraining ")


def vae_loss(vae, pixels: torch.Tensor, kl_weight: float, generator: torch.Generator) -> torch.Tensor:
    """Reconstruction MSE of a posterior sample on [-1, 1] pixels, plus `kl_weight` x KL to the unit gaussian."""
    images = to_vae_input(to_unit_float(pixels)).to(next(vae.parameters()).device)
    posterior = vae.encode(images).latent_dist
    reconstruction = vae.decode(posterior.sample(generator=generator)).sample
    return F.mse_loss(reconstruction, images) + kl_weight * posterior.kl().mean()


@torch.no_grad()
def reconstruction_psnr(vae, pixels: torch.Tensor, batch_size: int = 64) -> float:
    """Mean PSNR (dB, pixels in [0, 1]) of images decoded from their posterior mean."""
    was_training = vae.training
    vae.eval()
    scores = []
    for batch in pixels.split(batch_size):
        images = to_unit_float(batch)
        decoded = vae.decode(vae.encode(to_vae_input(images)).latent_dist.mode()).sample
        gray = ((decoded.mean(dim=1, keepdim=True) + 1) / 2).clamp(0, 1)
        mse = ((gray - images) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
        scores.append(10 * torch.log10(1.0 / mse))
    vae.train(was_training)
    return float(torch.cat(scores).mean()) if scores else float("nan")


def train_vae(components: SDComponents, images: PretrainingImages, settings: DiffusionPretrainingConfig,
              state: PretrainingState, history: HistoryFile, logger, progress: dict, cpu: bool) -> None:
    from tqdm.auto import tqdm

    accelerator = fresh_accelerator("no", cpu)
    vae = components.vae
    vae.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
    scheduler = cosine_schedule(optimizer, settings.warmup_steps, settings.vae_steps)
    start = 0
    if progress.get("phase") == "vae":
        start = state.load({"vae": vae}, None, optimizer, scheduler)["step"]
        log.info("pretraining: the VAE resumes at step %d of %d", start, settings.vae_steps)
    model, optimizer = accelerator.prepare(vae, optimizer)
    rows = LossRows("vae", settings.vae_steps, settings.log_every, history, logger, accelerator)
    seconds = progress.get("vae_seconds", 0.0)
    bar = tqdm(range(start, settings.vae_steps), desc="pretraining the VAE", unit="step", initial=start,
               total=settings.vae_steps, mininterval=1.0)
    window_start = time.perf_counter()
    for step in bar:
        draws = seeded_generator(settings.seed, 0, step)
        indices = batch_indices(len(images.train), settings.vae_batch_size, step, settings.seed, "vae")

        def loss_of(indices: torch.Tensor, draws: torch.Generator = draws) -> torch.Tensor:
            return vae_loss(model, images.train[indices], settings.vae_kl_weight, draws)

        result = optimizer_step(accelerator, model, optimizer, scheduler, [indices], loss_of, vae.parameters(),
                                settings.max_grad_norm)
        rows.record(step + 1, result, scheduler.get_last_lr()[0], bar)
        if (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.vae_steps:
            rows.check()
            seconds += time.perf_counter() - window_start
            window_start = time.perf_counter()
            state.save({"vae": vae}, None, optimizer, scheduler,
                       {"phase": "vae", "step": step + 1, "history": history.rows, "vae_seconds": seconds})
    progress["vae_seconds"] = seconds + time.perf_counter() - window_start
    vae.eval().requires_grad_(False)
    accelerator.free_memory()


@torch.no_grad()
def latent_scale(components: SDComponents, parameters: torch.Tensor) -> float:
    """1 / standard deviation of the training latents (Stable Diffusion's `scaling_factor`, 0.18215 for its VAE)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    latents = DiagonalGaussianDistribution(parameters).sample(generator=seeded_generator(0))
    return float(1.0 / latents.float().std())


def prompt_tokens(components: SDComponents, prompts: dict[str, str]) -> torch.Tensor:
    """Token ids of each class's prompt (CLASSES order) and, last, of the empty prompt."""
    texts = [prompts[label] for label in CLASSES] + [""]
    return components.tokenizer(texts, padding="max_length", truncation=True,
                                max_length=components.tokenizer.model_max_length, return_tensors="pt").input_ids


class Denoiser(torch.nn.Module):
    """The UNet and the text encoder as one trainable module: prompt states are encoded in every step."""

    def __init__(self, unet: torch.nn.Module, text_encoder: torch.nn.Module):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, noisy_latents, timesteps, encoder_states, return_dict=False):
        return self.unet(noisy_latents, timesteps, encoder_states, return_dict=return_dict)


def train_unet(components: SDComponents, images: PretrainingImages, diffusion_cfg: DiffusionConfig,
               state: PretrainingState, history: HistoryFile, logger, progress: dict, samples_dir: Path,
               cpu: bool) -> WeightAverage:
    from tqdm.auto import tqdm

    settings, prompts = diffusion_cfg.pretraining, plain(diffusion_cfg.prompts)
    accelerator = fresh_accelerator(settings.unet_precision, cpu)
    device = accelerator.device
    denoiser = Denoiser(components.unet, components.text_encoder).to(device)
    denoiser.requires_grad_(True).train()
    optimizer = torch.optim.AdamW([{"params": components.unet.parameters(), "lr": settings.unet_lr},
                                   {"params": components.text_encoder.parameters(), "lr": settings.text_encoder_lr}],
                                  weight_decay=1.0e-2)
    scheduler = cosine_schedule(optimizer, settings.warmup_steps, settings.unet_steps)
    average = WeightAverage(denoiser, settings.ema_decay)
    start = 0
    if progress.get("phase") == "unet":
        start = state.load({"vae": components.vae, "denoiser": denoiser}, average, optimizer, scheduler)["step"]
        log.info("pretraining: the UNet resumes at step %d of %d", start, settings.unet_steps)
    latent_cache = cache_latent_distributions(components, images.train, images.train.shape[-1], 64, device)
    tokens = prompt_tokens(components, prompts).to(device)
    model, optimizer = accelerator.prepare(denoiser, optimizer)
    rows = LossRows("unet", settings.unet_steps, settings.log_every, history, logger, accelerator)
    problem = None
    if images.validation_labels is not None and len(images.validation_labels):
        problem = validation_problem(components, images.validation, images.validation_labels,
                                     images.train.shape[-1], 64, device)

    def log_validation_loss(step: int) -> None:
        """The validation loss of the moving-average weights (those the base is saved with), as a history row."""
        if problem is None:
            return
        with average.applied(denoiser), accelerator.autocast():
            loss = validation_loss(components, components.unet, problem, class_states(denoiser, tokens),
                                   settings.unet_batch_size)
        row = {"pretrain/unet_step": step, "pretrain/unet_val_loss": loss}
        history.append(row)
        if logger is not None:
            logger.log_metrics(row)

    if start == 0:
        log_validation_loss(0)
    seconds = progress.get("unet_seconds", 0.0)
    empty_prompt = len(CLASSES)
    bar = tqdm(range(start, settings.unet_steps), desc="pretraining the UNet", unit="step", initial=start,
               total=settings.unet_steps, mininterval=1.0)
    window_start = time.perf_counter()
    for step in bar:
        draws = seeded_generator(settings.seed, 1, step)
        indices = batch_indices(len(images.train), settings.unet_batch_size, step, settings.seed, "unet")

        def loss_of(indices: torch.Tensor, draws: torch.Generator = draws) -> torch.Tensor:
            conditions = images.labels[indices].clone()
            conditions[torch.rand(len(indices), generator=draws) < settings.empty_prompt_fraction] = empty_prompt
            states = denoiser.text_encoder(tokens, return_dict=False)[0][conditions.to(device)]
            latents = sample_latents(components, latent_cache[indices].to(device), draws)
            return latent_loss(components, model, latents, states, draws, settings.min_snr_gamma)

        result = optimizer_step(accelerator, model, optimizer, scheduler, [indices], loss_of, denoiser.parameters(),
                                settings.max_grad_norm)
        average.update(denoiser)
        rows.record(step + 1, result, scheduler.get_last_lr()[0], bar)
        done = step + 1
        if settings.sample_every and done % settings.sample_every == 0 and done < settings.unet_steps:
            with average.applied(denoiser):
                save_grid(components, diffusion_cfg, samples_dir / f"step_{done:05d}.png", columns=4)
            log_validation_loss(done)
        if done % settings.checkpoint_every == 0 and done < settings.unet_steps:
            rows.check()
            seconds += time.perf_counter() - window_start
            window_start = time.perf_counter()
            state.save({"vae": components.vae, "denoiser": denoiser}, average, optimizer, scheduler,
                       {"phase": "unet", "step": done, "history": history.rows, "vae_seconds":
                        progress.get("vae_seconds", 0.0), "unet_seconds": seconds,
                        "vae_psnr": progress.get("vae_psnr"), "scaling_factor": progress.get("scaling_factor")})
    progress["unet_seconds"] = seconds + time.perf_counter() - window_start
    denoiser.eval().requires_grad_(False)
    log_validation_loss(settings.unet_steps)
    accelerator.free_memory()
    return average


@torch.no_grad()
def class_states(denoiser: Denoiser, tokens: torch.Tensor) -> torch.Tensor:
    """(C, L, D) text-encoder states of the class prompts (the empty prompt, last in `tokens`, left out)."""
    was_training = denoiser.text_encoder.training
    denoiser.text_encoder.eval()
    states = denoiser.text_encoder(tokens[:len(CLASSES)], return_dict=False)[0]
    denoiser.text_encoder.train(was_training)
    return states


def save_grid(components: SDComponents, diffusion_cfg: DiffusionConfig, path: Path, columns: int) -> Path:
    """One row per class, images drawn from fixed seeds (the same noise in every grid) with the preset's
    sampling settings."""
    generation, seed = diffusion_cfg.generation, diffusion_cfg.pretraining.seed
    was_training = components.unet.training
    components.unet.eval()
    pipeline = pipeline_from_components(components)
    rows = {label: sample(pipeline, diffusion_cfg.prompts[label], [image_seed(seed, label, i) for i in range(columns)],
                          generation.num_inference_steps, generation.guidance_scale, int(diffusion_cfg.resolution))
            for label in CLASSES}
    components.unet.train(was_training)
    with atomic_file(path, "wb") as handle:
        grid_image(rows).save(handle, format="PNG")
    return path


# ------------------------------------------------------------------------------------------- output


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def loss_summary(history: list[dict], phase: str) -> dict:
    losses = [row[f"pretrain/{phase}_loss"] for row in history if f"pretrain/{phase}_loss" in row]
    if not losses:
        return {}
    return {"first_logged": losses[0], "last_logged": losses[-1], "min_logged": min(losses)}


def model_card(cfg: JobConfig, images: PretrainingImages, components: SDComponents, key: str, progress: dict,
               history: list[dict]) -> dict:
    diffusion_cfg = cfg.diffusion_lora
    settings = diffusion_cfg.pretraining
    return {
        "name": diffusion_cfg.name, "settings_key": key, "resolution": int(diffusion_cfg.resolution),
        "architecture": plain(diffusion_cfg.architecture), "prompts": plain(diffusion_cfg.prompts),
        "parameters": {"vae": parameter_count(components.vae), "unet": parameter_count(components.unet),
                       "text_encoder": parameter_count(components.text_encoder)},
        "training_split": {"dataset": cfg.dataset.name, "fingerprint": images.fingerprint,
                           "images": len(images.train), "per_class": images.class_counts},
        "vae": {"steps": settings.vae_steps, "loss": loss_summary(history, "vae"),
                "validation_psnr_db": progress.get("vae_psnr"), "validation_images": len(images.validation),
                "scaling_factor": progress.get("scaling_factor"), "wall_seconds": round(progress["vae_seconds"], 1)},
        "unet": {"steps": settings.unet_steps, "loss": loss_summary(history, "unet"),
                 "validation_loss": loss_summary(history, "unet_val"), "validation_images": len(images.validation),
                 "wall_seconds": round(progress["unet_seconds"], 1)},
        "pretraining": plain(settings),
        "seed": settings.seed,
    }


def loss_text(loss: dict) -> str:
    """A phase's logged loss as `first -> last (lowest min)`."""
    return f"{loss['first_logged']:.4g} -> {loss['last_logged']:.4g} (lowest {loss['min_logged']:.4g})"


def card_text(card: dict) -> str:
    vae, unet, split = card["vae"], card["unet"], card["training_split"]
    return "\n".join([
        f"# {card['name']}: a Stable-Diffusion-shaped base pretrained from scratch by pneumo-exp", "",
        f"Trained on the training split of `{split['dataset']}` only ({split['images']} images, "
        f"{split['per_class']}; content fingerprint `{split['fingerprint']}`), at {card['resolution']} px.",
        f"Parameters: VAE {card['parameters']['vae']:,}, UNet {card['parameters']['unet']:,}, "
        f"text encoder {card['parameters']['text_encoder']:,}.", "",
        f"- VAE: {vae['steps']} steps in {vae['wall_seconds'] / 60:.1f} min, loss {loss_text(vae['loss'])}, "
        f"reconstruction PSNR on {vae['validation_images']} validation images {vae['validation_psnr_db']:.2f} dB, "
        f"latent scaling factor {vae['scaling_factor']:.4f}",
        f"- UNet + text encoder: {unet['steps']} steps in {unet['wall_seconds'] / 60:.1f} min, loss "
        f"{loss_text(unet['loss'])}" + (f"; validation denoising loss on {unet['validation_images']} images at fixed "
                                         f"noise and timesteps {loss_text(unet['validation_loss'])}"
                                         if unet.get("validation_loss") else ""),
        "", "Prompts: " + "; ".join(f"{label}: \"{prompt}\"" for label, prompt in card["prompts"].items()),
        "", "![samples](samples.png)", ""])


def write_base(target: Path, components: SDComponents, card: dict, train: list[Record],
               diffusion_cfg: DiffusionConfig) -> None:
    from diffusers import StableDiffusionPipeline

    def fill(staging: Path) -> None:
        pipeline = StableDiffusionPipeline(
            vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
            unet=components.unet, scheduler=components.noise_scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
        pipeline.save_pretrained(staging)
        save_grid(components, diffusion_cfg, staging / "samples.png",
                  columns=diffusion_cfg.pretraining.samples_per_class)
        write_training_record(staging, train)
        write_json_atomic(staging / MODEL_CARD, card)
        write_atomic(staging / "README.md", card_text(card))

    swap_folder(target, fill)


def existing_base(target: Path, key: str) -> bool:
    """True when `target` already holds this very base; a base of other settings there is refused."""
    if not (target / "model_index.json").is_file():
        return False
    card_file = target / MODEL_CARD
    stored = json.loads(card_file.read_text()).get("settings_key") if card_file.is_file() else None
    if stored != key:
        raise UserError("the folder already holds a base model pretrained with other settings or images",
                        where=str(target), fix="delete it to pretrain again, or set diffusion_lora.pretrained to "
                                               "another folder")
    return True


def pretrain_base(cfg: JobConfig, images: PretrainingImages, output_dir: Path, logger=None) -> Path:
    """Build the base of `cfg.diffusion_lora` for the training split from scratch; resumable; returns its folder."""
    diffusion_cfg = cfg.diffusion_lora
    settings = diffusion_cfg.pretraining
    target = split_base_folder(diffusion_cfg, images.train_records)
    key = settings_key(diffusion_cfg, images.fingerprint)
    if existing_base(target, key):
        log.info("%s holds this base already (same settings and images): nothing to do", target)
        return target
    state = PretrainingState(target, key)
    components = load_components(str(state.initial_model(plain(diffusion_cfg.architecture),
                                                         int(diffusion_cfg.resolution))))
    progress = state.progress()
    history = HistoryFile(output_dir / "pretrain" / "metrics.jsonl")
    history.restart(progress.get("history", []))
    torch.manual_seed(settings.seed)

    if progress.get("phase") != "unet":
        train_vae(components, images, settings, state, history, logger, progress, cfg.trainer.cpu)
        progress["vae_psnr"] = reconstruction_psnr(components.vae, images.validation)
        log.info("pretraining: VAE reconstruction PSNR on %d validation images: %.2f dB", len(images.validation),
                 progress["vae_psnr"])
        parameters = cache_latent_distributions(components, images.train, images.train.shape[-1], 64, "cpu")
        progress["scaling_factor"] = latent_scale(components, parameters)
        history.append({"pretrain/vae_psnr_db": progress["vae_psnr"],
                        "pretrain/scaling_factor": progress["scaling_factor"]})
    components.vae.register_to_config(scaling_factor=progress["scaling_factor"])

    average = train_unet(components, images, diffusion_cfg, state, history, logger, progress,
                         output_dir / "pretrain" / "samples", cfg.trainer.cpu)
    average.copy_to(Denoiser(components.unet, components.text_encoder))
    card = model_card(cfg, images, components, key, progress, history.rows)
    write_base(target, components, card, images.train_records, diffusion_cfg)
    shutil.rmtree(state.folder, ignore_errors=True)
    log.info("pretrained base written to %s", target)
    return target


def pretraining_images(data, resolution: int, cache_dir: str, progress: bool = True) -> PretrainingImages:
    """The real training split (and validation, for the VAE's reconstruction score and the validation loss) cached at
    `resolution`."""
    from collections import Counter

    from pneumo_exp.data.cache import open_or_build
    from pneumo_exp.labels import class_index

    train = [r for r in data.split("train") if r.source == "real"]
    validation = [r for r in data.split("val") if r.source == "real"]
    cache = open_or_build(train + validation, resolution, cache_dir, progress=progress)

    def pixels(records) -> torch.Tensor:
        return torch.from_numpy(np.asarray(cache.pixels[cache.rows_of(records)]).copy())

    return PretrainingImages(train=pixels(train), labels=torch.tensor([class_index(r.label) for r in train]),
                             validation=pixels(validation), fingerprint=content_fingerprint(train),
                             class_counts=dict(sorted(Counter(r.label for r in train).items())), train_records=train,
                             validation_labels=torch.tensor([class_index(r.label) for r in validation],
                                                            dtype=torch.int64))
