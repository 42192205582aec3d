"""The extraction loop: images -> x_t -> truncated U-Net forwards over rows of (image, t) ->
pooled features -> store chunks, as an overlapped pipeline.

Work is done chunk by chunk (the store's unit of completion): `chunk_work` lists the chunks
still to do and `extract_chunks` computes them (the same function in this process and on
dask workers, see extract.dask_worker). Three stages overlap:

1. **Loaders** (`Loader`: ``extract.loaders`` threads or processes) read and preprocess a
   batch of ``batch_size`` images (at each pending view or noise draw: `ChunkWork.variants`)
   and generate its noise, keyed by (seed, image id, t, view or draw) on a CPU generator
   (extract.noise), ``extract.prefetch`` batches ahead of the model.
2. **The model** (this thread): x_t = q_sample(x0, t, noise) on the device, from host tensors
   copied without blocking (pinned on CUDA). Every pending timestep of a batch shares its
   forwards: the rows are (image, t), image-major, and every U-Net call has exactly
   ``forward_batch`` rows (the last group zero-padded). CPU and GPU matmul kernels choose their
   blocking by row count, so the bits of a row would otherwise depend on how many rows shared
   its call; with a fixed call shape they depend only on (model, image, t, noise seed, device,
   dtype, and on CPU the torch thread count), whatever the batch size, resume or worker.
   Pooling and the cast to the store's dtype run on the device; only pooled tensors cross back.
3. **The writer** (`ChunkWriter`: one thread, ``extract.write_behind`` chunks in flight) writes a
   finished chunk's data, then its completion records, while the next chunk computes. A crash
   loses at most the chunks in flight; a failed write stops the run and nothing after it is
   marked complete.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from diffprobe.extract.images import ImageSource
from diffprobe.extract.masks import ChunkMasks, MaskedSource, load_masked
from diffprobe.extract.noise import rows_noise
from diffprobe.extract.plan import Plan
from diffprobe.extract.report import Reporter, Totals
from diffprobe.extract.unet import capture
from diffprobe.store.errors import ImageError
from diffprobe.store.feature_store import FeatureKey, StoreWriter
from diffprobe.store.hooks import PAUSE_FILE as PAUSE_FILE  # the hooks' variables, as tests name them
from diffprobe.store.hooks import PAUSE_LIMIT_S as PAUSE_LIMIT_S
from diffprobe.store.hooks import SIGKILL_FILE as SIGKILL_FILE
from diffprobe.store.hooks import pause_hook, sigkill_hook

# Testing hooks (store/hooks.py): each variable holds the path of a file naming one chunk
# ("train/3"); the writer of that chunk (this process or a dask worker) acts right after its
# completion records. SIGKILL_FILE: a kill at a moment a test controls (a run's first kill);
# PAUSE_FILE: while the writer waits, exactly the chunks written so far are complete.


@dataclass(frozen=True)
class ComputeSettings:
    device: torch.device
    forward_batch: int = 32
    autocast: str = "none"  # "none", "bf16", "fp16"
    noise_seed: int = 0
    batch_size: int = 64
    on_corrupt: str = "error"  # "error" or "skip"
    loaders: int = 2  # loader workers (0: read and noise in the model's thread)
    loader_kind: str = "thread"  # "thread" or "process"
    prefetch: int = 4  # ready batches the loaders hold ahead of the model
    write_behind: int = 1  # chunks being written while the next computes (0: write in line)
    channels_last: bool = False


def autocast_context(device: torch.device, autocast: str):
    """torch.autocast for "bf16"/"fp16" (guided-diffusion's GroupNorm32 still normalises in
    float32), a no-op for "none"."""
    if autocast == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[autocast])


def pool_features(x: torch.Tensor, p: int) -> torch.Tensor:
    """Adaptive average pooling of (N, C, H, W) to (N, C, p, p); p is already capped at H."""
    return x if x.shape[-1] == p else F.adaptive_avg_pool2d(x, p)


def forward_rows(
    model,
    x_t: torch.Tensor,
    t: torch.Tensor,
    pairs: Iterable[tuple[int, int]],
    settings: ComputeSettings,
    dtype: torch.dtype = torch.float16,
    on_call=None,
) -> dict[tuple[int, int], torch.Tensor]:
    """Pooled block outputs of rows (x_t[r], t[r]) for every (block, pool) in ``pairs``.

    x_t: (R, 3, S, S) and t: (R,) on the model's device. The U-Net runs on groups of exactly
    ``settings.forward_batch`` rows (the last zero-padded); each group's block outputs are
    pooled (in float32) and cast to ``dtype`` on the device before the next group runs, so
    memory scales with forward_batch, not with R. ``on_call(n)`` after each call of n real
    rows. Returns {(block, pool): (R, C, p, p)} on the device.
    """
    pairs = sorted(set(pairs))
    fb = settings.forward_batch
    blocks = sorted({b for b, _ in pairs})
    parts: dict[tuple[int, int], list[torch.Tensor]] = {bp: [] for bp in pairs}
    for lo in range(0, len(x_t), fb):
        group, tg = x_t[lo : lo + fb], t[lo : lo + fb]
        n = len(group)
        if n < fb:
            group = torch.cat([group, group.new_zeros((fb - n, *group.shape[1:]))])
            tg = torch.cat([tg, tg[-1:].expand(fb - n)])
        if settings.channels_last:
            group = group.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), autocast_context(settings.device, settings.autocast):
            out = capture(model, group, tg, blocks)
        for b, p in pairs:
            parts[(b, p)].append(pool_features(out[b][:n].float(), p).to(dtype))
        del out
        if on_call:
            on_call(n)
    return {bp: torch.cat(v) for bp, v in parts.items()}


def pooled_features(
    model, x_t: torch.Tensor, t: int, keys, settings: ComputeSettings, dtype: torch.dtype = torch.float16
) -> dict[FeatureKey, torch.Tensor]:
    """Pooled block outputs for ``keys`` (all at timestep ``t``) of the rows x_t: (N, 3, S, S)
    on the model's device. Returns {key: (N, C, p, p)} in ``dtype`` on the device."""
    tt = torch.full((len(x_t),), t, dtype=torch.long, device=x_t.device)
    out = forward_rows(model, x_t, tt, [(k.block, k.pool) for k in keys], settings, dtype)
    return {k: out[(k.block, k.pool)] for k in keys}


def warm_up(model, settings: ComputeSettings, blocks, image_size: int) -> float:
    """One U-Net call of the run's shape on zeros (what torch.compile compiles on); its seconds."""
    x = torch.zeros((settings.forward_batch, 3, image_size, image_size), device=settings.device)
    start = time.perf_counter()
    forward_rows(model, x, torch.zeros(len(x), dtype=torch.long, device=settings.device), [(max(blocks), 1)], settings)
    if settings.device.type == "cuda":
        torch.cuda.synchronize(settings.device)
    return time.perf_counter() - start


def _where(source: ImageSource, split: str, image_id: str) -> str:
    return str(source.path(split, image_id)) if hasattr(source, "path") else image_id


# ------------------------------------------------------------------ loaders


@dataclass
class Ready:
    """A batch ready for the model: images, their noise, and the images that could not be read.

    x0: (B * R, 3, S, S) float32, row i * R + r for (image i, variant r: a (view, draw) pair);
    noise: (B * R * T, 3, S, S), row (i * R + r) * T + j for (image i, variant r, t_j);
    errors: position -> the one-line reason (naming the file) of each image that could not be
    read; masks: (B, S, S) uint8 label maps of a dense source (`extract.masks`), else None."""

    x0: np.ndarray
    noise: np.ndarray
    errors: dict[int, str] = field(default_factory=dict)
    masks: np.ndarray | None = None


def load_batch(
    source: ImageSource,
    split: str,
    ids: tuple[str, ...],
    variants: tuple[tuple[int, int], ...],
    timesteps: tuple[int, ...],
    seed: int,
) -> Ready:
    """Read and preprocess ``ids`` at every view of ``variants`` ((view, draw) pairs; a draw
    m >= 1 is the center crop) and generate the noise of every (image, variant, t): a loader's
    task. A dense source's masks are of view 0, the only view its stores hold (`extract.job`)."""
    views = tuple(sorted({v for v, _ in variants}))
    masks = None
    if isinstance(source, MaskedSource):
        loaded, masks = load_masked(source, split, ids)
        loaded = [x if isinstance(x, Exception) else x[None] for x in loaded]  # (1, 3, S, S): view 0
    else:
        loaded = source.load_views(split, list(ids), views)
    errors = {i: _unreadable(source, split, ids[i], x) for i, x in enumerate(loaded) if isinstance(x, Exception)}
    shape = next(
        (x.shape[1:] for x in loaded if not isinstance(x, Exception)), (3, source.image_size, source.image_size)
    )
    blank = np.zeros((len(views), *shape), np.float32)
    x0 = np.stack([(blank if isinstance(x, Exception) else x)[views.index(v)] for x in loaded for v, _ in variants])
    noise = rows_noise(seed, [(i, t, v, m) for i in ids for v, m in variants for t in timesteps], tuple(shape))
    return Ready(x0, noise.numpy(), errors, masks)


def _unreadable(source: ImageSource, split: str, image_id: str, e: Exception) -> str:
    """Why an image (or its mask) could not be read, naming the file: a source's `ImageError`
    says it already."""
    if isinstance(e, ImageError):
        return str(e)
    return f"{_where(source, split, image_id)}: cannot read image ({type(e).__name__}: {e})"


_PROCESS_SOURCE: ImageSource | None = None


def _start_loader_process(source: ImageSource) -> None:
    global _PROCESS_SOURCE
    _PROCESS_SOURCE = source
    torch.set_num_threads(1)  # a loader's torch work is one noise tensor at a time


def _load_in_process(split, ids, variants, timesteps, seed) -> Ready:
    assert _PROCESS_SOURCE is not None
    return load_batch(_PROCESS_SOURCE, split, ids, variants, timesteps, seed)


class Loader:
    """Ready batches in order, ``prefetch`` ahead of their consumer, from ``workers`` threads
    (PIL decodes and torch generates without the GIL) or processes (spawned: each gets the
    source once). ``workers`` 0 loads in the consumer's thread."""

    def __init__(self, source: ImageSource, workers: int, kind: str = "thread", prefetch: int = 4):
        self.source, self.prefetch = source, max(1, prefetch)
        self.pool: ThreadPoolExecutor | ProcessPoolExecutor | None = None
        if workers and kind == "process":
            self.pool = ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_loader_process,
                initargs=(source,),
            )
        elif workers:
            self.pool = ThreadPoolExecutor(workers, thread_name_prefix="diffprobe-loader")

    def _submit(self, task) -> Future:
        assert self.pool is not None
        if isinstance(self.pool, ProcessPoolExecutor):
            return self.pool.submit(_load_in_process, *task)
        return self.pool.submit(load_batch, self.source, *task)

    def batches(self, tasks: Iterable[tuple]) -> Iterator[Ready]:
        """``load_batch(source, *task)`` for each task (split, ids, variants, timesteps, seed), in order."""
        tasks = iter(tasks)
        if self.pool is None:
            for task in tasks:
                yield load_batch(self.source, *task)
            return
        pending: deque[tuple[tuple, Future]] = deque()
        for task in tasks:
            pending.append((task, self._submit(task)))
            if len(pending) >= self.prefetch:
                break
        while pending:
            task, future = pending.popleft()
            try:
                ready = future.result()
            except BrokenProcessPool:
                split, ids = task[0], task[1]
                raise ImageError(
                    f"a loader process died reading {_where(self.source, split, ids[0])} .. "
                    f"{_where(self.source, split, ids[-1])}; set extract.loader_kind = 'thread' to see the error"
                ) from None
            nxt = next(tasks, None)
            if nxt is not None:
                pending.append((nxt, self._submit(nxt)))
            yield ready

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------ writer


def _testing_hooks(split: str, chunk: int) -> None:
    """SIGKILL_FILE and PAUSE_FILE (store/hooks.py), after a chunk's completion records."""
    sigkill_hook(f"{split}/{chunk}")
    pause_hook(f"{split}/{chunk}")


class ChunkWriter:
    """Writes finished chunks (a dense source's masks, ``skipped``, data, then completion records) on one thread, at most
    ``behind`` chunks in flight while the caller computes the next; ``behind`` 0 writes in line.

    A write that fails is re-raised in the caller at its next `submit` or at `close`, and no later
    chunk is written (so none is marked complete). ``report.chunks`` counts chunks as they land."""

    def __init__(self, writer: StoreWriter, behind: int, report: Reporter, done: int = 0, total: int = 0):
        self.writer, self.behind, self.report = writer, behind, report
        self.done, self.total = done, total
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="diffprobe-writer") if behind else None
        self.inflight: deque[Future] = deque()
        self.failed = threading.Event()

    def _write(self, work: ChunkWork, skipped: np.ndarray, data: dict, masks: ChunkMasks | None) -> None:
        if self.failed.is_set():
            return
        try:
            if masks is not None:
                masks.write(self.writer, work.chunk)  # masks and their record before the features' records
            self.writer.write_skipped(work.split, skipped)  # before the chunk's records
            self.writer.write_chunk(work.split, work.chunk, data)
        except BaseException:
            self.failed.set()
            raise
        _testing_hooks(work.split, work.chunk)

    def _landed(self) -> None:
        self.done += 1
        self.report.chunks(self.done, self.total)

    def submit(self, work: ChunkWork, skipped: np.ndarray, data: dict, masks: ChunkMasks | None = None) -> None:
        if self.pool is None:
            self._write(work, skipped, data, masks)
            self._landed()
            return
        while len(self.inflight) >= self.behind:
            self._reap()
        self.inflight.append(self.pool.submit(self._write, work, skipped, data, masks))

    def _reap(self) -> None:
        self.inflight.popleft().result()  # the writer's error, if it failed
        self._landed()

    def close(self) -> None:
        """Wait for every write; raise the first that failed."""
        while self.inflight:
            self._reap()
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def abort(self) -> None:
        """The run failed elsewhere: write nothing more, wait for the write in progress."""
        self.failed.set()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------ chunks


@dataclass(frozen=True)
class ChunkWork:
    """One image chunk of one split and the feature arrays it still lacks: the unit of writing,
    completion, resume and distribution (two workers never get the same chunk).

    ``was_skipped``: positions (into the split) recorded as skipped by earlier runs; they stay
    skipped. ``has_data``: some array already holds this chunk, so an image that cannot be
    read now but was read then is an error (a store never mixes the two).
    """

    split: str
    chunk: int
    lo: int
    hi: int
    arrays: tuple[tuple[FeatureKey, tuple[int, ...]], ...]  # (key, shape of one image's feature)
    dtype: str
    was_skipped: tuple[int, ...] = ()
    has_data: bool = False

    @property
    def images(self) -> int:
        return self.hi - self.lo

    @property
    def timesteps(self) -> tuple[int, ...]:
        """The timesteps with a pending array, ascending: each image of the chunk runs once per t."""
        return tuple(sorted({k.t for k, _ in self.arrays}))

    @property
    def variants(self) -> tuple[tuple[int, int], ...]:
        """The (view, draw) pairs with a pending array, ascending: each image runs once per variant and t."""
        return tuple(sorted({(k.view, k.draw) for k, _ in self.arrays}))

    @property
    def forwards(self) -> int:
        return self.images * len(self.variants) * len(self.timesteps)


def start_chunks(plan: Plan, writer, report: Reporter, job=None) -> tuple[list[ChunkWork], Totals]:
    """`chunk_work` and the run's `Totals`, told to ``report.start``: how every run (one process
    or many) begins."""
    work, complete = chunk_work(plan, writer)
    todo = sum(w.forwards for w in work)
    images = sum(plan.split_sizes.values())
    totals = Totals(
        images=images,
        forwards=plan.forwards,
        chunks=len(work) + len(complete),
        images_done=sum(complete),
        forwards_done=plan.forwards - todo,
        chunks_done=len(complete),
    )
    report.start(job, totals)
    return work, totals


def chunk_work(plan: Plan, store) -> tuple[list[ChunkWork], list[int]]:
    """The chunks of ``plan`` still to compute in ``store`` (in split and chunk order), and the
    image counts of the chunks found complete. Reads only the completion records and ``skipped``."""
    work, complete = [], []
    for split, n in plan.split_sizes.items():
        arrays = [(a.key, a.shape[1:], a.dtype) for a in plan.arrays if a.split == split]
        done = store.done_masks(split)
        chunk = store.chunk_images(split)
        skipped = np.flatnonzero(store.skipped(split))
        n_chunks = store.n_chunks(split)
        has_data = np.logical_or.reduce(list(done.values()), axis=0) if done else np.zeros(n_chunks, bool)
        for c in range(n_chunks):
            lo, hi = c * chunk, min((c + 1) * chunk, n)
            pending = tuple((k, shape) for k, shape, _ in arrays if not done[k][c])
            if not pending:
                complete.append(hi - lo)
                continue
            was = tuple(int(i) for i in skipped[(skipped >= lo) & (skipped < hi)])
            work.append(ChunkWork(split, c, lo, hi, pending, arrays[0][2], was, bool(has_data[c])))
    return work, complete


def _to_device(x: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device``: pinned and copied without blocking on CUDA."""
    t = torch.from_numpy(x)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def extract_chunks(
    model,
    diffusion,
    source: ImageSource,
    works: list[ChunkWork],
    writer: StoreWriter,
    settings: ComputeSettings,
    report: Reporter | None = None,
    chunks_done: int = 0,
    chunks_total: int = 0,
) -> int:
    """Compute ``works`` in order and write each chunk's data, then its completion records.

    The one loop of both the single-process run and a dask worker (which passes one chunk).
    ``model`` must already be on ``settings.device`` and in eval mode. ``report.advance`` after
    every U-Net call and batch; ``report.chunks`` as chunks land (counted from ``chunks_done`` of
    ``chunks_total``). Returns the number of images recorded as skipped.
    """
    report = report or Reporter()
    dev = settings.device
    batches = [
        (w, b0, min(b0 + settings.batch_size, w.hi)) for w in works for b0 in range(w.lo, w.hi, settings.batch_size)
    ]
    tasks = (
        (w.split, source.split(w.split).ids[b0:b1], w.variants, w.timesteps, settings.noise_seed)
        for w, b0, b1 in batches
    )
    loader = Loader(source, settings.loaders, settings.loader_kind, settings.prefetch)
    out_writer = ChunkWriter(writer, settings.write_behind, report, chunks_done, chunks_total)
    n_skipped = 0
    try:
        out: dict[FeatureKey, np.ndarray] = {}
        skipped: list[int] = []
        dense: ChunkMasks | None = None
        for (w, b0, b1), ready in zip(batches, loader.batches(tasks)):
            if b0 == w.lo:
                out = {k: np.empty((w.images, *shape), dtype=w.dtype) for k, shape in w.arrays}
                skipped = []
                dense = ChunkMasks.for_source(source, w.split, w.lo, w.hi)  # None unless the source has masks
            bad = _bad_positions(source, w, b0, b1, ready, settings.on_corrupt)
            skipped += [b0 + i for i in bad]
            ts, variants = w.timesteps, w.variants
            if dense is not None:
                dense.add(b0, ready.x0[:: len(variants)], ready.masks)  # a dense store's variants are all view 0
                dense.ignore(b0, bad)
            x0 = _to_device(ready.x0, dev).repeat_interleave(len(ts), dim=0)
            noise = _to_device(ready.noise, dev)
            tt = torch.tensor(ts, dtype=torch.long, device=dev).repeat((b1 - b0) * len(variants))  # row .. + j -> t_j
            x_t = diffusion.q_sample(x0, tt, noise)
            pairs = {(k.block, k.pool) for k, _ in w.arrays}
            pooled = forward_rows(
                model, x_t, tt, pairs, settings, getattr(torch, w.dtype), lambda n: report.advance(0, n)
            )
            for (b, p), rows in pooled.items():
                rows = rows.cpu().numpy()  # only pooled, cast tensors cross
                step = len(variants) * len(ts)  # row (i * R + r) * T + j: image i, variant r, t_j
                for r, (v, m) in enumerate(variants):
                    for j, t in enumerate(ts):
                        key = FeatureKey(t, b, p, v, m)
                        if key in out:
                            dest = out[key][b0 - w.lo : b1 - w.lo]
                            dest[:] = rows[r * len(ts) + j :: step]
                            if bad:
                                dest[bad] = np.nan
            report.advance(b1 - b0, 0)
            if b1 == w.hi:
                n_skipped += len(skipped)
                out_writer.submit(w, np.asarray(skipped, dtype=np.int64), out, dense)
        out_writer.close()
    except BaseException:
        out_writer.abort()
        raise
    finally:
        loader.close()
    return n_skipped


def _bad_positions(source: ImageSource, w: ChunkWork, b0: int, b1: int, ready: Ready, on_corrupt: str) -> list[int]:
    """Positions of the batch to record as skipped, or the one-line error that stops the run."""
    ids = source.split(w.split).ids[b0:b1]
    bad = sorted(ready.errors)
    if bad and on_corrupt == "error":
        i = bad[0]
        raise ImageError(f'{ready.errors[i]}; set data.on_corrupt = "skip" to record it as skipped and go on')
    was_skipped = set(w.was_skipped)
    newly_bad = [i for i in bad if b0 + i not in was_skipped]
    if newly_bad and w.has_data:
        raise ImageError(
            f"{_where(source, w.split, ids[newly_bad[0]])}: cannot be read now, but it was "
            f"read when this store's earlier arrays were extracted; restore the file"
        )
    return sorted(set(bad) | {i for i in range(b1 - b0) if b0 + i in was_skipped})


def extract_features(
    model,
    diffusion,
    source: ImageSource,
    plan: Plan,
    writer: StoreWriter,
    settings: ComputeSettings,
    report: Reporter | None = None,
    job=None,
) -> dict:
    """Fill every array of ``plan`` in ``writer``'s store in this process, skipping chunks
    already complete. ``model`` must already be on ``settings.device`` and in eval mode.
    Returns counts of chunks computed and found complete, and images recorded as skipped."""
    report = report or Reporter()
    work, totals = start_chunks(plan, writer, report, job)
    skipped = extract_chunks(
        model, diffusion, source, work, writer, settings, report, totals.chunks_done, totals.chunks
    )
    return {"chunks_written": len(work), "chunks_already_done": totals.chunks_done, "images_skipped": skipped}
