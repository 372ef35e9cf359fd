"""What both trainers (classifier, diffusion LoRA) do the same way: the accelerator of a job and its precision
(`auto` resolved by the device), the plan of an epoch (this process's shard cut into optimizer steps of accumulated
micro-batches), the epochs that spend a step budget, one optimizer step and its gradient norm, means summed on the
device, the progress bar and the non-finite-loss watch. Each trainer keeps its own loss, metrics, randomness and
checkpoint contents."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from pneumo_exp.errors import UserError


class NonFiniteLossError(UserError, FloatingPointError):
    """The training loss became nan or inf; raised on every rank at once, before any checkpoint of the epoch."""


CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # /proc/cpuinfo flags of CPUs that compute bf16 natively


def resolve_precision(precision: str, cpu: bool, cpuinfo: str | None = None) -> str:
    """The mixed precision a job runs at: `auto` is bf16 where the device computes bf16 natively (a CUDA GPU with
    bf16 units; a CPU with AVX-512 bf16 or AMX, read from `cpuinfo`, by default /proc/cpuinfo), else `no`; any
    other value is kept. Every process of a job resolves it alike."""
    if precision != "auto":
        return getattr(precision, "value", precision)
    if not cpu and torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "no"
    return "bf16" if cpu_computes_bf16(read_cpuinfo() if cpuinfo is None else cpuinfo) else "no"


def cpu_computes_bf16(cpuinfo: str) -> bool:
    flags = {flag for line in cpuinfo.splitlines() if line.startswith("flags")
             for flag in line.partition(":")[2].split()}
    return bool(flags & CPU_BF16_FLAGS)


def read_cpuinfo() -> str:
    path = Path("/proc/cpuinfo")
    return path.read_text() if path.exists() else ""


def fresh_accelerator(precision: str, cpu: bool):
    """A new Accelerator for this job at its own precision (`auto` resolved): jobs of one sweep process may ask for
    different ones, and accelerate keeps one shared state per process, so that state is reset first (the process
    group of a launched run is kept)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)  # no public API resets the precision
    return Accelerator(mixed_precision=resolve_precision(precision, cpu), cpu=cpu)


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


def budget_epochs(budget: int, steps_per_epoch: int) -> list[int]:
    """The optimizer steps of each epoch (a pass over the data of `steps_per_epoch` steps) that together make
    exactly `budget` steps: whole passes, then a partial one where the budget ends mid-pass."""
    whole, rest = divmod(budget, steps_per_epoch)
    return [steps_per_epoch] * whole + ([rest] if rest else [])


class OptimizerStep(NamedTuple):
    losses: list[torch.Tensor]  # each micro-batch's loss, detached and not read (a read waits for the device)
    grad_norm: torch.Tensor  # the gradients' total norm before clipping (unscaled under fp16), on the device


def optimizer_step(accelerator, model, optimizer, scheduler, micro_batches: list[torch.Tensor],
                   loss_of: Callable[[torch.Tensor], torch.Tensor], parameters: Iterable[torch.nn.Parameter],
                   max_grad_norm: float) -> OptimizerStep:
    """One optimizer step: `loss_of(indices)` of each micro-batch, gradients accumulated (synchronised across
    processes at the last micro-batch only), clipped to `max_grad_norm` (0: not clipped) and applied; the schedule
    advances."""
    losses = []
    for position, indices in enumerate(micro_batches):
        last = position == len(micro_batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            loss = loss_of(indices)
            accelerator.backward(loss / len(micro_batches))
        losses.append(loss.detach())
    grad_norm = gradient_norm(accelerator, optimizer, parameters, max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return OptimizerStep(losses, grad_norm)


def gradient_norm(accelerator, optimizer, parameters: Iterable[torch.nn.Parameter],
                  max_grad_norm: float) -> torch.Tensor:
    """The total norm of the gradients, which are clipped to `max_grad_norm` (0: measured only)."""
    if max_grad_norm > 0:
        return accelerator.clip_grad_norm_(parameters, max_grad_norm)
    accelerator.unscale_gradients(optimizer)  # fp16: the norm of the true gradients, not of the scaled ones
    return torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])


class DeviceMeans:
    """Running means of device scalars (losses, gradient norms) summed where they are, so that a loop reads the
    device only when it logs: `pop` is one host read, summed over processes. Non-finite values are left out of a
    mean (a step fp16 skipped); a non-finite loss is NonFiniteWatch's to report."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, name: str, total: torch.Tensor, count: float = 1.0) -> None:
        """`total` (a scalar tensor) summed over `count` items: a mean of 3 images adds (3 x mean, 3)."""
        total = total.detach().float()
        finite = torch.isfinite(total)
        pair = torch.stack([torch.where(finite, total, 0.0), finite.float() * count])
        self.sums[name] = self.sums[name] + pair if name in self.sums else pair

    def local_mean(self, name: str) -> float:
        """This process's mean so far (for a progress bar): one host read, no collective."""
        total, count = self.sums[name].tolist()
        return total / count if count else math.nan

    def pop(self, accelerator) -> dict[str, float]:
        """The means since the last pop over every process (nan where nothing finite was added), then a fresh
        start. Every process must call it at the same point: it is one collective reduce."""
        if not self.sums:
            return {}
        names = list(self.sums)
        totals = accelerator.reduce(torch.stack([self.sums[name] for name in names]), "sum").tolist()
        self.sums = {}
        return {name: total / count if count else math.nan for name, (total, count) in zip(names, totals, strict=True)}


class NonFiniteWatch:
    """The first optimizer step whose loss was nan or inf, recorded on the device (`observe`, no host read) and read
    by `check` only: one gather over the processes, so every rank raises NonFiniteLossError at the same point.
    A loop checks it where it reads the device anyway (a logged row) and before any checkpoint it writes."""

    def __init__(self, device, loss_name: str, where: str, fix: str):
        self.first_step = torch.zeros((), dtype=torch.long, device=device)
        self.loss_name, self.where, self.fix = loss_name, where, fix

    def observe(self, losses: list[torch.Tensor], step: int) -> None:
        non_finite = ~torch.isfinite(torch.stack(losses)).all() & (self.first_step == 0)
        self.first_step = torch.where(non_finite, step, self.first_step)

    def check(self, accelerator, context: str = "") -> None:
        """Raises on every rank when any rank saw a non-finite loss; `context` leads the step ("epoch 3, ")."""
        steps = accelerator.gather(self.first_step.view(1))
        steps = steps[steps > 0]
        if len(steps):
            raise NonFiniteLossError(f"{self.loss_name} became non-finite at {context}step {int(steps.min())}",
                                     self.where, self.fix)


def progress_bar(steps: list, desc: str, accelerator) -> tqdm:
    """The main process's bar over an epoch's optimizer steps (the others draw none)."""
    return tqdm(steps, desc=desc, unit="step", leave=False, disable=not accelerator.is_main_process, mininterval=1.0)
