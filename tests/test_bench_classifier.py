"""`make bench`'s classifier script at tiny size, so that it cannot fall behind the code it measures."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def test_classifier_bench_runs_at_tiny_size(tmp_path):
    out = tmp_path / "classifier.json"
    done = subprocess.run([sys.executable, "bench/bench_classifier.py", "--tiny", "--out", str(out)], cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    [row] = results["presets"]
    assert row["preset"] == "tiny" and row["images"] == 24
    assert all(value > 0 for value in row["images_per_second"].values())
    assert "framework overhead" in done.stdout
