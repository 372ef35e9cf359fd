"""Real-size smoke bench: the paper rows at true architecture size (random weights), at toy step counts.

    python bench/bench_real_size.py [--configs ../shared/models] [--data ../shared/data/kermany-224]
                                    [--rows original_study,zero_shot] [--images-per-class 8] [--out FILE]
                                    [--medsiglip | --medsiglip-only]

Builds random-init CLIP ViT-L/14 and Stable Diffusion 2 (768 px) folders once from the official configuration files
in `--configs` (any folder with the layout of `../shared/models`: clip-vit-large-patch14/, stable-diffusion-2/,
clip-bpe/), then runs each row of experiments/paper/ in this process on a small subset of the real data (the first
`--images-per-class` files of each split and class), with each stage timed and its peak memory sampled (CPU resident
set; CUDA max allocated on a GPU).

On a GPU the same command also measures what the paper table's cost depends on (`--throughput` runs this part on
a CPU too, at tiny sizes, to exercise it): CLIP-L LoRA steps at batch 32 in bf16 (images/s and model-FLOP
utilisation against the bf16 matmul peak measured in the same run), SD2-768 LoRA steps/s and images/s with and
without latent caching at the preset's batch and accumulation (the rows train the LoRA at batch 1 x 1), and
generation images/s at 25 steps. Writes one JSON (default bench/results/real_size.json); the numbers are of this
machine, this load, this run.

`--medsiglip` adds (`--medsiglip-only`: runs only) a few LoRA steps of clip_lora=medsiglip_448 on a random-init
MedSigLIP-shaped model (`--configs`/medsiglip-448/ if present, else the published sizes), timed, with peak memory.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import torch  # noqa: E402
from conftest import compose  # noqa: E402

from pneumo_exp.config import plain  # noqa: E402
from pneumo_exp.core.files import build_folder_once, write_json_atomic  # noqa: E402

PAPER_ROWS = ("original_study", "original_no_augmentation", "zero_shot", "linear_probe", "lora", "full")
SD_COMPONENTS = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}


# ------------------------------------------------------------------------------------ real-size random-init models


def copy_json_files(source: Path, target: Path) -> None:
    for path in source.glob("*.json"):
        shutil.copy(path, target / path.name)


def build_clip(configs: Path, folder: Path) -> None:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    CLIPModel(CLIPConfig.from_pretrained(configs / "clip-vit-large-patch14")).save_pretrained(folder)
    copy_json_files(configs / "clip-vit-large-patch14", folder)
    copy_json_files(configs / "clip-bpe", folder)
    shutil.copy(configs / "clip-bpe" / "merges.txt", folder / "merges.txt")


def build_sd2(configs: Path, folder: Path) -> None:
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    source = configs / "stable-diffusion-2"
    torch.manual_seed(0)
    for name, class_name in SD_COMPONENTS.items():
        model_class = getattr(diffusers, class_name)
        model_class.from_config(model_class.load_config(source / name)).save_pretrained(folder / name)
    CLIPTextModel(CLIPTextConfig.from_pretrained(source / "text_encoder")).save_pretrained(folder / "text_encoder")
    for name in ("tokenizer", "scheduler", "feature_extractor"):
        (folder / name).mkdir(parents=True, exist_ok=True)
        copy_json_files(source / name, folder / name)
    copy_json_files(configs / "clip-bpe", folder / "tokenizer")
    shutil.copy(configs / "clip-bpe" / "merges.txt", folder / "tokenizer" / "merges.txt")
    shutil.copy(source / "model_index.json", folder / "model_index.json")


# google/medsiglip-448 as published: SigLIP so400m-shaped towers (vision ViT patch 14 at 448 px, ~400 M parameters;
# text 27 layers, ~450 M with its 32k vocabulary), used where --configs holds no medsiglip-448/config.json
MEDSIGLIP_448 = {"vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                                   "num_attention_heads": 16, "patch_size": 14, "image_size": 448},
                 "text_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                                 "num_attention_heads": 16, "max_position_embeddings": 64, "vocab_size": 32000}}


def build_medsiglip(configs: Path, folder: Path) -> None:
    """A random-init MedSigLIP-shaped SiglipModel: `configs/medsiglip-448/` (config.json, preprocessor_config.json)
    where present, else the published sizes with SigLIP's processor at 448 px; the offline character tokenizer
    (its ids fit any vocabulary)."""
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel

    from pneumo_exp.core.presets import character_tokenizer

    source = configs / "medsiglip-448"
    config = (SiglipConfig.from_pretrained(source) if (source / "config.json").is_file()
              else SiglipConfig(**MEDSIGLIP_448))
    torch.manual_seed(0)
    SiglipModel(config).save_pretrained(folder)
    character_tokenizer().save_pretrained(folder)
    if (source / "preprocessor_config.json").is_file():
        shutil.copy(source / "preprocessor_config.json", folder / "preprocessor_config.json")
    else:
        side = config.vision_config.image_size
        SiglipImageProcessorPil(size={"height": side, "width": side}).save_pretrained(folder)


def real_size_models(configs: Path, cache: Path) -> dict[str, Path]:
    print(f"random-init real-size models from {configs} (built once into {cache})", flush=True)
    return {"clip": build_folder_once(cache / "clip-vit-large-patch14", "config.json",
                                      lambda staging: build_clip(configs, staging)),
            "sd2": build_folder_once(cache / "stable-diffusion-2", "model_index.json",
                                     lambda staging: build_sd2(configs, staging))}


# ----------------------------------------------------------------------------------------------- measurement


def live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage the garbage collector can reach: what a finished stage left alive."""
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not obj.is_meta:
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def release_freed_heap() -> None:
    """Return freed heap pages to the system (glibc keeps them otherwise), so the resident size means live memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler:
    """The highest resident set size within each open window, sampled every 10 ms by a daemon thread."""

    def __init__(self) -> None:
        self.windows: dict[str, int] = {}
        self.lock = threading.Lock()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            self._raise_all(rss_bytes())
            time.sleep(0.01)

    def _raise_all(self, value: int) -> None:
        with self.lock:
            for name, peak in self.windows.items():
                self.windows[name] = max(peak, value)

    def open(self, name: str) -> None:
        with self.lock:
            self.windows[name] = rss_bytes()

    def close(self, name: str) -> int:
        """The window's peak, which is also a lower bound of the peak of every window still open around it."""
        with self.lock:
            peak = max(self.windows.pop(name), rss_bytes())
        self._raise_all(peak)
        return peak


GIB = 2 ** 30
SAMPLER: PeakSampler | None = None
STAGES: list[dict] = []  # the stages of the row being run
OPEN_STAGES: list[str] = []


@contextmanager
def measured(name: str):
    """Seconds and peak memory of one stage (or of the whole row, or one benchmark); returns its entry."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    release_freed_heap()
    SAMPLER.open(name)
    entry = {"stage": name, "rss_before_gib": rss_bytes() / GIB}
    start = time.perf_counter()
    try:
        yield entry
    finally:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            entry["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
        entry["seconds"] = time.perf_counter() - start
        entry["rss_peak_gib"] = SAMPLER.close(name) / GIB
        gc.collect()
        release_freed_heap()
        entry["rss_after_gib"] = rss_bytes() / GIB
        entry["live_tensors_after_gib"] = live_tensor_bytes() / GIB
        print(f"  {name:<10} {entry['seconds']:8.1f} s   peak RSS {entry['rss_peak_gib']:6.2f} GiB   "
              f"after {entry['rss_after_gib']:6.2f} GiB (tensors {entry['live_tensors_after_gib']:5.2f} GiB)",
              flush=True)


def instrument_stages() -> None:
    """Time every stage function the pipeline calls, wherever it is looked up from; a stage called inside
    another (the quality stage trains classifiers) counts as part of the outer one."""
    import pneumo_exp.classify.train as classify_train
    import pneumo_exp.evaluation.quality_stage as quality_stage
    import pneumo_exp.pipeline as pipeline

    def wrap(module, attribute: str, name: str) -> None:
        original = getattr(module, attribute)

        def timed(*args, **kwargs):
            if OPEN_STAGES:
                return original(*args, **kwargs)
            OPEN_STAGES.append(name)
            try:
                with measured(name) as entry:
                    return original(*args, **kwargs)
            finally:
                OPEN_STAGES.pop()
                STAGES.append(entry)

        setattr(module, attribute, timed)

    wrap(pipeline, "prepare_data", "data")
    wrap(pipeline, "train_diffusion", "diffusion")
    wrap(pipeline, "add_synthetic", "synthesize")
    wrap(classify_train, "train_and_evaluate", "classify")
    wrap(quality_stage, "run_quality", "quality")


def logged_rates(run_dir: Path) -> dict[str, float]:
    """The last value of every `*step_seconds` / `*images_per_second` the run's history files hold."""
    rates: dict[str, float] = {}
    for history in (run_dir / "metrics.jsonl", run_dir / "diffusion" / "metrics.jsonl"):
        if history.is_file():
            for line in history.read_text().splitlines():
                row = json.loads(line)
                rates.update({k: v for k, v in row.items() if k.endswith(("step_seconds", "images_per_second"))})
    return rates


# --------------------------------------------------------------------------------------------------- the rows


def real_data_subset(data: Path, images_per_class: int, target: Path) -> Path:
    """The first files (by name, so mostly whole patients) of each split and class, in the class-folder layout."""
    for class_dir in sorted(p for p in data.glob("*/*") if p.is_dir()):
        (target / class_dir.parent.name / class_dir.name).mkdir(parents=True)
        for image in sorted(class_dir.iterdir())[:images_per_class]:
            shutil.copy(image, target / class_dir.parent.name / class_dir.name / image.name)
    return target


def toy_overrides(models: dict[str, Path], data: Path, cpu: bool) -> list[str]:
    precision = "bf16"
    return [f"dataset.root={data}", "dataset.resolution=224",
            f"clip_lora.pretrained={models['clip']}", f"diffusion_lora.pretrained={models['sd2']}",
            "trainer.epochs=1", "trainer.max_steps_per_epoch=2", "trainer.bootstrap_samples=50",
            f"trainer.precision={precision}", f"trainer.cpu={str(cpu).lower()}",
            "diffusion_lora.training.max_train_steps=2", "diffusion_lora.training.validation_every=0",
            "diffusion_lora.generation.num_inference_steps=2", "diffusion_lora.generation.batch_size=2",
            "augmentation.per_class_count={NORMAL:2,VIRUS:2}", "logger=none"]


ROW_DIFFUSION_BATCH = ["diffusion_lora.training.batch_size=1", "diffusion_lora.training.grad_accum_steps=1"]


def section_overrides(models: dict[str, Path], data: Path, cpu: bool, extra: list[str]) -> dict[str, list[str]]:
    """The rows train the diffusion LoRA at batch 1 x 1 (toy step counts, memory); the throughput section at the
    configured batch and accumulation, so that its steps/s are those of the preset (or of `extra`)."""
    toy = toy_overrides(models, data, cpu)
    return {"rows": [*toy, *ROW_DIFFUSION_BATCH, *extra], "throughput": [*toy, *extra]}


def run_row(row: str, overrides: list[str], scratch: Path) -> dict:
    from pneumo_exp.pipeline import run

    STAGES.clear()
    run_dir = scratch / row
    cfg = compose([f"experiment=paper/{row}", f"paths.output_dir={run_dir}", f"paths.cache_dir={scratch / 'cache'}",
                   *overrides])
    print(f"{row}: stages {list(cfg.stages)}", flush=True)
    with measured("whole row") as whole:
        metrics = run(cfg)
    return {"row": row, "stages": list(STAGES), "seconds": whole["seconds"], "rss_peak_gib": whole["rss_peak_gib"],
            "rss_peak_largest_stage_gib": max(s["rss_peak_gib"] for s in STAGES),
            "logged_rates": logged_rates(run_dir), "test_acc": metrics.get("test/acc")}


# ------------------------------------------------------------------------------------------------ throughput

GPU_SIZES = {"matmul_side": 8192, "clip_batch": 32, "clip_steps": 10, "diffusion_steps": 20, "images": 8,
             "sampling_steps": 25, "siglip_batch": 8, "siglip_steps": 5}
CPU_SIZES = {"matmul_side": 256, "clip_batch": 2, "clip_steps": 1, "diffusion_steps": 2, "images": 2,
             "sampling_steps": 2, "siglip_batch": 1, "siglip_steps": 1}  # only to exercise the code path


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bf16_matmul_peak_tflops(device: str, side: int, repeats: int = 20) -> float:
    a = torch.randn(side, side, device=device, dtype=torch.bfloat16)
    b = torch.randn(side, side, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * side ** 3 * repeats / (time.perf_counter() - start) / 1e12


def clip_lora_throughput(cfg, batch: int, steps: int, device: str) -> dict:
    """LoRA training steps of `cfg.clip_lora` (CLIP-L: the original study's adapters) under bf16 autocast at its
    image size: images/s and TFLOP/s."""
    from torch.utils.flop_counter import FlopCounterMode

    from pneumo_exp.classify.model import build_classifier, trainable_parameters

    classifier, _ = build_classifier(cfg.clip_lora, cfg.paths.cache_dir)
    classifier.to(device).train()
    optimizer = torch.optim.AdamW(trainable_parameters(classifier), lr=1e-5)
    side = cfg.clip_lora.image_size
    images = torch.rand(batch, 1, side, side, device=device)
    labels = torch.randint(0, 3, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(classifier(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    return {"batch": batch, "step_seconds": seconds, "images_per_second": batch / seconds,
            "tflop_per_step": flops / 1e12, "achieved_tflops": flops / seconds / 1e12}


def sd_lora_settings(overrides: list[str]) -> dict[str, int]:
    """The batch and accumulation the diffusion stage trains at under `overrides`."""
    training = compose(["experiment=paper/original_study", *overrides]).diffusion_lora.training
    return {"batch_size": training.batch_size, "grad_accum_steps": training.grad_accum_steps}


def diffusion_rates(run_dir: Path, full_step_images: int) -> dict[str, float]:
    """Optimizer steps/s and images/s of the diffusion stage, from its history logged every step: over the steps
    that held `full_step_images` (an epoch's last step may hold fewer) where there are any, the first (warm-up) left
    out where more remain; `images_per_step` says what the timed steps held."""
    steps = []  # (seconds, images) of each logged step
    for line in (run_dir / "diffusion" / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "diffusion/step_seconds" in row:
            seconds = row["diffusion/step_seconds"]
            steps.append((seconds, row["diffusion/images_per_second"] * seconds))
    full = [step for step in steps if round(step[1]) == full_step_images] or steps
    timed = full[1:] or full
    seconds, images = (sum(column) for column in zip(*timed))
    return {"steps_timed": len(timed), "steps_per_second": len(timed) / seconds, "images_per_second": images / seconds,
            "images_per_step": images / len(timed)}


def diffusion_throughput(overrides: list[str], scratch: Path, sizes: dict, device: str) -> dict:
    """SD LoRA training at the configured batch and accumulation with latent caching off and on (the diffusion
    stage alone, rates over its logged windows), and generation images/s with classifier-free guidance."""
    from pneumo_exp.diffusion.stable_diffusion import load_pipeline, sample

    result: dict = sd_lora_settings(overrides)
    for cache_latents in ("false", "true"):
        name = f"cache_latents={cache_latents}"
        run_dir = scratch / f"cache_latents_{cache_latents}"  # no '=' in a path given as an override
        row = run_row("original_study", [*overrides, "stages=[data,diffusion]",
                                         f"diffusion_lora.training.max_train_steps={sizes['diffusion_steps']}",
                                         "diffusion_lora.training.crop_min_side=1",  # cached latents take no crops
                                         f"diffusion_lora.training.cache_latents={cache_latents}",
                                         "diffusion_lora.training.log_every=1"], run_dir)
        full_step = result["batch_size"] * result["grad_accum_steps"]
        result[name] = {"diffusion_stage_seconds": row["stages"][-1]["seconds"],
                        **diffusion_rates(run_dir / "original_study", full_step)}
    cfg = compose(["experiment=paper/original_study", *overrides])
    pipeline = load_pipeline(str(cfg.diffusion_lora.pretrained), device=device, dtype=torch.bfloat16)
    resolution, steps = int(cfg.diffusion_lora.resolution), sizes["sampling_steps"]
    sample(pipeline, "a chest X-ray", [0], 2, 7.5, resolution)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    sample(pipeline, "a chest X-ray", list(range(sizes["images"])), steps, 7.5, resolution)
    synchronize(device)
    result[f"generation_images_per_second_{steps}_steps"] = sizes["images"] / (time.perf_counter() - start)
    return result


def throughput(overrides: list[str], scratch: Path, device: str) -> dict:
    sizes = GPU_SIZES if device.startswith("cuda") else CPU_SIZES
    peak = bf16_matmul_peak_tflops(device, sizes["matmul_side"])
    cfg = compose(["experiment=paper/original_study", f"paths.cache_dir={scratch / 'cache'}", *overrides])
    clip = clip_lora_throughput(cfg, sizes["clip_batch"], sizes["clip_steps"], device)
    return {"sizes": sizes, "bf16_matmul_peak_tflops": peak,
            "clip_lora": {**clip, "model_flop_utilisation": clip["achieved_tflops"] / peak},
            "sd_lora": diffusion_throughput(overrides, scratch, sizes, device)}


def medsiglip_lora(configs: Path, model_cache: Path, scratch: Path, device: str) -> dict:
    """A few LoRA steps of clip_lora=medsiglip_448 (its adapters on both towers, its resolution) on a random-init
    MedSigLIP-shaped model, timed, with the peak memory of building it and stepping."""
    folder = build_folder_once(model_cache / "medsiglip-448", "config.json",
                               lambda staging: build_medsiglip(configs, staging))
    side = json.loads((folder / "config.json").read_text())["vision_config"]["image_size"]
    cfg = compose(["clip_lora=medsiglip_448", f"clip_lora.pretrained={folder}", f"clip_lora.image_size={side}",
                   f"dataset.resolution={side}", f"paths.cache_dir={scratch / 'cache'}"])
    sizes = GPU_SIZES if device.startswith("cuda") else CPU_SIZES
    print(f"medsiglip_448 LoRA: {sizes['siglip_steps']} steps at batch {sizes['siglip_batch']}, {side} px", flush=True)
    with measured("medsiglip lora") as entry:
        steps = clip_lora_throughput(cfg, sizes["siglip_batch"], sizes["siglip_steps"], device)
    return {"model": str(folder), "image_size": side, "lora": plain(cfg.clip_lora.lora), **steps,
            **{key: entry[key] for key in ("seconds", "rss_peak_gib", "cuda_max_allocated_gib") if key in entry}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", type=Path, default=REPO.parent / "shared" / "models")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "kermany-224")
    parser.add_argument("--rows", default="original_study", help=f"comma-separated, from {','.join(PAPER_ROWS)}")
    parser.add_argument("--images-per-class", type=int, default=8)
    parser.add_argument("--model-cache", type=Path, default=Path.home() / ".cache" / "pneumo_exp" / "real-size")
    parser.add_argument("--override", action="append", default=[], help="an extra Hydra override (repeatable)")
    parser.add_argument("--throughput", action="store_true", help="the throughput section on a CPU too (tiny sizes)")
    parser.add_argument("--medsiglip", action="store_true",
                        help="also a few LoRA steps of a random-init MedSigLIP-shaped model (clip_lora=medsiglip_448)")
    parser.add_argument("--medsiglip-only", action="store_true", help="only those steps: no rows, no throughput")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "real_size.json")
    args = parser.parse_args()
    needed = [] if args.medsiglip_only else [args.configs / "clip-vit-large-patch14",
                                             args.configs / "stable-diffusion-2", args.data]
    for folder in needed:
        if not folder.is_dir():
            raise SystemExit(f"bench_real_size: {folder} is not a folder (see --configs and --data)")
    global SAMPLER
    SAMPLER = PeakSampler()
    instrument_stages()
    scratch = Path(tempfile.mkdtemp(prefix="bench-real-size-"))
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    report = {"device": torch.cuda.get_device_name() if on_gpu else f"cpu ({os.cpu_count()} cores)",
              "torch": torch.__version__, "images_per_class": args.images_per_class, "rows": []}
    try:
        if not args.medsiglip_only:
            models = real_size_models(args.configs, args.model_cache)
            data = real_data_subset(args.data, args.images_per_class, scratch / "data")
            overrides = section_overrides(models, data, not on_gpu, args.override)
            for row in args.rows.split(","):
                report["rows"].append(run_row(row, overrides["rows"], scratch))
                write_json_atomic(args.out, report)
            if on_gpu or args.throughput:
                report["throughput"] = throughput(overrides["throughput"], scratch, device)
        if args.medsiglip or args.medsiglip_only:
            report["medsiglip_lora"] = medsiglip_lora(args.configs, args.model_cache, scratch, device)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    write_json_atomic(args.out, report)
    print(f"written {args.out}", flush=True)


if __name__ == "__main__":
    main()
