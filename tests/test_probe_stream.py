"""The linear probe streamed from the store (a split above ``probe.memory_mb``): the same
statistics, the same lbfgs optimum, a learning and deterministic window-shuffled sgd, skipped
images and subsets honoured, and never more rows read at once than the budget holds."""

import dataclasses

import numpy as np
import pytest

from diffprobe.probe.data import FeatureData
from diffprobe.probe.linear import feature_stats, linear_probe
from diffprobe.probe.protocol import select
from diffprobe.store.config import ProbeConfig
from diffprobe.store.feature_store import open_store

from .test_probe_linear import C, P, _planted, write_store

D = C * P * P  # 64 features: 256 bytes per row at float32
SKIPPED = (3, 70, 71, 200, 399)


def _mb(rows: int) -> float:  # the budget that holds ``rows`` float16 rows
    return rows * 2 * D / 2**20


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    x, y = _planted(400, 1, strength=4.0)  # weaker signal than test_probe_linear's: not 100% accurate
    x[list(SKIPPED)] = np.nan  # skipped images hold NaN; they must never reach a head or the statistics
    return open_store(
        write_store(tmp_path_factory.mktemp("stream") / "s.zarr", (x, y), _planted(200, 2, 4.0), skipped_train=SKIPPED)
    )


@pytest.fixture
def reads(monkeypatch):
    """Rows of every block the streaming path reads; a whole-split read fails the test."""
    sizes = []
    real = FeatureData._read

    def spy(self, i, out=None):
        sizes.append(self.pieces[i].hi - self.pieces[i].lo)
        return real(self, i, out)

    monkeypatch.setattr(FeatureData, "_read", spy)
    return sizes


def _no_whole_reads(monkeypatch):
    monkeypatch.setattr(FeatureData, "_read_all", lambda *a: pytest.fail("read a whole split while streaming"))


FAST = dataclasses.replace(
    ProbeConfig(), lbfgs_l2=(1e-3, 1e-1), lbfgs_max_iter=40, sgd_epochs=14, sgd_step_size=5, sgd_batch_size=64
)


@pytest.mark.parametrize("budget", [1, 40, 150])  # below a chunk (64 rows), and two whole chunks
@pytest.mark.parametrize("subset", ["all", "fraction:0.5"])
def test_streamed_stats_equal_in_memory(store, reads, budget, subset):
    p = dataclasses.replace(FAST, memory_mb=_mb(budget))
    sel = select(store, 0, p, subset)
    rows = np.flatnonzero(sel.usable)[sel.fit]
    data = FeatureData(store, "train", [(24, 90, 2)], rows, None, sel.usable, memory_mb=p.memory_mb)
    assert not data.in_memory
    got = feature_stats(data)
    x = store.features("train", 24, 90, 2).reshape(400, -1)[rows].astype(np.float64)  # numpy, independently
    np.testing.assert_allclose(got[0][0], x.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1][0], x.std(0), rtol=1e-5, atol=1e-5)
    assert reads and max(reads) <= budget and sum(reads) <= 400  # blocks without a used row are not read


@pytest.mark.parametrize("budget", [40, 150])
def test_streamed_lbfgs_reaches_the_in_memory_optimum_within_budget(store, reads, budget, monkeypatch):
    whole = linear_probe(store, 24, 90, 2, recipe="lbfgs", settings=FAST)
    assert not whole["streamed"]
    reads.clear()  # the in-memory run read whole chunks too; what follows must stay within budget
    _no_whole_reads(monkeypatch)
    r = linear_probe(store, 24, 90, 2, recipe="lbfgs", settings=dataclasses.replace(FAST, memory_mb=_mb(budget)))
    assert r["streamed"] and max(reads) <= budget
    assert (r["n_train"], r["n_heldout"], r["n_val"]) == (whole["n_train"], whole["n_heldout"], whole["n_val"])
    assert r["n_train"] + r["n_heldout"] == 400 - len(SKIPPED)
    assert abs(r["top1"] - whole["top1"]) <= 0.01, (r["top1"], whole["top1"])
    assert r["hyperparameters"] == whole["hyperparameters"]
    for a, b in zip(r["grid"], whole["grid"]):
        assert a["heldout_loss"] == pytest.approx(b["heldout_loss"], rel=1e-3, abs=1e-4)
        assert abs(a["heldout_top1"] - b["heldout_top1"]) <= 0.03


def test_streamed_sgd_learns_and_is_deterministic(store, reads, monkeypatch):
    whole = linear_probe(store, 24, 90, 2, recipe="sgd", seed=1, settings=FAST)
    reads.clear()
    _no_whole_reads(monkeypatch)
    p = dataclasses.replace(FAST, memory_mb=_mb(100))  # one 64-row chunk per block
    a, b = (linear_probe(store, 24, 90, 2, recipe="sgd", seed=1, settings=p) for _ in range(2))
    assert (
        a["streamed"] and max(reads) <= 100 and set(reads) <= {64, 16, 8}
    )  # whole chunks (the last: 16 of train, 8 of val)
    drop = ("timestamp", "seconds")
    assert {k: v for k, v in a.to_json().items() if k not in drop} == {
        k: v for k, v in b.to_json().items() if k not in drop
    }
    assert a["top1"] >= whole["top1"] - 0.04, (a["top1"], whole["top1"])
    c = linear_probe(store, 24, 90, 2, recipe="sgd", seed=2, settings=p)
    assert c["grid"] != a["grid"]  # the seed drives the window shuffle


def test_non_finite_unskipped_features_are_an_error_when_streamed(tmp_path):
    from diffprobe.store.errors import StoreError

    x, y = _planted(100, 1)
    x[5] = np.inf
    s = open_store(write_store(tmp_path / "bad.zarr", (x, y), _planted(50, 2)))
    with pytest.raises(StoreError, match="non-finite values in images that are not marked skipped"):
        linear_probe(s, 24, 90, 2, recipe="lbfgs", settings=dataclasses.replace(FAST, memory_mb=_mb(30)))
