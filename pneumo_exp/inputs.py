"""What a training job read, by content: the fingerprints that make two jobs of the same settings the same job.

`inputs.json` in the run folder holds, when the job starts: the content fingerprints of the real training,
validation and test images (bytes and labels, not paths), and the content hash of each model folder it loads, or
the hub commit of a hub id: the classifier's backbone, the diffusion base, a LoRA trained by another run, and the
classifier of the run that filters the drawn images (`augmentation.filter.judge_run`). A
finished job is skipped, a stopped one resumed and seeds are pooled by the report only when these agree: a LoRA
retrained at the same path, a base pretrained again or an edited image makes another job.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pneumo_exp.config import AugmentationSource, JobConfig
from pneumo_exp.core.files import sha256_file
from pneumo_exp.data.manifest import SPLITS
from pneumo_exp.data.prepare import PreparedData
from pneumo_exp.data.provenance import content_fingerprint
from pneumo_exp.hub import ModelSourceError, describe_source

INPUTS_FILE = "inputs.json"
FINGERPRINT_LENGTH = 16
UNRECORDED = "inputs.json (the job ran before its inputs were recorded)"


def model_fingerprint(source: str, revision: str | None, marker: str, key: str = "pretrained") -> str:
    """A local folder's content hash, or `<hub id>@<commit>` of a hub id (its revision where the hub cache has no
    copy yet). `key` names the setting in the one-line error for a source that is neither."""
    try:
        described = describe_source(source, revision, marker)
    except ValueError as error:  # huggingface_hub's HFValidationError: no folder here and no valid hub id
        raise ModelSourceError(f"{source!r} is no folder here and no hub id ({type(error).__name__})", where=key,
                               fix="give a local folder of the model, or a hub id (org/name) and revision") from None
    if "content_sha256" in described:
        return described["content_sha256"][:FINGERPRINT_LENGTH]
    return f"{source}@{described['commit'] or revision or 'main'}"


def draws_images(cfg: JobConfig) -> bool:
    """Whether the synthesize stage draws from the generator: not for `augmentation.source=duplicate_real`, whose
    arm lists the same stages but repeats real images."""
    return "synthesize" in cfg.stages and cfg.augmentation.source == AugmentationSource.synthetic


def reads_generator(cfg: JobConfig) -> bool:
    """Whether the job trains or draws from a diffusion base."""
    return "diffusion" in cfg.stages or draws_images(cfg)


def judge_fingerprint(run_dir: Path) -> str:
    """A classifier run by content: its best weights and what it read (its inputs.json)."""
    from pneumo_exp.classify.checkpoint import STATE_FILE

    best = run_dir / "checkpoints" / "best"
    files = sorted(path for path in best.rglob("*") if path.is_file() and path.name != STATE_FILE)
    lines = [f"{path.relative_to(best).as_posix()}\t{sha256_file(path)}" for path in files]
    if (run_dir / INPUTS_FILE).is_file():
        lines.append(f"{INPUTS_FILE}\t{sha256_file(run_dir / INPUTS_FILE)}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:FINGERPRINT_LENGTH]


def split_fingerprint(records: list) -> str:
    """The real images of a split by content (`content_fingerprint`), and any other rows the dataset itself holds
    (a manifest's synthetic rows) with their source."""
    real = content_fingerprint(r for r in records if r.source == "real")
    others = sorted(f"{r.source}\t{r.sha256}\t{r.label}" for r in records if r.source != "real")
    if not others:
        return real
    return hashlib.sha256("\n".join([real, *others]).encode()).hexdigest()[:FINGERPRINT_LENGTH]


def job_inputs(cfg: JobConfig, data: PreparedData) -> dict[str, str]:
    """The inputs of a training job whose diffusion base is resolved (`diffusion.bases.run_base`)."""
    inputs = {f"images.{split}": split_fingerprint(data.split(split)) for split in SPLITS}
    if "classify" in cfg.stages:
        from pneumo_exp.classify.model import backbone_source

        inputs["classifier"] = model_fingerprint(backbone_source(cfg.clip_lora, cfg.paths.cache_dir),
                                                 cfg.clip_lora.revision, "config.json", "clip_lora.pretrained")
    if reads_generator(cfg):
        from pneumo_exp.diffusion.stable_diffusion import pipeline_source

        inputs["diffusion_base"] = model_fingerprint(pipeline_source(cfg.diffusion_lora, cfg.paths.cache_dir),
                                                     cfg.diffusion_lora.revision, "model_index.json",
                                                     "diffusion_lora.pretrained")
    if draws_images(cfg) and "diffusion" not in cfg.stages:
        from pneumo_exp.diffusion.stable_diffusion import check_lora_file

        inputs["diffusion_lora"] = check_lora_file(cfg.diffusion_lora.trained_lora)[1][:FINGERPRINT_LENGTH]
    if draws_images(cfg) and cfg.augmentation.filter.judge_run:
        inputs["judge"] = judge_fingerprint(Path(cfg.augmentation.filter.judge_run))
    return inputs


def stored_inputs(folder: Path) -> dict[str, str] | None:
    path = folder / INPUTS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def changed_inputs(folder: Path, current: dict[str, str]) -> list[str]:
    """The inputs that differ from those the job in `folder` recorded (all of them, unknown, without a record)."""
    stored = stored_inputs(folder)
    if stored is None:
        return [UNRECORDED]
    return sorted(key for key in stored.keys() | current.keys() if stored.get(key) != current.get(key))
