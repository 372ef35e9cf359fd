"""The classifier stage: train CLIP on cached tensors, keep the best epoch by `trainer.selection_metric`, test it once.

Reads top to bottom: tensors from the cache, the plan of the epochs, model, optimiser and schedule, resume, epochs
(train, validate, checkpoint, log), then the test split evaluated once with the best weights reloaded from disk. With
`trainer.ema_decay > 0` the weights validated, kept as best and tested are the moving average (`ema.py`).
With no validation split (`dataset.val_fraction=0`: the final fit on train + val, for an epoch count chosen on
validation beforehand) nothing is selected: the last epoch's weights are kept and tested.

Augmentation arms differ only in the images added to the training split (source synthetic or duplicate): class
weights count the real images (`trainer.class_weights_from=real`), `trainer.max_steps` fixes the optimizer steps
whatever the image count (epochs are then passes over the data as needed, the last one partial), and
`augmentation.schedule=synthetic_then_real` spends the budget's first share on the added images only.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pneumo_exp.classify.checkpoint import load_training_state, load_weights, save_checkpoint, save_weights
from pneumo_exp.classify.metrics import bootstrap_intervals, classification_metrics
from pneumo_exp.classify.model import build_classifier, trainable_parameters
from pneumo_exp.classify.predict import write_predictions
from pneumo_exp.config import (
    AugmentationConfig,
    AugmentationSchedule,
    ClassBalance,
    ClassifierMode,
    ClassWeightsFrom,
    JobConfig,
    TrainerConfig,
)
from pneumo_exp.core.checkpoint import last_checkpoint, restore_training
from pneumo_exp.core.ema import WeightAverage
from pneumo_exp.core.files import swap_folder, write_json_atomic
from pneumo_exp.core.history import epoch_rows, read_json_lines
from pneumo_exp.core.seeds import epoch_seed, rank_seed
from pneumo_exp.core.training import (
    DeviceMeans,
    NonFiniteWatch,
    budget_epochs,
    fresh_accelerator,
    optimizer_step,
    optimizer_steps,
    optimizer_steps_per_epoch,
    progress_bar,
    resolve_precision,
    shard_of,
)
from pneumo_exp.data.augment import random_augment, to_unit_float
from pneumo_exp.data.cache import open_or_build
from pneumo_exp.data.manifest import Record
from pneumo_exp.data.prepare import PreparedData, check_splits_filled
from pneumo_exp.errors import UserError
from pneumo_exp.labels import CLASSES, class_index
from pneumo_exp.plots import confusion_matrix_png, curves_png
from pneumo_exp.rundir import not_a_result
from pneumo_exp.tracking import RunLogger
from pneumo_exp.validate import check_selection_split

log = logging.getLogger(__name__)
HOST_CHECK_EVERY = 50  # optimizer steps between reads of the non-finite-loss watch (and progress bar updates)
SOURCES_COUNTED = ("real", "synthetic", "duplicate")  # results.json's train_images: added = not real


@dataclass
class SplitTensors:
    records: list[Record]
    pixels: torch.Tensor  # uint8 (N, R, R)
    labels: torch.Tensor  # int64 (N,)


def load_splits(data: PreparedData, resolution: int, cache_dir: str, progress: bool,
                intensity: str = "none") -> dict[str, SplitTensors]:
    cache = open_or_build(data.records, resolution, cache_dir, progress=progress, intensity=intensity)
    splits = {}
    for name in ("train", "val", "test"):
        records = data.split(name)
        pixels = torch.from_numpy(np.ascontiguousarray(cache.pixels[cache.rows_of(records)]))
        labels = torch.tensor([class_index(r.label) for r in records], dtype=torch.long)
        splits[name] = SplitTensors(records, pixels, labels)
    return splits


def class_weights(labels: torch.Tensor) -> torch.Tensor:
    """Inverse class frequency, scaled so that a balanced set gets weight 1 everywhere."""
    counts = torch.bincount(labels, minlength=len(CLASSES)).float()
    return counts.sum() / (len(CLASSES) * counts.clamp(min=1))


def added_images(records: list[Record]) -> torch.Tensor:
    """True for each training image added to the real ones (synthetic, or a duplicate of a real image)."""
    return torch.tensor([r.source != "real" for r in records], dtype=torch.bool)


def training_class_weights(train: SplitTensors, counted: ClassWeightsFrom) -> torch.Tensor:
    """The class weights of `weighted_loss` and of the sampler: inverse class frequency over the real training images
    (`real`: an added image takes its class's weight, so arms with the same real images weigh classes alike) or over
    all of them (`real_and_added`, or a split without real images: the quality stage's synthetic-only classifier)."""
    real = ~added_images(train.records)
    if ClassWeightsFrom(counted) == ClassWeightsFrom.real_and_added or not real.any():
        return class_weights(train.labels)
    return class_weights(train.labels[real])


def class_weights_used(train: SplitTensors, trainer: TrainerConfig) -> dict[str, float] | None:
    """The class weights training used, by class name (None with `class_balance=none`)."""
    if ClassBalance(trainer.class_balance) == ClassBalance.none:
        return None
    return dict(zip(CLASSES, training_class_weights(train, trainer.class_weights_from).tolist()))


def source_weights(records: list[Record], synthetic_weight: float) -> torch.Tensor | None:
    """Each image's loss weight by its source: `augmentation.synthetic_weight` for a synthetic image, 1 for any
    other (None where every weight is 1)."""
    if synthetic_weight == 1 or not any(r.source == "synthetic" for r in records):
        return None
    return torch.tensor([synthetic_weight if r.source == "synthetic" else 1.0 for r in records])


def training_objective(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None,
                       smoothing: float, image_source_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy against the target (1 - smoothing) * one-hot + smoothing / C, uniform over the classes, each
    image's loss weighted by its class weight times its source weight (`source_weights`): the weighted mean, as
    `F.cross_entropy(weight=...)` takes it. (PyTorch's own `weight` with `label_smoothing` would weight the
    smoothing share by class too.)"""
    losses = F.cross_entropy(logits, labels, label_smoothing=smoothing, reduction="none")
    if weights is None and image_source_weights is None:
        return losses.mean()
    image_weights = torch.ones_like(losses) if weights is None else weights[labels]
    if image_source_weights is not None:
        image_weights = image_weights * image_source_weights.to(image_weights.device)
    return (losses * image_weights).sum() / image_weights.sum()


def epoch_order(labels: torch.Tensor, balance: ClassBalance, generator: torch.Generator,
                weights: torch.Tensor | None = None) -> torch.Tensor:
    """A permutation of the images, or with the sampler a draw by class `weights` (by default: these labels')."""
    if balance == ClassBalance.sampler:
        per_class = class_weights(labels) if weights is None else weights
        return torch.multinomial(per_class[labels], len(labels), replacement=True, generator=generator)
    return torch.randperm(len(labels), generator=generator)


def epoch_randomness(seed: int, epoch: int, process_index: int, labels: torch.Tensor, balance: ClassBalance,
                     weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Generator]:
    """The epoch's sample order (positions in `labels`; `weights` as `epoch_order` takes them), the same on every
    rank, and this rank's own generator for augmentation; torch's global generator (dropout, LoRA dropout) is seeded
    for this rank too. All depend on (seed, epoch, rank) only, so a resumed run repeats them; rank 0 draws what a
    single-process run always drew."""
    shared_seed = epoch_seed(seed, epoch)
    shared = torch.Generator().manual_seed(shared_seed)
    order = epoch_order(labels, balance, shared, weights)
    if process_index == 0:
        torch.manual_seed(shared_seed)
        return order, shared  # the shared stream, continued past the order
    own_seed = rank_seed(shared_seed, process_index)
    torch.manual_seed(own_seed)
    return order, torch.Generator().manual_seed(own_seed)


@dataclass(frozen=True)
class EpochPlan:
    """One epoch of the run: the training images it passes over (positions in the split), its optimizer steps, the
    run's steps before it and the run's number of epochs."""
    pool: torch.Tensor
    steps: int
    steps_before: int
    epochs: int


def steps_per_pass(images: int, trainer: TrainerConfig, num_processes: int) -> int:
    """The optimizer steps of one pass over `images` (capped by `trainer.max_steps_per_epoch`)."""
    steps = optimizer_steps_per_epoch(images, num_processes, trainer.batch_size, trainer.grad_accum_steps,
                                      trainer.max_steps_per_epoch)
    if steps == 0:
        raise UserError(f"{images} training images make no batch over {num_processes} processes",
                        "trainer.max_steps", "add images, or run on fewer processes")
    return steps


def whole_pass(images: int, epoch: int, trainer: TrainerConfig, num_processes: int) -> EpochPlan:
    steps = optimizer_steps_per_epoch(images, num_processes, trainer.batch_size, trainer.grad_accum_steps,
                                      trainer.max_steps_per_epoch)
    return EpochPlan(torch.arange(images), steps, (epoch - 1) * steps, trainer.epochs)


def budget_phases(train: SplitTensors, augmentation: AugmentationConfig, budget: int) -> list[tuple[torch.Tensor, int]]:
    """The step budget by the images its batches are drawn from: all of them (`mix`), or the added images for
    round(pretrain_share x budget) steps and the real ones for the rest (`synthetic_then_real`)."""
    everything = torch.arange(len(train.labels))
    if AugmentationSchedule(augmentation.schedule) == AugmentationSchedule.mix:
        return [(everything, budget)]
    added = added_images(train.records)
    if not added.any():
        raise UserError("the synthetic-then-real schedule found no added training images to start on",
                        "augmentation.schedule", "add images (augmentation.strategy) or use augmentation.schedule=mix")
    pretraining = round(augmentation.pretrain_share * budget)
    phases = [(everything[added], pretraining), (everything[~added], budget - pretraining)]
    return [(pool, steps) for pool, steps in phases if steps > 0]


def epoch_plans(train: SplitTensors, cfg: JobConfig, num_processes: int) -> list[EpochPlan]:
    """Every epoch of the run: `trainer.epochs` whole passes, or with `trainer.max_steps` exactly that many optimizer
    steps in epochs over each phase's images (`budget_phases`), a phase's last epoch partial. An epoch of a budget is
    as long as a pass over the real training images (or over the phase's images where they are fewer), so arms that
    add images are validated, and can pick their weights, as often as the arm without them."""
    trainer = cfg.trainer
    if trainer.max_steps is None:
        return [whole_pass(len(train.labels), epoch, trainer, num_processes) for epoch in range(1, trainer.epochs + 1)]
    real_images = int((~added_images(train.records)).sum()) or len(train.labels)
    epochs = [(pool, steps) for pool, budget in budget_phases(train, cfg.augmentation, trainer.max_steps)
              for steps in budget_epochs(budget, steps_per_pass(min(len(pool), real_images), trainer, num_processes))]
    starts = itertools.accumulate([steps for _, steps in epochs], initial=0)
    return [EpochPlan(pool, steps, before, len(epochs)) for (pool, steps), before in zip(epochs, starts)]


def train_one_epoch(model, optimizer, scheduler, train: SplitTensors, cfg: JobConfig, epoch: int, accelerator,
                    loss_weights: torch.Tensor | None, average: WeightAverage | None,
                    log_step_row: Callable[[dict], None] | None = None, plan: EpochPlan | None = None) -> dict:
    """One epoch as `plan` says (by default a whole pass over `train`); `loss` is the plain cross-entropy
    (comparable with `val/loss`), `objective` the loss optimised (`training_objective`: class-weighted with
    `loss_weights`, synthetic images weighted by `augmentation.synthetic_weight`, smoothed uniformly by
    `trainer.label_smoothing`), `grad_norm` the mean gradient norm of its steps (before clipping), `optimizer_steps`
    its steps. With `trainer.log_every_steps` = N, every N optimizer steps of the epoch `log_step_row` gets a step
    row: `step` (counted over the run) and `train_step/*`, the means of those N steps. Nothing is read back to the
    host during the epoch except the non-finite watch every HOST_CHECK_EVERY steps, at each step row and after the
    last step."""
    model.train()
    trainer = cfg.trainer
    plan = plan or whole_pass(len(train.labels), epoch, trainer, accelerator.num_processes)
    order, generator = epoch_randomness(cfg.seed, epoch, accelerator.process_index, train.labels[plan.pool],
                                        ClassBalance(trainer.class_balance),
                                        training_class_weights(train, trainer.class_weights_from))
    steps = optimizer_steps(shard_of(plan.pool[order], accelerator.process_index, accelerator.num_processes),
                            trainer.batch_size, trainer.grad_accum_steps, plan.steps)
    image_source_weights = source_weights(train.records, cfg.augmentation.synthetic_weight)
    augment_settings = trainer.augment_settings
    probabilities, targets = [], []
    row_every = trainer.log_every_steps if log_step_row is not None else None
    epoch_means, window = DeviceMeans(), DeviceMeans()
    tallies = (epoch_means, window) if row_every else (epoch_means,)
    watch = NonFiniteWatch(accelerator.device, "the training loss", "optim.lr, trainer.precision",
                           "lower optim.lr, use trainer.precision=bf16 instead of fp16, or check the input images")

    def objective_of(indices: torch.Tensor) -> torch.Tensor:
        images = to_unit_float(train.pixels[indices]).to(accelerator.device)
        if trainer.augment:
            images = random_augment(images, augment_settings, generator)
        labels = train.labels[indices].to(accelerator.device)
        logits = model(images).float()
        batch_source_weights = None if image_source_weights is None else image_source_weights[indices]
        objective = training_objective(logits, labels, loss_weights, trainer.label_smoothing, batch_source_weights)
        for means in tallies:  # over images: summed losses and image counts
            means.add("loss", F.cross_entropy(logits.detach(), labels, reduction="sum"), len(indices))
            means.add("objective", objective.detach() * len(indices), len(indices))
        probabilities.append(logits.detach().softmax(-1))
        targets.append(labels)
        return objective

    bar = progress_bar(steps, f"epoch {epoch}/{plan.epochs} train", accelerator)
    start = time.perf_counter()
    for step_number, micro_batches in enumerate(bar, start=1):
        step = optimizer_step(accelerator, model, optimizer, scheduler, micro_batches, objective_of,
                              model.parameters(), trainer.max_grad_norm)
        watch.observe(step.losses, step_number)
        for means in tallies:
            means.add("grad_norm", step.grad_norm)
        if average is not None and not accelerator.optimizer_step_was_skipped:  # fp16 skips inf/nan steps
            average.update(accelerator.unwrap_model(model))
        row_due = bool(row_every) and step_number % row_every == 0
        if step_number % HOST_CHECK_EVERY == 0 or step_number == len(steps) or row_due:
            watch.check(accelerator, f"epoch {epoch}, ")
            bar.set_postfix(loss=f"{epoch_means.local_mean('loss'):.3f}")
        if row_due:
            row = {"epoch": epoch, "lr": scheduler.get_last_lr()[0], **window.pop(accelerator)}
            log_step_row({"step": plan.steps_before + step_number, **prefixed("train_step", row)})
    seconds = time.perf_counter() - start
    probabilities = accelerator.gather(torch.cat(probabilities))
    targets = accelerator.gather(torch.cat(targets))
    metrics = classification_metrics(probabilities.cpu(), targets.cpu())
    metrics.update(epoch_means.pop(accelerator))
    metrics["step_seconds"] = seconds / len(steps)
    metrics["images_per_second"] = len(targets) / seconds
    metrics["optimizer_steps"] = len(steps)
    return metrics


@torch.no_grad()
def predict_probabilities(model, pixels: torch.Tensor, batch_size: int, accelerator, desc: str) -> torch.Tensor:
    """Class probabilities (N, C) for every image, in order, whatever the number of processes."""
    model.eval()
    count, processes = len(pixels), accelerator.num_processes
    indices = torch.arange(count)[accelerator.process_index::processes]
    padded = torch.full((math.ceil(count / processes),), -1, dtype=torch.long)
    padded[: len(indices)] = indices
    outputs = []
    for batch in tqdm(padded.split(batch_size), desc=desc, unit="batch", leave=False,
                      disable=not accelerator.is_main_process, mininterval=1.0):
        images = to_unit_float(pixels[batch.clamp(min=0)]).to(accelerator.device)
        outputs.append(model(images).float().softmax(-1))
    gathered = accelerator.gather(torch.cat(outputs)).cpu()
    order = accelerator.gather(padded.to(accelerator.device)).cpu()
    probabilities = torch.empty(count, len(CLASSES))
    keep = order >= 0
    probabilities[order[keep]] = gathered[keep]
    return probabilities


def evaluate(model, split: SplitTensors, cfg: JobConfig, accelerator, desc: str) -> tuple[dict, torch.Tensor]:
    probabilities = predict_probabilities(model, split.pixels, cfg.trainer.eval_batch_size, accelerator, desc)
    metrics = classification_metrics(probabilities, split.labels)
    metrics["loss"] = F.nll_loss(probabilities.clamp(min=1e-12).log(), split.labels).item()
    return metrics, probabilities


def prefixed(prefix: str, metrics: dict) -> dict:
    return {f"{prefix}/{key}": value for key, value in metrics.items()}


def log_step_budget(plans: list[EpochPlan], trainer: TrainerConfig) -> None:
    log.info("trainer.max_steps=%d: %d epochs (passes over the training images, the last partial) of %s optimizer "
             "steps; trainer.epochs=%d is not used", trainer.max_steps, len(plans),
             "+".join(str(plan.steps) for plan in plans), trainer.epochs)


def fit(cfg: JobConfig, splits: dict[str, SplitTensors], output_dir: Path, accelerator, logger: RunLogger) -> None:
    """Train for the planned epochs (`epoch_plans`), writing checkpoints/last and checkpoints/best; resumes when
    asked. Warm-up and the cosine schedule span every planned step; the weight average follows each of them."""
    from transformers import get_cosine_schedule_with_warmup

    mode = ClassifierMode(cfg.clip_lora.mode)
    plans = epoch_plans(splits["train"], cfg, accelerator.num_processes)
    if cfg.trainer.max_steps is not None and accelerator.is_main_process:
        log_step_budget(plans, cfg.trainer)
    # fp32 weights under the accelerator's autocast, as in test_best: the weights validated are the weights tested
    classifier, peft_model = build_classifier(cfg.clip_lora, cfg.paths.cache_dir, seed=cfg.seed)
    optimizer = torch.optim.AdamW(trainable_parameters(classifier), lr=cfg.optim.lr,
                                  weight_decay=cfg.optim.weight_decay, betas=tuple(cfg.optim.betas))
    total_steps = sum(plan.steps for plan in plans)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.optim.warmup_ratio * total_steps), total_steps)
    model, optimizer = accelerator.prepare(classifier, optimizer)
    average = WeightAverage(classifier, cfg.trainer.ema_decay) if cfg.trainer.ema_decay > 0 else None
    loss_weights = None
    if cfg.trainer.class_balance == ClassBalance.weighted_loss:
        loss_weights = training_class_weights(splits["train"], cfg.trainer.class_weights_from).to(accelerator.device)

    checkpoints = output_dir / "checkpoints"
    history: list[dict] = []
    best = {"epoch": 0, "value": -math.inf}
    start_epoch = 1
    if cfg.resume:
        last = last_checkpoint(checkpoints / "last")
        if last.exists():
            state = load_training_state(last)
            load_weights(classifier, peft_model, mode, last)
            restore_training(state, optimizer, scheduler, last)
            if average is not None:
                average.load_state_dict(state["weight_average"])
            history, best, start_epoch = state["history"], state["best"], state["epoch"] + 1
            log.info("resumed from %s after epoch %d", last, state["epoch"])
        else:
            log.warning("resume=true but %s holds no checkpoint: starting from epoch 1", checkpoints)
    logger.rewrite_history(history)  # exactly the epochs done so far: none when starting from epoch 1

    def log_step_row(row: dict) -> None:  # kept in the checkpoint's history too, so a resume rewrites it
        history.append(row)
        logger.log_row(row)

    validated = len(splits["val"].labels) > 0  # without a validation split every epoch is kept: the last one wins
    for epoch in range(start_epoch, len(plans) + 1):
        train_metrics = train_one_epoch(model, optimizer, scheduler, splits["train"], cfg, epoch, accelerator,
                                        loss_weights, average, log_step_row, plans[epoch - 1])
        row = {"epoch": epoch, "lr": scheduler.get_last_lr()[0], **prefixed("train", train_metrics)}
        if average is not None and validated:  # the live weights too, to show what the average adds
            live_metrics, _ = evaluate(model, splits["val"], cfg, accelerator, f"epoch {epoch} val (live)")
            row.update({f"val_live/{key}": live_metrics[key] for key in ("acc", "f1_macro", "recall_macro")})
        with average.applied(classifier) if average is not None else contextlib.nullcontext():
            if validated:
                val_metrics, _ = evaluate(model, splits["val"], cfg, accelerator, f"epoch {epoch} val")
                row.update(prefixed("val", val_metrics))
            history.append(row)
            value = row[cfg.trainer.selection_metric] if validated else epoch
            improved = value > best["value"]
            if improved:
                best = {"epoch": epoch, "value": value}
            if accelerator.is_main_process and improved:
                swap_folder(checkpoints / "best",
                                    lambda folder: save_weights(classifier, peft_model, mode, folder))
        if accelerator.is_main_process:
            progress = {"epoch": epoch, "history": history, "best": best}
            if average is not None:
                progress["weight_average"] = average.state_dict()
            save_checkpoint(checkpoints / "last", classifier, peft_model, mode,
                            optimizer if cfg.trainer.save_optimizer_state else None, scheduler, progress)
        accelerator.wait_for_everyone()
        logger.log_row(row)
        if accelerator.is_main_process and validated:
            log.info("epoch %d: train acc %.3f f1 %.3f | val acc %.3f recall %.3f f1 %.3f%s", epoch,
                     row["train/acc"], row["train/f1_macro"], row["val/acc"], row["val/recall_macro"],
                     row["val/f1_macro"], "  (best)" if improved else "")
        elif accelerator.is_main_process:
            log.info("epoch %d: train acc %.3f f1 %.3f (no validation split: the last epoch is kept)", epoch,
                     row["train/acc"], row["train/f1_macro"])


def test_best(cfg: JobConfig, splits: dict[str, SplitTensors], output_dir: Path, accelerator) -> dict:
    """Reload the best weights from disk into a fresh model and evaluate validation and test once (validation
    only with `trainer.evaluate_test=false`; test only without a validation split)."""
    mode = ClassifierMode(cfg.clip_lora.mode)
    classifier, peft_model = build_classifier(cfg.clip_lora, cfg.paths.cache_dir, seed=cfg.seed)
    best_folder = output_dir / "checkpoints" / "best"
    if mode != ClassifierMode.zero_shot:
        load_weights(classifier, peft_model, mode, best_folder)
    model = accelerator.prepare(classifier)
    results: dict = {"metrics": {}, "ci95": {}, "confusion_matrix": {}, "images": {},
                     "backbone": {"family": classifier.family.value,  # how images reached it, from its checkpoint
                                  "preprocessing": classifier.preprocessing.as_dict()}}
    for name in [name for name in ("val", "test") if len(splits[name].labels) > 0
                 and (name == "val" or cfg.trainer.evaluate_test)]:
        metrics, probabilities = evaluate(model, splits[name], cfg, accelerator, f"{name} (best weights)")
        results["confusion_matrix"][name] = metrics.pop("confusion_matrix")
        results["metrics"].update(prefixed(name, metrics))
        results["images"][name] = len(splits[name].labels)
        if accelerator.is_main_process:
            predictions = probabilities.argmax(-1).numpy()
            patients = np.array([r.patient_id for r in splits[name].records])
            intervals = bootstrap_intervals(predictions, splits[name].labels.numpy(), groups=patients,
                                            samples=cfg.trainer.bootstrap_samples, seed=cfg.seed)
            results["ci95"].update(prefixed(name, intervals))
            write_predictions(splits[name].records, probabilities,
                              output_dir / ("predictions.csv" if name == "test" else f"predictions_{name}.csv"))
    return results


def cap_evaluation(splits: dict[str, SplitTensors], trainer: TrainerConfig,
                   num_processes: int) -> tuple[dict[str, SplitTensors], dict]:
    """`trainer.max_eval_batches` per process of validation (and of test with `trainer.cap_test`): a fixed random
    subset, the same in training and in test_best. Returns the splits and {split: {evaluated, available}}."""
    if trainer.max_eval_batches is None:
        return splits, {}
    if trainer.max_eval_batches < 1:
        raise UserError(f"trainer.max_eval_batches={trainer.max_eval_batches} evaluates nothing",
                        "trainer.max_eval_batches", "give a number of batches >= 1, or null for no cap")
    limit = trainer.max_eval_batches * trainer.eval_batch_size * num_processes
    capped = {}
    for name in ("val", "test") if trainer.cap_test else ("val",):
        split = splits[name]
        if len(split.labels) > limit:
            keep = torch.randperm(len(split.labels), generator=torch.Generator().manual_seed(0))[:limit].sort().values
            splits = {**splits, name: SplitTensors([split.records[i] for i in keep.tolist()], split.pixels[keep],
                                                   split.labels[keep])}
            capped[name] = {"evaluated": limit, "available": len(split.labels)}
    return splits, capped


def kept_epoch(history: list[dict], metric: str) -> int:
    """The epoch whose weights were kept: the best by `metric`, or the last where nothing was validated."""
    if not history:
        return 0
    if metric not in history[0]:
        return history[-1]["epoch"]
    return max(history, key=lambda row: row[metric])["epoch"]


def optimizer_steps_run(history: list[dict]) -> int | None:
    """The optimizer steps of the epochs run (None where an epoch row of an older version lacks its count)."""
    if any("train/optimizer_steps" not in row for row in history):
        return None
    return sum(row["train/optimizer_steps"] for row in history)


def training_images_by_source(records: list[Record]) -> dict[str, int]:
    sources = Counter(r.source for r in records)
    return {source: sources[source] for source in SOURCES_COUNTED}


def release_memory(accelerator) -> None:
    """Drop what the accelerator keeps of a finished phase (prepared models, optimizers) before the next builds."""
    accelerator.free_memory()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def read_json_or_none(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def train_and_evaluate(cfg: JobConfig, data: PreparedData, output_dir: str | os.PathLike,
                       logger: RunLogger) -> dict[str, float]:
    output_dir = Path(output_dir)
    from accelerate.utils import set_seed

    check_splits_filled(data, cfg.dataset.name)
    precision = resolve_precision(cfg.trainer.precision, cfg.trainer.cpu)
    if cfg.trainer.precision == "auto":
        log.info("trainer.precision=auto: %s on this device", precision)
    accelerator = fresh_accelerator(precision, cfg.trainer.cpu)
    set_seed(cfg.seed)
    with accelerator.main_process_first():
        splits = load_splits(data, cfg.dataset.resolution, cfg.paths.cache_dir, accelerator.is_main_process,
                             cfg.dataset.intensity)
    splits, capped = cap_evaluation(splits, cfg.trainer, accelerator.num_processes)
    for name, sizes in capped.items():
        log.warning("the %s split is capped to %d of %d images (trainer.max_eval_batches)%s", name,
                    sizes["evaluated"], sizes["available"],
                    ": its metrics are a smoke test, not a result" if name == "test" else "")
    check_selection_split(cfg, [r.label for r in splits["val"].records])  # the validation split as capped
    mode = ClassifierMode(cfg.clip_lora.mode)
    if mode != ClassifierMode.zero_shot:
        fit(cfg, splits, output_dir, accelerator, logger)
        release_memory(accelerator)
    results = test_best(cfg, splits, output_dir, accelerator)
    release_memory(accelerator)
    results["capped"] = capped
    history = epoch_rows(read_json_lines(output_dir / "metrics.jsonl"))
    results["best_epoch"] = kept_epoch(history, cfg.trainer.selection_metric)
    results["mode"] = mode.value
    results["seed"] = cfg.seed
    results["image_size"] = {"cached": cfg.dataset.resolution, "model": cfg.clip_lora.image_size}  # what it saw
    results["processes"] = accelerator.num_processes  # shapes the effective batch, the schedule and the eval cap
    results["precision"] = precision
    results["train_fraction"] = cfg.dataset.train_fraction
    results["train_images"] = training_images_by_source(splits["train"].records)
    results["class_weights"] = class_weights_used(splits["train"], cfg.trainer)
    results["optimizer_steps"] = optimizer_steps_run(history)
    results["synthetic_filter"] = read_json_or_none(output_dir / "synthetic" / "filter.json")  # acceptance per class
    if accelerator.is_main_process:
        write_json_atomic(output_dir / "results.json", results)
        figures = {f"confusion_{name}": confusion_matrix_png(
            results["confusion_matrix"][name], output_dir / f"confusion_{name}.png",
            f"{name}: acc {results['metrics'][f'{name}/acc']:.3f}, macro F1 "
            f"{results['metrics'][f'{name}/f1_macro']:.3f}") for name in results["confusion_matrix"]}
        if history:
            figures["curves"] = curves_png(history, output_dir / "curves.png")
        logger.log_images(figures)
        logger.set_summary({**results["metrics"], "best_epoch": results["best_epoch"]})
        logger.mark_not_a_result(not_a_result(capped, cfg.dataset.limit_per_class))
    return {key: value for key, value in results["metrics"].items() if isinstance(value, float)}
