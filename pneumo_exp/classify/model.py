"""CLIP as a 3-class classifier: logits = logit_scale x cos(image embedding, class text embedding).

The class text embeddings come from the prompts of each class (several templates, averaged), in the order of
`labels.CLASSES`. Modes decide what trains: nothing (zero_shot), the class embeddings (linear_probe, initialised
from the prompts), LoRA adapters on the image and optionally the text encoder (lora), or everything (full).
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pneumo_exp.config import ClassifierMode, ClipConfig, plain
from pneumo_exp.core.presets import MAX_TEXT_TOKENS, character_tokenizer, model_source
from pneumo_exp.hub import cannot_load, note_loaded
from pneumo_exp.labels import CLASSES
from pneumo_exp.validate import check_templates

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
log = logging.getLogger(__name__)

DEFAULT_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's normalisation, used when a checkpoint has none
DEFAULT_STD = (0.26862954, 0.26130258, 0.27577711)


def build_random_clip(architecture: dict, image_size: int, folder: Path) -> None:
    """Save a randomly initialised CLIP, its tokenizer and image processor as a loadable checkpoint folder."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    tokenizer = character_tokenizer()
    special = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    text = {"max_position_embeddings": MAX_TEXT_TOKENS, **architecture.get("text", {}), **special}
    vision = {**architecture.get("vision", {}), "image_size": image_size, "num_channels": 3}
    config = CLIPConfig(text_config=text, vision_config=vision,
                        projection_dim=architecture.get("projection_dim", 64))
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                       image_mean=list(DEFAULT_MEAN), image_std=list(DEFAULT_STD)).save_pretrained(folder)


def backbone_source(clip_cfg: ClipConfig, cache_dir: str | os.PathLike) -> str:
    """Where to load CLIP from: the configured hub id or folder, or a random-init preset saved once in the cache."""
    return model_source("clip_lora", clip_cfg, clip_cfg.image_size, cache_dir, "clip", "config.json",
                        build_random_clip)


def load_backbone(source: str, revision: str | None = None):
    """CLIPModel, tokenizer and (mean, std) from a hub id (at `revision`) or a local folder."""
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    try:
        clip = CLIPModel.from_pretrained(source, revision=revision)
        tokenizer = CLIPTokenizer.from_pretrained(source, revision=revision)
    except OSError as error:
        raise cannot_load("clip_lora.pretrained", source, revision, error,
                          "config.json, weights and tokenizer files") from None
    note_loaded(source, revision, "config.json")
    try:
        processor = CLIPImageProcessorPil.from_pretrained(source, revision=revision)  # only its mean and std are used
        mean, std = tuple(processor.image_mean), tuple(processor.image_std)
    except OSError:
        mean, std = DEFAULT_MEAN, DEFAULT_STD
    return clip, tokenizer, (mean, std)


def tokenize_prompts(tokenizer, prompts: dict, max_length: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Token ids (C*T, L) and mask for T templates per class, classes in `CLASSES` order."""
    check_templates(prompts, "clip_lora.prompts")
    texts = [text for label in CLASSES for text in prompts[label]]
    encoded = tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt",
                        max_length=max_length)
    return encoded.input_ids, encoded.attention_mask, len(prompts[CLASSES[0]])


class PromptClassifier(nn.Module):
    def __init__(self, clip, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, templates_per_class: int,
                 mean: tuple, std: tuple, image_size: int, text_trains: bool, center: bool,
                 learn_class_embeddings: bool):
        super().__init__()
        self.clip = clip
        self.register_buffer("prompt_ids", prompt_ids, persistent=False)
        self.register_buffer("prompt_mask", prompt_mask, persistent=False)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.templates_per_class = templates_per_class
        self.image_size = image_size
        self.text_trains = text_trains
        self.center = center
        self._frozen_class_embeddings: torch.Tensor | None = None
        self.class_embeddings = None
        if learn_class_embeddings:
            with torch.no_grad():
                self.class_embeddings = nn.Parameter(self.prompt_class_embeddings().float().clone())

    def prompt_class_embeddings(self) -> torch.Tensor:
        """(C, D) unit vectors: each class's template embeddings, normalised, averaged, normalised again.

        With `center`, the part all classes share is removed first; a random-init text tower maps every prompt
        to nearly the same vector (cosine ~0.98), which leaves the image tower almost nothing to aim at."""
        features = self.clip.get_text_features(input_ids=self.prompt_ids, attention_mask=self.prompt_mask)
        features = F.normalize(features.pooler_output.float(), dim=-1)
        features = features.view(len(CLASSES), self.templates_per_class, -1).mean(dim=1)
        if self.center:
            features = features - features.mean(dim=0, keepdim=True)
        return F.normalize(features, dim=-1)

    def class_text_embeddings(self) -> torch.Tensor:
        if self.class_embeddings is not None:
            return F.normalize(self.class_embeddings, dim=-1)
        if self.text_trains:
            return self.prompt_class_embeddings()
        if self._frozen_class_embeddings is None:  # frozen text side: encode the prompts once
            with torch.no_grad():
                self._frozen_class_embeddings = self.prompt_class_embeddings()
        return self._frozen_class_embeddings

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """float (B, 1, H, W) in [0, 1] -> normalised (B, 3, S, S) for the image encoder."""
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        return (images.expand(-1, 3, -1, -1) - self.pixel_mean) / self.pixel_std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: float (B, 1, H, W) in [0, 1] -> logits (B, C)."""
        pixel_values = self.pixel_values(images).to(self.clip.visual_projection.weight.dtype)
        image_features = self.clip.get_image_features(pixel_values=pixel_values).pooler_output
        image_embeddings = F.normalize(image_features.float(), dim=-1)
        text_embeddings = self.class_text_embeddings().to(image_embeddings.device)
        scale = self.clip.logit_scale.float().exp().clamp(max=100.0)
        return scale * image_embeddings @ text_embeddings.t()


def lora_target_pattern(target_modules: list[str], towers: list[str]) -> str:
    """A regex peft matches against full module names, limiting LoRA to the chosen encoder towers."""
    modules = "|".join(re.escape(name) for name in target_modules)
    return rf"({'|'.join(towers)})\..*\.({modules})"


def attach_conv_tower(clip, conv: dict, seed: int) -> None:
    """Swap CLIP's vision transformer for a residual CNN and re-draw the image projection, from `seed`: each seed
    of a from-scratch run starts elsewhere, and rebuilding with the run's seed gives the same weights."""
    from pneumo_exp.classify.conv_tower import ConvVisionTower

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        clip.vision_model = ConvVisionTower(widths=list(conv["widths"]),
                                            blocks_per_stage=int(conv["blocks_per_stage"]),
                                            hidden_size=clip.config.vision_config.hidden_size)
        clip.visual_projection.reset_parameters()


def enable_gradient_checkpointing(clip, clip_cfg: ClipConfig) -> None:
    """transformers' checkpointing of the encoder layers (non-reentrant: works with frozen inputs under LoRA)."""
    if hasattr(clip, "activation_checkpointing_enable"):  # transformers >= 5.24 renamed gradient_checkpointing_enable
        clip.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        clip.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if clip_cfg.image_tower == "conv":
        log.info("clip_lora=%s: the conv image tower ignores gradient checkpointing (the text tower uses it)",
                 clip_cfg.name)


def build_classifier(clip_cfg: ClipConfig, cache_dir: str | os.PathLike, seed: int = 0):
    """The classifier with the configured mode applied; returns (classifier, peft_model or None). `seed` draws the
    weights a from-scratch image tower starts from (pretrained and random-init ViT bases are the same for all)."""
    clip, tokenizer, (mean, std) = load_backbone(backbone_source(clip_cfg, cache_dir), clip_cfg.revision)
    if clip_cfg.image_tower == "conv":
        attach_conv_tower(clip, clip_cfg.architecture["conv"], seed)
    prompt_ids, prompt_mask, templates = tokenize_prompts(tokenizer, plain(clip_cfg.prompts),
                                                          clip.config.text_config.max_position_embeddings)
    if clip_cfg.gradient_checkpointing:
        enable_gradient_checkpointing(clip, clip_cfg)
    mode = ClassifierMode(clip_cfg.mode)
    clip.requires_grad_(mode == ClassifierMode.full)
    clip.logit_scale.requires_grad_(False)  # a learnt temperature can collapse the logits; fine-tuners keep it fixed
    if not clip_cfg.train_text_encoder:
        clip.text_model.requires_grad_(False)
        clip.text_projection.requires_grad_(False)
    peft_model = None
    if mode == ClassifierMode.lora:
        from peft import LoraConfig, get_peft_model

        towers = ["vision_model"] + (["text_model"] if clip_cfg.train_text_encoder else [])
        lora = LoraConfig(r=int(clip_cfg.lora.r), lora_alpha=float(clip_cfg.lora.alpha),
                          lora_dropout=float(clip_cfg.lora.dropout),
                          target_modules=lora_target_pattern(list(clip_cfg.lora.target_modules), towers))
        peft_model = get_peft_model(clip, lora)
        clip = peft_model.base_model.model  # the same modules, with LoRA layers injected in place
    text_trains = mode in (ClassifierMode.full, ClassifierMode.lora) and clip_cfg.train_text_encoder
    classifier = PromptClassifier(clip, prompt_ids, prompt_mask, templates, mean, std, clip_cfg.image_size,
                                  text_trains=text_trains, center=clip_cfg.center_class_embeddings,
                                  learn_class_embeddings=mode == ClassifierMode.linear_probe)
    return classifier, peft_model


def trainable_parameters(classifier: nn.Module) -> list[nn.Parameter]:
    return [p for p in classifier.parameters() if p.requires_grad]
