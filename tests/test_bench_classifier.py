"""`make bench`'s classifier script at tiny size, so that it cannot fall behind the code it measures: run once for
the module, read by each test."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from conftest import bench_main, bench_module

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory) -> SimpleNamespace:
    out = tmp_path_factory.mktemp("bench") / "classifier.json"
    printed = bench_main("bench_classifier", "--tiny", "--out", str(out))
    return SimpleNamespace(stdout=printed, results=json.loads(out.read_text()))


def test_classifier_bench_runs_at_tiny_size(tiny_bench):
    [row] = tiny_bench.results["presets"]
    assert row["preset"] == "tiny" and row["images"] == 24
    assert all(value > 0 for value in row["images_per_second"].values())
    assert "framework overhead" in tiny_bench.stdout


def test_classifier_speedups_compare_runs_of_one_batch_size(tiny_bench):
    [row] = tiny_bench.results["presets"]
    bench = bench_module("bench_classifier")
    for name, (slower, faster) in bench.SPEEDUPS.items():
        assert row["batch_sizes"][slower] == row["batch_sizes"][faster] == bench.ORIGINAL_BATCH
        rate = row["images_per_second"]
        assert row[name] == pytest.approx(rate[faster] / rate[slower], rel=0.05, abs=0.01)
    assert set(row["batch_sizes"]) == set(row["images_per_second"])
