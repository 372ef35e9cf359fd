"""What both trainers (classifier, diffusion LoRA) do the same way: the accelerator of a job, the plan of an epoch
(this process's shard cut into optimizer steps of accumulated micro-batches), one optimizer step, the progress bar
and the non-finite-loss error. Each trainer keeps its own loss, metrics, randomness and checkpoint contents."""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

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


def shard_of(order: torch.Tensor, process_index: int, num_processes: int) -> torch.Tensor:
    """This rank's samples of the epoch: ranks take turns and all get the same count (DDP steps in lockstep)."""
    per_process = len(order) // num_processes
    return order[process_index::num_processes][:per_process]


def optimizer_steps(shard: torch.Tensor, batch_size: int, accumulation: int,
                    max_steps: int | None = None) -> list[list[torch.Tensor]]:
    """The shard cut into micro-batches of `batch_size`, `accumulation` of them per optimizer step (an epoch's last
    step may have fewer), at most `max_steps` steps."""
    batches = list(shard.split(batch_size))
    if max_steps:
        batches = batches[: max_steps * accumulation]
    return [batches[i:i + accumulation] for i in range(0, len(batches), accumulation)]


def optimizer_steps_per_epoch(images: int, num_processes: int, batch_size: int, accumulation: int,
                              max_steps: int | None = None) -> int:
    """How many steps `optimizer_steps` makes of an epoch's shard (for the learning-rate schedule)."""
    batches = math.ceil(images // num_processes / batch_size)
    if max_steps:
        batches = min(batches, max_steps * accumulation)
    return math.ceil(batches / accumulation)


def optimizer_step(accelerator, model, optimizer, scheduler, micro_batches: list[torch.Tensor],
                   loss_of: Callable[[torch.Tensor], torch.Tensor], parameters: Iterable[torch.nn.Parameter],
                   max_grad_norm: float) -> list[torch.Tensor]:
    """One optimizer step: `loss_of(indices)` of each micro-batch, gradients accumulated (synchronised across
    processes at the last micro-batch only), clipped to `max_grad_norm` (0: not clipped) and applied; the schedule
    advances. Returns each micro-batch's loss, detached and not read (a read waits for the device)."""
    losses = []
    for position, indices in enumerate(micro_batches):
        last = position == len(micro_batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            loss = loss_of(indices)
            accelerator.backward(loss / len(micro_batches))
        losses.append(loss.detach())
    if max_grad_norm > 0:
        accelerator.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return losses


def progress_bar(steps: list, desc: str, accelerator) -> tqdm:
    """The main process's bar over an epoch's optimizer steps (the others draw none)."""
    return tqdm(steps, desc=desc, unit="step", leave=False, disable=not accelerator.is_main_process, mininterval=1.0)
