"""`pneumo-exp`: the command line. Every setting is a Hydra override; a leading command word sets `task`."""

from __future__ import annotations

import difflib
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pneumo_exp.config import register_schemas
from pneumo_exp.errors import UserError
from pneumo_exp.validate import TASKS, SettingError, did_you_mean, options_with_key

COMMANDS = TASKS  # the first word of the command line may name the task
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")  # the repository's conf/ (editable install)
CONSOLE_LOGGERS = ("pneumo_exp", "hydra")  # hydra: a sweep's "#N : overrides" line before each job


class ProjectLines(logging.Filter):
    """The terminal's filter in the job's logging (conf/hydra/job_logging/project_console.yaml): the project's and
    Hydra's records, and any library's errors. Other libraries' INFO records and warnings (matplotlib building its
    font cache, transformers' missing optional backends) reach only the job's log file."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or record.name.split(".")[0] in CONSOLE_LOGGERS


def library_records_to_job_logging() -> None:
    """transformers writes its records to stderr through a handler of its own, past the job's logging: they go to
    the job's handlers instead. Its warning that torchvision is missing (raised when diffusers imports
    CLIPImageProcessor and SiglipImageProcessor; the project never needs torchvision) then stays in the log file."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def hydra_entry(cfg: DictConfig):
    """One job. A problem the user can fix (UserError) ends a single run with one line on stderr; in a sweep a
    failing job is recorded in its folder (failed.json) and the sweep goes on."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from pneumo_exp.pipeline import run  # heavy imports after Hydra has parsed the command line

    library_records_to_job_logging()
    if HydraConfig.get().mode != RunMode.MULTIRUN:
        try:
            return objective(cfg, run(cfg))
        except UserError as error:
            exit_with_message(error)
    try:
        return objective(cfg, run(cfg))
    except Exception as error:  # any failure of one job must not stop the others
        record_failure(cfg, error)
        return objective(cfg, None)


def debug_requested() -> bool:
    """PNEUMO_EXP_DEBUG=1 or hydra.verbose=true: user errors show their traceback too."""
    from hydra.core.hydra_config import HydraConfig

    return debug_in_environment() or bool(HydraConfig.get().verbose)


def debug_in_environment() -> bool:
    return os.environ.get("PNEUMO_EXP_DEBUG", "") not in ("", "0")


def exit_with_message(error: UserError) -> None:
    """The traceback to the job's log file, `pneumo-exp: error: <what> (<where>): <fix>` to stderr, exit status 2
    for a bad setting and 1 for other user errors. A run folder that holds nothing of the job yet is removed."""
    import logging

    from hydra.core.hydra_config import HydraConfig

    from pneumo_exp.rundir import is_main_process

    record = logging.LogRecord("pneumo_exp", logging.ERROR, __file__, 0, "%s", (f"{type(error).__name__}: {error}",),
                               (type(error), error, error.__traceback__))
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
            handler.flush()
    if is_main_process():
        remove_unused_run_folder(Path(HydraConfig.get().runtime.output_dir), HydraConfig.get().job.name)
    if debug_requested():
        raise error
    if is_main_process():
        print(f"pneumo-exp: error: {error}", file=sys.stderr, flush=True)
    raise SystemExit(2 if isinstance(error, SettingError) else 1)


def remove_unused_run_folder(folder: Path, job_name: str) -> None:
    """Hydra makes the run folder, `.hydra/` and the job log before the job starts: a job refused before it wrote
    anything leaves no folder behind. Only those two are removed, and the folder only if nothing else is in it
    (`hydra.run.dir` may name a folder of the user's)."""
    import shutil

    ours = {".hydra", f"{job_name}.log"}
    if not folder.is_dir() or any(path.name not in ours for path in folder.iterdir()):
        return
    shutil.rmtree(folder / ".hydra", ignore_errors=True)
    (folder / f"{job_name}.log").unlink(missing_ok=True)
    folder.rmdir()


def objective(cfg: DictConfig, metrics: dict | None):
    """What a sweeper optimises: `sweep_objective` (a metric name) as a float, else the metrics dict."""
    if not cfg.sweep_objective:
        return metrics
    if metrics is None:
        return float("nan")
    if cfg.sweep_objective not in metrics:
        raise SettingError(f"{cfg.sweep_objective!r} is not among the run's metrics", where="sweep_objective",
                           fix=f"use one of {', '.join(sorted(metrics))}")
    return metrics[cfg.sweep_objective]


def record_failure(cfg: DictConfig, error: Exception) -> None:
    import logging
    import traceback

    from hydra.core.hydra_config import HydraConfig

    from pneumo_exp.core.files import write_json_atomic

    folder = Path(HydraConfig.get().runtime.output_dir)
    message = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
    write_json_atomic(folder / "failed.json", {"error": f"{type(error).__name__}: {error}", "message": message,
                                               "traceback": traceback.format_exc(),
                                               "overrides": list(HydraConfig.get().overrides.task)})
    logging.getLogger("pneumo_exp").error("job %s failed: %s (details in %s)", folder.name, message,
                                          folder / "failed.json")


def launcher_start_time() -> str:
    """When the launcher that started this process began: the same for every rank it started on this machine."""
    fields = Path(f"/proc/{os.getppid()}/stat").read_text().rsplit(")", 1)[1].split()
    boot_time = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime"))
    started = boot_time + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(started)) + f"-ppid{os.getppid()}"


def distributed_run_dir(argv: list[str]) -> list[str]:
    """Under `accelerate launch`/torchrun every rank runs Hydra: give all ranks one run folder."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or any(a.startswith("hydra.run.dir=") for a in argv):
        return []
    try:
        stamp = launcher_start_time()
    except (OSError, StopIteration, IndexError, ValueError):
        raise SystemExit("pneumo-exp: error: several processes were launched (hydra.run.dir): pass "
                         "hydra.run.dir=<one folder for all ranks>") from None
    return [f"hydra.run.dir=outputs/${{experiment_name}}/{stamp}"]


@contextmanager
def overrides_refused_in_one_line() -> Iterator[None]:
    """Hydra prints a bad override (an unknown key, a value of the wrong type, a config group option that does not
    exist) in several lines, advising `+key=value`, which adds a key no code reads: one line instead, naming the key
    and the closest valid one, exit status 2. Hydra passes its errors on only under HYDRA_FULL_ERROR=1, set for the
    call; a user who set it, or PNEUMO_EXP_DEBUG=1, gets Hydra's own error."""
    from hydra.errors import ConfigCompositionException, OverrideParseException

    from pneumo_exp.rundir import is_main_process

    details_asked = os.environ.get("HYDRA_FULL_ERROR") == "1" or debug_in_environment()
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    except (ConfigCompositionException, OverrideParseException) as error:
        if details_asked:
            raise
        if is_main_process():
            print(f"pneumo-exp: error: {refused_override(error)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


def refused_override(error: Exception) -> SettingError:
    """Hydra's composition error as one SettingError."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    cause = error.__cause__
    if isinstance(error, OverrideParseException):
        return SettingError(f"cannot read {error.override}",
                            fix=f"{lines[0]} (see https://hydra.cc/docs/advanced/override_grammar/basic)")
    if isinstance(error, MissingConfigException) and error.missing_cfg_file and error.options is not None:
        return missing_option(error.missing_cfg_file, error.options)
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):  # an override of a key that is not there
        key = lines[0].split("'")[1]
        if cause.object_type is dict:  # a free mapping (prompts, per-class counts) takes new entries with +
            return SettingError(f"no entry {key}", fix="add it with " + lines[-1].split(" use ")[-1])
        options = options_with_key(key)
        if options:
            group = key.split(".")[0]
            choices = " or ".join(f"{group}={option}" for option in options)
            return SettingError(f"{key} is not a setting of the {group} composed here",
                                fix=f"choose {choices} on the command line (a multirun composes its first config "
                                    f"without the options it sweeps, such as experiment=a,b)")
        return SettingError(f"unknown key {key}", fix=did_you_mean(key))
    if isinstance(cause, ValidationError):
        return SettingError(str(cause).splitlines()[0], where=cause.full_key)
    return SettingError(" ".join(lines))


def missing_option(missing_file: str, options: list[str]) -> SettingError:
    """`group=name` names no config file of the group: the closest option, or all of them."""
    group, name = missing_file.rsplit("/", 1)
    options = [option for option in options if not option.endswith("_schema")]
    close = difflib.get_close_matches(name, options, n=1)
    return SettingError(f"no {group} option {name!r}", where=f"{group}={name}",
                        fix=f"did you mean {group}={close[0]}?" if close else f"use one of {', '.join(options)}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
        sys.argv = [sys.argv[0], f"task={sys.argv[1]}", *sys.argv[2:]]
    sys.argv += distributed_run_dir(sys.argv)
    register_schemas()
    from pneumo_exp import sweep  # registers the job-folder resolver; collects the failed jobs of a multirun

    with overrides_refused_in_one_line():
        hydra_entry()
    if sweep.failed_jobs:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
