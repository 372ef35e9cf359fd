"""Read the history W&B wrote to an offline run file (`run-<id>.wandb`), with no W&B server.

The file is a sequence of protobuf `Record`s in LevelDB log framing: a 7-byte file header, then 32 KiB blocks
of chunks, each with a 7-byte header (checksum, length, type: full, first, middle or last piece of a record).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

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


def history(run_file: str | Path) -> list[dict]:
    """The rows given to `wandb.log`, in order, with their values decoded from JSON."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for raw in _record_bytes(Path(run_file)):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def run_files(folder: str | Path) -> list[Path]:
    """Offline run files under a run or sweep folder."""
    return sorted(Path(folder).rglob("offline-run-*/run-*.wandb"))
