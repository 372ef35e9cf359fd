"""Collecting run folders under a root, whatever their depth, and grouping them by configuration (seed and generator
replicate left out)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from pneumo_exp.config import ReportConfig
from pneumo_exp.core.history import epoch_rows, read_json_lines
from pneumo_exp.core.nested import nested_value
from pneumo_exp.inputs import INPUTS_FILE
from pneumo_exp.rundir import neutral_keys, not_a_result, recorded_processes, resolved_settings, shapes_result

# Override keys (and their sub-keys) that cannot change what a training job computes, so never split a configuration.
NOT_A_SETTING = neutral_keys("run")
RUN_MARKERS = ("results.json", "failed.json", "metrics.jsonl", "git.json")
NOT_RUN_FOLDERS = {".hydra", "wandb", "checkpoints", "__pycache__"}

COMPLETED, FAILED, UNFINISHED = "completed", "failed", "unfinished"

# The keys that tell generator replicates apart (report.replicate_keys): runs differing only in them and in seed are
# one configuration, replicated over generators and seeds.
REPLICATE_KEYS = tuple(ReportConfig().replicate_keys)
LORA_SEED_KEY = "diffusion_lora.training.seed"  # null: the run's seed, so a job that trains its LoRA has its own
# The generator's own content (inputs.json): it differs between replicates, so it tells replicates apart where each
# replicate has one value of it, and configurations where it does not (a LoRA retrained under the same seed).
GENERATOR_INPUTS = ("inputs.diffusion_lora", "inputs.diffusion_base")
UNNAMED_GENERATOR = "unnamed"  # a generator that no replicate key names (a fixed diffusion_lora.trained_lora)
STUDY_RECIPES = "augment_study/"  # the augmentation study's arms: experiment=augment_study/<arm>


@dataclass
class RunRecord:
    path: Path
    status: str  # completed | failed | unfinished (still running, or killed)
    overrides: list[str]
    config: dict  # the resolved config.yaml, else the composed .hydra/config.yaml
    results: dict | None = None
    history: list[dict] = field(default_factory=list)
    error: str | None = None  # failed.json's error
    inputs: dict | None = None  # inputs.json: content fingerprints of the images and models the job read
    commit: str | None = None  # git.json: the code version it ran (`<sha>-dirty` with uncommitted changes)
    split_by_commit: bool = False  # report.split_by_commit: the code version is a setting like any other
    replicate_keys: tuple[str, ...] = REPLICATE_KEYS  # report.replicate_keys

    def value(self, dotted_key: str, default: Any = None) -> Any:
        return nested_value(self.config, dotted_key, default)

    @property
    def experiment_name(self) -> str:
        return str(self.value("experiment_name", "default"))

    @property
    def seed(self) -> int | None:
        seed = self.value("seed", (self.results or {}).get("seed"))
        return int(seed) if isinstance(seed, (int, float)) and not isinstance(seed, bool) else None

    @property
    def uses_generator(self) -> bool:
        """Its training images include ones drawn by a generator (not real images repeated, not none)."""
        return ("synthesize" in (self.value("stages") or []) and self.value("augmentation.source", "synthetic")
                == "synthetic" and self.value("augmentation.strategy", "none") != "none")

    @property
    def generator(self) -> str | None:
        """The generator replicate its synthetic images came from, as `key=value` of the replicate keys (the seed of
        a LoRA the job trains from the run's seed); None for a run that reads no generator."""
        if not self.uses_generator:
            return None
        values = {key: self.value(key) for key in self.replicate_keys}
        if "diffusion" in self.value("stages") and self.value(LORA_SEED_KEY) is None:
            values[LORA_SEED_KEY] = self.seed
        named = [f"{key.removeprefix('diffusion_lora.')}={value}" for key, value in values.items() if value is not None]
        return ",".join(named) or UNNAMED_GENERATOR

    @property
    def unit(self) -> tuple[str | None, int | str]:
        """What it replicates: (generator replicate, seed); a run without a seed stands alone (its path)."""
        return self.generator, self.seed if self.seed is not None else str(self.path)

    @property
    def arm(self) -> str:
        """The recipe it ran: `experiment=augment_study/mix` -> mix, another recipe by its path; else the
        experiment name."""
        recipes = [value for key, value in map(parse_override, self.overrides) if key == "experiment"]
        return recipes[-1].removeprefix(STUDY_RECIPES) if recipes else self.experiment_name

    @property
    def in_study(self) -> bool:
        return any(override.lstrip("+").startswith("experiment=" + STUDY_RECIPES) for override in self.overrides)

    @property
    def train_fraction(self) -> float:
        return float(self.value("dataset.train_fraction", 1.0))

    @property
    def metrics(self) -> dict:
        return (self.results or {}).get("metrics", {})

    @property
    def not_a_result(self) -> list[str]:
        """Why its test metrics are no result (a capped test split, a subset); empty when they are one."""
        return not_a_result((self.results or {}).get("capped") or {}, self.value("dataset.limit_per_class"))

    @property
    def test_counts(self) -> tuple[int, ...] | None:
        """Test images per class (the test confusion matrix's row sums); None without one."""
        matrix = (self.results or {}).get("confusion_matrix", {}).get("test")
        return tuple(int(sum(row)) for row in matrix) if matrix else None

    @cached_property
    def all_settings(self) -> dict[str, Any]:
        """Its config as dotted keys against today's schema (read once: the report groups runs more than once)."""
        return resolved_settings(self.config)

    def not_settings(self) -> tuple[str, ...]:
        """The keys whose values are replicates of one configuration: the seed and the generator-replicate keys."""
        return "seed", *self.replicate_keys

    def settings(self, ignore: Iterable[str] | None = None) -> dict[str, Any]:
        """The resolved settings that shape the result (a key an older run lacks at its schema default), the process
        count, the inputs it read (`inputs.<name>`: "unrecorded" for a job that predates inputs.json) and, with
        `split_by_commit`, the code version; `ignore` (default: the seed and the replicate keys) left out."""
        ignore = self.not_settings() if ignore is None else tuple(ignore)
        settings = {key: value for key, value in self.all_settings.items()
                    if shapes_result(key, (*NOT_A_SETTING, *ignore))}
        settings["processes"] = recorded_processes(self.results or {})
        settings["precision"] = (self.results or {}).get("precision", "unrecorded")  # what trainer.precision=auto ran
        if self.inputs is None:
            settings["inputs"] = "unrecorded"
        else:
            settings |= {f"inputs.{name}": value for name, value in self.inputs.items()}
        if self.split_by_commit:
            settings["code"] = self.commit
        return settings

    @property
    def error_line(self) -> str:
        """The error's first line: what went wrong without the traceback."""
        lines = [line.strip() for line in (self.error or "").splitlines() if line.strip()]
        return lines[0] if lines else "unknown error"


def collect_runs(root: str | os.PathLike, split_by_commit: bool = False,
                 replicate_keys: Iterable[str] = REPLICATE_KEYS) -> list[RunRecord]:
    """Every job folder under root (any depth) that trains, in path order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"report: no folder {root}")
    runs = [read_run(folder, split_by_commit, tuple(replicate_keys)) for folder in run_folders(root)]
    return [run for run in runs if run is not None]


def run_folders(root: Path) -> Iterator[Path]:
    for folder, subfolders, _ in os.walk(root):
        folder = Path(folder)
        if is_run_folder(folder):
            subfolders.clear()  # checkpoints, wandb: nothing more to find inside a job
            yield folder
        else:
            subfolders[:] = sorted(name for name in subfolders
                                   if name not in NOT_RUN_FOLDERS and not name.startswith("."))


def is_run_folder(folder: Path) -> bool:
    if (folder / ".hydra" / "config.yaml").is_file():
        return True
    return (folder / "config.yaml").is_file() and any((folder / name).is_file() for name in RUN_MARKERS)


def read_run(folder: Path, split_by_commit: bool = False,
             replicate_keys: tuple[str, ...] = REPLICATE_KEYS) -> RunRecord | None:
    """None for jobs that train nothing (`pneumo-exp summary`, `predict`)."""
    config = load_config(folder)
    if config.get("task", "run") != "run" or "classify" not in config.get("stages", ["classify"]):
        return None
    failure = read_json(folder / "failed.json")
    overrides = load_overrides(folder) or list((failure or {}).get("overrides") or [])
    run = RunRecord(path=folder, status=UNFINISHED, overrides=overrides, config=config,
                    history=read_history(folder / "metrics.jsonl"), inputs=read_json(folder / INPUTS_FILE),
                    commit=code_version(read_json(folder / "git.json")), split_by_commit=split_by_commit,
                    replicate_keys=replicate_keys)
    if (folder / "results.json").is_file():
        try:
            run.results, run.status = json.loads((folder / "results.json").read_text()), COMPLETED
        except (OSError, ValueError) as error:
            run.status, run.error = FAILED, f"results.json unreadable: {type(error).__name__}: {error}"
    elif failure is not None:
        run.status = FAILED
        run.error = str(failure.get("error") or "") or last_line(failure.get("traceback")) or "unknown error"
    return run


def code_version(git: dict | None) -> str | None:
    if not git or not git.get("sha"):
        return None
    return git["sha"][:12] + ("-dirty" if git.get("dirty") else "")


def load_config(folder: Path) -> dict:
    for path in (folder / "config.yaml", folder / ".hydra" / "config.yaml"):
        if path.is_file():
            loaded = load_yaml(path)
            return loaded if isinstance(loaded, dict) else {}
    return {}


def load_overrides(folder: Path) -> list[str]:
    path = folder / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    loaded = load_yaml(path)
    return [str(item) for item in loaded] if isinstance(loaded, list) else []


def load_yaml(path: Path) -> Any:
    """Interpolations stay unresolved text; a damaged file reads as None rather than stopping the report."""
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except (OSError, ValueError, yaml.YAMLError):
        return None


def read_json(path: Path) -> dict | None:
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


def read_history(path: Path) -> list[dict]:
    """Epoch rows (not step rows); a line being appended by a running job (cut short) is skipped."""
    return epoch_rows(read_json_lines(path))


def last_line(text: str | None) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


# ------------------------------------------------------------------------------------------------------ grouping

def parse_override(override: str) -> tuple[str, str]:
    """`+key=value` -> (key, value) with numbers normalised, so that 1e-4 and 0.0001 are one setting."""
    key, _, value = override.lstrip("+").partition("=")
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]
    return key.strip(), normalise_number(value)


def normalise_number(text: str) -> str:
    with contextlib.suppress(ValueError):
        return str(int(text))
    try:
        number = float(text)
    except ValueError:
        return text
    return repr(number) if math.isfinite(number) else text


def is_setting(key: str, value: str, run: RunRecord, ignore: Iterable[str]) -> bool:
    if any(key == name or key.startswith(name + ".") for name in (*NOT_A_SETTING, *ignore)):
        return False
    return not (key == "experiment" and value == run.experiment_name)  # the experiment is grouped on anyway


def configuration_items(run: RunRecord, ignore: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """The overrides that define the configuration: all but `ignore` (default: the seed and the replicate keys)."""
    ignore = run.not_settings() if ignore is None else tuple(ignore)
    items = {key: value for key, value in map(parse_override, run.overrides) if is_setting(key, value, run, ignore)}
    return sorted(items.items())


def group_key(run: RunRecord, ignore: Iterable[str] | None = None) -> str:
    """The overrides that define the configuration, sorted and joined by ','; experiment_name when there are none."""
    items = configuration_items(run, ignore)
    return ",".join(f"{key}={value}" for key, value in items) if items else run.experiment_name


def sort_key(run: RunRecord) -> tuple:
    """Experiment name, then overrides, numbers compared as numbers."""
    def value_order(value: str) -> tuple:
        try:
            return 0, float(value), ""
        except ValueError:
            return 1, 0.0, value
    return run.experiment_name, [(key, value_order(value)) for key, value in configuration_items(run)]


def group_runs(runs: Iterable[RunRecord]) -> dict[tuple[str, str], list[RunRecord]]:
    """Runs by configuration: the same overrides and the same resolved settings (see `split_by_settings`)."""
    by_overrides: dict[tuple[str, str], list[RunRecord]] = {}
    for run in sorted(runs, key=lambda r: (sort_key(r), r.seed if r.seed is not None else -1, r.generator or "",
                                           str(r.path))):
        by_overrides.setdefault((run.experiment_name, group_key(run)), []).append(run)
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for (experiment, key), members in by_overrides.items():
        for variant, variant_members in split_by_settings(members).items():
            groups[(experiment, ",".join(filter(None, (key, variant))))] = variant_members
    return groups


def split_by_settings(members: list[RunRecord]) -> dict[str, list[RunRecord]]:
    """Runs with the same overrides but other resolved settings (an edited recipe file, another code version,
    another process count) are other configurations, each named by the settings that tell them apart ("" when
    all agree). A generator's own inputs that each of several replicates read one value of tell replicates apart,
    not configurations."""
    settings = [{key: setting_text(value) for key, value in run.settings().items()} for run in members]
    compared = set().union(*settings) - replicate_inputs(members, settings)
    differing = sorted(key for key in compared if len({values.get(key) for values in settings}) > 1)
    variants: dict[str, list[RunRecord]] = {}
    for run, values in zip(members, settings):
        variants.setdefault(",".join(f"{key}={values.get(key)}" for key in differing), []).append(run)
    return variants


def replicate_inputs(members: list[RunRecord], settings: list[dict[str, str]]) -> set[str]:
    """The generator inputs (GENERATOR_INPUTS) that are one value per generator replicate, where the runs come from
    two or more replicates."""
    generators = {run.generator for run in members}
    if len(generators) < 2 or None in generators:
        return set()
    tied = set()
    for key in GENERATOR_INPUTS:
        values_of: dict[str | None, set] = {}
        for run, values in zip(members, settings):
            values_of.setdefault(run.generator, set()).add(values.get(key))
        if all(len(values) == 1 for values in values_of.values()):
            tied.add(key)
    return tied


def setting_text(value: Any) -> str:
    """A resolved value as an override writes it: `0.1`, `true`, `null`, `[0.9,0.999]`."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def override_parts(key: str) -> list[str]:
    """`a=1,b={x:1,y:2}` -> ["a=1", "b={x:1,y:2}"]: commas inside braces or brackets belong to the value."""
    return re.split(r",(?![^{\[]*[}\]])", key) if key else []


def shared_overrides(keys: list[str]) -> set[str]:
    """Overrides every configuration has: they say nothing about the differences, so labels leave them out."""
    if len(keys) < 2:
        return set()
    return set.intersection(*(set(override_parts(key)) for key in keys))


def newest_per_unit(runs: list[RunRecord]) -> list[RunRecord]:
    """A seed of one generator replicate run twice counts once (the newest results), so repeats never inflate n or
    shrink the CI."""
    newest: dict[Any, RunRecord] = {}
    for run in sorted(runs, key=lambda r: (r.path / "results.json").stat().st_mtime_ns):
        newest[run.unit] = run
    kept = {id(run) for run in newest.values()}
    return [run for run in runs if id(run) in kept]
