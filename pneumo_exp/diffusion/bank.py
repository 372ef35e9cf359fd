"""The synthetic image bank: the images a generator draws, kept once per generator and settings, in a fixed order.

`<paths.cache_dir>/synthetic_bank/<key>/<CLASS>/<index>.png`: image i of a class is always drawn from the seed
`image_seed(seed, class, i)`, and the key hashes everything else that decides its pixels (`Generation.identity`):
the base's content (folder hash or hub commit), the LoRA's sha256, the sampling settings, the prompts and the seed.
An arm that needs n images of a class takes the bank's first n and draws only those the bank lacks, so two arms of
one seed share their images. A writer holds the bank's lock (`.lock`, fcntl.flock) while it extends the bank and
writes each image atomically: two jobs filling one bank at once draw each image once, and a killed job leaves the
images it finished, in order.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneumo_exp.core.files import atomic_file, sha256_file, write_json_atomic
from pneumo_exp.core.seeds import image_seed
from pneumo_exp.labels import CLASSES

BANK_DIR = "synthetic_bank"  # under paths.cache_dir
IDENTITY_FILE = "generation.json"
LOCK_FILE = ".lock"
SCHEDULER = "DPMSolverMultistep"  # the sampling scheduler of stable_diffusion.load_pipeline

Draw = Callable[[str, list[int]], np.ndarray]  # (class, seeds) -> uint8 (len(seeds), R, R), image i from seeds[i]


@dataclass(frozen=True)
class Generation:
    """What decides a drawn image's pixels besides its class and index."""
    source: str  # the base: a hub id or a diffusers folder
    lora: str | os.PathLike | None  # a LoRA folder or file; None: the base alone
    prompts: dict[str, str]
    seed: int
    steps: int
    guidance: float
    resolution: int
    precision: str = "no"
    revision: str | None = None

    @functools.cached_property
    def identity(self) -> dict:
        """The generator by content and the settings: what the bank key hashes (computed once: it reads the base
        and the LoRA). Refuses a missing or corrupt LoRA (LoraFileError naming the file)."""
        from pneumo_exp.diffusion.stable_diffusion import check_lora_file
        from pneumo_exp.inputs import model_fingerprint

        return {"base": model_fingerprint(self.source, self.revision, "model_index.json"),
                "lora_sha256": check_lora_file(self.lora)[1] if self.lora is not None else None,
                "prompts": {label: self.prompts[label] for label in CLASSES if label in self.prompts},
                "seed": int(self.seed), "steps": int(self.steps), "guidance": float(self.guidance),
                "resolution": int(self.resolution), "precision": self.precision, "scheduler": SCHEDULER}


def bank_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class BankImage:
    label: str
    index: int  # its place in the class's order
    seed: int
    path: Path
    sha256: str


class SyntheticBank:
    """One bank folder. `draw` makes the pixels of a batch of seeds; `drawn` counts what this process drew."""

    def __init__(self, folder: str | os.PathLike, seed: int, draw: Draw, batch_size: int = 8,
                 progress: bool = False):
        self.folder, self.seed, self.draw = Path(folder), seed, draw
        self.batch_size, self.progress = batch_size, progress
        self.drawn: Counter[str] = Counter()

    @property
    def key(self) -> str:
        return self.folder.name

    def path(self, label: str, index: int) -> Path:
        return self.folder / label / f"{index:05d}.png"

    def size(self, label: str) -> int:
        """How many images of the class the bank holds: they are written in order, so the first missing ends it."""
        count = 0
        while self.path(label, count).is_file():
            count += 1
        return count

    def images(self, label: str, stop: int, start: int = 0) -> list[BankImage]:
        """Images start..stop-1 of the class, drawing those the bank lacks."""
        if self.size(label) < stop:
            self.extend(label, stop)
        return [BankImage(label, index, image_seed(self.seed, label, index), self.path(label, index),
                          sha256_file(self.path(label, index))) for index in range(start, stop)]

    def extend(self, label: str, count: int) -> None:
        """Draw the class's images up to `count`, under the bank's lock."""
        from PIL import Image
        from tqdm.auto import tqdm

        with self.locked():
            for stale in (self.folder / label).glob(".*.tmp"):  # left by a writer killed while it held the lock
                stale.unlink()
            start = self.size(label)
            bar = tqdm(total=max(0, count - start), desc=f"drawing synthetic {label} images", unit="img",
                       disable=not self.progress, mininterval=1.0)
            for first in range(start, count, self.batch_size):
                indices = range(first, min(first + self.batch_size, count))
                pixels = self.draw(label, [image_seed(self.seed, label, index) for index in indices])
                for index, image in zip(indices, pixels):
                    with atomic_file(self.path(label, index), "wb") as handle:
                        Image.fromarray(np.ascontiguousarray(image)).save(handle, format="PNG")
                self.drawn[label] += len(indices)
                bar.update(len(indices))
            bar.close()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


class Sampler:
    """Draws with the generator's pipeline, loaded at the first draw and freed by `close`."""

    def __init__(self, generation: Generation, device: str | None = None):
        self.generation, self.device, self.pipeline = generation, device, None

    def __call__(self, label: str, seeds: list[int]) -> np.ndarray:
        from pneumo_exp.diffusion import stable_diffusion

        settings = self.generation
        if self.pipeline is None:
            self.pipeline = stable_diffusion.load_pipeline(
                settings.source, settings.lora, device=self.device,
                dtype=stable_diffusion.WEIGHT_DTYPES[settings.precision], revision=settings.revision)
        return stable_diffusion.sample(self.pipeline, settings.prompts[label], seeds, settings.steps,
                                       settings.guidance, settings.resolution)

    def close(self) -> None:
        from accelerate.utils.memory import clear_device_cache

        self.pipeline = None
        clear_device_cache(garbage_collection=True)


@contextlib.contextmanager
def open_bank(generation: Generation, root: str | os.PathLike, *, batch_size: int = 8, device: str | None = None,
              progress: bool = True) -> Iterator[SyntheticBank]:
    """The bank of `generation` under `root`; the pipeline it loaded to draw is freed when the block ends."""
    folder = Path(root) / bank_key(generation.identity)
    if not (folder / IDENTITY_FILE).is_file():
        write_json_atomic(folder / IDENTITY_FILE, generation.identity)
    sampler = Sampler(generation, device)
    try:
        yield SyntheticBank(folder, generation.seed, sampler, batch_size, progress)
    finally:
        sampler.close()
