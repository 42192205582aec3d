"""Attention and DifFormer through the data layer: a split 8x over ``probe.memory_mb`` streams
instead of being refused (and reads only the rows it trains on), streamed and in-memory heads
end bit-identical, every lr of a grid trained in one pass equals the head trained alone, the
progress reports, and the bad inputs (a budget below one batch) name the culprit with exit 2."""

import dataclasses
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from diffprobe.probe.attention import attention_probe, fusion_probe
from diffprobe.probe.cli import probe_app
from diffprobe.probe.data import FeatureData
from diffprobe.probe.protocol import select
from diffprobe.store.config import HeadsConfig, ProbeConfig
from diffprobe.store.feature_store import FeatureKey, open_store
from diffprobe.store.synthetic import write_synthetic_store

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")
N, C, P, K = 320, 8, 4, 4
ROW = C * P * P * 2  # bytes per image of one float16 map
H = dataclasses.replace(
    HeadsConfig(), epochs=2, batch_size=32, num_heads=2, attention_lr=(0.05, 0.01), fusion_lr=(0.05, 0.02)
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    def split(n, seed):
        rng = np.random.default_rng(seed)
        y = np.arange(n) % K
        means = np.random.default_rng(0).normal(size=(K, C, P, P))  # a class pattern LayerNorm keeps
        maps = {
            FeatureKey(t, b, P): (rng.normal(size=(n, C, P, P)) + means[y]).astype(np.float16)
            for b in (19, 24)
            for t in (90, 150)
        }
        return maps, y

    (tr, ytr), (va, yva) = split(N, 1), split(80, 2)
    path = tmp_path_factory.mktemp("heads") / "s.zarr"
    return open_store(
        write_synthetic_store(path, {"train": tr, "val": va}, {"train": ytr, "val": yva}, chunk_images=16)
    )


def _same(a, b):
    drop = ("timestamp", "seconds", "streamed")
    assert {k: v for k, v in a.to_json().items() if k not in drop} == {
        k: v for k, v in b.to_json().items() if k not in drop
    }


def test_attention_streams_a_split_8x_over_the_budget_bit_identical_to_in_memory(store, monkeypatch):
    budget = N * ROW / 8 / 2**20  # the train split is 8x the budget
    p = dataclasses.replace(ProbeConfig(), memory_mb=budget)
    whole = attention_probe(store, 24, 90, P, heads=H)
    assert not whole.streamed
    largest = []
    real = FeatureData._place

    def spy(self, order, slot=None):
        out = real(self, order, slot)
        largest.append(len(out[2]))
        return out

    monkeypatch.setattr(FeatureData, "_place", spy)
    streamed = attention_probe(store, 24, 90, P, heads=H, settings=p)
    assert streamed.streamed and 2 * max(largest) <= N // 8  # two windows: never more rows held than the budget
    assert whole.top1 > 0.4 and streamed.top1 > 0.4, (whole.top1, streamed.top1)  # both learn (chance 0.25)
    # forced to stream with a budget that holds everything: the very same head as in memory
    _same(attention_probe(store, 24, 90, P, heads=H, stream=True), whole)


def test_difformer_streams_its_arrays_together_and_equals_in_memory(store, monkeypatch):
    reads = []
    real = FeatureData._read
    monkeypatch.setattr(
        FeatureData, "_read", lambda self, i, out=None: reads.append(len(self.cells)) or real(self, i, out)
    )
    whole = fusion_probe(store, [19, 24], [90, 150], P, heads=H)
    streamed = fusion_probe(store, [19, 24], [90, 150], P, heads=H, stream=True)
    assert streamed.streamed and set(reads) == {4}  # each piece: the 4 arrays' chunks, read together
    _same(streamed, whole)
    small = dataclasses.replace(ProbeConfig(), memory_mb=4 * N * ROW / 8 / 2**20)
    assert fusion_probe(store, [19, 24], [90, 150], P, heads=H, settings=small).streamed


def test_heads_read_only_the_rows_they_train_on(store, monkeypatch):
    kept = []
    real = FeatureData._read
    monkeypatch.setattr(
        FeatureData, "_read", lambda self, i, out=None: (x := real(self, i, out), kept.append(len(x[0])))[0]
    )
    sel = select(store, 0, ProbeConfig(), "shots:2")
    attention_probe(store, 24, 90, P, heads=dataclasses.replace(H, epochs=1), selection=sel)
    # train: 8 fitted + 32 held out (10% of 320) rows, not the 320 usable ones; val: 80
    assert sum(kept) <= 2 * (8 + len(sel.hold)) + 80


@pytest.mark.parametrize("probe", ["attention", "fusion"])
def test_each_head_of_the_grid_equals_the_head_trained_alone(store, probe):
    def run(lrs):
        h = dataclasses.replace(H, attention_lr=lrs, fusion_lr=lrs)
        if probe == "attention":
            return attention_probe(store, 24, 90, P, heads=h)
        return fusion_probe(store, [19, 24], [90, 150], P, heads=h)

    grid = run((0.05, 0.01))
    for point in grid.grid:
        alone = run((point["lr"],))
        assert alone.grid == [point]  # the same held-out top-1 and loss, bit for bit
    best = run((grid.hyperparameters["lr"],))
    assert (best.top1, best.per_class) == (grid.top1, grid.per_class)


def test_progress_reports_every_step(store):
    steps = []
    attention_probe(store, 24, 90, P, heads=H, on_step=steps.append)
    fit = 288  # 320 less the 32 held out
    per_epoch = -(-fit // H.batch_size)
    assert len(steps) == H.epochs * per_epoch and steps[-1].steps == per_epoch
    assert [s.images for s in steps[:per_epoch]] == [32] * (per_epoch - 1) + [fit - 32 * (per_epoch - 1)]
    assert all(np.isfinite(s.loss) for s in steps) and steps[-1].epoch == H.epochs - 1


def test_cli_budget_below_one_batch_is_one_line_and_no_row(store, tmp_path):
    ledger = tmp_path / "l.csv"
    toml = tmp_path / "p.toml"
    toml.write_text("[probe]\nmemory_mb = 0.01\n[heads]\nepochs = 1\nnum_heads = 2\n")
    res = runner.invoke(
        probe_app,
        [
            "attention",
            "--block",
            "24",
            "--t",
            "90",
            "--store",
            str(store.path),
            "--ledger",
            str(ledger),
            "--config",
            str(toml),
        ],
    )
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert "probe.memory_mb = 0.01 holds 40 images of block 24, t 90, pool 4" in res.output
    assert "fewer than one batch of 128" in res.output and not ledger.exists()


def test_cli_attention_json_and_progress(store, tmp_path):
    toml = tmp_path / "p.toml"
    toml.write_text("[heads]\nepochs = 1\nnum_heads = 2\nbatch_size = 64\n")
    args = ["attention", "--block", "24", "--t", "90", "--store", str(store.path), "--config", str(toml)]
    res = runner.invoke(probe_app, [*args, "--ledger", str(tmp_path / "l.csv"), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["head"] == "attention" and out["streamed"] is False and out["ledger"] == str(tmp_path / "l.csv")


def test_a_store_still_being_written_is_refused_in_one_line(store, tmp_path):
    import fcntl
    import os

    from diffprobe.store.feature_store import lock_path

    fd = os.open(lock_path(store.path), os.O_RDWR | os.O_CREAT, 0o644)  # where `extract run` takes it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as `extract run` holds it while writing
        os.pwrite(fd, b"pid 1 on host, run abcd", 0)
        res = runner.invoke(
            probe_app,
            [
                "linear",
                "--block",
                "24",
                "--t",
                "90",
                "--pool",
                "4",
                "--store",
                str(store.path),
                "--ledger",
                str(tmp_path / "l.csv"),
            ],
        )
    finally:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert "an `extract run` is still writing this store (pid 1 on host, run abcd)" in res.output
    assert not (tmp_path / "l.csv").exists()
