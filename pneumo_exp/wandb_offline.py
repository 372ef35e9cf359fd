"""Read what W&B wrote to a run file (`run-<id>.wandb`, offline or online), with no W&B server: the history, the
run's settings (config, tags, group, job type), its final summary and the tables it logged.

The file is a sequence of protobuf `Record`s in LevelDB log framing: a 7-byte file header, then 32 KiB blocks
of chunks, each with a 7-byte header (checksum, length, type: full, first, middle or last piece of a record).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pneumo_exp.core.nested import nested_value

BLOCK_SIZE = 32768
CHUNK_HEADER = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _record_bytes(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file (header {data[:4]!r})")
    position, pending = 7, b""
    while position + CHUNK_HEADER.size <= len(data):
        left_in_block = BLOCK_SIZE - position % BLOCK_SIZE
        if left_in_block < CHUNK_HEADER.size:
            position += left_in_block
            continue
        checksum, length, kind = CHUNK_HEADER.unpack_from(data, position)
        if (checksum, length, kind) == (0, 0, 0):  # zero padding up to the end of the block
            position += left_in_block
            continue
        chunk = data[position + CHUNK_HEADER.size: position + CHUNK_HEADER.size + length]
        position += CHUNK_HEADER.size + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""


def _records(run_file: str | Path) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2

    for raw in _record_bytes(Path(run_file)):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        yield record


def history(run_file: str | Path) -> list[dict]:
    """The rows given to `wandb.log`, in order, with their values decoded from JSON."""
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for record in _records(run_file) if record.WhichOneof("record_type") == "history"]


@dataclass
class RunFile:
    """One W&B run as its run file holds it."""
    path: Path
    run_id: str = ""
    name: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)  # top-level keys as given to wandb.init, nested values as dicts
    history_keys: set[str] = field(default_factory=set)  # every key a `wandb.log` row held
    summary: dict = field(default_factory=dict)  # the final summary, top-level keys

    def config_value(self, dotted_key: str, default: Any = None) -> Any:
        return nested_value(self.config, dotted_key, default)

    def has_config(self, dotted_key: str) -> bool:
        missing = object()
        return self.config_value(dotted_key, missing) is not missing


def _set_nested(target: dict, keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        if not isinstance(target.get(key), dict):
            target[key] = {}
        target = target[key]
    target[keys[-1]] = value


def read_run(run_file: str | Path) -> RunFile:
    """The run's settings, the keys it logged and its final summary (a key set in pieces, like a logged table's
    fields, comes back as one dict)."""
    run = RunFile(Path(run_file))
    for record in _records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.name, run.group = record.run.run_id, record.run.display_name, record.run.run_group
            run.job_type, run.tags = record.run.job_type, list(record.run.tags)
            updates = record.run.config.update
        elif kind == "config":
            updates = record.config.update
        elif kind == "history":
            run.history_keys.update(item.key or item.nested_key[0] for item in record.history.item)
            continue
        elif kind == "summary":
            for item in record.summary.update:
                keys = [item.key] if item.key else list(item.nested_key)
                _set_nested(run.summary, keys, json.loads(item.value_json))
            for item in record.summary.remove:
                run.summary.pop(item.key or item.nested_key[0], None)
            continue
        else:
            continue
        for item in updates:
            _set_nested(run.config, [item.key] if item.key else list(item.nested_key), json.loads(item.value_json))
    run.config.pop("_wandb", None)
    run.summary = {key: value for key, value in run.summary.items() if not key.startswith("_")}
    run.history_keys = {key for key in run.history_keys if not key.startswith("_")}
    return run


def logged_table(run_file: str | Path, key: str) -> dict:
    """The last W&B Table logged under `key`: {"columns": [...], "data": [[...], ...]}, read from the run's files."""
    summary = read_run(run_file).summary
    if not isinstance(summary.get(key), dict) or summary[key].get("_type") != "table-file":
        raise KeyError(f"{run_file} logged no table {key!r}")
    return json.loads((Path(run_file).parent / "files" / summary[key]["path"]).read_text())


def run_files(folder: str | Path) -> list[Path]:
    """Run files under a run or sweep folder: offline runs (`offline-run-*`) and the local copies of online ones."""
    folder = Path(folder)
    return sorted({*folder.rglob("offline-run-*/run-*.wandb"), *folder.rglob("run-*/run-*.wandb")})
