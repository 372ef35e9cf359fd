"""The benchmarks say what they measure: each runs at the settings it reports (the preset's, the recipe's), compares
like with like, and reports each run's own peak memory. Nothing here times anything."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, compose


def bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------- bench_classifier


@pytest.mark.slow
def test_classifier_speedups_compare_runs_of_one_batch_size(tmp_path):
    out = tmp_path / "classifier.json"
    done = subprocess.run([sys.executable, "bench/bench_classifier.py", "--tiny", "--out", str(out)], cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    [row] = json.loads(out.read_text())["presets"]
    bench = bench_module("bench_classifier")
    for name, (slower, faster) in bench.SPEEDUPS.items():
        assert row["batch_sizes"][slower] == row["batch_sizes"][faster] == bench.ORIGINAL_BATCH
        rate = row["images_per_second"]
        assert row[name] == pytest.approx(rate[faster] / rate[slower], rel=0.05, abs=0.01)
    assert set(row["batch_sizes"]) == set(row["images_per_second"])
