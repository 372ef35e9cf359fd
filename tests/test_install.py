"""What `make install` leaves behind: libraries whose bytecode is cached. Where PYTHONDONTWRITEBYTECODE is set (as on
the development VMs) Python never writes it at import, so an install without it made every process (each test
worker, each job, each `accelerate launch` rank) compile torch and transformers again: 25 s of imports, not 10."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest

LIBRARY_MODULES = ["torch", "torch.nn.modules.module", "transformers.modeling_utils",
                   "diffusers.models.unets.unet_2d_condition", "peft.tuners.lora.layer", "accelerate.accelerator"]


@pytest.mark.parametrize("name", LIBRARY_MODULES)
def test_the_libraries_come_with_their_bytecode(name):
    source = importlib.import_module(name).__file__
    cached = Path(importlib.util.cache_from_source(source))
    assert cached.is_file(), f"{cached} is missing: `make install` compiles the environment's bytecode"
