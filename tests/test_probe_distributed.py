"""`probe sweep` on dask.distributed (probe/distributed.py): a sweep with 2 local workers writes
the same ledger rows as the single-process sweep (every number equal), each cell once, written by
the client; a second run resumes from the ledger; a worker SIGKILLed as it starts a cell has that
cell retried on another worker; a client SIGKILLed mid-sweep resumes from its ledger, training only
the missing cells; an unreachable scheduler is one line, exit 2."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from diffprobe.probe import sweep as sw
from diffprobe.probe.cli import probe_app
from diffprobe.probe.ledger import read_rows
from diffprobe.store.config import ProbeConfig
from diffprobe.store.feature_store import FeatureKey, open_store
from diffprobe.store.hooks import SIGKILL_FILE
from diffprobe.store.synthetic import write_synthetic_store

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")
SAME = ("timestamp", "seconds")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(0)
    means = rng.normal(size=(3, 4, 2, 2)) * 2

    def split(n):
        y = np.arange(n) % 3
        return {
            FeatureKey(t, b, p): (rng.normal(size=(n, 4, 2, 2)) + means[y])[:, :, :p, :p].astype(np.float16)
            for b in (19, 24)
            for t in (90, 150)
            for p in (1, 2)
        }, y

    (tr, ytr), (va, yva) = split(120), split(60)
    path = tmp_path_factory.mktemp("dist") / "s.zarr"
    blocks = [{"number": b, "module": f"m{b}", "channels": 4, "spatial": 2} for b in range(1, 38)]
    return open_store(
        write_synthetic_store(
            path, {"train": tr, "val": va}, {"train": ytr, "val": yva}, chunk_images=32, blocks=blocks
        )
    )


def _rows(path):
    return sorted(
        ({k: v for k, v in r.items() if k not in SAME} for r in read_rows(path)),
        key=lambda r: (r["block"], r["t"], r["pool"]),
    )


@pytest.mark.slow
def test_two_workers_write_the_single_process_rows(store, tmp_path):
    cells, _ = sw.plan(store)
    p = ProbeConfig(sgd_epochs=4, memory_mb=2 * 120 * 16 * 2 / 2**20)  # two pool-2 sets per pass: several tasks
    one = sw.sweep(store, cells, settings=p, seed=3, ledger=tmp_path / "one.csv")
    two = sw.sweep(store, cells, settings=p, seed=3, ledger=tmp_path / "two.csv", workers=2)
    assert one["trained"] == two["trained"] == len(cells) == 8
    assert _rows(tmp_path / "one.csv") == _rows(tmp_path / "two.csv")  # every number, one row per cell
    again = sw.sweep(store, cells, settings=p, seed=3, ledger=tmp_path / "two.csv", workers=2)
    assert again["trained"] == 0 and len(read_rows(tmp_path / "two.csv")) == 8  # resumed from the ledger


P = ProbeConfig(sgd_epochs=4, memory_mb=2 * 120 * 16 * 2 / 2**20)  # two pool-2 sets per pass: several tasks


def _block24(store):
    return [k for k in sw.plan(store)[0] if k.block == 24]  # 4 cells: t 90/150 x pool 1/2


@pytest.mark.slow
def test_a_killed_worker_s_cell_is_retried_on_another_worker(store, tmp_path, monkeypatch):
    cells = _block24(store)
    one = sw.sweep(store, cells, settings=P, seed=3, ledger=tmp_path / "one.csv")
    trigger = tmp_path / "kill-at"
    trigger.write_text("24/90/2")  # the worker that starts cell 24/90/2 deletes this and SIGKILLs itself
    monkeypatch.setenv(SIGKILL_FILE, str(trigger))  # the local cluster's workers inherit it
    two = sw.sweep(store, cells, settings=P, seed=3, ledger=tmp_path / "two.csv", workers=2)
    assert not trigger.exists()  # a worker died, at that cell
    assert one["trained"] == two["trained"] == len(cells) == 4
    assert _rows(tmp_path / "one.csv") == _rows(tmp_path / "two.csv")  # every number, one row per cell


KILLED_CLIENT = """
import sys, torch
from diffprobe.probe import sweep as sw
from diffprobe.store.config import ProbeConfig
from diffprobe.store.feature_store import open_store
torch.set_num_threads(1)
store = open_store(sys.argv[1])
cells = [k for k in sw.plan(store)[0] if k.block == 24]
sw.sweep(store, cells, settings=ProbeConfig(**eval(sys.argv[3])), seed=3, ledger=sys.argv[2], workers=1)
"""


@pytest.mark.slow
def test_a_killed_client_resumes_from_the_ledger(store, tmp_path):
    cells = _block24(store)
    sw.sweep(store, cells, settings=P, seed=3, ledger=tmp_path / "one.csv")
    trigger = tmp_path / "kill-at"
    trigger.write_text("ledger/24/90/1")  # the client SIGKILLs itself once it has written that row
    ledger = tmp_path / "two.csv"
    settings = repr({"sgd_epochs": P.sgd_epochs, "memory_mb": P.memory_mb})
    # one worker runs the passes in order, so the kill comes before the last pass's rows
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_CLIENT, str(store.path), str(ledger), settings],
        env={**os.environ, SIGKILL_FILE: str(trigger)},
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    written = read_rows(ledger)
    assert 1 <= len(written) < len(cells)
    assert (24, 90, 1) in {(r["block"], r["t"], r["pool"]) for r in written}
    again = sw.sweep(store, cells, settings=P, seed=3, ledger=ledger, workers=2)
    assert again["trained"] == len(cells) - len(written)  # only the missing cells train
    assert _rows(tmp_path / "one.csv") == _rows(ledger)  # every number, one row per cell


def test_unreachable_scheduler_is_one_line(store, tmp_path):
    res = runner.invoke(
        probe_app,
        ["sweep", "--store", str(store.path), "--ledger", str(tmp_path / "l.csv"), "--scheduler", "tcp://127.0.0.1:9"],
    )
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert "cannot reach a dask scheduler at 'tcp://127.0.0.1:9' (Connection refused)" in res.output
    assert not (tmp_path / "l.csv").exists()
