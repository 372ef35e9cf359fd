"""Training throughput of the `small` conv tower by autocast precision and memory layout, ratios in one run.

    python bench/bench_precision.py [--sizes 128 160] [--steps 8] [--repeats 3] [--out FILE]

One training step is the recipe's: a batch of 32 grey images through the `small` CLIP classifier (conv tower,
frozen text tower), class-weighted cross-entropy, backward, AdamW. Four variants per image size: fp32 or bf16
autocast (`trainer.precision`), weights and activations in the default (NCHW) or channels-last layout (the
tower's default). Each timing is the best of `--repeats` interleaved rounds; only the ratios mean anything on a
shared machine. bf16 pays where the CPU has native bf16 instructions (AVX-512 BF16 or AMX); elsewhere it can be
slower than fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import compose  # noqa: E402

from pneumo_exp.classify.model import build_classifier, trainable_parameters  # noqa: E402
from pneumo_exp.labels import CLASSES  # noqa: E402

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def training_step(size: int, precision: str, layout: str, cache_dir: Path, batch: int = 32):
    cfg = compose(["clip_lora=small", f"clip_lora.image_size={size}", "paths.output_dir=/tmp/unused",
                   f"paths.cache_dir={cache_dir}"])
    torch.manual_seed(0)
    classifier, _ = build_classifier(cfg.clip_lora, cfg.paths.cache_dir)
    tower = classifier.clip.vision_model
    tower.memory_format = LAYOUTS[layout]
    tower.to(memory_format=LAYOUTS[layout])
    optimizer = torch.optim.AdamW(trainable_parameters(classifier), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 1, size, size, generator=generator)
    labels = torch.randint(len(CLASSES), (batch,), generator=generator)
    classifier.train()

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = F.cross_entropy(classifier(images).float(), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 160])
    parser.add_argument("--steps", type=int, default=8, help="training steps per timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/pneumo_exp_bench_cache"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "precision.json")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    for size in args.sizes:
        steps = {(precision, layout): training_step(size, precision, layout, args.cache_dir)
                 for precision in ("fp32", "bf16") for layout in LAYOUTS}
        for step in steps.values():  # warm-up: kernels, allocator
            step()
        seconds = {key: float("inf") for key in steps}
        for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits every variant
            for key, step in steps.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
                seconds[key] = min(seconds[key], time.perf_counter() - start)
        baseline = seconds[("fp32", "nchw")]
        for (precision, layout), value in seconds.items():
            rows.append({"image_size": size, "precision": precision, "layout": layout,
                         "images_per_second": round(32 * args.steps / value, 1),
                         "speedup_vs_fp32_nchw": round(baseline / value, 2)})
            print(f"{size:>4} px  {precision:<5} {layout:<14} {rows[-1]['images_per_second']:>7.1f} img/s  "
                  f"x{rows[-1]['speedup_vs_fp32_nchw']:.2f}", flush=True)
    report = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "torch": torch.__version__}, "batch_size": 32, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
