"""What images a generator was trained on, by content: the record every LoRA and pretrained base keeps beside its
weights (`training_split.json`), and the check each stage that draws or judges images makes before it reads one.

A generator that saw a validation or test image would leak it into training through its drawings, so it must have
been trained only on images of the run's own training split: every sha256 it records must be one of the split's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from pneumo_exp.core.files import write_json_atomic
from pneumo_exp.data import manifest
from pneumo_exp.data.manifest import LeakageError, Record
from pneumo_exp.errors import UserError

TRAINING_SPLIT_FILE = "training_split.json"  # {"fingerprint", "images", "sha256": [...]} of the images trained on
SPLIT_SETTINGS = "dataset, train_fraction, val_fraction, split_seed or limit_per_class"


class GeneratorProvenanceError(UserError, FileNotFoundError):
    """A generator folder without the record of the images it was trained on."""


def content_fingerprint(records: Iterable[Record]) -> str:
    """A hash of what the images are (their bytes and labels), not of where they lie: a moved or renamed copy of
    a dataset has the same fingerprint, an edited image or a changed label another."""
    lines = sorted(f"{record.sha256}\t{record.label}" for record in records)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def write_training_record(folder: str | Path, records: list[Record], base: str | None = None) -> Path:
    """`training_split.json`: the images trained on and, for a LoRA, the fingerprint of the base it was trained on."""
    record = {"fingerprint": content_fingerprint(records), "images": len(records),
              "sha256": sorted({record.sha256 for record in records})}
    return write_json_atomic(Path(folder) / TRAINING_SPLIT_FILE, record | ({"base": base} if base else {}))


def check_trained_on_base(lora: str | Path, base: str, key: str) -> None:
    """A LoRA learned a correction of the base it was trained on: on another base it draws something else."""
    trained_on = json.loads((Path(lora) / TRAINING_SPLIT_FILE).read_text()).get("base")
    if trained_on is not None and trained_on != base:
        raise UserError(f"the LoRA {lora} was trained on another diffusion base ({trained_on}) than the one this run "
                        f"draws from ({base})", where=key,
                        fix="train the LoRA on this base (the diffusion stage), or point diffusion_lora.pretrained "
                            "(its pretraining settings) at the base it was trained on")


def trained_within(record: dict, train: list[Record]) -> bool:
    """Whether the images a record names all lie in `train`. A record written before the image list was kept
    holds only the fingerprint of the exact split it saw."""
    if "sha256" in record:
        return set(record["sha256"]) <= {r.sha256 for r in train}
    return record.get("fingerprint") in (manifest.fingerprint(train), content_fingerprint(train))


def check_trained_within(folder: str | Path, train: list[Record], what: str, key: str) -> None:
    """Refuse the generator `what` at `folder` (set by config key `key`) unless its record shows it was trained
    only on images of `train`, the run's real training split."""
    record_file = Path(folder) / TRAINING_SPLIT_FILE
    if not record_file.is_file():
        raise GeneratorProvenanceError(
            f"cannot tell which images the {what} {folder} was trained on (no {TRAINING_SPLIT_FILE}), so it may have "
            "seen validation or test images", where=key,
            fix=f"train it with pneumo-exp on this run's training split, or set {key} to one that was")
    if not trained_within(json.loads(record_file.read_text()), train):
        raise LeakageError(
            f"the {what} {folder} was trained on images outside this run's training split (its {SPLIT_SETTINGS} "
            "differ): it may have seen validation or test images", where=key,
            fix=f"train one on this run's training split (the same dataset settings), or set {key} to one")
