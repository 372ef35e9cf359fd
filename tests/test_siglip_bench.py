"""The real-size smoke bench's MedSigLIP section runs at a tiny size, so it cannot rot between the occasions it is
run at true size (`python bench/bench_real_size.py --medsiglip-only` on a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def test_medsiglip_lora_steps_are_timed_with_their_memory(tmp_path):
    from transformers import SiglipConfig

    configs = tmp_path / "models" / "medsiglip-448"
    tiny = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    SiglipConfig(vision_config={**tiny, "patch_size": 8, "image_size": 32},
                 text_config={**tiny, "vocab_size": 600, "max_position_embeddings": 64}).save_pretrained(configs)
    out = tmp_path / "real_size.json"
    command = [sys.executable, str(REPO / "bench" / "bench_real_size.py"), "--medsiglip-only",
               "--configs", str(configs.parent), "--model-cache", str(tmp_path / "built"), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    section = json.loads(out.read_text())["medsiglip_lora"]
    assert section["image_size"] == 32 and section["lora"]["target_modules"] == ["q_proj", "k_proj", "v_proj",
                                                                                  "out_proj", "fc1", "fc2"]
    assert section["step_seconds"] > 0 and section["rss_peak_gib"] > 0 and section["tflop_per_step"] > 0


def test_without_configs_the_published_medsiglip_sizes_are_used():
    sys.path.insert(0, str(REPO / "bench"))
    from bench_real_size import MEDSIGLIP_448
    from transformers import SiglipConfig

    config = SiglipConfig(**MEDSIGLIP_448)
    assert (config.vision_config.image_size, config.vision_config.patch_size, config.text_config.projection_size) \
        == (448, 14, 1152)
