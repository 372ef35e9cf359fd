"""An exponential moving average of the trained weights (and of BatchNorm statistics).

`update` follows every optimizer step; `applied` swaps the average into the model for validation, the best checkpoint
and the test split, then puts the live weights back so that training goes on from them.
"""

from __future__ import annotations

import contextlib

import torch


class WeightAverage:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        self.names += [name for name, b in model.named_buffers() if b.dtype.is_floating_point]
        tensors = self._tensors(model)
        self.average = {name: tensors[name].detach().clone().float() for name in self.names}

    def _tensors(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {**dict(model.named_parameters()), **dict(model.named_buffers())}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Early on the average forgets faster (decay (1 + n) / (10 + n)), so random init fades out quickly."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        tensors = self._tensors(model)
        for name in self.names:
            self.average[name].lerp_(tensors[name].detach().float(), 1 - decay)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Put the average into the model for good (its live weights are dropped)."""
        tensors = self._tensors(model)
        for name in self.names:
            tensors[name].copy_(self.average[name])

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module):
        tensors = self._tensors(model)
        live = {name: tensors[name].detach().clone() for name in self.names}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name in self.names:
                    tensors[name].copy_(live[name])

    def state_dict(self) -> dict:
        return {"updates": self.updates, "average": self.average}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.names) - set(state["average"])
        if missing:
            raise KeyError(f"the saved weight average lacks {sorted(missing)[:3]}")
        self.updates = state["updates"]
        self.average = {name: state["average"][name].to(self.average[name].device, torch.float32)
                        for name in self.names}
