"""What both trainers (classifier, diffusion LoRA) set up and guard against the same way."""

from __future__ import annotations

from pneumo_exp.errors import UserError


class NonFiniteLossError(UserError, FloatingPointError):
    """The training loss became nan or inf; raised on every rank at once, before any checkpoint of the epoch."""


def fresh_accelerator(precision: str, cpu: bool):
    """A new Accelerator for this job at its own precision: jobs of one sweep process may ask for different ones,
    and accelerate keeps one shared state per process, so that state is reset first (the process group of a
    launched run is kept)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)  # no public API resets the precision
    return Accelerator(mixed_precision=precision, cpu=cpu)
