"""Random-init presets: a model of the configured architecture, randomly initialised, saved once into the cache
and then loaded through the same `from_pretrained(folder)` code as a real checkpoint. Both stages' presets (CLIP,
Stable Diffusion) tokenise with the same offline character tokenizer."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from pneumo_exp.config import plain
from pneumo_exp.core.files import build_folder_once

RANDOM_INIT_FORMAT = 1  # part of every preset's cache key: bump it when a builder changes what it writes
MAX_TEXT_TOKENS = 77


def _bytes_to_unicode() -> list[str]:
    """The 256 printable characters GPT-2 style byte-level BPE uses for the 256 byte values."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return [chr(c) for c in printable] + [chr(256 + i) for i in range(len(extra))]


def character_tokenizer():
    """A CLIP tokenizer with a byte-level vocabulary and no merges (one token per character), built offline."""
    from transformers import CLIPTokenizer

    characters = _bytes_to_unicode()
    tokens = characters + [c + "</w>" for c in characters] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={token: index for index, token in enumerate(tokens)}, merges=[])


def model_source(group: str, model_cfg, size: int, cache_dir: str | os.PathLike, prefix: str, marker: str,
                 build: Callable[[dict, int, Path], None]) -> str:
    """The configured hub id or folder (`<group>.pretrained`), or the preset `build(architecture, size, folder)`
    saved once under `cache_dir/models/<prefix>-<name>-<hash of architecture and size>` (`marker` is the file that
    a complete folder holds)."""
    if model_cfg.pretrained:
        return str(model_cfg.pretrained)
    if not model_cfg.architecture:
        raise ValueError(f"{group}={model_cfg.name}: set either `pretrained` (hub id or local folder) "
                         f"or `architecture` (a random-init preset)")
    architecture = plain(model_cfg.architecture)
    key = hashlib.sha256(json.dumps([RANDOM_INIT_FORMAT, architecture, size], sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(cache_dir) / "models" / f"{prefix}-{model_cfg.name}-{key}"
    return str(build_folder_once(folder, marker, lambda staging: build(architecture, size, staging)))
