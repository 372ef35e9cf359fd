"""Training throughput of the recipe's classifier step by autocast precision and memory layout, ratios in one run.

    python bench/bench_precision.py [--recipe kermany_cpu] [--sizes 128 160] [--steps 8] [--repeats 3] [--out FILE]

One training step is the recipe's own: `train_one_epoch` under `experiment=<recipe>` (default kermany_cpu, the
`small` conv tower) with the recipe's batch and accumulation, augmentation, class-weighted and label-smoothed loss,
gradient clipping, AdamW settings and weight average, on random grey images with random labels; the time is the
epoch's own step time (`step_seconds`: the step loop, not the epoch's metrics). Four variants per image size: fp32 or
bf16 autocast (`trainer.precision`), weights and activations in the default (NCHW) or channels-last layout (the
tower's default). The JSON lists the step's settings as run. Each timing is the best of `--repeats` interleaved
rounds; only the ratios mean anything on a shared machine. bf16 pays where the CPU has native bf16 instructions
(AVX-512 BF16 or AMX); elsewhere it can be slower than fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import compose  # noqa: E402

from pneumo_exp.classify.model import build_classifier, trainable_parameters  # noqa: E402
from pneumo_exp.classify.train import SplitTensors, class_weights, train_one_epoch  # noqa: E402
from pneumo_exp.config import ClassBalance, Precision  # noqa: E402
from pneumo_exp.core.ema import WeightAverage  # noqa: E402
from pneumo_exp.core.training import fresh_accelerator  # noqa: E402
from pneumo_exp.labels import CLASSES  # noqa: E402

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
PRECISIONS = {"fp32": Precision.no.value, "bf16": Precision.bf16.value}  # the bench's names: trainer.precision


def recipe_config(recipe: str, size: int, precision: str, cache_dir: Path):
    return compose([f"experiment={recipe}", f"clip_lora.image_size={size}", f"dataset.resolution={size}",
                    f"trainer.precision={PRECISIONS[precision]}", "trainer.cpu=true", "paths.output_dir=/tmp/unused",
                    f"paths.cache_dir={cache_dir}"])


def step_settings(cfg) -> dict:
    """What the timed step does, as the recipe sets it."""
    trainer = cfg.trainer
    return {"batch_size": trainer.batch_size, "grad_accum_steps": trainer.grad_accum_steps,
            "augment": trainer.augment, "class_balance": ClassBalance(trainer.class_balance).value,
            "label_smoothing": trainer.label_smoothing, "ema_decay": trainer.ema_decay,
            "max_grad_norm": trainer.max_grad_norm, "lr": cfg.optim.lr, "weight_decay": cfg.optim.weight_decay}


def random_images(count: int, size: int) -> SplitTensors:
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (count, size, size), dtype=torch.uint8, generator=generator)
    return SplitTensors([], pixels, torch.randint(len(CLASSES), (count,), generator=generator))


def epoch_step_seconds(cfg, layout: str, steps: int) -> float:
    """Seconds per optimizer step of one `train_one_epoch` of `steps` steps: a fresh model, optimizer and weight
    average set up as `fit` sets them (the learning rate held constant), in a fresh accelerator at the config's
    precision."""
    accelerator = fresh_accelerator(Precision(cfg.trainer.precision).value, cfg.trainer.cpu)
    classifier, _ = build_classifier(cfg.clip_lora, cfg.paths.cache_dir, seed=cfg.seed)
    tower = classifier.clip.vision_model
    tower.memory_format = LAYOUTS[layout]
    tower.to(memory_format=LAYOUTS[layout])
    optimizer = torch.optim.AdamW(trainable_parameters(classifier), lr=cfg.optim.lr,
                                  weight_decay=cfg.optim.weight_decay, betas=tuple(cfg.optim.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer = accelerator.prepare(classifier, optimizer)
    average = WeightAverage(classifier, cfg.trainer.ema_decay) if cfg.trainer.ema_decay > 0 else None
    train = random_images(steps * cfg.trainer.batch_size * cfg.trainer.grad_accum_steps, cfg.clip_lora.image_size)
    weights = class_weights(train.labels) if cfg.trainer.class_balance == ClassBalance.weighted_loss else None
    return train_one_epoch(model, optimizer, scheduler, train, cfg, 1, accelerator, weights, average)["step_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="kermany_cpu", help="the experiment whose training step is timed")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 160])
    parser.add_argument("--steps", type=int, default=8, help="training steps per timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/pneumo_exp_bench_cache"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "precision.json")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    for size in args.sizes:
        configs = {precision: recipe_config(args.recipe, size, precision, args.cache_dir) for precision in PRECISIONS}
        variants = [(precision, layout) for precision in PRECISIONS for layout in LAYOUTS]
        for precision, layout in variants:  # warm-up: kernels, allocator
            epoch_step_seconds(configs[precision], layout, 1)
        seconds = {variant: float("inf") for variant in variants}
        for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits every variant
            for precision, layout in variants:
                seconds[(precision, layout)] = min(seconds[(precision, layout)],
                                                   epoch_step_seconds(configs[precision], layout, args.steps))
        baseline = seconds[("fp32", "nchw")]
        images_per_step = configs["fp32"].trainer.batch_size * configs["fp32"].trainer.grad_accum_steps
        for (precision, layout), value in seconds.items():
            rows.append({"image_size": size, "precision": precision, "layout": layout,
                         "images_per_second": round(images_per_step / value, 1),
                         "speedup_vs_fp32_nchw": round(baseline / value, 2)})
            print(f"{size:>4} px  {precision:<5} {layout:<14} {rows[-1]['images_per_second']:>7.1f} img/s  "
                  f"x{rows[-1]['speedup_vs_fp32_nchw']:.2f}", flush=True)
    step = step_settings(recipe_config(args.recipe, args.sizes[0], "fp32", args.cache_dir))
    print(f"the step of experiment={args.recipe}: {step}")
    report = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "torch": torch.__version__}, "recipe": args.recipe, "step": step, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
