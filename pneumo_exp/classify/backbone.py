"""The vision-language backbone of the classifier, by family: where it comes from, how it reads prompts and images.

- **clip** (`CLIPModel`): text padded to the tower's 77 positions with the attention mask (its causal text tower pools
  the end-of-text token, so padding never reaches the pooled state); logits = scale x cosine, scale capped at 100 as
  CLIP's training capped it.
- **siglip** (`SiglipModel`: SigLIP, SigLIP 2 FixRes checkpoints such as google/siglip2-base-patch16-224, and
  MedSigLIP): text padded to the fixed length it was trained with (`padding="max_length"` to the tower's 64 positions,
  on the checkpoint tokenizer's own side and lowercasing) and passed *without* an attention mask: big_vision trained
  the bidirectional text tower on the full padded sequence and pools its last position, so masking the padding would
  feed the tower inputs it never saw. Logits = exp(logit_scale) x cosine + logit_bias, both as pretrained. The
  classes are exclusive, so probabilities are a softmax over the 3 logits (the bias, shared by all classes, cancels
  there; it is kept so the logits are the checkpoint's own scores). SigLIP 2 NaFlex (`Siglip2Model`) takes patch
  sequences and their shapes instead of images and is refused.

Images reach either family as the checkpoint's image processor prepares them (`Preprocessing`): side, resize filter,
centre crop, mean and std from its `preprocessor_config.json`; a grayscale X-ray is repeated over the 3 channels.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pneumo_exp.config import BackboneFamily, ClipConfig
from pneumo_exp.core.presets import MAX_TEXT_TOKENS, character_tokenizer, model_source
from pneumo_exp.hub import cannot_load, note_loaded
from pneumo_exp.labels import CLASSES
from pneumo_exp.validate import SettingError, check_templates

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # each family's normalisation, used when a checkpoint has none
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
SIGLIP_TEXT_TOKENS = 64
SIGLIP_PRETRAINING_LOGITS = (math.log(10.0), -10.0)  # logit scale and bias SigLIP pretraining starts from
PIL_FILTERS = {2: "bilinear", 3: "bicubic"}  # PIL resample codes a processor config names -> F.interpolate modes


def model_class(family: BackboneFamily):
    from transformers import CLIPModel, SiglipModel

    return {BackboneFamily.clip: CLIPModel, BackboneFamily.siglip: SiglipModel}[BackboneFamily(family)]


# ------------------------------------------------------------------------------------------- random-init presets


def build_random(family: BackboneFamily, architecture: dict, image_size: int, folder: Path) -> None:
    """Save a randomly initialised model of `family`, its tokenizer and image processor as a checkpoint folder,
    drawn from seed 0 without touching the caller's random state (a run that built the folder draws its LoRA
    weights as a run that found it built)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        save_random(family, architecture, image_size, folder)


def save_random(family: BackboneFamily, architecture: dict, image_size: int, folder: Path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessorPil, SiglipConfig, SiglipImageProcessorPil
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # its "Writing model shards" bar, for one small file
    tokenizer = character_tokenizer()
    special = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = {**architecture.get("vision", {}), "image_size": image_size, "num_channels": 3}
    if family == BackboneFamily.clip:
        text = {"max_position_embeddings": MAX_TEXT_TOKENS, **architecture.get("text", {}), **special}
        model = model_class(family)(CLIPConfig(text_config=text, vision_config=vision,
                                               projection_dim=architecture.get("projection_dim", 64)))
        processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                          crop_size={"height": image_size, "width": image_size},
                                          image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    else:
        text = {"max_position_embeddings": SIGLIP_TEXT_TOKENS, "projection_size": vision.get("hidden_size", 768),
                **architecture.get("text", {}), **special}
        model = model_class(family)(SiglipConfig(text_config=text, vision_config=vision))
        with torch.no_grad():  # transformers initialises both at 0; SigLIP pretraining starts at log 10 and -10
            model.logit_scale.fill_(SIGLIP_PRETRAINING_LOGITS[0])
            model.logit_bias.fill_(SIGLIP_PRETRAINING_LOGITS[1])
        processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size},
                                            image_mean=list(SIGLIP_MEAN), image_std=list(SIGLIP_STD))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor.save_pretrained(folder)


def backbone_source(clip_cfg: ClipConfig, cache_dir: str | os.PathLike) -> str:
    """Where to load the backbone from: the configured hub id or folder, or a random-init preset saved once."""
    family = BackboneFamily(clip_cfg.family)
    return model_source("clip_lora", clip_cfg, clip_cfg.image_size, cache_dir, family.value, "config.json",
                        lambda architecture, size, folder: build_random(family, architecture, size, folder))


# ---------------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Preprocessing:
    """How the checkpoint's image processor turns an image into pixel values, for a square image."""
    resize: int  # side the image is resized to
    crop: int  # side of the centre crop taken after resizing (= resize: none)
    resample: str  # bilinear | bicubic
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str  # where these came from

    def as_dict(self) -> dict:
        return asdict(self)


def side(size: dict | int | None) -> int | None:
    """The side a processor's `size` / `crop_size` gives a square image."""
    if isinstance(size, int):
        return size
    if isinstance(size, dict):
        return size.get("shortest_edge") or size.get("height")
    return None


def read_preprocessing(source: str, revision: str | None, family: BackboneFamily, model_side: int) -> Preprocessing:
    """The checkpoint's preprocessor_config.json as a `Preprocessing`; without one, the family's defaults at the
    vision tower's own size."""
    from transformers.image_processing_base import ImageProcessingMixin

    try:
        values, _ = ImageProcessingMixin.get_image_processor_dict(source, revision=revision)
        origin = "preprocessor_config.json"
    except OSError:
        values, origin = {}, f"{family.value} defaults (the checkpoint has no preprocessor_config.json)"
    clip = family == BackboneFamily.clip
    resize = side(values.get("size")) if values.get("do_resize", True) else None
    crop = side(values.get("crop_size")) if values.get("do_center_crop", clip) else None
    resize = resize or crop or model_side
    return Preprocessing(resize=resize, crop=crop or resize,
                         resample=PIL_FILTERS.get(values.get("resample", 3), "bilinear"),
                         mean=tuple(values.get("image_mean", CLIP_MEAN if clip else SIGLIP_MEAN)),
                         std=tuple(values.get("image_std", CLIP_STD if clip else SIGLIP_STD)), source=origin)


def load_backbone(source: str, revision: str | None = None, family: BackboneFamily = BackboneFamily.clip):
    """The model of `family`, its tokenizer and its `Preprocessing`, from a hub id (at `revision`) or a folder."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    family = BackboneFamily(family)
    transformers_logging.disable_progress_bar()
    try:
        model = AutoModel.from_pretrained(source, revision=revision)
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
    except OSError as error:
        raise cannot_load("clip_lora.pretrained", source, revision, error,
                          "config.json, weights and tokenizer files") from None
    expected = model_class(family)
    if type(model) is not expected:
        raise SettingError(f"{source!r} holds a {type(model).__name__}, not a {expected.__name__}",
                           where="clip_lora.family",
                           fix="set clip_lora.family=clip for CLIPModel and =siglip for SiglipModel checkpoints "
                               "(SigLIP, SigLIP 2 FixRes, MedSigLIP); SigLIP 2 NaFlex is not supported")
    note_loaded(source, revision, "config.json")
    preprocessing = read_preprocessing(source, revision, family, model.config.vision_config.image_size)
    return model, tokenizer, preprocessing


def check_image_size(clip_cfg: ClipConfig, model, preprocessing: Preprocessing) -> None:
    """A ViT tower sees what it was trained on: `clip_lora.image_size` is its size and its processor's crop."""
    trained = {model.config.vision_config.image_size, preprocessing.crop}
    if trained != {clip_cfg.image_size}:
        raise SettingError(f"clip_lora.image_size={clip_cfg.image_size}, but {clip_cfg.pretrained or clip_cfg.name} "
                           f"was trained on {sorted(trained)} px images ({preprocessing.source})",
                           where="clip_lora.image_size",
                           fix=f"set clip_lora.image_size={preprocessing.crop} (and dataset.resolution to match)")


# ----------------------------------------------------------------------------------------------------- prompts


def tokenize_prompts(tokenizer, prompts: dict, model, family: BackboneFamily, lowercase: bool = False):
    """Token ids (C*T, L), the attention mask the family's text tower takes (None for SigLIP: see the module
    docstring) and T, for T templates per class in `CLASSES` order, padded to the tower's trained length L."""
    check_templates(prompts, "clip_lora.prompts")
    texts = [text.lower() if lowercase else text for label in CLASSES for text in prompts[label]]
    encoded = tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt",
                        max_length=model.config.text_config.max_position_embeddings)
    mask = encoded.attention_mask if BackboneFamily(family) == BackboneFamily.clip else None
    return encoded.input_ids, mask, len(prompts[CLASSES[0]])


# -------------------------------------------------------------------------------------------------------- LoRA


def lora_target_pattern(target_modules: list[str], towers: list[str]) -> str:
    """A regex peft matches against full module names, limiting LoRA to the chosen encoder towers. SigLIP's
    attention-pooling head is an `nn.MultiheadAttention`, whose forward reads `out_proj.weight` directly: a LoRA
    layer on that `out_proj` would never run, so the pattern leaves it out."""
    modules = "|".join(re.escape(name) for name in target_modules)
    return rf"({'|'.join(towers)})\.(?!head\.attention\.).*\.({modules})"


def check_lora_targets(model, target_modules: list[str], towers: list[str]) -> str:
    """The pattern for `target_modules` in `towers`, after checking that every name adapts at least one layer."""
    pattern = lora_target_pattern(target_modules, towers)
    matched = [name for name, _ in model.named_modules() if re.fullmatch(pattern, name)]
    missing = [target for target in target_modules if not any(name.endswith("." + target) for name in matched)]
    if missing:
        layers = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and name.split(".")[0] in towers})
        raise SettingError(f"{missing} match no layer of the {' and '.join(towers)} of this {type(model).__name__}",
                           where="clip_lora.lora.target_modules", fix=f"choose among {layers}")
    return pattern
