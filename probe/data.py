"""The data layer: the rows a head reads from one split's feature arrays, in memory or streamed
from the store, behind one interface. Every probe reads through it (linear, attention,
DifFormer; kNN and segmentation build on it).

    from diffprobe.probe.data import FeatureData
    fit, held = FeatureData.parts(store, "train", [(24, 90, 16)], [(rows_fit, y_fit), (rows_held, y_held)],
                                  usable, memory_mb=2048, device="cpu")
    for xs, y in fit.batches(128, generator):   # xs: one float16 (n, C, P, P) tensor per cell
        ...
    for xs, y in held.sequential(512):           # every row once, in ``rows`` order, 512 at a time
        ...
    fit.in_memory, len(fit), fit.shapes, fit.row_bytes

Public interface (kept stable: other probes build on it):

- `FeatureData(store, split, cells, rows, labels, usable, memory_mb=, device=, stream=None,
  prefetch=PREFETCH)`: the store rows ``rows`` (ascending) of the arrays ``cells`` = [(block,
  t, pool), ...] of ``split``, with ``labels`` (one per row). All cells' arrays must have the
  same number of images and the same chunking (else `StoreError` naming both). ``usable`` is
  the split's not-skipped mask: non-finite values in usable rows of anything read are errors.
  ``stream`` None: held in memory iff every row of every cell fits ``memory_mb`` (counted in
  the stored dtype's bytes, `row_bytes`); True/False force it.
- `FeatureData.parts(...)`: several row sets of one split (fit and held-out) deciding
  together: held in memory iff all of them fit the budget together (then read once); else
  each streams on its own, one at a time.
- `batches(batch_size, gen)`: one epoch of (xs, y) in the seeded order below; xs is a list
  of float16 tensors on the device, one per cell, y a long tensor. Raises `BudgetError` if a
  streamed window cannot hold one batch.
- `sequential(step)`: (xs, y) of exactly ``step`` rows (the last fewer) in ``rows`` order:
  statistics and scoring.
- ``in_memory``, ``shapes`` (per-row shape of each cell), ``dims``, ``row_bytes``,
  ``budget_rows``, ``window_rows``, ``pieces``, ``device``, `__len__`.
- `train_parts(store, cells, sel, ...)` and `val_part(store, cells, sel, ...)`: the fitted and
  held-out parts of train and the usable val rows of a `probe.protocol.Selection`, as every
  head reads them; `val_logits` averages a head's val logits over the stored noise draws.

Where the rows live:

- A *piece* is one store chunk (``store.chunk_images`` rows, read as one chunk-aligned slice of
  the Zarr array `FeatureStore.feature_array`, every cell's chunk together), or, when one chunk
  does not fit a window, ``window_rows`` rows of it. Pieces without a row of ``rows`` are
  never read; of a piece read, only the rows of ``rows`` are read.
- In memory: every row is read once (pieces in store order) into one buffer per cell.
- Streamed, when the budget holds at least two store chunks: two *windows* of rows are held
  (each at most ``window_rows`` = half the budget). While one window's batches are taken, the
  next is filled on a background thread, so reading and decoding overlap training: its pieces
  are read ``READ_THREADS`` at once (a disk serves several reads faster than one), each
  straight into its place in the window. With ``prefetch`` 0 the next window is read when
  needed, one piece at a time. A smaller budget holds one window of ``budget_rows``, and
  ``prefetch`` pieces are read ahead across windows into buffers of their own: halving it
  would split chunks. A split forced to stream although it fits the budget is one window of
  every row. Memory is the budget and the batches in use, plus a fixed overhead, flat in N:
  with two windows, a buffer per piece being read only at several views (at most
  ``READ_THREADS``); with one window, up to ``prefetch`` + 2 pieces read ahead.
  On a GPU the windows are also held on the device. One streamed epoch of an object runs at a
  time.

The order of an epoch (seeded by ``gen``; a function of the rows, the store's chunking, the
budget and the generator alone, so it does not depend on where the data lives):

1. If all rows fit the budget: one permutation of all of them, ``torch.randperm(n, gen)``.
2. Else: the pieces in a seeded order (``torch.randperm(pieces, gen)``), cut greedily into
   windows of consecutive pieces holding at most ``window_rows`` rows (at least one piece);
   each window's rows, in ascending order, permuted (``torch.randperm(window rows, gen)``).
3. The epoch is the concatenation, cut every ``batch_size`` rows: a batch may span two
   windows; the last batch holds the rest.

So in-memory and streamed data of a split that fits give the same batches in the same order,
bit for bit (a head trained both ways ends identical: tests/test_probe_data.py).

Views (``views`` K > 1, the store's augmented views 0..K-1 of `extract.views`): every row is
held at all K views (a piece reads a chunk's K views together; ``row_bytes`` counts them all),
and `batches(..., epoch=e)` gives each row the view `view_schedule` chose for it at epoch e: a
seeded permutation of the K views per (seed, image id, e // K), taken at e % K, so every K
consecutive epochs show every image at every view once. `sequential` reads view 0. ``draw`` m
reads the center crop under noise draw m (`extract.noise_draws`) instead of view 0.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from diffprobe.probe.protocol import Selection
from diffprobe.store.errors import StoreError
from diffprobe.store.feature_store import FeatureStore, read_rows
from diffprobe.store.finite import all_finite
from diffprobe.store.seeds import derive_seed

PREFETCH = 2  # pieces read ahead (one window; `sequential`); with two windows only > 0 matters; 0: read when needed
READ_THREADS = 4  # pieces read at once (a window's, or those read ahead)

Cell = tuple[int, int, int]  # (block, t, pool)


class BudgetError(StoreError):
    """A memory budget too small for what was asked (e.g. one batch)."""


@dataclass(frozen=True)
class Piece:
    """Store rows [lo, hi) read together, and the positions in ``rows`` of the used ones."""

    lo: int
    hi: int
    pos: np.ndarray


def _where(store: FeatureStore, split: str, cell: Cell) -> str:
    b, t, p = cell
    return f"{store.path}: block {b}, t {t}, pool {p} in split {split!r}"


def _ahead(fn, items: Sequence, depth: int) -> Iterator:
    """``fn(item)`` for each item in order, up to ``depth`` of them computed ahead on threads."""
    if depth <= 0:
        yield from (fn(i) for i in items)
        return
    it = iter(items)
    pool = ThreadPoolExecutor(min(READ_THREADS, depth + 1), thread_name_prefix="diffprobe-read")
    try:
        pending = deque(pool.submit(fn, i) for i in itertools.islice(it, depth + 1))
        while pending:
            result = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(fn, nxt))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _taker(bufs: list[torch.Tensor], device: torch.device):
    """(rows[, views]) -> those rows of every buffer (with ``views``: each row at its view of a
    (rows, K, ...) buffer). On the CPU through numpy: torch's float16 gather there runs at
    ~0.2 GB/s, numpy's fancy indexing at ~2 GB/s (same bits)."""
    if device.type == "cpu":
        arrays = [b.numpy() for b in bufs]

        def take_host(rows, views=None):
            key = rows if views is None else (rows, views)
            return [torch.from_numpy(a[key]) for a in arrays]

        return take_host

    def take(rows, views=None):
        i = torch.from_numpy(np.ascontiguousarray(rows)).to(device)
        if views is None:
            return [b[i] for b in bufs]
        v = torch.from_numpy(np.ascontiguousarray(views)).to(device)
        return [b[i, v] for b in bufs]

    return take


def _cut(views: np.ndarray | None, lo: int, hi: int) -> np.ndarray | None:
    return None if views is None else views[lo:hi]


def _mix(x):
    """splitmix64's finaliser on uint64 arrays: a seeded, well-spread hash, vectorised."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _fold(h, x):
    """Hash ``x`` into ``h`` (uint64 arrays, broadcast)."""
    with np.errstate(over="ignore"):
        return _mix(
            np.asarray(h, dtype=np.uint64) ^ _mix(np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15))
        )


class FeatureData:
    """The rows ``rows`` of ``split``'s arrays ``cells``, in memory or streamed (module docstring)."""

    def __init__(
        self,
        store: FeatureStore,
        split: str,
        cells: Sequence[Cell],
        rows: np.ndarray,
        labels: np.ndarray | None,
        usable: np.ndarray,
        *,
        memory_mb: float,
        device: str | torch.device = "cpu",
        stream: bool | None = None,
        prefetch: int = PREFETCH,
        views: int = 1,
        draw: int = 0,
        view_seed: int = 0,
    ):
        self.store, self.split, self.cells = store, split, [tuple(int(v) for v in c) for c in cells]
        if not self.cells:
            raise ValueError("FeatureData needs at least one (block, t, pool)")
        self.views, self.draw, self.view_seed = views, draw, view_seed
        self.arrays = [store.feature_array(split, *c, draw=draw) for c in self.cells]
        # view v of each cell (view 0 is ``arrays``); a view the store lacks is a StoreError naming what it holds
        self.view_arrays = [self.arrays] + [
            [store.feature_array(split, *c, view=v) for c in self.cells] for v in range(1, views)
        ]
        first = self.arrays[0]
        for c, a in zip(self.cells[1:], self.arrays[1:]):
            if a.shape[0] != first.shape[0] or a.chunks[0] != first.chunks[0]:
                raise StoreError(
                    f"{_where(store, split, c)}: {a.shape[0]} images in chunks of {a.chunks[0]}, but "
                    f"block {self.cells[0][0]}, t {self.cells[0][1]}, pool {self.cells[0][2]} has "
                    f"{first.shape[0]} in chunks of {first.chunks[0]}; arrays read together must match"
                )
        self.rows = np.asarray(rows, dtype=np.int64)
        if len(self.rows) > 1 and not (np.diff(self.rows) > 0).all():
            raise ValueError("rows must be ascending store rows without repeats")
        self.labels = None if labels is None else np.asarray(labels)
        self.usable = np.asarray(usable, dtype=bool)
        self.device = torch.device(device) if isinstance(device, str) else device
        if self.device.type == "cuda" and self.device.index is None and torch.cuda.is_available():
            # the caller's current device, named: windows move to it on the filler thread
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.shapes = [tuple(int(s) for s in a.shape[1:]) for a in self.arrays]
        self.dims = [int(np.prod(s)) for s in self.shapes]
        self.row_bytes = views * sum(d * a.dtype.itemsize for d, a in zip(self.dims, self.arrays))
        self.memory_mb = memory_mb
        self.budget_rows = max(1, int(memory_mb * 2**20 // self.row_bytes))
        self.prefetch = prefetch
        chunk = int(first.chunks[0])
        self.two_windows = self.budget_rows >= 2 * chunk  # streamed: two windows of half the budget
        self.window_rows = self.budget_rows // 2 if self.two_windows else self.budget_rows
        step = chunk if self.window_rows >= chunk else self.window_rows
        self.pieces: list[Piece] = []
        n = int(first.shape[0])
        for lo in range(0, n, step):
            hi = min(lo + step, n)
            a, b = np.searchsorted(self.rows, [lo, hi])
            if b > a:
                self.pieces.append(Piece(lo, hi, np.arange(a, b)))
        self.in_memory = len(self.rows) <= self.budget_rows if stream is None else not stream
        self._checked: set[int] = set()
        self._held: list[torch.Tensor] | None = None
        self._windows: list[list[np.ndarray] | None] = [None, None]  # the two window buffers, reused
        self._streaming = False  # a streamed epoch is under way (`_filled`)
        self._y = None if self.labels is None else torch.from_numpy(self.labels).to(self.device)
        self._ids: np.ndarray | None = None

    # -- several parts of one split ------------------------------------------------------

    @classmethod
    def parts(
        cls,
        store: FeatureStore,
        split: str,
        cells: Sequence[Cell],
        parts: Sequence[tuple[np.ndarray, np.ndarray | None]],
        usable: np.ndarray,
        *,
        memory_mb: float,
        device: str | torch.device = "cpu",
        stream: bool | None = None,
        prefetch: int = PREFETCH,
        views: Sequence[int] | None = None,
        view_seed: int = 0,
    ) -> list[FeatureData]:
        """One `FeatureData` per (rows, labels) of ``parts``: in memory, read once, iff they all
        fit ``memory_mb`` together (or ``stream`` is False); else each streams on its own.
        ``views``: K of each part (default 1 each; e.g. [K, 1]: the fitted part at K views, the
        held-out part at view 0)."""
        views = list(views or [1] * len(parts))
        out = [
            cls(
                store,
                split,
                cells,
                r,
                y,
                usable,
                memory_mb=memory_mb,
                device=device,
                stream=True,
                prefetch=prefetch,
                views=k,
                view_seed=view_seed,
            )
            for (r, y), k in zip(parts, views)
        ]
        if len(set(views)) > 1:  # parts at different views are held apart: each decides alone
            for d in out:
                d.in_memory = stream is False or (stream is None and len(d) <= d.budget_rows)
            return out
        together = sum(len(d) for d in out)
        if stream is False or (stream is None and together <= out[0].budget_rows):
            union = cls(
                store,
                split,
                cells,
                np.unique(np.concatenate([d.rows for d in out])),
                None,
                usable,
                memory_mb=memory_mb,
                device=device,
                stream=True,
                prefetch=prefetch,
            )
            take = _taker(union._read_all(), union.device)
            for d in out:
                d._held, d.in_memory = take(np.searchsorted(union.rows, d.rows)), True
        return out

    def __len__(self) -> int:
        return len(self.rows)

    # -- reading -------------------------------------------------------------------------

    def _read(self, i: int, out: list[np.ndarray] | None = None) -> list[np.ndarray]:
        """Piece ``i``: each cell's used rows, float16 (rows, *shape) (with views: (rows, K,
        *shape), the piece's K views read together), finite-checked once (the used rows the
        split does not mark skipped); into ``out`` (one array per cell of that shape) when
        given. Read straight into place (at one view): no copy, and unused rows not read."""
        piece = self.pieces[i]
        keep = self.rows[piece.pos] - piece.lo
        usable = self.usable[piece.lo : piece.hi][keep]
        if len(keep) == piece.hi - piece.lo:
            keep = None  # every row: one read of the chunk
        if out is None:
            out = self._buffers(len(piece.pos))
        for j, cell in enumerate(self.cells):
            for v, arrays in enumerate(self.view_arrays):
                dst = out[j] if self.views == 1 else out[j][:, v]
                each = None if i in self._checked else self._finite(cell, v, usable)  # as rows arrive
                read_rows(arrays[j], piece.lo, piece.hi, out=dst, each=each, keep=keep)
        self._checked.add(i)
        return out

    def _finite(self, cell: Cell, view: int, usable: np.ndarray):
        """A `read_rows` ``each`` that refuses non-finite values in the rows ``usable`` marks."""

        def check(x: np.ndarray, at: int) -> None:
            flat, ok = x.reshape(len(x), -1), usable[at : at + len(x)]
            if not all_finite(flat if ok.all() else flat[ok]):
                raise StoreError(
                    f"{_where(self.store, self.split, cell)}{f', view {view},' if view else ''} holds "
                    f"non-finite values in images that are not marked skipped"
                )

        return check

    def _fill_order(self, pieces: Sequence[int]) -> list[int]:
        """The order `_fill` reads ``pieces`` in: ascending in the store."""
        return sorted(pieces, key=lambda i: self.pieces[i].lo)

    def _place(
        self, order: Sequence[int], slot: int | None = None
    ) -> tuple[list[int], list[np.ndarray], np.ndarray, list[list[np.ndarray]]]:
        """Where pieces ``order`` go: the pieces in `_fill_order`, the buffers of their used rows
        (one per cell; ``slot`` 0/1: that window buffer, allocated (and paged in) once and reused,
        since a window's batches are copies; else new), the rows' positions in ``rows``, and each
        piece's place in the buffers."""
        order = self._fill_order(order)
        pos = np.concatenate([self.pieces[i].pos for i in order]) if order else np.zeros(0, np.int64)
        if slot is not None:
            held = self._windows[slot]
            if held is None or len(held[0]) < len(pos):
                held = self._windows[slot] = self._buffers(len(pos))
            bufs = [w[: len(pos)] for w in held]
        else:
            bufs = self._buffers(len(pos))
        ends = np.cumsum([0] + [len(self.pieces[i].pos) for i in order])
        return order, bufs, pos, [[b[ends[k] : ends[k + 1]] for b in bufs] for k in range(len(order))]

    def _buffers(self, n: int) -> list[np.ndarray]:
        """Empty buffers of ``n`` rows, one per cell (with views: (n, K, *shape))."""
        lead = (n,) if self.views == 1 else (n, self.views)
        return [np.empty((*lead, *s), a.dtype) for s, a in zip(self.shapes, self.arrays)]

    def _on_device(self, bufs: list[np.ndarray]) -> list[torch.Tensor]:
        return [torch.from_numpy(b).to(self.device) for b in bufs]

    def _fill(
        self, order: Sequence[int], slot: int | None = None, parts: Iterator[list[np.ndarray]] | None = None
    ) -> tuple[list[torch.Tensor], np.ndarray]:
        """The used rows of pieces ``order``, ascending, as device tensors per cell, and their
        positions in ``rows`` (``slot``: as in `_place`). ``parts``: the pieces already being
        read, in `_fill_order` (one window's read-ahead across windows), copied in; else each
        piece is read straight into its place, ``READ_THREADS`` at once (``prefetch`` 0: in turn)."""
        order, bufs, pos, places = self._place(order, slot)
        if parts is not None:
            for place, part in zip(places, parts):
                for dst, x in zip(place, part):
                    dst[...] = x
        elif self.prefetch > 0 and len(order) > 1:
            pool = ThreadPoolExecutor(min(READ_THREADS, len(order)), thread_name_prefix="diffprobe-read")
            try:
                for done in [pool.submit(self._read, i, place) for i, place in zip(order, places)]:
                    done.result()
            finally:  # a failed read: the pieces not yet started are not read
                pool.shutdown(wait=True, cancel_futures=True)
        else:
            for i, place in zip(order, places):
                self._read(i, place)
        return self._on_device(bufs), pos

    def _read_all(self) -> list[torch.Tensor]:
        return self._fill(range(len(self.pieces)))[0]

    def _memory(self) -> list[torch.Tensor]:
        if self._held is None:
            self._held = self._read_all()
        return self._held

    # -- the order of an epoch -----------------------------------------------------------

    def windows(self, gen: torch.Generator) -> list[tuple[list[int], np.ndarray]]:
        """One epoch: [(pieces of the window, positions in ``rows`` in the epoch's order)]."""
        n = len(self.rows)
        if n <= self.budget_rows:
            return [(list(range(len(self.pieces))), torch.randperm(n, generator=gen).numpy())]
        out, window, used = [], [], 0
        for i in torch.randperm(len(self.pieces), generator=gen).tolist():
            k = len(self.pieces[i].pos)
            if window and used + k > self.window_rows:
                out.append(window)
                window, used = [], 0
            window.append(i)
            used += k
        out.append(window)
        result = []
        for w in out:
            pos = np.sort(np.concatenate([self.pieces[i].pos for i in w]))
            result.append((w, pos[torch.randperm(len(pos), generator=gen).numpy()]))
        return result

    def order(self, gen: torch.Generator) -> np.ndarray:
        """The positions in ``rows`` of one epoch, in order (draws from ``gen`` as `batches` does)."""
        return np.concatenate([seq for _, seq in self.windows(gen)])

    def view_schedule(self, epoch: int) -> np.ndarray:
        """The view (0..K-1) each row is read at in ``epoch``: a permutation of the K views seeded
        by (view seed, image id, epoch // K), taken at epoch % K (module docstring)."""
        k = self.views
        if k == 1:
            return np.zeros(len(self.rows), np.int64)
        if self._ids is None:
            ids = self.store.ids(self.split)[self.rows]
            self._ids = np.array([derive_seed(i) for i in ids], dtype=np.uint64)
        cycle = _fold(_fold(self._ids, self.view_seed), epoch // k)[:, None]  # per (seed, image, cycle)
        keys = _fold(cycle, np.arange(k, dtype=np.uint64)[None, :])
        return np.argsort(keys, axis=1, kind="stable")[:, epoch % k].astype(np.int64)

    def batches(
        self, batch_size: int, gen: torch.Generator, epoch: int = 0
    ) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        """One epoch of (xs, y) batches in the seeded order (module docstring); with views, each
        row at its view of ``epoch`` (`view_schedule`)."""
        if not self.in_memory and self.budget_rows < batch_size:
            raise BudgetError(
                f"probe.memory_mb = {self.memory_mb:g} holds {self.budget_rows} images of "
                f"{', '.join(f'block {c[0]}, t {c[1]}, pool {c[2]}' for c in self.cells)} "
                f"({self.row_bytes} bytes each), fewer than one batch of {batch_size}; allowed: at least "
                f"{batch_size * self.row_bytes / 2**20:.3g} MB"
            )
        return self._batches(batch_size, self.windows(gen), self.view_schedule(epoch) if self.views > 1 else None)

    def _batches(self, batch: int, windows, view_of: np.ndarray | None = None):
        if self.in_memory:
            filled = ((self._memory(), seq) for _, seq in windows)
        else:
            filled = self._filled(windows)
        try:
            yield from self._window_batches(batch, windows, view_of, filled)
        finally:
            filled.close()  # a streamed epoch stopped early: its fill and read-ahead threads end

    def _filled(self, windows) -> Generator[tuple[list[torch.Tensor], np.ndarray], None, None]:
        """Each streamed window's (buffers, rows in batch order as buffer positions), in turn.
        Two windows (prefetch > 0): window k + 1 is read while window k's batches are taken, and
        as soon as those are all taken window k + 2's pieces queue behind k + 1's on the same
        ``READ_THREADS`` readers, into k's buffer, so the disk always has reads to serve. One
        window: a read-ahead runs over every window's pieces. Same data, same order either way.
        One streamed epoch of an object at a time: they share the buffers."""
        if self._streaming:
            raise RuntimeError(
                "FeatureData streams one epoch at a time (the epochs share its window buffers): "
                "finish or close the previous batches() iterator first"
            )
        self._streaming = True
        try:
            if self.two_windows and self.prefetch > 0:
                yield from self._filled_ahead(windows)
            else:
                yield from self._filled_in_turn(windows)
        finally:
            self._streaming = False

    def _filled_in_turn(self, windows):
        """`_filled` with one window buffer: each window filled when asked for (one window and
        prefetch > 0: its pieces read ahead across windows, into buffers of their own)."""
        stream = None
        if not self.two_windows and self.prefetch > 0:
            stream = _ahead(self._read, [i for w, _ in windows for i in self._fill_order(w)], self.prefetch)
        try:
            for pieces, seq in windows:
                bufs, pos = self._fill(pieces, 0, stream)
                yield bufs, np.searchsorted(pos, seq)
        finally:
            if stream is not None:
                stream.close()

    def _filled_ahead(self, windows):
        """`_filled` with two window buffers and a shared pool of readers (its docstring)."""
        readers = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="diffprobe-read")
        filler = ThreadPoolExecutor(1, thread_name_prefix="diffprobe-fill")  # a window's tensors, once read

        def ready(reads, bufs, pos):
            for r in reads:
                r.result()
            return self._on_device(bufs), pos

        def start(k: int):
            order, bufs, pos, places = self._place(windows[k][0], k % 2)
            return filler.submit(ready, [readers.submit(self._read, i, p) for i, p in zip(order, places)], bufs, pos)

        try:
            pending = deque([start(k) for k in range(min(2, len(windows)))])
            for k, (_, seq) in enumerate(windows):
                bufs, pos = pending.popleft().result()
                yield bufs, np.searchsorted(pos, seq)
                if k + 2 < len(windows):  # window k's batches are all taken: its buffer takes k + 2
                    pending.append(start(k + 2))
        finally:  # stopped early or failed: reads not started are dropped, those in flight end first
            readers.shutdown(wait=True, cancel_futures=True)
            filler.shutdown(wait=True, cancel_futures=True)

    def _window_batches(self, batch: int, windows, view_of: np.ndarray | None, filled):
        carry: tuple[list[torch.Tensor], torch.Tensor] | None = None
        for (_, seq), (bufs, at) in zip(windows, filled):
            take = _taker(bufs, self.device)
            views = None if view_of is None else view_of[seq]  # one view per row: (row, its view)
            lab = torch.from_numpy(np.ascontiguousarray(seq)).to(self.device)
            start = 0
            if carry is not None:
                need = batch - len(carry[1])
                xs = [torch.cat([c, x]) for c, x in zip(carry[0], take(at[:need], _cut(views, 0, need)))]
                ys = torch.cat([carry[1], self._labels(lab[:need])])
                carry = None
                if len(ys) < batch:
                    carry = (xs, ys)
                    continue
                yield xs, ys
                start = need
            full = start + (len(at) - start) // batch * batch
            for lo in range(start, full, batch):
                yield take(at[lo : lo + batch], _cut(views, lo, lo + batch)), self._labels(lab[lo : lo + batch])
            if full < len(at):
                carry = (take(at[full:], _cut(views, full, len(at))), self._labels(lab[full:]))
            del bufs, take
        if carry is not None:
            yield carry

    def _labels(self, pos: torch.Tensor) -> torch.Tensor:
        if self._y is None:
            return pos
        return self._y[pos]

    def steps(self, batch_size: int) -> int:
        """Batches per epoch."""
        return -(-len(self.rows) // batch_size)

    # -- in order ------------------------------------------------------------------------

    def sequential(self, step: int) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        """Every row once, in ``rows`` order, ``step`` rows at a time (the last fewer)."""
        n = len(self.rows)
        if self.in_memory:
            held = self._memory() if self.views == 1 else [x[:, 0] for x in self._memory()]
            for lo in range(0, n, step):
                yield [x[lo : lo + step] for x in held], self._labels(torch.arange(lo, min(lo + step, n)))
            return
        carry: list[np.ndarray] | None = None
        at = 0
        for part in _ahead(self._read, range(len(self.pieces)), self.prefetch):
            if self.views > 1:
                part = [x[:, 0] for x in part]
            if carry is not None:
                part = [np.concatenate([c, x]) for c, x in zip(carry, part)]
            k = len(part[0])
            full = k // step * step
            for lo in range(0, full, step):
                yield self._host(part, lo, lo + step, at + lo)
            carry = [x[full:] for x in part] if full < k else None
            at += full
        if carry is not None and len(carry[0]):
            yield self._host(carry, 0, len(carry[0]), at)

    def _host(self, part: list[np.ndarray], lo: int, hi: int, at: int):
        xs = [torch.from_numpy(np.ascontiguousarray(x[lo:hi])).to(self.device) for x in part]
        return xs, self._labels(torch.arange(at, at + hi - lo))


# ------------------------------------------------------------------ views and noise draws


@dataclass(frozen=True)
class Views:
    """How a probe reads the store's views and noise draws (`--views`, `--noise-draws`):
    ``views`` train views per epoch ("all": every view held; 1: view 0, today's protocol),
    ``noise_draws`` val noise draws whose logits are averaged (1: view 0 alone)."""

    views: int | str = 1
    noise_draws: int = 1

    def resolve(self, store: FeatureStore, cells: Sequence[Cell]) -> Views:
        """These settings with ``views`` a number, checked against what ``store`` holds of
        every cell: more views (train) or noise draws (val) than stored is a `StoreError`."""
        k = self.views
        if k == "all":  # a cell without view 0 counts 1: its reader names what the store holds
            k = max(1, min((store.views("train", *c) for c in cells), default=1))
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise StoreError(f"--views: {k!r} is not allowed; allowed: all, or a count >= 1")
        if isinstance(self.noise_draws, bool) or not isinstance(self.noise_draws, int) or self.noise_draws < 1:
            raise StoreError(f"--noise-draws: {self.noise_draws!r} is not allowed; allowed: a count >= 1")
        for what, n, split, count in (
            ("--views", k, "train", store.views),
            ("--noise-draws", self.noise_draws, "val", store.noise_draws),
        ):
            for c in cells if n > 1 else ():  # view 0 and draw 0: checked by the reader, with its own message
                have = count(split, *c)
                if n > have:
                    key = "extract.views" if what == "--views" else "extract.noise_draws"
                    raise StoreError(
                        f"{what} {n}: {store.path} holds {have} of block {c[0]}, t {c[1]}, pool {c[2]} in "
                        f"split {split!r}; allowed: 1-{have} ({key} stores more)"
                    )
        return Views(k, self.noise_draws)

    @property
    def record(self) -> dict:
        """What a result and its settings digest record: nothing for the default (1 view, 1 draw),
        so results and digests of probes without views are those of before views existed."""
        return (
            {} if self.views == 1 and self.noise_draws == 1 else {"views": self.views, "noise_draws": self.noise_draws}
        )


def train_parts(
    store: FeatureStore,
    cells: Sequence[Cell],
    sel: Selection,
    *,
    memory_mb: float,
    device: str | torch.device = "cpu",
    stream: bool | None = None,
    views: Views = Views(),
    seed: int = 0,
) -> list[FeatureData]:
    """(fit, held-out) `FeatureData` of train for the selection ``sel``: only those rows are read
    (in memory iff both fit ``memory_mb`` together; else streamed). The fitted part reads
    ``views.views`` views (each epoch one per image, scheduled by ``seed``), the held-out part view 0."""
    rows = np.flatnonzero(sel.usable)  # usable row -> store row
    return FeatureData.parts(
        store,
        "train",
        cells,
        [(rows[sel.fit], sel.y[sel.fit]), (rows[sel.hold], sel.y[sel.hold])],
        sel.usable,
        memory_mb=memory_mb,
        device=device,
        stream=stream,
        views=[int(views.views), 1],
        view_seed=seed,
    )


def val_logits(
    store: FeatureStore,
    cells: Sequence[Cell],
    sel: Selection,
    views: Views,
    logits_of,
    *,
    memory_mb: float,
    device: str | torch.device = "cpu",
    stream: bool | None = None,
) -> tuple[torch.Tensor, bool]:
    """``logits_of(val)`` over `val_part` at each of ``views.noise_draws`` noise draws, averaged
    (one draw: its logits as they are); and whether any draw was streamed. Every head scores
    val through this."""
    total, streamed = None, False
    for draw in range(views.noise_draws):
        val = val_part(store, cells, sel, memory_mb=memory_mb, device=device, stream=stream, draw=draw)
        logits = logits_of(val)
        total = logits if total is None else total + logits
        streamed = streamed or not val.in_memory
    assert total is not None
    return (total / views.noise_draws if views.noise_draws > 1 else total), streamed


def val_part(
    store: FeatureStore,
    cells: Sequence[Cell],
    sel: Selection,
    *,
    memory_mb: float,
    device: str | torch.device = "cpu",
    stream: bool | None = None,
    draw: int = 0,
) -> FeatureData:
    """Val's usable rows of ``cells`` at noise ``draw`` (0: view 0)."""
    rows = np.flatnonzero(sel.usable_val)
    return FeatureData(
        store,
        "val",
        cells,
        rows,
        sel.y_val,
        sel.usable_val,
        memory_mb=memory_mb,
        device=device,
        stream=stream,
        draw=draw,
    )
