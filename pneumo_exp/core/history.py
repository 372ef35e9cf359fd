"""`.jsonl` histories: one strict-JSON object per line, written by the main process, read back by anyone."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from pneumo_exp.core.files import finite_or_none, write_atomic


def json_line(row: dict) -> str:
    """One strict-JSON line of a `.jsonl` history (non-finite numbers as null), newline included."""
    return json.dumps(finite_or_none(row), allow_nan=False) + "\n"


def read_json_lines(path: str | os.PathLike) -> list[dict]:
    """The rows of a `.jsonl` history, null values read back as NaN; a line cut short by a writer still running
    (or any line that is not a JSON object) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append({key: math.nan if value is None else value for key, value in row.items()})
    return rows


def epoch_rows(rows: list[dict]) -> list[dict]:
    """The epoch rows of a classifier history; the step rows of `trainer.log_every_steps` carry `step`, no `epoch`."""
    return [row for row in rows if "epoch" in row]


class HistoryFile:
    """The rows of a run so far, mirrored to `path` when `enabled` (the main process): `restart` rewrites the file
    to the given rows (those a resumed checkpoint completed, or none), `append` adds one line."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path, self.enabled, self.rows = Path(path), enabled, []

    def restart(self, rows: list[dict]) -> None:
        self.rows = list(rows)
        if self.enabled:
            write_atomic(self.path, "".join(map(json_line, self.rows)))

    def append(self, row: dict) -> None:
        self.rows.append(row)
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json_line(row))
