"""The heads' streaming benchmarks still run against today's data layer (they patch its
internals to time the waits): `benchmarks/heads_stream.py` grid and wait at toy sizes, their
results written to a temporary folder, never to benchmarks/results."""

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def heads_stream(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("heads_stream", REPO / "benchmarks" / "heads_stream.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
    return module


def test_the_grid_benchmark_streams_and_times_its_waits(heads_stream, tmp_path, monkeypatch):
    from diffprobe.probe.data import FeatureData

    monkeypatch.setattr(FeatureData, "_batches", FeatureData._batches)  # the benchmark patches it: restored after
    args = argparse.Namespace(images=512, channels=16, pool=4, budget=0.15, chunk=32, repeats=1, tmp=str(tmp_path))
    heads_stream.grid(args)  # asserts itself that the data streamed
    out = json.loads((tmp_path / "results" / "heads_stream_grid.json").read_text())
    for name in ("one_pass", "three_passes"):
        assert out[name]["seconds"] > 0 and 0 <= out[name]["waiting_for_data_fraction"] <= 1
    assert out["ratio_three_over_one"] > 0


def test_the_wait_benchmark_reports_the_window_wait(heads_stream, tmp_path):  # one child process: ~5 s
    args = argparse.Namespace(
        images=256, budgets="80", step_ms="1", grid=0, caches="cold", chunk=32, repeats=1, tmp=str(tmp_path)
    )
    heads_stream.wait(args)
    rows = json.loads((tmp_path / "results" / "heads_stream_wait.json").read_text())["runs"]
    assert [r["cache"] for r in rows] == ["cold"]
    for r in rows:
        assert 0 <= r["window_wait_fraction"] <= r["waiting_fraction"] <= 1 and r["GBps"] > 0
