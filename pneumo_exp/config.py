"""Typed schemas for the config groups, registered in Hydra's ConfigStore.

Each YAML file of a typed group starts with ``defaults: [<group>_schema, _self_]``, so a misspelt key or a value of
the wrong type fails when the config is composed, naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from pneumo_exp.data.augment import AugmentSettings
from pneumo_exp.diffusion.settings import DiffusionGenerationConfig, DiffusionTrainingConfig
from pneumo_exp.labels import CLASSES


@dataclass
class DatasetConfig:
    name: str = MISSING
    kind: str = MISSING  # fixed by the schema below: phantom | kermany | folder
    resolution: int = 128  # side of the square uint8 images kept in the cache
    val_fraction: float = 0.15  # share of training patients moved to validation
    split_seed: int = 0
    limit_per_class: Optional[int] = None  # a short run: whole patients, up to N images per class and split; null = all
    skip_bad_images: bool = False  # True: skip unreadable or unrecognised files and report them
    check_images: bool = True  # verify every image header while building the manifest
    min_image_side: int = 32  # with check_images: refuse (or skip) images whose shorter side has fewer pixels


@dataclass
class PhantomDatasetConfig(DatasetConfig):
    kind: str = "phantom"
    patients_per_class: int = 24
    test_patients_per_class: int = 8
    images_per_patient: int = 3
    difficulty: float = 0.5  # 0 = obvious lesions, 1 = subtle
    seed: int = 0


@dataclass
class KermanyDatasetConfig(DatasetConfig):
    kind: str = "kermany"
    root: str = MISSING  # a folder or a .zip in the Kaggle, Mendeley or class-folder layout
    extract_dir: Optional[str] = None  # where a .zip is extracted; default under paths.cache_dir
    max_extract_bytes: int = 20_000_000_000  # a .zip that would inflate to more is refused before extraction
    max_compression_ratio: float = 200.0  # so is one with a member inflating more than this many times


@dataclass
class FolderDatasetConfig(DatasetConfig):
    kind: str = "folder"
    root: Optional[str] = None  # a {split}/{class}/image tree
    manifest: Optional[str] = None  # or a CSV with columns path,label,patient_id,split
    class_aliases: dict[str, str] = field(default_factory=dict)


@dataclass
class LoraSpec:
    r: int = 16
    alpha: float = 32.0  # kept separate from r: the update is scaled by alpha / r
    dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])


class ClassifierMode(str, Enum):
    zero_shot = "zero_shot"
    linear_probe = "linear_probe"
    lora = "lora"
    full = "full"


class ImageTower(str, Enum):
    vit = "vit"
    conv = "conv"


def default_prompts() -> dict[str, list[str]]:
    return {
        "NORMAL": ["An image of normal chest X-ray", "a chest radiograph with clear lungs"],
        "BACTERIA": ["An image of bacteria chest X-ray", "a chest radiograph with lobar consolidation"],
        "VIRUS": ["An image of virus chest X-ray", "a chest radiograph with diffuse interstitial opacities"],
    }


@dataclass
class ClipConfig:
    name: str = MISSING
    pretrained: Optional[str] = None  # hub id or local directory; null builds `architecture` with random weights
    revision: Optional[str] = None  # hub commit hash (or branch/tag) to load; null: the hub's main
    architecture: Optional[dict[str, Any]] = None  # CLIPConfig keyword arguments for the random-init presets
    image_size: int = 224
    image_tower: ImageTower = ImageTower.vit  # conv: a residual CNN in place of the ViT (from-scratch presets)
    mode: ClassifierMode = ClassifierMode.lora
    lora: LoraSpec = field(default_factory=LoraSpec)
    train_text_encoder: bool = False  # the text side trains too: LoRA on it (lora) or all its weights (full)
    center_class_embeddings: bool = False  # subtract the class mean: keeps random-init text towers apart
    gradient_checkpointing: bool = False  # recompute the transformer layers in backward: less memory, more time
    prompts: dict[str, list[str]] = field(default_factory=default_prompts)


@dataclass
class DiffusionConfig:
    name: str = MISSING
    pretrained: Optional[str] = None  # hub id or local directory of a Stable Diffusion pipeline
    revision: Optional[str] = None  # hub commit hash (or branch/tag) to load; null: the hub's main
    architecture: Optional[dict[str, Any]] = None  # sizes of the random-init tiny pipeline
    resolution: int = 512  # must match the base model: 512 for SD 1.5 / 2.1-base, 768 for SD 2
    allow_non_native_resolution: bool = False  # true: train at a resolution other than the base model's
    lora: LoraSpec = field(default_factory=lambda: LoraSpec(r=4, alpha=16.0, dropout=0.1,
                                                             target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    prompts: dict[str, str] = field(default_factory=lambda: {
        "NORMAL": "a pediatric chest X-ray, normal lungs",
        "BACTERIA": "a pediatric chest X-ray, bacterial pneumonia",
        "VIRUS": "a pediatric chest X-ray, viral pneumonia",
    })
    training: DiffusionTrainingConfig = field(default_factory=DiffusionTrainingConfig)
    generation: DiffusionGenerationConfig = field(default_factory=DiffusionGenerationConfig)
    trained_lora: Optional[str] = None  # a LoRA folder from an earlier run: synthesize without the diffusion stage


class AugmentationStrategy(str, Enum):
    none = "none"
    balance = "balance"  # every class up to the largest
    ratio = "ratio"  # synthetic = ratio x real, per class overridable
    fixed = "fixed"  # an explicit number per class


@dataclass
class AugmentationConfig:
    name: str = MISSING
    strategy: AugmentationStrategy = AugmentationStrategy.none
    ratio: float = 0.0
    per_class_ratio: dict[str, float] = field(default_factory=dict)
    per_class_count: dict[str, int] = field(default_factory=lambda: {label: 0 for label in CLASSES})  # fixed


class ClassBalance(str, Enum):
    none = "none"
    weighted_loss = "weighted_loss"  # cross-entropy weighted by inverse class frequency
    sampler = "sampler"  # draw training images with probability inverse to their class size


class Precision(str, Enum):
    no = "no"
    bf16 = "bf16"
    fp16 = "fp16"


@dataclass
class TrainerConfig:
    epochs: int = 3
    batch_size: int = 32
    eval_batch_size: int = 128
    grad_accum_steps: int = 1  # optimizer step every N batches; the effective batch is batch_size x N x processes
    max_grad_norm: float = 1.0  # 0 turns clipping off
    precision: Precision = Precision.no
    class_balance: ClassBalance = ClassBalance.weighted_loss
    augment: bool = True
    augment_settings: AugmentSettings = field(default_factory=AugmentSettings)  # ranges of the random transforms
    ema_decay: float = 0.0  # >0: validate, keep and test an exponential moving average of the weights; 0 turns it off
    max_steps_per_epoch: Optional[int] = None  # cap for smoke tests
    max_eval_batches: Optional[int] = None  # cap of validation batches per process, for smoke tests
    cap_test: bool = False  # the cap applies to the test split too (its metrics are then no result)
    save_optimizer_state: bool = True  # false: checkpoints/last holds no optimizer state (resume restarts it)
    bootstrap_samples: int = 1000
    cpu: bool = False  # force the CPU even where a GPU is present


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1  # share of optimizer steps with linear warm-up, then cosine decay to zero
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


class LoggerMode(str, Enum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


@dataclass
class LoggerConfig:
    mode: LoggerMode = LoggerMode.offline
    project: str = "pneumo_exp"
    entity: Optional[str] = None
    group: str = "${experiment_name}"


SCHEMAS = {
    ("dataset", "phantom_schema"): PhantomDatasetConfig,
    ("dataset", "kermany_schema"): KermanyDatasetConfig,
    ("dataset", "folder_schema"): FolderDatasetConfig,
    ("clip_lora", "clip_schema"): ClipConfig,
    ("diffusion_lora", "diffusion_schema"): DiffusionConfig,
    ("augmentation", "augmentation_schema"): AugmentationConfig,
    ("trainer", "trainer_schema"): TrainerConfig,
    ("optim", "optim_schema"): OptimConfig,
    ("logger", "logger_schema"): LoggerConfig,
}


def register_schemas() -> None:
    store = ConfigStore.instance()
    for (group, name), schema in SCHEMAS.items():
        store.store(group=group, name=name, node=schema)


def check_class_keys(mapping: dict, key: str) -> None:
    """Per-class settings must name exactly the known classes."""
    unknown = set(mapping) - set(CLASSES)
    if unknown:
        raise ValueError(f"{key}: unknown class(es) {sorted(unknown)}; expected names from {list(CLASSES)}")
