"""The classifier stage: train CLIP on cached tensors, keep the best epoch by `trainer.selection_metric`, test it once.

Reads top to bottom: tensors from the cache, model, optimiser and schedule, resume, epochs (train, validate,
checkpoint, log), then the test split evaluated once with the best weights reloaded from disk. With
`trainer.ema_decay > 0` the weights validated, kept as best and tested are the moving average (`ema.py`).
With no validation split (`dataset.val_fraction=0`: the final fit on train + val, for an epoch count chosen on
validation beforehand) nothing is selected: the last epoch's weights are kept and tested.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import time
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
from pneumo_exp.config import ClassBalance, ClassifierMode, JobConfig, Precision, TrainerConfig
from pneumo_exp.core.checkpoint import last_checkpoint, restore_training
from pneumo_exp.core.ema import WeightAverage
from pneumo_exp.core.files import swap_folder, write_json_atomic
from pneumo_exp.core.history import epoch_rows, read_json_lines
from pneumo_exp.core.seeds import epoch_seed, rank_seed
from pneumo_exp.core.training import (
    DeviceMeans,
    NonFiniteWatch,
    fresh_accelerator,
    optimizer_step,
    optimizer_steps,
    optimizer_steps_per_epoch,
    progress_bar,
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


def training_objective(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None,
                       smoothing: float) -> torch.Tensor:
    """Cross-entropy against the target (1 - smoothing) * one-hot + smoothing / C, uniform over the classes, each
    image's loss weighted by its class weight: the weighted mean, as `F.cross_entropy(weight=...)` takes it.
    (PyTorch's own `weight` with `label_smoothing` would weight the smoothing share by class too.)"""
    losses = F.cross_entropy(logits, labels, label_smoothing=smoothing, reduction="none")
    if weights is None:
        return losses.mean()
    image_weights = weights[labels]
    return (losses * image_weights).sum() / image_weights.sum()


def epoch_order(labels: torch.Tensor, balance: ClassBalance, generator: torch.Generator) -> torch.Tensor:
    if balance == ClassBalance.sampler:
        weights = class_weights(labels)[labels]
        return torch.multinomial(weights, len(labels), replacement=True, generator=generator)
    return torch.randperm(len(labels), generator=generator)


def epoch_randomness(seed: int, epoch: int, process_index: int, labels: torch.Tensor,
                     balance: ClassBalance) -> tuple[torch.Tensor, torch.Generator]:
    """The epoch's sample order, the same on every rank, and this rank's own generator for augmentation; torch's
    global generator (dropout, LoRA dropout) is seeded for this rank too. All depend on (seed, epoch, rank) only, so
    a resumed run repeats them; rank 0 draws what a single-process run always drew."""
    shared_seed = epoch_seed(seed, epoch)
    shared = torch.Generator().manual_seed(shared_seed)
    order = epoch_order(labels, balance, shared)
    if process_index == 0:
        torch.manual_seed(shared_seed)
        return order, shared  # the shared stream, continued past the order
    own_seed = rank_seed(shared_seed, process_index)
    torch.manual_seed(own_seed)
    return order, torch.Generator().manual_seed(own_seed)


def train_one_epoch(model, optimizer, scheduler, train: SplitTensors, cfg: JobConfig, epoch: int, accelerator,
                    loss_weights: torch.Tensor | None, average: WeightAverage | None,
                    log_step_row: Callable[[dict], None] | None = None) -> dict:
    """One epoch; `loss` is the plain cross-entropy (comparable with `val/loss`), `objective` the loss optimised
    (`training_objective`: class-weighted with `loss_weights`, smoothed uniformly by `trainer.label_smoothing`),
    `grad_norm` the mean gradient norm of its steps (before clipping). With `trainer.log_every_steps` = N, every N
    optimizer steps of the epoch `log_step_row` gets a step row: `step` (counted over the run) and `train_step/*`,
    the means of those N steps. Nothing is read back to the host during the epoch except the non-finite watch every
    HOST_CHECK_EVERY steps, at each step row and after the last step."""
    model.train()
    trainer = cfg.trainer
    order, generator = epoch_randomness(cfg.seed, epoch, accelerator.process_index, train.labels,
                                        ClassBalance(trainer.class_balance))
    steps = optimizer_steps(shard_of(order, accelerator.process_index, accelerator.num_processes),
                            trainer.batch_size, trainer.grad_accum_steps, trainer.max_steps_per_epoch)
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
        objective = training_objective(logits, labels, loss_weights, trainer.label_smoothing)
        for means in tallies:  # over images: summed losses and image counts
            means.add("loss", F.cross_entropy(logits.detach(), labels, reduction="sum"), len(indices))
            means.add("objective", objective.detach() * len(indices), len(indices))
        probabilities.append(logits.detach().softmax(-1))
        targets.append(labels)
        return objective

    bar = progress_bar(steps, f"epoch {epoch}/{trainer.epochs} train", accelerator)
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
            log_step_row({"step": (epoch - 1) * len(steps) + step_number, **prefixed("train_step", row)})
    seconds = time.perf_counter() - start
    probabilities = accelerator.gather(torch.cat(probabilities))
    targets = accelerator.gather(torch.cat(targets))
    metrics = classification_metrics(probabilities.cpu(), targets.cpu())
    metrics.update(epoch_means.pop(accelerator))
    metrics["step_seconds"] = seconds / len(steps)
    metrics["images_per_second"] = len(targets) / seconds
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


def fit(cfg: JobConfig, splits: dict[str, SplitTensors], output_dir: Path, accelerator, logger: RunLogger) -> None:
    """Train for the configured epochs, writing checkpoints/last and checkpoints/best; resumes when asked."""
    from transformers import get_cosine_schedule_with_warmup

    mode = ClassifierMode(cfg.clip_lora.mode)
    # fp32 weights under the accelerator's autocast, as in test_best: the weights validated are the weights tested
    classifier, peft_model = build_classifier(cfg.clip_lora, cfg.paths.cache_dir, seed=cfg.seed)
    optimizer = torch.optim.AdamW(trainable_parameters(classifier), lr=cfg.optim.lr,
                                  weight_decay=cfg.optim.weight_decay, betas=tuple(cfg.optim.betas))
    total_steps = cfg.trainer.epochs * optimizer_steps_per_epoch(
        len(splits["train"].labels), accelerator.num_processes, cfg.trainer.batch_size, cfg.trainer.grad_accum_steps,
        cfg.trainer.max_steps_per_epoch)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.optim.warmup_ratio * total_steps), total_steps)
    model, optimizer = accelerator.prepare(classifier, optimizer)
    average = WeightAverage(classifier, cfg.trainer.ema_decay) if cfg.trainer.ema_decay > 0 else None
    loss_weights = None
    if cfg.trainer.class_balance == ClassBalance.weighted_loss:
        loss_weights = class_weights(splits["train"].labels).to(accelerator.device)

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
    for epoch in range(start_epoch, cfg.trainer.epochs + 1):
        train_metrics = train_one_epoch(model, optimizer, scheduler, splits["train"], cfg, epoch, accelerator,
                                        loss_weights, average, log_step_row)
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


def release_memory(accelerator) -> None:
    """Drop what the accelerator keeps of a finished phase (prepared models, optimizers) before the next builds."""
    accelerator.free_memory()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def train_and_evaluate(cfg: JobConfig, data: PreparedData, output_dir: str | os.PathLike,
                       logger: RunLogger) -> dict[str, float]:
    output_dir = Path(output_dir)
    from accelerate.utils import set_seed

    check_splits_filled(data, cfg.dataset.name)
    accelerator = fresh_accelerator(Precision(cfg.trainer.precision).value, cfg.trainer.cpu)
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
    results["train_images"] = {"real": sum(r.source == "real" for r in splits["train"].records),
                               "synthetic": sum(r.source == "synthetic" for r in splits["train"].records)}
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
