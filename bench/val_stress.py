"""Validation stress test: how a trained run's best weights hold up when the validation images are shifted.

    python bench/val_stress.py RUN_DIR [RUN_DIR ...] [--out FILE]

Each run's own validation split (from its manifest.csv) is evaluated as it is and under one shift at a time: gamma
0.7 and 1.4, contrast x0.75, zoom in and out by 15 % (zooming out repeats the edge pixels, where training
augmentation pads with black, so it is a shift for every recipe), a Gaussian blur (sigma 1 px) and an unsharp mask
(the same blur, amount 1): the official test images were nearly all resized by another tool than a third of the
training images, so sharpness is a candidate shift. A shift acts on the source pixels, before the run's
`dataset.intensity` step (a deployed image is equalised after it was exposed, not before), and the run's weights
are evaluated under its own autocast (`trainer.precision`). The test split is never read. A recipe whose
validation normals flip to VIRUS under a mild gamma or zoom is leaning on exposure or framing;
`experiments/kermany_cpu.yaml` chose its augmentation ranges from this table. Prints one table per run and writes
them all as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pneumo_exp.classify.metrics import classification_metrics  # noqa: E402
from pneumo_exp.classify.predict import class_probabilities, load_as_trained  # noqa: E402
from pneumo_exp.data import manifest  # noqa: E402
from pneumo_exp.data.augment import affine_warp, scale_contrast, to_unit_float  # noqa: E402
from pneumo_exp.data.cache import open_or_build  # noqa: E402
from pneumo_exp.data.images import standardize_intensity  # noqa: E402
from pneumo_exp.labels import CLASSES, class_index  # noqa: E402


def zoom(images: torch.Tensor, factor: float) -> torch.Tensor:
    """factor > 1 magnifies the centre; < 1 shrinks the image and repeats its edge pixels around it."""
    theta = torch.tensor([[1 / factor, 0.0, 0.0], [0.0, 1 / factor, 0.0]]).expand(len(images), 2, 3)
    return affine_warp(images, theta, padding_mode="border")


def gaussian_blur(images: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    offsets = torch.arange(-2, 3, dtype=images.dtype)
    kernel_1d = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    kernel = (kernel_1d[:, None] * kernel_1d[None, :] / kernel_1d.sum() ** 2).view(1, 1, 5, 5)
    return torch.nn.functional.conv2d(torch.nn.functional.pad(images, (2, 2, 2, 2), mode="replicate"), kernel)


SHIFTS = {
    "none": lambda x: x,
    "gamma 0.7": lambda x: x.pow(0.7),
    "gamma 1.4": lambda x: x.pow(1.4),
    "contrast x0.75": lambda x: scale_contrast(x, 0.75).clamp(0, 1),
    "zoom in 15%": lambda x: zoom(x, 1.15),
    "zoom out 15%": lambda x: zoom(x, 1 / 1.15),
    "blur 1px": gaussian_blur,
    "sharpen": lambda x: (2 * x - gaussian_blur(x)).clamp(0, 1),
}


def as_deployed(source: torch.Tensor, shift, intensity: str) -> torch.Tensor:
    """float (N, 1, R, R) images as a shifted source meets the run: uint8 (N, R, R) source pixels shifted, stored
    as uint8 again, then the run's intensity step."""
    shifted = shift(to_unit_float(source)).clamp(0, 1)[:, 0].mul(255).round().to(torch.uint8).numpy()
    return to_unit_float(torch.from_numpy(np.stack([standardize_intensity(image, intensity) for image in shifted])))


@torch.no_grad()
def stress(run_dir: Path, cache_dir: str) -> dict[str, dict[str, float]]:
    classifier, run_cfg, accelerator = load_as_trained(run_dir, cache_dir)
    records = [r for r in manifest.read_csv(run_dir / "manifest.csv") if r.split == "val"]
    if not records:
        raise ValueError(f"{run_dir / 'manifest.csv'} lists no validation images")
    cache = open_or_build(records, run_cfg.dataset.resolution, cache_dir, progress=True)  # before dataset.intensity
    source = torch.from_numpy(np.ascontiguousarray(cache.pixels[cache.rows_of(records)]))
    intensity = run_cfg.dataset.get("intensity", "none")
    labels = torch.tensor([class_index(r.label) for r in records])
    table = {}
    for name, shift in SHIFTS.items():
        probabilities = torch.cat([class_probabilities(classifier, as_deployed(batch, shift, intensity), accelerator)
                                   for batch in source.split(128)])
        metrics = classification_metrics(probabilities, labels)
        table[name] = {key: round(float(metrics[key]), 4)
                       for key in ("acc", "f1_macro", *[f"recall_{c}" for c in CLASSES])}
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="finished run folders (config.yaml, manifest.csv, "
                                                           "checkpoints/best)")
    parser.add_argument("--cache-dir", default=os.environ.get("PNEUMO_EXP_CACHE", Path.home() / ".cache/pneumo_exp"),
                        help="decoded images and random-init presets (default: $PNEUMO_EXP_CACHE or "
                             "~/.cache/pneumo_exp, as paths.cache_dir)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "val_stress.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    report = {}
    for run_dir in args.runs:
        report[str(run_dir)] = table = stress(run_dir, str(args.cache_dir))
        print(f"\n{run_dir} (validation split)\n{'shift':<16} {'acc':>6} {'F1':>6}  recall " + " / ".join(CLASSES))
        for name, row in table.items():
            recalls = " / ".join(f"{row[f'recall_{c}']:.2f}" for c in CLASSES)
            print(f"{name:<16} {row['acc']:>6.3f} {row['f1_macro']:>6.3f}  {recalls}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
