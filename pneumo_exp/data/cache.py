"""Decode every image once into a uint8 array on disk, keyed by the images' content, the resolution and the
intensity standardisation (`dataset.intensity`, applied to every image, whatever its split, before it is kept).

Epochs then read tensors from a memory map and never decode a JPEG again. A cache is built in a temporary folder
and renamed into place, so an interrupted build leaves nothing half-written behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pneumo_exp.core.files import build_folder_once
from pneumo_exp.data import phantom
from pneumo_exp.data.images import decode_grayscale, standardize_intensity
from pneumo_exp.data.manifest import Record

FORMAT_VERSION = 2  # 2: EXIF orientation applied


def load_pixels(record: Record, size: int, intensity: str = "none") -> np.ndarray:
    """One image as a (size, size) uint8 array, from a file or from the phantom generator."""
    if phantom.is_phantom_key(record.path):
        return standardize_intensity(phantom.render(record.path, size), intensity)
    return standardize_intensity(decode_grayscale(record.path, size), intensity)


def cache_key(records: list[Record], resolution: int, intensity: str = "none") -> str:
    version = f"v{FORMAT_VERSION}:{resolution}" + ("" if intensity == "none" else f":{intensity}")
    digest = hashlib.sha256(version.encode())
    for record in records:
        digest.update(f"{record.path}\t{record.sha256}\n".encode())
    return digest.hexdigest()[:20]


@dataclass
class ImageCache:
    """`pixels[i]` is the image of `paths[i]`; look rows up with `rows_of`."""

    folder: Path
    pixels: np.ndarray
    paths: list[str]
    built: bool  # False when an existing cache was reused

    def rows_of(self, records: list[Record]) -> np.ndarray:
        row_of_path = {path: row for row, path in enumerate(self.paths)}
        missing = [r.path for r in records if r.path not in row_of_path]
        if missing:
            raise KeyError(f"{len(missing)} image(s) are not in the cache {self.folder}, e.g. {missing[0]}")
        return np.array([row_of_path[r.path] for r in records], dtype=np.int64)


def open_or_build(records: list[Record], resolution: int, cache_dir: str | os.PathLike,
                  progress: bool = True, intensity: str = "none") -> ImageCache:
    unique = list({r.path: r for r in records}.values())
    folder = Path(cache_dir) / "images" / f"{resolution}px-{cache_key(unique, resolution, intensity)}"
    built = not (folder / "index.json").is_file()
    build_folder_once(folder, "index.json", lambda staging: _build(unique, resolution, intensity, staging, progress))
    index = json.loads((folder / "index.json").read_text())
    pixels = np.memmap(folder / "pixels.u8", dtype=np.uint8, mode="r",
                       shape=(len(index["paths"]), resolution, resolution))
    return ImageCache(folder=folder, pixels=pixels, paths=index["paths"], built=built)


def _build(records: list[Record], resolution: int, intensity: str, staging: Path, progress: bool) -> None:
    array = np.memmap(staging / "pixels.u8", dtype=np.uint8, mode="w+",
                      shape=(max(len(records), 1), resolution, resolution))
    for row, record in enumerate(tqdm(records, desc=f"caching images at {resolution}px", unit="img",
                                      disable=not progress, mininterval=1.0)):
        array[row] = load_pixels(record, resolution, intensity)
    array.flush()
    del array
    index = {"format": FORMAT_VERSION, "resolution": resolution, "intensity": intensity,
             "paths": [r.path for r in records], "sha256": [r.sha256 for r in records]}
    (staging / "index.json").write_text(json.dumps(index))
