"""Every check of the config, in one place: the plan (task and stages) and every setting, when a job starts and
before any work, naming the key that is out of range; and the per-class keys of counts and ratios.

Composition (the typed schemas in `config.py`) already refuses unknown keys and wrong types (`cli.py` says so in one
line, naming the closest key); this refuses keys added with `+key=value` that no code reads, values of the right
type that no run can use (`trainer.epochs=0`, `optim.lr=-1`, a diffusion resolution that is not a multiple of 8,
prompts missing a class, ...) and task inputs that are not there.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from PIL import Image

from pneumo_exp.config import SCHEMAS
from pneumo_exp.data.images import IMAGE_SUFFIXES, INTENSITY_METHODS
from pneumo_exp.data.manifest import read_csv
from pneumo_exp.errors import UserError
from pneumo_exp.labels import CLASSES


class SettingError(UserError, ValueError):
    """A config value that no run can use; `where` is its key."""


def at_least(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda value: math.isfinite(value) and value >= low), f"use {low} or more"


def above(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda value: math.isfinite(value) and value > low), f"use a value above {low}"


def share(closed_low: bool = True, closed_high: bool = False) -> tuple[Callable[[Any], bool], str]:
    low, high = "[" if closed_low else "(", "]" if closed_high else ")"
    return ((lambda value: (value >= 0 if closed_low else value > 0) and (value <= 1 if closed_high else value < 1)),
            f"use a value in {low}0, 1{high}")


def resolution(multiple: int = 1) -> tuple[Callable[[Any], bool], str]:
    if multiple == 1:
        return (lambda value: value >= 16), "use 16 pixels or more"
    return (lambda value: value >= 16 and value % multiple == 0), f"use 16 pixels or more, a multiple of {multiple}"


def one_of(*values: str) -> tuple[Callable[[Any], bool], str]:
    return (lambda value: value in values), f"use one of {', '.join(values)}"


SELECTION_METRICS = ("val/f1_macro", "val/acc", "val/recall_macro", "val/auroc_macro")  # higher is better

RULES: list[tuple[str, tuple[Callable[[Any], bool], str]]] = [
    ("trainer.selection_metric", one_of(*SELECTION_METRICS)),
    ("trainer.epochs", at_least(1)),
    ("trainer.batch_size", at_least(1)),
    ("trainer.eval_batch_size", at_least(1)),
    ("trainer.grad_accum_steps", at_least(1)),
    ("trainer.max_grad_norm", at_least(0)),
    ("trainer.max_steps_per_epoch", at_least(1)),
    ("trainer.max_steps", at_least(1)),
    ("trainer.log_every_steps", at_least(1)),
    ("trainer.max_eval_batches", at_least(1)),
    ("trainer.bootstrap_samples", at_least(1)),
    ("trainer.augment_settings.max_rotation_degrees", at_least(0)),
    ("trainer.augment_settings.brightness", at_least(0)),
    ("trainer.augment_settings.contrast", share(closed_high=True)),
    ("optim.lr", above(0)),
    ("optim.weight_decay", at_least(0)),
    ("optim.warmup_ratio", share()),
    ("dataset.resolution", resolution()),
    ("dataset.intensity", one_of(*INTENSITY_METHODS)),
    ("dataset.val_fraction", share()),
    ("dataset.train_fraction", share(closed_low=False, closed_high=True)),
    ("augmentation.synthetic_weight", share(closed_low=False, closed_high=True)),
    ("augmentation.pretrain_share", share(closed_low=False)),
    ("augmentation.filter.min_probability", share(closed_high=True)),
    ("augmentation.filter.max_draws_factor", at_least(1)),
    ("dataset.limit_per_class", at_least(1)),
    ("dataset.min_image_side", at_least(1)),
    ("dataset.max_extract_bytes", at_least(1)),
    ("dataset.max_compression_ratio", at_least(1)),
    ("clip_lora.image_size", resolution()),
    ("diffusion_lora.resolution", resolution(multiple=8)),
    *((f"{group}.lora.{name}", rule) for group in ("clip_lora", "diffusion_lora")
      for name, rule in (("r", at_least(1)), ("alpha", above(0)), ("dropout", share()))),
    ("diffusion_lora.training.max_train_steps", at_least(1)),
    ("diffusion_lora.training.batch_size", at_least(1)),
    ("diffusion_lora.training.grad_accum_steps", at_least(1)),
    ("diffusion_lora.training.lr", above(0)),
    ("diffusion_lora.training.weight_decay", at_least(0)),
    ("diffusion_lora.training.warmup_ratio", share()),
    ("diffusion_lora.training.max_grad_norm", at_least(0)),
    ("diffusion_lora.training.crop_min_side", share(closed_low=False, closed_high=True)),
    ("diffusion_lora.training.log_every", at_least(1)),
    ("diffusion_lora.training.validation_every", at_least(0)),
    ("diffusion_lora.training.keep", one_of("last", "best_val_loss")),
    ("diffusion_lora.training.validation_images_per_class", at_least(1)),
    ("diffusion_lora.training.validation_inference_steps", at_least(1)),
    ("diffusion_lora.training.validation_guidance_scale", at_least(0)),
    ("diffusion_lora.generation.num_inference_steps", at_least(1)),
    ("diffusion_lora.generation.guidance_scale", at_least(0)),
    ("diffusion_lora.generation.batch_size", at_least(1)),
    ("augmentation.ratio", at_least(0)),
    ("report.bootstrap_samples", at_least(1)),
    ("quality.copy_fraction", above(0)),
    ("quality.kid_subset_size", at_least(2)),
    ("quality.kid_subsets", at_least(1)),
    ("generator_study.images_per_class", at_least(1)),
    ("generator_study.draws", at_least(1)),
    ("generator_study.copy_quantile", share(closed_low=False)),
    ("generator_study.grid_images", at_least(1)),
]
PRECISIONS = ("no", "fp16", "bf16")
OPTIONAL_PRECISIONS = ("diffusion_lora.training.precision", "diffusion_lora.generation.precision")
PER_CLASS_RULES = [("augmentation.per_class_ratio", at_least(0)), ("augmentation.per_class_count", at_least(0))]
BETAS = ("optim.betas", "diffusion_lora.training.betas")


KNOWN_STAGES = ("data", "diffusion", "synthesize", "classify", "quality")


TASKS = ("run", "summary", "predict", "report", "dashboard", "pretrain_diffusion", "generator_study")


def check_plan(cfg: DictConfig) -> None:
    """Refuse a job that cannot finish before it spends any time: the task, the stages and every numeric setting."""
    if cfg.task not in TASKS:
        raise SettingError(f"unknown task {cfg.task!r}", where="task", fix=f"use one of {', '.join(TASKS)}")
    unknown = [stage for stage in cfg.stages if stage not in KNOWN_STAGES]
    if unknown:
        raise SettingError(f"unknown stage(s) {unknown}", where="stages", fix=f"use stages from {list(KNOWN_STAGES)}")
    draws = cfg.augmentation.get("source", "synthetic") == "synthetic" and cfg.augmentation.strategy != "none"
    if draws and "synthesize" in cfg.stages and "diffusion" not in cfg.stages and not cfg.diffusion_lora.trained_lora:
        raise SettingError("synthesize needs a LoRA", where="stages",
                           fix="add the diffusion stage or set diffusion_lora.trained_lora=<folder of a trained LoRA>")
    if "quality" in cfg.stages and "classify" not in cfg.stages:
        raise SettingError("quality measures images in the feature space of the classifier the same run trains",
                           where="stages", fix="add the classify stage")
    check_known_keys(cfg)
    check_augmentation_plan(cfg)
    check_task_inputs(cfg)
    if cfg.task == "pretrain_diffusion":
        check_pretraining(cfg)
    check_settings(cfg)
    if cfg.task == "run" and "classify" in cfg.stages:
        check_image_size(cfg)


def check_augmentation_plan(cfg: DictConfig) -> None:
    """What an augmentation design needs besides its own values: a step budget to split into phases, a generator
    to filter."""
    augmentation = cfg.augmentation
    if augmentation.get("schedule") == "synthetic_then_real" and cfg.trainer.get("max_steps") is None:
        raise SettingError("the synthetic-then-real schedule splits a step budget", where="trainer.max_steps",
                           fix="set trainer.max_steps=<optimizer steps> (augmentation.pretrain_share of them on "
                               "the added images)")
    if augmentation.get("source") == "duplicate_real" and OmegaConf.select(cfg, "augmentation.filter.judge_run"):
        raise SettingError("repeats of real images are not filtered", where="augmentation.filter.judge_run",
                           fix="set it to null with augmentation.source=duplicate_real")


def check_image_size(cfg: DictConfig) -> None:
    """The classifier trains on the cached images as they are: a cache size other than the tower's would be resized
    in every batch (a "160 px" run training a 128 px tower), unless `clip_lora.allow_resize` says so."""
    cached, tower = cfg.dataset.resolution, cfg.clip_lora.image_size
    if cached != tower and not cfg.clip_lora.allow_resize:
        raise SettingError(f"dataset.resolution={cached} differs from clip_lora.image_size={tower}, so every batch "
                           f"would be resized to {tower} px", where="dataset.resolution",
                           fix=f"set dataset.resolution={tower} or clip_lora.image_size={cached}, or "
                               "clip_lora.allow_resize=true to train the tower on resized images")


def check_pretraining(cfg: DictConfig) -> None:
    """task=pretrain_diffusion builds the base of a preset that says how (`diffusion_lora.pretraining`) and where
    (`diffusion_lora.pretrained`, a local folder)."""
    if cfg.diffusion_lora.get("pretraining") is None or not cfg.diffusion_lora.pretrained:
        raise SettingError(f"diffusion_lora={cfg.diffusion_lora.name} is not a preset pretrained by pneumo-exp",
                           where="diffusion_lora", fix="use a preset with a pretraining block, e.g. "
                                                       "diffusion_lora=cxr_small")
    settings = cfg.diffusion_lora.pretraining
    for name in ("vae_steps", "vae_batch_size", "unet_steps", "unet_batch_size", "checkpoint_every", "log_every",
                 "samples_per_class"):
        check(f"diffusion_lora.pretraining.{name}", settings[name], *at_least(1))
    for name in ("vae_lr", "unet_lr", "text_encoder_lr"):
        check(f"diffusion_lora.pretraining.{name}", settings[name], *above(0))
    for name in ("vae_kl_weight", "warmup_steps", "max_grad_norm", "sample_every"):
        check(f"diffusion_lora.pretraining.{name}", settings[name], *at_least(0))
    check("diffusion_lora.pretraining.empty_prompt_fraction", settings.empty_prompt_fraction, *share())
    check("diffusion_lora.pretraining.ema_decay", settings.ema_decay, *share())
    check("diffusion_lora.pretraining.unet_precision", settings.unet_precision, *one_of(*PRECISIONS))



def check_settings(cfg: DictConfig) -> None:
    """Raise a SettingError naming the first key whose value no run can use. Keys a config lacks, and optional
    settings left null, are not checked."""
    for key, (allowed, requirement) in RULES:
        check(key, OmegaConf.select(cfg, key, default=None), allowed, requirement)
    for key, (allowed, requirement) in PER_CLASS_RULES:
        per_class = OmegaConf.select(cfg, key, default=None) or {}
        check_class_keys(per_class, key)
        for label, value in per_class.items():
            check(f"{key}.{label}", value, allowed, requirement)
    for key in BETAS:
        betas = OmegaConf.select(cfg, key, default=None)
        if betas is not None and (len(betas) != 2 or not all(0 <= beta < 1 for beta in betas)):
            raise SettingError(f"bad value {list(betas)}", where=key,
                               fix="give two values in [0, 1), e.g. [0.9, 0.999]")
    for key in OPTIONAL_PRECISIONS:
        check(key, OmegaConf.select(cfg, key, default=None), lambda value: value in PRECISIONS,
              f"use one of {', '.join(PRECISIONS)}")
    training = OmegaConf.select(cfg, "diffusion_lora.training", default=None)
    if training is not None and training.get("max_train_steps") is None:
        check("diffusion_lora.training.epochs", training.get("epochs"), *at_least(1))
    if training is not None:
        check_cached_latents(training)
    check_trainer_ranges(cfg)
    check_prompts(cfg)
    check_model_sources(cfg)


def check(key: str, value: Any, allowed: Callable[[Any], bool], requirement: str) -> None:
    if value is not None and not allowed(value):
        raise SettingError(f"bad value {value}", where=key, fix=requirement)


def check_cached_latents(training) -> None:
    """`diffusion_lora.training`: latents cached once per image cannot follow random crops of its pixels."""
    if training.cache_latents and training.crop_min_side < 1:
        raise SettingError("cached latents take no random crops", where="diffusion_lora.training.crop_min_side",
                           fix="set diffusion_lora.training.crop_min_side=1 with cache_latents=true, or turn "
                               "cache_latents off to keep the crops")


def check_trainer_ranges(cfg: DictConfig) -> None:
    if not cfg.trainer.evaluate_test and OmegaConf.select(cfg, "dataset.val_fraction", default=None) == 0:
        raise SettingError("no validation split and trainer.evaluate_test=false: the run would measure nothing",
                           where="dataset.val_fraction", fix="carve a validation split (a dataset.val_fraction above "
                                                             "0), or set trainer.evaluate_test=true for the final fit")
    if not 0 <= cfg.trainer.ema_decay < 1:
        raise SettingError(f"bad value {cfg.trainer.ema_decay}", where="trainer.ema_decay",
                           fix="use 0 (off) or a decay in (0, 1), e.g. 0.998")
    if not 0 <= cfg.trainer.label_smoothing < 1:
        raise SettingError(f"bad value {cfg.trainer.label_smoothing}", where="trainer.label_smoothing",
                           fix="use 0 (off) or a share in (0, 1), e.g. 0.1")
    settings = cfg.trainer.augment_settings
    crop_scale = list(settings.crop_scale)
    if len(crop_scale) != 2 or not 0 < crop_scale[0] <= crop_scale[1]:
        raise SettingError(f"bad value {crop_scale}", where="trainer.augment_settings.crop_scale",
                           fix="give [low, high] with 0 < low <= high")
    if settings.max_gamma < 1:
        raise SettingError(f"bad value {settings.max_gamma}", where="trainer.augment_settings.max_gamma",
                           fix="use 1 (off) or more, e.g. 1.5 for gammas between 1/1.5 and 1.5")


def check_selection_split(cfg, validation_labels: list[str]) -> None:
    """`val/auroc_macro` is undefined (nan) on a validation split missing a class, so no epoch would ever be kept:
    refused on the split the classifier will validate on, before it trains."""
    if cfg.trainer.selection_metric != "val/auroc_macro" or cfg.clip_lora.mode == "zero_shot" or not validation_labels:
        return
    missing = [label for label in CLASSES if label not in validation_labels]
    if missing:
        raise SettingError(f"val/auroc_macro is undefined: the validation split has no {' or '.join(missing)} image",
                           where="trainer.selection_metric",
                           fix="use trainer.selection_metric=val/f1_macro, or a validation split with every class")


def check_class_keys(mapping: dict, key: str) -> None:
    """Per-class settings must name known classes."""
    unknown = set(mapping) - set(CLASSES)
    if unknown:
        raise SettingError(f"unknown class(es) {sorted(unknown)}", where=key,
                           fix=f"name classes from {', '.join(CLASSES)}")


def check_class_prompts(prompts: dict, key: str) -> None:
    """A prompt (or a list of templates) for each class, and for no other name."""
    missing = [label for label in CLASSES if label not in prompts]
    unknown = [label for label in prompts if label not in CLASSES]
    if missing or unknown:
        raise SettingError(f"prompts for the wrong classes: missing {missing}, unknown {unknown}", where=key,
                           fix=f"give prompts for exactly {', '.join(CLASSES)}")


def check_templates(prompts: dict, key: str) -> None:
    """The classifier averages T templates per class: every class needs the same T >= 1."""
    check_class_prompts(prompts, key)
    counts = {label: len(prompts[label]) for label in CLASSES}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise SettingError(f"every class needs the same number (>= 1) of templates, got {counts}", where=key,
                           fix="give each class as many templates as the others")


def check_prompts(cfg: DictConfig) -> None:
    clip_prompts = OmegaConf.select(cfg, "clip_lora.prompts", default=None)
    if clip_prompts is not None:
        check_templates(clip_prompts, "clip_lora.prompts")
    diffusion_prompts = OmegaConf.select(cfg, "diffusion_lora.prompts", default=None)
    if diffusion_prompts is not None:
        check_class_prompts(diffusion_prompts, "diffusion_lora.prompts")


def check_model_sources(cfg: DictConfig) -> None:
    """A model preset loads `pretrained` or builds `architecture` with random weights: one of them is needed."""
    for group in ("clip_lora", "diffusion_lora"):
        preset = OmegaConf.select(cfg, group, default=None)
        if preset is not None and not preset.get("pretrained") and not preset.get("architecture"):
            raise SettingError(f"{group}={preset.name} has no model to load and none to build",
                               where=f"{group}.pretrained", fix=f"set {group}.pretrained=<hub id or local folder>, "
                                                                f"or use a preset with an architecture ({group}=tiny)")


def check_task_inputs(cfg: DictConfig) -> None:
    """predict, report, dashboard and generator_study read what the user names: refused before the run folder is
    written if it is not there."""
    if cfg.task == "predict":
        run_dir = required_path(cfg, "predict.run_dir", "<the folder of a finished run>")
        if not (run_dir / "config.yaml").is_file():
            raise SettingError(f"{run_dir} holds no config.yaml", where="predict.run_dir",
                               fix="give the folder of a finished run")
        for image in prediction_images(required_path(cfg, "predict.input", "<an image or a folder of images>")):
            check_image_header(image)
    if cfg.task in ("report", "dashboard"):
        folder = required_path(cfg, "report.input", "<a sweep folder, or any folder holding run folders>")
        if not folder.is_dir():
            raise SettingError(f"no folder {folder}", where="report.input",
                               fix="give a sweep folder, or any folder holding run folders")
    if cfg.task == "generator_study":
        check_generator_study(cfg)


def required_path(cfg: DictConfig, key: str, example: str) -> Path:
    value = OmegaConf.select(cfg, key, default=None)
    if not value:
        raise SettingError(f"task={cfg.task} needs {key}", where=key, fix=f"set {key}={example}")
    return Path(value)


PREDICTION_INPUT_FIX = f"give an image ({', '.join(IMAGE_SUFFIXES)}) or a folder of them"


def prediction_images(path: Path) -> list[Path]:
    """What task=predict reads from `predict.input`: the image it names, or the images (by suffix) under the folder."""
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not found:
            raise SettingError(f"no {'/'.join(IMAGE_SUFFIXES)} images in the folder {path}", where="predict.input",
                               fix=PREDICTION_INPUT_FIX)
        return found
    if not path.is_file():
        raise SettingError(f"{path} does not exist", where="predict.input", fix=PREDICTION_INPUT_FIX)
    return [path]


def check_image_header(file: Path) -> None:
    """The file opens as an image (its header only: decoding is the prediction's work)."""
    try:
        with Image.open(file):
            pass
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise SettingError(f"{file} is not an image", where="predict.input",
                           fix=PREDICTION_INPUT_FIX) from None


STUDY_REAL_ARM = "real_validation"  # the arm of real validation images every generator study holds
RANDOM_BASE = "random"  # a study generator's base: the preset's architecture with random weights
ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_generator_study(cfg: DictConfig) -> None:
    """task=generator_study judges the generators it lists with the classifier of a run trained on real images only."""
    reference = check_reference_run(required_path(cfg, "generator_study.reference_run", "<the folder of a run "
                                                  "that trained a classifier on real images only>"))
    generators = cfg.generator_study.generators
    if not generators:
        raise SettingError("no generator to study", where="generator_study.generators",
                           fix="list them, e.g. generator_study.generators=[{name:noise,base:random},{name:base}]")
    names: list[str] = []
    for index, generator in enumerate(generators):
        check_study_generator(cfg, generator, f"generator_study.generators[{index}]", names, reference.dataset.name)
        names.append(generator.name)


def check_study_generator(cfg: DictConfig, generator: DictConfig, key: str, names_before: list[str],
                          reference_dataset: str) -> None:
    check_generator_name(generator, key, names_before)
    check_study_base(generator.base, f"{key}.base")
    if generator.base == RANDOM_BASE and not cfg.diffusion_lora.get("architecture"):
        raise SettingError(f"diffusion_lora={cfg.diffusion_lora.name} has no architecture to initialise at random",
                           where=f"{key}.base", fix="use a preset with one (tiny, cxr_small) or give a base folder")
    built_per_dataset = generator.base is None and cfg.diffusion_lora.get("pretraining") is not None
    if built_per_dataset and cfg.dataset.name != reference_dataset:
        raise SettingError(f"the base of diffusion_lora={cfg.diffusion_lora.name} is built per dataset, and this "
                           f"study's dataset is {cfg.dataset.name}, the reference run's {reference_dataset}",
                           where="dataset", fix=f"add dataset={reference_dataset} (and its dataset.root), or give "
                                                f"the base folder as {key}.base")
    if generator.lora and not Path(generator.lora).exists():
        raise SettingError(f"no LoRA {generator.lora}", where=f"{key}.lora",
                           fix="give a LoRA folder (a run's diffusion/lora), or null for the base alone")


def check_generator_name(generator: DictConfig, key: str, names_before: list[str]) -> None:
    name_rule = f"give each generator its own name of letters, digits, '.', '_' or '-' (not {STUDY_REAL_ARM})"
    if OmegaConf.is_missing(generator, "name"):
        raise SettingError("a generator without a name", where=f"{key}.name", fix=name_rule)
    if not ARM_NAME.fullmatch(generator.name) or generator.name in (STUDY_REAL_ARM, *names_before):
        raise SettingError(f"bad or repeated name {generator.name!r}", where=f"{key}.name", fix=name_rule)


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name: a base that is no path here is looked up on the hub


def check_study_base(base: str | None, key: str) -> None:
    """A base named by the user is a diffusers folder here, or a hub id (`random` and null are the preset's)."""
    if base in (None, RANDOM_BASE):
        return
    if Path(base).exists() and not (Path(base) / "model_index.json").is_file():
        raise SettingError(f"{base} is not a diffusers pipeline folder (no model_index.json)", where=key,
                           fix="give the folder of a Stable Diffusion pipeline (model_index.json, unet/, vae/, ...)")
    if not Path(base).exists() and not HUB_ID.fullmatch(base):
        raise SettingError(f"no folder {base}", where=key,
                           fix="give a diffusers pipeline folder or a hub id (org/name), random for the preset's "
                               "architecture with random weights, or null for the preset's base")


def check_reference_run(run_dir: Path) -> DictConfig:
    """The study's judge: a finished run whose classifier trained on real images only. Returns its config."""
    key = "generator_study.reference_run"
    if not (run_dir / "config.yaml").is_file():
        raise SettingError(f"{run_dir} holds no config.yaml", where=key, fix="give the folder of a finished run")
    stored = OmegaConf.load(run_dir / "config.yaml")
    finished = (run_dir / "results.json").is_file() and (run_dir / "manifest.csv").is_file()
    if not finished or "classify" not in stored.get("stages", []):
        raise SettingError(f"{run_dir} is not a finished classifier run (no results.json of the classify stage)",
                           where=key, fix="give the folder of a run that trained and tested a classifier on real "
                                          "images only")
    records = read_csv(run_dir / "manifest.csv")
    if any(record.source == "synthetic" for record in records):
        raise SettingError(f"the classifier of {run_dir} trained on synthetic images too", where=key,
                           fix="give a run that trained on real images only (augmentation=none)")
    if not any(record.split == "val" for record in records):
        raise SettingError(f"{run_dir} has no validation split, on which the study calibrates its copy threshold",
                           where=key, fix="give a run with a validation split (dataset.val_fraction above 0)")
    return stored


def check_known_keys(cfg: DictConfig) -> None:
    """`+key=value` adds a key that no code reads to a typed node: refused, naming the closest known key."""
    for key in unknown_keys(cfg):
        raise SettingError(f"unknown key {key}", fix=did_you_mean(key))


def unknown_keys(node: DictConfig, prefix: str = "") -> Iterator[str]:
    """Keys of the typed nodes under `node` that their schema lacks (free mappings, such as prompts, hold any)."""
    schema = OmegaConf.get_type(node)
    known = {field.name for field in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    for key in node:
        child = node._get_node(key)
        if known is not None and key not in known:
            yield f"{prefix}{key}"
        elif isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            yield from unknown_keys(child, f"{prefix}{key}.")


def did_you_mean(key: str) -> str:
    """`did you mean <the closest key of the schemas>?`, or where to see them all."""
    close = difflib.get_close_matches(key, schema_keys(), n=1, cutoff=0.8)
    return f"did you mean {close[0]}?" if close else "see every key with pneumo-exp --cfg job"


def options_with_key(key: str) -> list[str]:
    """The options of the key's group whose schema holds the key (`dataset.root`: kermany, folder)."""
    group, _, rest = key.partition(".")
    return sorted(name.removesuffix("_schema") for (schema_group, name), schema in SCHEMAS.items()
                  if schema_group == group and rest in set(dotted_fields(schema, "")))


def schema_keys() -> list[str]:
    """Every dotted key of a setting a composed config can hold (the dataset keys of every dataset kind)."""
    keys: set[str] = set()
    for (group, _), schema in SCHEMAS.items():
        keys.update(dotted_fields(schema, f"{group}." if group else ""))
    return sorted(keys)


def dotted_fields(schema: type, prefix: str) -> Iterator[str]:
    types = typing.get_type_hints(schema)
    for field in dataclasses.fields(schema):
        if dataclasses.is_dataclass(types[field.name]):
            yield from dotted_fields(types[field.name], f"{prefix}{field.name}.")
        else:
            yield prefix + field.name
