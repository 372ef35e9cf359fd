"""Every schema of the config, registered in Hydra's ConfigStore, and the one conversion to typed objects.

`conf/config.yaml` starts with ``job_schema`` and each YAML file of a group with ``defaults: [<group>_schema,
_self_]``, so a misspelt key or a value of the wrong type fails when the config is composed, naming the key. A job
converts the composed config once (`job_config`) and the stages take the typed objects.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from pneumo_exp.labels import CLASSES


@dataclass
class DatasetConfig:
    name: str = MISSING
    kind: str = MISSING  # fixed by the schema below: phantom | kermany | folder
    resolution: int = 128  # side of the square uint8 images kept in the cache
    intensity: str = "none"  # none | equalize: per-image histogram equalisation before the cache, every split alike
    val_fraction: float = 0.15  # share of training patients moved to validation
    split_seed: int = 0
    train_fraction: float = 1.0  # share of the training split kept: whole patients, stratified by class, nested for
    #                              a split_seed (the 0.05 subset lies inside the 0.1 one); validation and test untouched
    limit_per_class: int | None = None  # a short run: whole patients, up to N images per class and split; null = all
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
    extract_dir: str | None = None  # where a .zip is extracted; default under paths.cache_dir
    max_extract_bytes: int = 20_000_000_000  # a .zip that would inflate to more is refused before extraction
    max_compression_ratio: float = 200.0  # so is one with a member inflating more than this many times


@dataclass
class FolderDatasetConfig(DatasetConfig):
    kind: str = "folder"
    root: str | None = None  # a {split}/{class}/image tree
    manifest: str | None = None  # or a CSV with columns path,label,patient_id,split
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


class BackboneFamily(str, Enum):
    clip = "clip"  # CLIPModel: softmax-trained, logits = scale x cosine
    siglip = "siglip"  # SiglipModel (SigLIP, SigLIP 2 FixRes, MedSigLIP): sigmoid-trained, scale x cosine + bias


@dataclass
class ClipConfig:
    name: str = MISSING
    family: BackboneFamily = BackboneFamily.clip  # which model class `pretrained` holds (classify/model.py)
    pretrained: str | None = None  # hub id or local directory; null builds `architecture` with random weights
    revision: str | None = None  # hub commit hash (or branch/tag) to load; null: the hub's main
    architecture: dict[str, Any] | None = None  # CLIPConfig / SiglipConfig keyword arguments (random-init presets)
    image_size: int = 224
    allow_resize: bool = False  # true: train on dataset.resolution images resized to image_size in every batch
    image_tower: ImageTower = ImageTower.vit  # conv: a residual CNN in place of the ViT (from-scratch presets)
    mode: ClassifierMode = ClassifierMode.lora
    lora: LoraSpec = field(default_factory=LoraSpec)
    train_text_encoder: bool = False  # the text side trains too: LoRA on it (lora) or all its weights (full)
    center_class_embeddings: bool = False  # subtract the class mean: keeps random-init text towers apart
    gradient_checkpointing: bool = False  # recompute the transformer layers in backward: less memory, more time
    lowercase_prompts: bool = False  # lowercase the prompts first (SigLIP 2 trained on lowercased text)
    prompts: dict[str, list[str]] = MISSING  # class -> prompt templates: conf/clip_lora/prompts/


class Precision(str, Enum):
    no = "no"
    bf16 = "bf16"
    fp16 = "fp16"
    auto = "auto"  # bf16 where the device computes it natively (GPU with bf16, CPU with AVX-512 bf16 or AMX), else no


@dataclass
class DiffusionTrainingConfig:
    epochs: int = 5
    max_train_steps: int | None = None  # optimizer steps; when set, it ends training (and overrides epochs)
    batch_size: int = 4  # per process and micro-batch
    grad_accum_steps: int = 1  # optimizer step every N micro-batches: effective batch = batch x N x processes
    lr: float = 1.0e-4
    weight_decay: float = 1.0e-2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1.0e-8
    warmup_ratio: float = 0.05  # share of optimizer steps with linear warm-up, then cosine decay to zero
    max_grad_norm: float = 1.0  # 0 turns clipping off
    min_snr_gamma: float | None = None  # e.g. 5.0: min-SNR-gamma loss weighting; null = plain MSE
    noise_offset: float = 0.0
    crop_min_side: float = 0.9  # random square crops of side in [crop_min_side, 1] x image side; 1 = no crop
    cache_latents: bool = False  # VAE posteriors computed once per image before training (needs crop_min_side=1)
    gradient_checkpointing: bool = False  # UNet activations recomputed in the backward pass: less memory, slower
    precision: str | None = None  # no | bf16 | fp16 (LoRA parameters stay fp32); null: trainer.precision
    seed: int | None = None  # null: the run's top-level seed
    log_every: int = 10  # optimizer steps between loss rows in diffusion/metrics.jsonl (and W&B)
    validation_every: int = 500  # optimizer steps between validation grids and losses (and both at the end); 0 =
    #                              no grids, the validation loss only at the start and the end
    keep: str = "last"  # last | best_val_loss: the LoRA saved is the last one, or the one of the lowest validation loss
    validation_images_per_class: int | None = None  # null: 4 on a GPU, 1 on the CPU
    validation_inference_steps: int = 20
    validation_guidance_scale: float = 7.5

    def validation_images(self, device_type: str) -> int:
        if self.validation_images_per_class is not None:
            return self.validation_images_per_class
        return 1 if device_type == "cpu" else 4


@dataclass
class DiffusionGenerationConfig:
    num_inference_steps: int = 25  # DPM-Solver++ multistep
    guidance_scale: float = 7.5
    batch_size: int = 8
    seed: int | None = None  # null: the run's top-level seed
    precision: str = "no"  # no | fp16 | bf16: the dtype of the pipeline's weights while sampling


@dataclass
class DiffusionPretrainingConfig:
    """`diffusion_lora.pretraining`: how `task=pretrain_diffusion` trains the preset's base from scratch on the
    training split (VAE first, then UNet and text encoder) into the folder `diffusion_lora.pretrained`."""
    vae_steps: int = 800
    vae_batch_size: int = 32
    vae_lr: float = 1.0e-3
    vae_kl_weight: float = 1.0e-6  # the KL term keeps the latent space smooth; reconstruction dominates
    unet_steps: int = 6000
    unet_batch_size: int = 32
    unet_lr: float = 5.0e-4
    text_encoder_lr: float = 1.0e-4  # the text encoder learns with the UNet, so the class prompts come apart
    unet_precision: str = "no"  # no | bf16 | fp16 (the VAE trains in fp32); bf16 pays only with bf16 hardware
    empty_prompt_fraction: float = 0.1  # share of UNet examples with the empty prompt: classifier-free guidance
    min_snr_gamma: float | None = 5.0
    ema_decay: float = 0.999  # the UNet and text encoder saved are this moving average of the trained weights
    warmup_steps: int = 100
    max_grad_norm: float = 1.0
    checkpoint_every: int = 250  # optimizer steps between resume checkpoints
    log_every: int = 25
    sample_every: int = 1000  # UNet steps between sample grids in the run folder; 0 = only the final grid
    samples_per_class: int = 8  # in the model card's grid
    seed: int = 0


@dataclass
class DiffusionConfig:
    name: str = MISSING
    pretrained: str | None = None  # hub id or local directory of a Stable Diffusion pipeline
    revision: str | None = None  # hub commit hash (or branch/tag) to load; null: the hub's main
    architecture: dict[str, Any] | None = None  # sizes of the random-init tiny pipeline
    resolution: int = 512  # must match the base model: 512 for SD 1.5 / 2.1-base, 768 for SD 2
    allow_non_native_resolution: bool = False  # true: train at a resolution other than the base model's
    lora: LoraSpec = field(default_factory=lambda: LoraSpec(r=4, alpha=16.0, dropout=0.1,
                                                             target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    prompts: dict[str, str] = MISSING  # class -> generation prompt: conf/diffusion_lora/prompts/
    training: DiffusionTrainingConfig = field(default_factory=DiffusionTrainingConfig)
    generation: DiffusionGenerationConfig = field(default_factory=DiffusionGenerationConfig)
    trained_lora: str | None = None  # a LoRA folder from an earlier run: synthesize without the diffusion stage
    pretraining: DiffusionPretrainingConfig | None = None  # set: the base is built by task=pretrain_diffusion


class AugmentationSource(str, Enum):
    synthetic = "synthetic"  # drawn by the generator (diffusion_lora), from the synthetic image bank
    duplicate_real = "duplicate_real"  # the same counts as seeded repeats of real training images: the count-matched
    #                                    control, through the same training-time augmentation


class AugmentationSchedule(str, Enum):
    mix = "mix"  # real and added images together, throughout
    synthetic_then_real = "synthetic_then_real"  # added images only for `pretrain_share` of the step budget, then
    #                                              real images only (synthetic pre-training, real fine-tuning)


@dataclass
class SyntheticFilterConfig:
    """`augmentation.filter`: keep a drawn image only where a classifier trained on real images agrees."""
    judge_run: str | None = None  # a finished run trained on real images of the same training split; null: no filter
    min_probability: float = 0.5  # keep an image whose prompted class gets at least this probability from the judge
    max_draws_factor: float = 4.0  # draw at most this many times the count asked per class (one line if not met)


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
    source: AugmentationSource = AugmentationSource.synthetic
    synthetic_weight: float = 1.0  # loss weight of a synthetic example, in (0, 1]
    schedule: AugmentationSchedule = AugmentationSchedule.mix
    pretrain_share: float = 0.5  # synthetic_then_real: the share of trainer.max_steps spent on added images
    filter: SyntheticFilterConfig = field(default_factory=SyntheticFilterConfig)


class ClassBalance(str, Enum):
    none = "none"
    weighted_loss = "weighted_loss"  # cross-entropy weighted by inverse class frequency
    sampler = "sampler"  # draw training images with probability inverse to their class size


class ClassWeightsFrom(str, Enum):
    real = "real"  # class frequencies of the real training images; an added image takes its class's weight
    real_and_added = "real_and_added"  # real + synthetic (or duplicated) counts: reweights the classes as well as
    #                                    adding images (the behaviour before December 2026)


@dataclass
class AugmentSettings:
    """`trainer.augment_settings`: ranges of the random transforms of `pneumo_exp.data.augment`."""
    crop_scale: tuple[float, float] = (0.75, 1.0)  # area of the view relative to the image; above 1 zooms out
    max_rotation_degrees: float = 7.0
    brightness: float = 0.1  # additive shift, uniform in [-b, b], on [0, 1] pixels
    contrast: float = 0.15  # multiplicative factor, uniform in [1 - c, 1 + c]
    max_gamma: float = 1.0  # pixels ** gamma with log(gamma) uniform in [-log g, log g]; 1 turns it off


@dataclass
class TrainerConfig:
    epochs: int = 3
    batch_size: int = 32
    eval_batch_size: int = 128
    grad_accum_steps: int = 1  # optimizer step every N batches; the effective batch is batch_size x N x processes
    max_grad_norm: float = 1.0  # 0 turns clipping off
    precision: Precision = Precision.no
    class_balance: ClassBalance = ClassBalance.weighted_loss
    class_weights_from: ClassWeightsFrom = ClassWeightsFrom.real  # which counts weighted_loss and sampler use
    max_steps: int | None = None  # optimizer-step budget: training ends after it, whatever the image count, and
    #                               warm-up, cosine schedule and EMA are defined over it (trainer.epochs unused)
    label_smoothing: float = 0.0  # share of each target spread uniformly over the classes; 0 turns it off
    augment: bool = True
    augment_settings: AugmentSettings = field(default_factory=AugmentSettings)  # ranges of the random transforms
    ema_decay: float = 0.0  # >0: validate, keep and test an exponential moving average of the weights; 0 turns it off
    max_steps_per_epoch: int | None = None  # cap for smoke tests
    log_every_steps: int | None = None  # a step row (train_step/*) every N optimizer steps; null: epoch rows only
    max_eval_batches: int | None = None  # cap of validation batches per process, for smoke tests
    cap_test: bool = False  # the cap applies to the test split too (its metrics are then no result)
    evaluate_test: bool = True  # false: validation only, the test split is not read (recipe development)
    save_optimizer_state: bool = True  # false: checkpoints/last holds no optimizer state (resume restarts it)
    bootstrap_samples: int = 1000
    selection_metric: str = "val/f1_macro"  # the validation metric that picks the best epoch (higher is better)
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
    entity: str | None = None
    group: str = "${experiment_name}"


@dataclass
class PathsConfig:
    output_dir: str = MISSING
    cache_dir: str = MISSING
    study_dir: str | None = None  # an augmentation study's folder: its recipes find each fraction's generator there


@dataclass
class PredictConfig:
    run_dir: str | None = None
    input: str | None = None
    output: str | None = None


@dataclass
class ReportConfig:
    input: str | None = None
    output: str | None = None
    pairs: list[list[str]] | None = None
    bootstrap_samples: int = 2000
    split_by_commit: bool = False  # true: seeds run by other code versions (git.json) are other configurations
    replicate_keys: list[str] = field(default_factory=lambda: ["diffusion_lora.training.seed",
                                                               "diffusion_lora.pretraining.seed"])  # generator
    #                                 replicates: runs differing only in these and seed are one configuration
    published: Any = None  # the reference rows of every report (conf/report/default.yaml)


@dataclass
class DashboardConfig:
    """`pneumo-exp dashboard report.input=<sweep folder>`: the sweep's saved W&B view (pneumo_exp/dashboard.py)."""
    dry_run: bool = False  # true: write the view's spec to <sweep>/dashboard_spec.json, save nothing
    name: str | None = None  # the view's name; null: "pneumo_exp sweep <experiment>/<sweep>"


@dataclass
class QualityConfig:
    copy_fraction: float = 0.25  # a synthetic image this much closer to a real one than real images are to each other
    kid_subset_size: int = 50
    kid_subsets: int = 100


@dataclass
class StudyGenerator:
    """One generator of `task=generator_study`: a base model and, optionally, a LoRA trained on it."""
    name: str = MISSING  # its arm: a folder of the study and a row of its tables
    base: str | None = None  # null: the diffusion_lora preset's base; "random": the preset's architecture with
    #                             random weights (the model before any training); or a diffusers folder or hub id
    lora: str | None = None  # a LoRA folder trained on that base (a run's diffusion/lora); null: the base alone


@dataclass
class GeneratorStudyConfig:
    """`task=generator_study`: did the generators learn? Their images judged by a classifier trained on real images
    only, beside the same numbers for real validation images."""
    reference_run: str | None = None  # the folder of a finished run whose classifier trained on real images only
    generators: list[StudyGenerator] = field(default_factory=list)
    images_per_class: int = 100  # drawn by each generator with the class prompt
    draws: int = 1  # disjoint draws per generator (draw i with seed + i): means and CIs over draws, paired comparisons
    copy_quantile: float = 0.01  # a likely copy: closer to a training image than this share of validation images
    accuracy_score: bool = True  # the classification accuracy score: two more classifiers per generator
    grid_images: int = 8  # images per row of each arm's samples.png


@dataclass
class JobConfig:
    """The whole config of a job (`conf/config.yaml`), as the stages take it."""
    task: str = "run"
    stages: list[str] = field(default_factory=lambda: ["data", "classify"])
    experiment_name: str = "default"
    seed: int = 0
    tags: list[str] = field(default_factory=list)
    resume: bool = False
    sweep_name: str = MISSING
    sweep_objective: str | None = None
    predict: PredictConfig = field(default_factory=PredictConfig)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    generator_study: GeneratorStudyConfig = field(default_factory=GeneratorStudyConfig)
    dataset: DatasetConfig = MISSING
    clip_lora: ClipConfig = MISSING
    diffusion_lora: DiffusionConfig = MISSING
    augmentation: AugmentationConfig = MISSING
    optim: OptimConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    paths: PathsConfig = MISSING
    report: ReportConfig = MISSING


SCHEMAS = {
    (None, "job_schema"): JobConfig,
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


def scaled_steps(full_steps: int, fraction: float, minimum: int) -> int:
    """`${scaled_steps:full,fraction,minimum}`: a step budget scaled to the real training fraction, at least minimum."""
    return max(int(minimum), round(int(full_steps) * float(fraction)))


OmegaConf.register_new_resolver("scaled_steps", scaled_steps, replace=True)


def register_schemas() -> None:
    store = ConfigStore.instance()
    for (group, name), schema in SCHEMAS.items():
        store.store(group=group, name=name, node=schema)


def job_config(cfg: DictConfig) -> JobConfig:
    """The composed config as typed objects, interpolations resolved: done once, when a job starts."""
    return OmegaConf.to_object(cfg)


def plain(value: Any) -> Any:
    """Typed settings, a mapping or a config node as plain dicts and lists (interpolations resolved)."""
    return OmegaConf.to_container(value if OmegaConf.is_config(value) else OmegaConf.create(value), resolve=True)


def clip_config(values: Any) -> ClipConfig:
    """`clip_lora` settings stored by a run (a mapping or config node) as typed settings; keys added to the schema
    since the run take their defaults."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ClipConfig), values))


def stored_job_config(values: Any) -> JobConfig:
    """A run's stored config (its config.yaml, a mapping or config node) as typed settings, each group read against
    its schema (the dataset's by its kind); keys added to the schemas since the run take their defaults."""
    typed = OmegaConf.structured(JobConfig)
    schemas = typing.get_type_hints(JobConfig)
    for group in fields(JobConfig):
        schema = schemas[group.name]
        if group.default == MISSING and is_dataclass(schema):
            kinds = [sub for sub in schema.__subclasses__() if sub.kind == values[group.name].get("kind")]
            typed[group.name] = OmegaConf.structured(kinds[0] if kinds else schema)
    return OmegaConf.to_object(OmegaConf.merge(typed, values))
