"""`probe sweep` on dask.distributed (probe/distributed.py): a sweep with 2 local workers writes
the same ledger rows as the single-process sweep (every number equal), each cell once, written by
the client; a second run resumes from the ledger; an unreachable scheduler is one line, exit 2."""

import numpy as np
import pytest
from typer.testing import CliRunner

from diffprobe.probe import sweep as sw
from diffprobe.probe.cli import probe_app
from diffprobe.probe.ledger import read_rows
from diffprobe.store.config import ProbeConfig
from diffprobe.store.feature_store import FeatureKey, open_store
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


def test_unreachable_scheduler_is_one_line(store, tmp_path):
    res = runner.invoke(
        probe_app,
        ["sweep", "--store", str(store.path), "--ledger", str(tmp_path / "l.csv"), "--scheduler", "tcp://127.0.0.1:9"],
    )
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert "cannot reach a dask scheduler at 'tcp://127.0.0.1:9' (Connection refused)" in res.output
    assert not (tmp_path / "l.csv").exists()
