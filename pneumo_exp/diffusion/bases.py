"""Which diffusion base a run draws from, and whether it may.

A preset whose base this project pretrains (`diffusion_lora.pretraining` set) keeps one base per training split and
pretraining settings in `<diffusion_lora.pretrained>/train-<content fingerprint of the training images>-<settings>/`,
so pretraining for another split (another split_seed, val_fraction, train_fraction or limit_per_class) or with other
steps never shares or replaces the folder that other LoRAs were trained on. Where that folder is missing, a
`pretrained` folder that itself holds a pipeline (`model_index.json`) is used as it is. Either way a base pretrained
by this project must have been pretrained only on images of the run's training split (`data/provenance.py`); a hub
model or a random-init preset was not trained here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import replace
from pathlib import Path

from pneumo_exp.config import DiffusionConfig, plain
from pneumo_exp.data.manifest import Record
from pneumo_exp.data.provenance import TRAINING_SPLIT_FILE, check_trained_within, content_fingerprint
from pneumo_exp.errors import UserError

log = logging.getLogger(__name__)

MODEL_CARD = "model_card.json"  # written by pretraining beside the weights
PIPELINE_MARKER = "model_index.json"


def build_command(diffusion_cfg: DiffusionConfig) -> str:
    return (f"pneumo-exp task=pretrain_diffusion diffusion_lora={diffusion_cfg.name} dataset=<the run's dataset> "
            f"(or make pretrain-diffusion DATA=<chest_xray folder>)")


def pretrained_here(diffusion_cfg: DiffusionConfig) -> bool:
    return diffusion_cfg.pretraining is not None and bool(diffusion_cfg.pretrained)


def settings_key(diffusion_cfg: DiffusionConfig, fingerprint: str) -> str:
    """What decides the pretrained weights: architecture, resolution, prompts, pretraining settings, the images."""
    shaping = [plain(diffusion_cfg.architecture), int(diffusion_cfg.resolution), plain(diffusion_cfg.prompts),
               plain(diffusion_cfg.pretraining), fingerprint]
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


def split_base_folder(diffusion_cfg: DiffusionConfig, train: list[Record]) -> Path:
    """Where the preset's base for the training split `train` is pretrained to."""
    fingerprint = content_fingerprint(train)
    return Path(diffusion_cfg.pretrained) / f"train-{fingerprint}-{settings_key(diffusion_cfg, fingerprint)[:8]}"


def require_built_base(diffusion_cfg: DiffusionConfig, train: list[Record]) -> str:
    """The split's base: the one of these pretraining settings, else the split's only base (pretrained with other
    settings: what it is, inputs.json records by content), else a base that `pretrained` names itself (checked like
    any by its record)."""
    exact = split_base_folder(diffusion_cfg, train)
    if (exact / PIPELINE_MARKER).is_file():
        return str(exact)
    given = Path(diffusion_cfg.pretrained)
    split_base = re.compile(rf"train-{content_fingerprint(train)}-[0-9a-f]{{8}}")  # not a staging or .old folder
    others = sorted(folder for folder in given.glob(f"train-{content_fingerprint(train)}-*")
                    if split_base.fullmatch(folder.name) and (folder / PIPELINE_MARKER).is_file())
    if len(others) == 1:
        log.info("the base of this training split in %s was pretrained with other settings than "
                 "diffusion_lora.pretraining: it is used as it is", others[0])
        return str(others[0])
    if len(others) > 1:
        raise UserError(f"{len(others)} bases of this training split were pretrained with other settings than "
                        "diffusion_lora.pretraining", where=str(given),
                        fix="set diffusion_lora.pretraining to the settings of the one to use (its model_card.json), "
                            "or diffusion_lora.pretrained to its folder")
    if (given / PIPELINE_MARKER).is_file():
        return str(given)
    raise UserError(f"the base of diffusion_lora={diffusion_cfg.name} has not been built yet for this training "
                    "split", where=str(exact), fix=f"build it once with: {build_command(diffusion_cfg)}")


def check_base_provenance(source: str, train: list[Record], key: str, required: bool) -> None:
    """A base pretrained by this project (`required`, or its folder holds a model card or training record) must have
    been pretrained only on images of `train`."""
    folder = Path(source)
    if required or (folder / MODEL_CARD).is_file() or (folder / TRAINING_SPLIT_FILE).is_file():
        check_trained_within(folder, train, "diffusion base", key)


def run_base(diffusion_cfg: DiffusionConfig, train: list[Record]) -> DiffusionConfig:
    """The preset with `pretrained` set to the base this run draws from, refused unless it was pretrained on images
    of `train` only. Hub models and random-init presets pass unchanged."""
    if not pretrained_here(diffusion_cfg):
        if diffusion_cfg.pretrained:
            check_base_provenance(diffusion_cfg.pretrained, train, "diffusion_lora.pretrained", required=False)
        return diffusion_cfg
    source = require_built_base(diffusion_cfg, train)
    check_base_provenance(source, train, "diffusion_lora.pretrained", required=True)
    return replace(diffusion_cfg, pretrained=source)
