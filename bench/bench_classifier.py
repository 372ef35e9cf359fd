"""Classifier throughput: the framework's epoch against plain PyTorch loops doing the same work, ratios in one run.

    python bench/bench_classifier.py [--images DIR] [--presets tiny small] [--count 256] [--out bench.json]
    python bench/bench_classifier.py --tiny     # seconds: the tiny preset, 24 images, one round (the test suite)

Three ways to train one epoch of the same images with the same model, loss and optimizer:
  framework      `train_one_epoch` on cached uint8 tensors (accelerate, augmentation, metrics, progress)
  plain_cached   a ten-line loop on the same cached tensors, same augmentation and clipping, same batch
  original       the original study's way: decode every JPEG and tokenise the prompts every step, batch 4
and two ways to predict: `predict_probabilities` against a plain no-grad loop. The framework and the plain loop run
at batch 32 and again at the original's batch 4, and each speed-up compares two runs of one batch size (the JSON
lists every run's batch). Each timing is the best of `--repeats` interleaved rounds (these machines are noisy; only
ratios within one run are meaningful).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import compose  # noqa: E402

from pneumo_exp.classify.model import build_classifier, trainable_parameters  # noqa: E402
from pneumo_exp.classify.train import (  # noqa: E402
    SplitTensors,
    predict_probabilities,
    train_one_epoch,
)
from pneumo_exp.config import AugmentSettings, Precision  # noqa: E402
from pneumo_exp.core.training import fresh_accelerator  # noqa: E402
from pneumo_exp.data.augment import random_augment, to_unit_float  # noqa: E402
from pneumo_exp.data.images import decode_grayscale  # noqa: E402
from pneumo_exp.data.phantom import phantom_records, render  # noqa: E402
from pneumo_exp.labels import CLASSES, class_index  # noqa: E402


def jpeg_files(source: Path | None, count: int, folder: Path) -> list[tuple[Path, int]]:
    """`count` labelled JPEGs: from a {split}/{class}/ folder if given, else phantom images written as JPEG."""
    if source is not None:
        files = [(path, class_index(path.parent.name)) for path in sorted(source.rglob("*.jp*g"))
                 if path.parent.name in CLASSES]
        rng = np.random.default_rng(0)
        return [files[i] for i in rng.choice(len(files), size=min(count, len(files)), replace=False)]
    from PIL import Image

    records = phantom_records(patients_per_class=count // 3 + 1, test_patients_per_class=0, images_per_patient=1)
    labelled = []
    for record in records[:count]:
        path = folder / f"{record.patient_id}.jpg"
        Image.fromarray(render(record.path, 224)).save(path, quality=95)
        labelled.append((path, class_index(record.label)))
    return labelled


def best_time(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


ORIGINAL_BATCH = 4  # the original study's training batch
PREDICT_BATCH = 128
SPEEDUPS = {  # name: (slower run, faster run), each pair at one batch size
    "cached_epoch_speedup_vs_original": ("original_decode_batch4", "framework_batch4"),
    "cached_batch4_speedup_vs_original": ("original_decode_batch4", "plain_cached_batch4"),
}


def bench_preset(preset: str, files: list[tuple[Path, int]], repeats: int, cache_dir: Path) -> dict:
    overrides = [f"clip_lora={preset}", "paths.output_dir=/tmp/unused", f"paths.cache_dir={cache_dir}",
                 "trainer.epochs=1", "trainer.class_balance=none", "trainer.cpu=true"]
    cfg = compose([*overrides, "trainer.batch_size=32"])
    cfg_original_batch = compose([*overrides, f"trainer.batch_size={ORIGINAL_BATCH}"])
    size = cfg.clip_lora.image_size
    pixels = torch.from_numpy(np.stack([decode_grayscale(path, size) for path, _ in files]))
    labels = torch.tensor([label for _, label in files])
    split = SplitTensors(records=[], pixels=pixels, labels=labels)
    torch.manual_seed(0)
    classifier, _ = build_classifier(cfg.clip_lora, cfg.paths.cache_dir)
    optimizer = torch.optim.AdamW(trainable_parameters(classifier), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    accelerator = fresh_accelerator(Precision(cfg.trainer.precision).value, cfg.trainer.cpu)
    model, optimizer = accelerator.prepare(classifier, optimizer)
    settings, batch = AugmentSettings(), cfg.trainer.batch_size

    def framework(run_cfg=cfg) -> None:
        train_one_epoch(model, optimizer, scheduler, split, run_cfg, 1, accelerator, loss_weights=None, average=None)

    def plain_cached(batch_size: int = batch) -> None:
        classifier.train()
        generator = torch.Generator().manual_seed(0)
        for indices in torch.randperm(len(labels), generator=generator).split(batch_size):
            images = random_augment(to_unit_float(pixels[indices]), settings, generator)
            loss = F.cross_entropy(classifier(images), labels[indices])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(classifier.parameters(), cfg.trainer.max_grad_norm)
            optimizer.step()

    prompts = [cfg.clip_lora.prompts[label][0] for label in CLASSES]
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(classifier_source(cfg))
    max_length = classifier.clip.config.text_config.max_position_embeddings

    def original(batch_size: int = ORIGINAL_BATCH) -> None:
        classifier.train()
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            images = to_unit_float(torch.from_numpy(np.stack([decode_grayscale(p, size) for p, _ in chunk])))
            tokens = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                               return_tensors="pt")
            text = classifier.clip.get_text_features(**tokens).pooler_output  # text encoded every step
            image = classifier.clip.get_image_features(pixel_values=classifier.pixel_values(images)).pooler_output
            logits = 100 * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()
            loss = F.cross_entropy(logits, torch.tensor([label for _, label in chunk]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    def framework_predict() -> None:
        predict_probabilities(model, pixels, PREDICT_BATCH, accelerator, "bench")

    @torch.no_grad()
    def plain_predict() -> None:
        classifier.eval()
        for indices in torch.arange(len(labels)).split(PREDICT_BATCH):
            classifier(to_unit_float(pixels[indices])).softmax(-1)

    runs = {"framework": framework, "plain_cached": plain_cached,
            "framework_batch4": lambda: framework(cfg_original_batch),
            "plain_cached_batch4": lambda: plain_cached(ORIGINAL_BATCH), "original_decode_batch4": original,
            "framework_predict": framework_predict, "plain_predict": plain_predict}
    batch_sizes = {"framework": batch, "plain_cached": batch, "framework_batch4": ORIGINAL_BATCH,
                   "plain_cached_batch4": ORIGINAL_BATCH, "original_decode_batch4": ORIGINAL_BATCH,
                   "framework_predict": PREDICT_BATCH, "plain_predict": PREDICT_BATCH}
    for run in runs.values():  # warm-up: lazy initialisation, allocator, caches
        run()
    seconds = {name: float("inf") for name in runs}
    for _ in range(repeats):  # interleaved, so a slow spell of the machine hits every variant
        for name, run in runs.items():
            seconds[name] = min(seconds[name], best_time(run, 1))
    images_per_second = {name: len(files) / value for name, value in seconds.items()}
    return {
        "preset": preset, "images": len(files), "image_size": size, "batch_size": batch, "batch_sizes": batch_sizes,
        "images_per_second": {k: round(v, 1) for k, v in images_per_second.items()},
        "framework_overhead_vs_plain_cached": round(seconds["framework"] / seconds["plain_cached"] - 1, 4),
        "predict_overhead_vs_plain": round(seconds["framework_predict"] / seconds["plain_predict"] - 1, 4),
        **{name: round(seconds[slower] / seconds[faster], 2) for name, (slower, faster) in SPEEDUPS.items()},
    }


def classifier_source(cfg) -> str:
    from pneumo_exp.classify.model import backbone_source

    return backbone_source(cfg.clip_lora, cfg.paths.cache_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, help="a folder with {NORMAL,BACTERIA,VIRUS}/*.jpg (default: phantom)")
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--count", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/classifier.json"))
    parser.add_argument("--tiny", action="store_true", help="a few seconds: --presets tiny --count 24 --repeats 1")
    args = parser.parse_args(argv)
    if args.tiny:
        args.presets, args.count, args.repeats = ["tiny"], 24, 1
    with tempfile.TemporaryDirectory() as scratch:
        files = jpeg_files(args.images, args.count, Path(scratch))
        results = {"machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                               "platform": platform.platform(), "torch": torch.__version__},
                   "presets": [bench_preset(p, files, args.repeats, Path(scratch) / "cache") for p in args.presets]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for row in results["presets"]:
        print(f"\n{row['preset']} ({row['images']} images, {row['image_size']} px, batch {row['batch_size']})")
        for name, value in row["images_per_second"].items():
            print(f"  {name:<24}{value:>10.1f} images/s")
        overhead = row["framework_overhead_vs_plain_cached"]
        print(f"  framework overhead vs plain loop on the same tensors: {overhead:+.1%}")
        print(f"  predict overhead vs plain no-grad loop:              {row['predict_overhead_vs_plain']:+.1%}")
        print(f"  cached epoch vs original (decode + tokenise), both at batch {ORIGINAL_BATCH}: framework "
              f"{row['cached_epoch_speedup_vs_original']}x, plain loop {row['cached_batch4_speedup_vs_original']}x")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
