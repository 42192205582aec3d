"""The data layer (probe/data.py): the documented epoch order computed independently, the same
batches in memory and streamed (so a head trained both ways ends bit-identical), prefetch
changing nothing, only pieces holding used rows read, and the bad inputs (a budget below one
batch, arrays read together with different chunking)."""

import dataclasses
import threading
import time

import numpy as np
import pytest
import torch
import zarr

from diffprobe.probe.data import BudgetError, FeatureData
from diffprobe.probe.linear import Standardise, feature_stats, fit_sgd
from diffprobe.store.config import ProbeConfig
from diffprobe.store.errors import StoreError
from diffprobe.store.feature_store import FeatureKey, open_store
from diffprobe.store.synthetic import write_synthetic_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")
N, C, P, CHUNK = 300, 4, 2, 32
CELLS = [(24, 90, P), (19, 90, P)]


def _mb(rows: int, cells: int = 2) -> float:
    return rows * 2 * C * P * P * cells / 2**20


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(0)
    y = np.arange(N) % 5
    x = {
        FeatureKey(t, b, P): (rng.normal(size=(N, C, P, P)) + y[:, None, None, None]).astype(np.float16)
        for b, t, _ in CELLS
    }
    xv = {k: v[:50] for k, v in x.items()}
    path = tmp_path_factory.mktemp("data") / "s.zarr"
    return open_store(
        write_synthetic_store(path, {"train": x, "val": xv}, {"train": y, "val": y[:50]}, chunk_images=CHUNK)
    )


def _rows():
    return np.flatnonzero(np.arange(N) % 7 != 3)  # a subset, as a fitted part is


def _data(store, budget_rows, stream, prefetch=2, rows=None):
    rows = _rows() if rows is None else rows
    y = store.labels("train")[rows]
    usable = np.ones(N, bool)
    return FeatureData(
        store, "train", CELLS, rows, y, usable, memory_mb=_mb(budget_rows), stream=stream, prefetch=prefetch
    )


def _epoch(data, batch, seed):
    gen = torch.Generator().manual_seed(seed)
    return [(xs, y) for _ in range(2) for xs, y in data.batches(batch, gen)]  # two epochs: the generator carries


def _our_threads():
    return [t.name for t in threading.enumerate() if t.name.startswith(("diffprobe-fill", "diffprobe-read"))]


def _same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb) and all(torch.equal(u, v) for u, v in zip(xa, xb))


def test_the_order_is_the_documented_one(store):
    rows = _rows()
    whole = _data(store, 10_000, None)
    assert whole.in_memory
    gen = torch.Generator().manual_seed(5)
    want = torch.randperm(len(rows), generator=torch.Generator().manual_seed(5)).numpy()
    np.testing.assert_array_equal(whole.order(gen), want)  # fits: one permutation of every row
    # streamed at 100 rows: pieces (whole 32-row chunks) shuffled, cut greedily into windows of
    # half the budget (it holds two chunks, so two windows are held: one filling), each permuted
    small = _data(store, 100, None)
    assert small.two_windows and small.window_rows == 50
    assert not small.in_memory
    ref = torch.Generator().manual_seed(5)
    chunk_of = rows // CHUNK
    pos_of = {c: np.flatnonzero(chunk_of == c) for c in np.unique(chunk_of)}
    chunks = sorted(pos_of)
    expected, window, used = [], [], 0
    windows = []
    for i in torch.randperm(len(chunks), generator=ref).tolist():
        k = len(pos_of[chunks[i]])
        if window and used + k > 50:
            windows.append(window)
            window, used = [], 0
        window.append(chunks[i])
        used += k
    windows.append(window)
    for w in windows:
        pos = np.sort(np.concatenate([pos_of[c] for c in w]))
        expected.append(pos[torch.randperm(len(pos), generator=ref).numpy()])
    got = small.order(torch.Generator().manual_seed(5))
    np.testing.assert_array_equal(got, np.concatenate(expected))
    assert len(windows) > 2 and sorted(got.tolist()) == list(range(len(rows)))


@pytest.mark.parametrize("budget", [10_000, 100])
def test_in_memory_and_streamed_give_the_same_batches(store, budget):
    in_memory = _data(store, budget, stream=False)
    streamed = _data(store, budget, stream=True)
    assert in_memory.in_memory and not streamed.in_memory
    _same(_epoch(in_memory, 40, 1), _epoch(streamed, 40, 1))
    _same(_epoch(streamed, 40, 1), _epoch(_data(store, budget, stream=True, prefetch=0), 40, 1))
    # sequential reads give every row in order, whatever the chunking of the reads
    a = torch.cat([xs[1] for xs, _ in in_memory.sequential(17)])
    b = torch.cat([xs[1] for xs, _ in streamed.sequential(17)])
    want = torch.from_numpy(store.features("train", 19, 90, P)[_rows()])
    assert torch.equal(a, want) and torch.equal(b, want)


def test_a_head_trained_both_ways_ends_bit_identical(store):
    p = dataclasses.replace(ProbeConfig(), sgd_epochs=3, sgd_batch_size=40, sgd_lr=(0.1, 0.01))
    heads = []
    for stream in (False, True):
        data = _data(store, 10_000, stream)
        std = Standardise(*feature_stats(data), data.device)
        heads.append(fit_sgd(data, std, 5, [{"lr": lr, "weight_decay": 0.0} for lr in p.sgd_lr], p, seed=2))
    assert torch.equal(heads[0][0], heads[1][0]) and torch.equal(heads[0][1], heads[1][1])


def test_only_pieces_holding_used_rows_are_read(store, monkeypatch):
    read = []
    real = FeatureData._read
    monkeypatch.setattr(
        FeatureData, "_read", lambda self, i, out=None: read.append(self.pieces[i].lo) or real(self, i, out)
    )
    data = _data(store, 100, True, rows=np.array([3, 5, 200]))
    list(data.sequential(2))
    assert sorted(read) == [0, 192]  # the chunks of rows 3, 5 and 200 only


def test_parts_read_once_when_they_fit_together(store, monkeypatch):
    read = []
    real = FeatureData._read
    monkeypatch.setattr(FeatureData, "_read", lambda self, i, out=None: read.append(i) or real(self, i, out))
    usable = np.ones(N, bool)
    y = store.labels("train")
    a, b = np.arange(0, N, 2), np.arange(1, N, 2)
    parts = FeatureData.parts(store, "train", CELLS, [(a, y[a]), (b, y[b])], usable, memory_mb=_mb(N))
    assert all(d.in_memory for d in parts) and len(read) == -(-N // CHUNK)
    got = torch.cat([xs[0] for xs, _ in parts[1].sequential(50)])
    assert torch.equal(got, torch.from_numpy(store.features("train", 24, 90, P)[b]))
    parts = FeatureData.parts(store, "train", CELLS, [(a, y[a]), (b, y[b])], usable, memory_mb=_mb(N - 1))
    assert not any(d.in_memory for d in parts)  # together they do not fit: each streams


def test_a_budget_below_one_batch_is_an_error(store):
    data = _data(store, 30, None)
    with pytest.raises(
        BudgetError, match=r"probe.memory_mb = .* holds 30 images .* fewer than one batch of 40; allowed: at least"
    ):
        data.batches(40, torch.Generator())


def test_arrays_with_different_chunking_are_an_error(tmp_path):
    rng = np.random.default_rng(0)
    y = np.arange(64) % 2
    x = {FeatureKey(90, b, P): rng.normal(size=(64, C, P, P)).astype(np.float16) for b in (19, 24)}
    path = write_synthetic_store(tmp_path / "s.zarr", {"train": x, "val": x}, {"train": y, "val": y}, chunk_images=16)
    g = zarr.open_group(str(path / "train"), mode="r+")
    name = FeatureKey(90, 24, P).name
    data = g[name][:]
    del g[name]
    g.create_array(name, shape=data.shape, chunks=(8, C, P, P), dtype=data.dtype)[:] = data
    with pytest.raises(StoreError, match="in chunks of 8, but block 19, t 90, pool 2 has 64 in chunks of 16"):
        FeatureData(
            open_store(path), "train", [(19, 90, P), (24, 90, P)], np.arange(64), y, np.ones(64, bool), memory_mb=1
        )


def test_the_read_ahead_runs_across_windows(store, monkeypatch):
    """One window (a budget under two chunks): while a window's last batch is in use, the next
    window's first pieces are already read (one read-ahead for the epoch, not one per window);
    the batches are those of no read-ahead, and closing the epoch ends its threads."""
    data = _data(store, 50, stream=True, prefetch=2)
    windows = data.windows(torch.Generator().manual_seed(0))
    assert not data.two_windows and len(windows) > 2
    first_of_next = data._fill_order(windows[1][0])[0]
    reads: list[int] = []
    real = FeatureData._read
    monkeypatch.setattr(FeatureData, "_read", lambda self, i, out=None: (reads.append(i), real(self, i, out))[1])
    rows_in_first = len(windows[0][1])
    seen = 0
    batches = data.batches(16, torch.Generator().manual_seed(0))
    for _, y in batches:
        seen += len(y)
        if seen >= rows_in_first // 16 * 16:  # the first window's last whole batch is out (no carry)
            break
    for _ in range(50):  # the read-ahead threads: give them a moment
        if first_of_next in reads:
            break
        time.sleep(0.01)
    assert first_of_next in reads
    batches.close()  # stops the read-ahead (its threads are joined)
    assert not _our_threads()
    monkeypatch.undo()
    again = [
        (xs, y) for xs, y in _data(store, 50, stream=True, prefetch=0).batches(16, torch.Generator().manual_seed(0))
    ]
    ahead = [
        (xs, y) for xs, y in _data(store, 50, stream=True, prefetch=2).batches(16, torch.Generator().manual_seed(0))
    ]
    assert len(again) == len(ahead)
    for (xa, ya), (xb, yb) in zip(again, ahead):
        assert torch.equal(ya, yb) and all(torch.equal(a, b) for a, b in zip(xa, xb))


def test_the_next_window_is_filled_while_this_one_is_taken(store, monkeypatch):
    """Two windows of half the budget: while the first batch of window 0 is in use, every piece
    of window 1 is read (not just the first few of a read-ahead), and never more rows are held
    than the budget; the batches are those read with no prefetch."""
    data = _data(store, 224, stream=True, prefetch=2)
    windows = data.windows(torch.Generator().manual_seed(0))
    assert len(windows) >= 2 and len(windows[1][0]) > data.prefetch + 1  # more than a read-ahead holds
    assert data.two_windows and 2 * data.window_rows <= data.budget_rows
    assert all(len(seq) <= data.window_rows for _, seq in windows)
    reads: list[int] = []
    real = FeatureData._read
    monkeypatch.setattr(FeatureData, "_read", lambda self, i, out=None: (reads.append(i), real(self, i, out))[1])
    batches = data.batches(8, torch.Generator().manual_seed(0))
    first = next(batches)
    for _ in range(200):  # the filler thread: give it a moment
        if set(windows[1][0]) <= set(reads):
            break
        time.sleep(0.01)
    assert set(windows[1][0]) <= set(reads)
    with pytest.raises(RuntimeError, match="one epoch at a time"):  # the epochs share the two buffers
        next(data.batches(8, torch.Generator().manual_seed(1)))
    ahead = [first, *batches]
    monkeypatch.undo()
    _same(ahead, [b for b in _data(store, 224, stream=True, prefetch=0).batches(8, torch.Generator().manual_seed(0))])


def test_a_window_that_fails_to_fill_stops_the_epoch_with_its_error(store, monkeypatch):
    data = _data(store, 224, stream=True, prefetch=2)
    windows = data.windows(torch.Generator().manual_seed(0))
    bad = windows[1][0][0]
    real = FeatureData._read

    def read(self, i, out=None):
        if i == bad:
            raise StoreError(f"piece {i} is unreadable")
        return real(self, i, out)

    monkeypatch.setattr(FeatureData, "_read", read)
    with pytest.raises(StoreError, match=f"piece {bad} is unreadable"):
        for _ in data.batches(8, torch.Generator().manual_seed(0)):
            pass
    assert not _our_threads()  # the fill and read-ahead threads are joined
    monkeypatch.undo()
    assert len(list(data.batches(8, torch.Generator().manual_seed(0)))) == data.steps(8)  # usable again


def test_a_budget_under_two_chunks_keeps_one_window_of_whole_chunks(store):
    data = _data(store, 50, stream=True)  # 50 rows: more than one 32-row chunk, less than two
    assert not data.two_windows and data.window_rows == 50
    assert {p.hi - p.lo for p in data.pieces} <= {CHUNK, N % CHUNK}  # chunks are not split
    _same(_epoch(data, 16, 3), _epoch(_data(store, 50, stream=True, prefetch=0), 16, 3))


def test_the_window_after_next_queues_behind_the_next_one(store, monkeypatch):
    """While the next window's last piece is still being read, the pieces of the window after
    it are already being read (on the readers left free): the disk is never without reads
    between windows. Same batches as with no prefetch."""
    data = _data(store, 224, stream=True, prefetch=2)
    windows = data.windows(torch.Generator().manual_seed(0))
    assert data.two_windows and len(windows) >= 3
    last_of_next = data._fill_order(windows[1][0])[-1]
    after_next = threading.Event()
    real = FeatureData._read

    def read(self, i, out=None):
        if i in windows[2][0]:
            after_next.set()
        if i == last_of_next:
            assert after_next.wait(10), "window 2 was not read while window 1 was"
        return real(self, i, out)

    monkeypatch.setattr(FeatureData, "_read", read)
    ahead = list(data.batches(8, torch.Generator().manual_seed(0)))
    assert after_next.is_set()
    monkeypatch.undo()
    _same(ahead, list(_data(store, 224, stream=True, prefetch=0).batches(8, torch.Generator().manual_seed(0))))


def test_rows_are_checked_finite_as_they_arrive_sparing_skipped_ones(tmp_path, monkeypatch):
    """Streamed and checked a few rows at a time (``SEGMENT`` patched to one row): NaN in a
    skipped row passes, inf in a usable row is an error naming its block, wherever it sits."""
    import diffprobe.store.feature_store as fs

    monkeypatch.setattr(fs, "SEGMENT", 1)
    x = np.ones((64, C, P, P), np.float16)
    x[[5, 40]] = np.nan
    usable = np.ones(64, bool)
    usable[[5, 40]] = False
    path = write_synthetic_store(
        tmp_path / "s.zarr", {"train": {FeatureKey(90, 24, P): x}}, {"train": np.zeros(64, int)}, chunk_images=16
    )

    def epoch(s):
        rows = np.flatnonzero(usable)
        data = FeatureData(s, "train", [(24, 90, P)], rows, None, usable, memory_mb=48 * 2 * C * P * P / 2**20)
        assert data.two_windows and not data.in_memory
        return sum(len(y) for _, y in data.batches(8, torch.Generator().manual_seed(0)))

    assert epoch(open_store(path)) == 62
    arr = zarr.open_array(path / "train" / f"t90_b24_p{P}", mode="r+")  # a usable row turns inf
    for row in (6, 20, 47, 60):  # in chunks read in part (a skipped row) and read straight into the window
        arr[row] = np.inf
        with pytest.raises(StoreError, match="block 24, t 90, pool 2 .* holds non-finite values"):
            epoch(open_store(path))
        arr[row] = 1


def test_a_bare_cuda_device_is_the_callers_current_one(store, monkeypatch):
    """Windows move to the device on the filler thread, where torch.cuda.set_device of the
    caller does not hold: a bare "cuda" is resolved to the caller's current device up front."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    usable = np.ones(N, bool)
    d = FeatureData(store, "train", CELLS, _rows(), None, usable, memory_mb=1, device="cuda", stream=True)
    assert d.device == torch.device("cuda", 3)


def test_a_failure_starting_the_windows_leaves_the_data_usable(store, monkeypatch):
    """Placing window 1 fails (say, no memory for its buffer) while window 0 is being read: the
    epoch raises that error, its threads are joined, and the next epoch runs."""
    data = _data(store, 224, stream=True, prefetch=2)
    real, calls = FeatureData._place, []

    def place(self, order, slot=None):
        calls.append(slot)
        if len(calls) == 2:
            raise MemoryError("no room for window 1")
        return real(self, order, slot)

    monkeypatch.setattr(FeatureData, "_place", place)
    with pytest.raises(MemoryError, match="window 1"):
        next(data.batches(8, torch.Generator().manual_seed(0)))
    assert not _our_threads()
    monkeypatch.undo()
    assert len(list(data.batches(8, torch.Generator().manual_seed(0)))) == data.steps(8)
