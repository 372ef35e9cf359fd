"""Errors the user can fix (bad data, a bad value, a missing file, an unreadable checkpoint).

The command line prints a `UserError` as one line, `pneumo-exp: error: <what> (<where>): <what to do>`, and exits
non-zero; its traceback goes only to the run's log file. Any other exception is a bug and shows its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """`what` went wrong at `where` (a file or a config key); `fix` says what to do about it."""

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(str(self))

    def __str__(self) -> str:
        text = self.what
        if self.where:
            text += f" ({self.where})"
        if self.fix:
            text += f": {self.fix}"
        return text

    def __reduce__(self):  # keeps the three parts when pickled across processes (joblib, submitit)
        return type(self), (self.what, self.where, self.fix)
