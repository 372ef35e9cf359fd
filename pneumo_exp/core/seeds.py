"""The random generators' state, saved with a checkpoint and restored on resume, and every seed derived from the
run's seed. A derived seed depends on what it names (seed, epoch, rank, class, index) only, never on batching,
counts or the number of processes, so a resumed run draws exactly what the uninterrupted run drew."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def rng_state() -> dict:
    """The torch, numpy and python generators' states as tensors and plain numbers."""
    bit_generator, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"bit_generator": bit_generator, "keys": torch.from_numpy(keys.astype(np.int64)),
                      "position": int(position), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached_gaussian)},
            "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64),
                       "gauss_next": gauss_next}}


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["bit_generator"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["state"].tolist()), python_state["gauss_next"]))


def seed_of_text(text: str) -> int:
    """A 56-bit seed from the SHA-256 of `text`."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "big")


def derived_seed(*parts: int) -> int:
    """The diffusion trainer's streams: (seed, epoch), (seed, epoch, rank), (seed, epoch, rank, 1)."""
    return seed_of_text(repr(parts))


def seeded_generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(*parts))


def image_seed(seed: int, label: str, index: int) -> int:
    """Image `index` of class `label`: the same image whatever the batch size or the number of images asked."""
    return seed_of_text(f"{seed}:{label}:{index}")


def epoch_seed(seed: int, epoch: int) -> int:
    """The classifier's epoch stream (sample order, rank 0's augmentation and dropout)."""
    return seed * 100_003 + epoch


def rank_seed(epoch_seed_value: int, process_index: int) -> int:
    """The classifier's stream of rank > 0 in an epoch."""
    return int(np.random.SeedSequence([epoch_seed_value, process_index]).generate_state(1)[0])
