"""A vision-language backbone as a 3-class classifier: logits score an image embedding against class text embeddings.

The class text embeddings come from the prompts of each class (several templates, averaged), in the order of
`labels.CLASSES`; the score is the family's own (`backbone.py`: CLIP scale x cosine, SigLIP scale x cosine + bias).
Modes decide what trains: nothing (zero_shot), the class embeddings (linear_probe, initialised from the prompts), LoRA
adapters on the image and optionally the text encoder (lora), or everything (full).
"""

from __future__ import annotations

import logging
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from pneumo_exp.classify.backbone import (
    Preprocessing,
    backbone_source,
    check_image_size,
    check_lora_targets,
    load_backbone,
    tokenize_prompts,
)
from pneumo_exp.config import BackboneFamily, ClassifierMode, ClipConfig, ImageTower, plain
from pneumo_exp.labels import CLASSES
from pneumo_exp.validate import SettingError

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
log = logging.getLogger(__name__)
__all__ = ["backbone_source", "build_classifier", "load_backbone", "trainable_parameters"]


class PromptClassifier(nn.Module):
    def __init__(self, clip, family: BackboneFamily, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor | None,
                 templates_per_class: int, preprocessing: Preprocessing, text_trains: bool, center: bool,
                 learn_class_embeddings: bool):
        super().__init__()
        self.clip = clip  # the backbone model of either family (the name is what saved weights use)
        self.family = BackboneFamily(family)
        self.register_buffer("prompt_ids", prompt_ids, persistent=False)
        self.register_buffer("prompt_mask", prompt_mask, persistent=False)
        self.register_buffer("pixel_mean", torch.tensor(preprocessing.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(preprocessing.std).view(1, 3, 1, 1), persistent=False)
        self.preprocessing = preprocessing
        self.templates_per_class = templates_per_class
        self.text_trains = text_trains
        self.center = center
        self._frozen_class_embeddings: torch.Tensor | None = None
        self.class_embeddings = None
        if learn_class_embeddings:
            with torch.no_grad():
                self.class_embeddings = nn.Parameter(self.prompt_class_embeddings().float().clone())

    @property
    def embedding_dim(self) -> int:
        config = self.clip.config
        return config.projection_dim if self.family == BackboneFamily.clip else config.vision_config.hidden_size

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
        """float (B, 1, H, W) in [0, 1] -> (B, 3, S, S) as the checkpoint's image processor makes them: resized
        (its filter; PIL clips bicubic overshoot to the pixel range, so this clamps), centre-cropped, normalised."""
        resize, crop = self.preprocessing.resize, self.preprocessing.crop
        if images.shape[-1] != resize or images.shape[-2] != resize:
            images = F.interpolate(images, size=(resize, resize), mode=self.preprocessing.resample,
                                   align_corners=False, antialias=True).clamp(0.0, 1.0)
        if crop < resize:
            top = (resize - crop) // 2
            images = images[..., top:top + crop, top:top + crop]
        return (images.expand(-1, 3, -1, -1) - self.pixel_mean) / self.pixel_std

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The backbone's image embedding (B, D), before normalisation."""
        return self.clip.get_image_features(pixel_values=pixel_values.to(self.clip.dtype)).pooler_output

    def scores(self, cosines: torch.Tensor) -> torch.Tensor:
        """The family's logits from cosine similarities, with its pretrained scale (and bias)."""
        scale = self.clip.logit_scale.float().exp()
        if self.family == BackboneFamily.clip:
            return scale.clamp(max=100.0) * cosines
        return scale * cosines + self.clip.logit_bias.float()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: float (B, 1, H, W) in [0, 1] -> logits (B, C)."""
        image_embeddings = F.normalize(self.image_features(self.pixel_values(images)).float(), dim=-1)
        text_embeddings = self.class_text_embeddings().to(image_embeddings.device)
        return self.scores(image_embeddings @ text_embeddings.t())


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
    family = BackboneFamily(clip_cfg.family)
    if clip_cfg.image_tower == ImageTower.conv and family != BackboneFamily.clip:
        raise SettingError(f"clip_lora.image_tower=conv replaces a CLIP image tower, not a {family.value} one",
                           where="clip_lora.image_tower", fix="use image_tower=vit, or family=clip")
    clip, tokenizer, preprocessing = load_backbone(backbone_source(clip_cfg, cache_dir), clip_cfg.revision, family)
    if clip_cfg.image_tower == ImageTower.conv:
        attach_conv_tower(clip, clip_cfg.architecture["conv"], seed)
    else:
        check_image_size(clip_cfg, clip, preprocessing)
    prompt_ids, prompt_mask, templates = tokenize_prompts(tokenizer, plain(clip_cfg.prompts), clip, family,
                                                          clip_cfg.lowercase_prompts)
    if clip_cfg.gradient_checkpointing:
        enable_gradient_checkpointing(clip, clip_cfg)
    mode = ClassifierMode(clip_cfg.mode)
    clip.requires_grad_(mode == ClassifierMode.full)
    for fixed in ("logit_scale", "logit_bias"):  # a learnt temperature can collapse the logits; fine-tuners keep
        if hasattr(clip, fixed):                 # both as pretrained
            getattr(clip, fixed).requires_grad_(False)
    if not clip_cfg.train_text_encoder:
        clip.text_model.requires_grad_(False)  # SigLIP's text projection (`head`) is inside its text_model
        if family == BackboneFamily.clip:
            clip.text_projection.requires_grad_(False)
    peft_model = None
    if mode == ClassifierMode.lora:
        from peft import LoraConfig, get_peft_model

        towers = ["vision_model"] + (["text_model"] if clip_cfg.train_text_encoder else [])
        lora = LoraConfig(r=int(clip_cfg.lora.r), lora_alpha=float(clip_cfg.lora.alpha),
                          lora_dropout=float(clip_cfg.lora.dropout),
                          target_modules=check_lora_targets(clip, list(clip_cfg.lora.target_modules), towers))
        peft_model = get_peft_model(clip, lora)
        clip = peft_model.base_model.model  # the same modules, with LoRA layers injected in place
    text_trains = mode in (ClassifierMode.full, ClassifierMode.lora) and clip_cfg.train_text_encoder
    classifier = PromptClassifier(clip, family, prompt_ids, prompt_mask, templates, preprocessing,
                                  text_trains=text_trains, center=clip_cfg.center_class_embeddings,
                                  learn_class_embeddings=mode == ClassifierMode.linear_probe)
    return classifier, peft_model


def trainable_parameters(classifier: nn.Module) -> list[nn.Parameter]:
    return [p for p in classifier.parameters() if p.requires_grad]
