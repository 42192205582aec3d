"""The extraction loop: images -> x_t -> one truncated U-Net forward per (batch, t) -> pooled
features -> store chunks.

Work is done chunk by chunk (the store's unit of completion): `chunk_work` lists the chunks
still to do, `extract_chunk` does one (the same function in this process and on dask
workers, see extract.distributed). Within a chunk, images are read ``batch_size`` at a time
and each batch is run once per pending timestep. Every U-Net call has exactly
``forward_batch`` rows (the last group is zero-padded): CPU and GPU matmul kernels choose
their blocking by row count, so the bits of a row would otherwise depend on how many images
shared its call. With a fixed call shape the features depend only on (model, image, t, noise
seed, device, dtype, and on CPU the torch thread count), whatever the batch size, resume or
worker.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from diffprobe.extract.images import ImageSource
from diffprobe.extract.masks import ChunkMasks
from diffprobe.extract.noise import batch_noise
from diffprobe.extract.plan import Plan
from diffprobe.extract.unet import capture
from diffprobe.store.errors import ImageError
from diffprobe.store.feature_store import FeatureKey, StoreWriter


@dataclass(frozen=True)
class ComputeSettings:
    device: torch.device
    forward_batch: int = 32
    autocast: str = "none"  # "none", "bf16", "fp16"
    noise_seed: int = 0
    batch_size: int = 64
    on_corrupt: str = "error"  # "error" or "skip"


def _autocast(device: torch.device, autocast: str):
    if autocast == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[autocast])


def pooled_features(
    model, x_t: torch.Tensor, t: int, keys, settings: ComputeSettings, dtype: torch.dtype = torch.float16
) -> dict[FeatureKey, torch.Tensor]:
    """Pooled block outputs for ``keys`` (all at timestep ``t``), in ``dtype`` on the device.

    x_t: (N, 3, S, S) on the model's device. The U-Net runs on row groups of exactly
    ``settings.forward_batch`` (the last zero-padded); each group's block outputs are pooled
    (in float32) and cast before the next group runs, so memory scales with forward_batch,
    not with N. Returns {key: (N, C, p, p)}.
    """
    fb = settings.forward_batch
    blocks = sorted({k.block for k in keys})
    parts: dict[FeatureKey, list[torch.Tensor]] = {k: [] for k in keys}
    for lo in range(0, len(x_t), fb):
        group = x_t[lo : lo + fb]
        n = len(group)
        if n < fb:
            group = torch.cat([group, group.new_zeros((fb - n, *group.shape[1:]))])
        tt = torch.full((fb,), t, dtype=torch.long, device=group.device)
        with torch.no_grad(), _autocast(settings.device, settings.autocast):
            out = capture(model, group, tt, blocks)
        for k in keys:
            parts[k].append(pool_features(out[k.block][:n].float(), k.pool).to(dtype))
        del out
    return {k: torch.cat(v) for k, v in parts.items()}


def pool_features(x: torch.Tensor, p: int) -> torch.Tensor:
    """Adaptive average pooling of (N, C, H, W) to (N, C, p, p); p is already capped at H."""
    return x if x.shape[-1] == p else F.adaptive_avg_pool2d(x, p)


def _where(source: ImageSource, split: str, image_id: str) -> str:
    return str(source.path(split, image_id)) if hasattr(source, "path") else image_id


def _read_batch(source: ImageSource, split: str, ids, on_corrupt: str):
    """Preprocessed images (N, 3, S, S) and the positions that could not be read."""
    loaded = source.load(split, list(ids))
    bad = [i for i, x in enumerate(loaded) if isinstance(x, Exception)]
    if bad and on_corrupt == "error":
        i = bad[0]
        raise ImageError(
            f"{_where(source, split, ids[i])}: cannot read image ({type(loaded[i]).__name__}: {loaded[i]}); "
            f'set data.on_corrupt = "skip" to record it as skipped and go on'
        )
    shape = next((x.shape for x in loaded if not isinstance(x, Exception)), (3, source.image_size, source.image_size))
    x0 = np.stack([np.zeros(shape, np.float32) if isinstance(x, Exception) else x for x in loaded])
    return torch.from_numpy(x0), bad


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


def start_chunks(plan: Plan, writer, progress=None, on_chunks=None) -> tuple[list[ChunkWork], list[int], int]:
    """`chunk_work` plus the total number of chunks, with the complete ones reported to
    ``progress(n, False)`` and ``on_chunks(done, total)``: how every run (one process or many) begins."""
    work, complete = chunk_work(plan, writer)
    total = len(work) + len(complete)
    if progress:
        for n in complete:
            progress(n, False)
    if on_chunks:
        on_chunks(len(complete), total)
    return work, complete, total


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


def extract_chunk(
    model,
    diffusion,
    source: ImageSource,
    work: ChunkWork,
    writer: StoreWriter,
    settings: ComputeSettings,
    progress: Callable[[int, bool], None] | None = None,
) -> int:
    """Compute one chunk's pending arrays, write its data, then its completion records.

    The one per-chunk function of both the single-process loop and the dask workers.
    ``model`` must already be on ``settings.device`` and in eval mode. Returns the number of
    images recorded as skipped in this chunk.
    """
    lo, hi = work.lo, work.hi
    index = source.split(work.split)
    torch_dtype = getattr(torch, work.dtype)
    by_t: dict[int, list[FeatureKey]] = {}
    for k, _ in work.arrays:
        by_t.setdefault(k.t, []).append(k)
    out = {k: np.empty((hi - lo, *shape), dtype=work.dtype) for k, shape in work.arrays}
    was_skipped = set(work.was_skipped)
    skipped = []
    dense = ChunkMasks.for_source(source, work.split, lo, hi)  # None unless the source has masks
    for b0 in range(lo, hi, settings.batch_size):
        b1 = min(b0 + settings.batch_size, hi)
        ids = index.ids[b0:b1]
        if dense:
            x0, bad = dense.read(b0, ids, settings.on_corrupt)
        else:
            x0, bad = _read_batch(source, work.split, ids, settings.on_corrupt)
        newly_bad = [i for i in bad if b0 + i not in was_skipped]
        if newly_bad and work.has_data:
            raise ImageError(
                f"{_where(source, work.split, ids[newly_bad[0]])}: cannot be read now, but it was "
                f"read when this store's earlier arrays were extracted; restore the file"
            )
        bad = sorted(set(bad) | {i for i in range(b1 - b0) if b0 + i in was_skipped})
        skipped += [b0 + i for i in bad]
        if dense:
            dense.ignore(b0, bad)
        for t, tkeys in by_t.items():
            noise = batch_noise(settings.noise_seed, ids, t, tuple(x0.shape[1:]))
            x_t = diffusion.q_sample(x0, torch.full((len(x0),), t, dtype=torch.long), noise)
            feats = pooled_features(model, x_t.to(settings.device), t, tkeys, settings, torch_dtype)
            for k, pooled in feats.items():
                if bad:
                    pooled[bad] = float("nan")
                out[k][b0 - lo : b1 - lo] = pooled.cpu().numpy()  # only pooled, cast tensors cross
        if progress:
            progress(b1 - b0, True)
    if dense:
        dense.write(writer, work.chunk)  # masks and their record before the features' records
    writer.write_skipped(work.split, np.asarray(skipped, dtype=np.int64))  # before the chunk's records
    writer.write_chunk(work.split, work.chunk, out)
    return len(skipped)


def extract_features(
    model,
    diffusion,
    source: ImageSource,
    plan: Plan,
    writer: StoreWriter,
    settings: ComputeSettings,
    progress: Callable[[int, bool], None] | None = None,
    on_chunks: Callable[[int, int], None] | None = None,
) -> dict:
    """Fill every array of ``plan`` in ``writer``'s store in this process, skipping chunks
    already complete.

    ``model`` must already be on ``settings.device`` and in eval mode. ``progress(n, computed)``
    is called each time n images are done (computed False: found complete); ``on_chunks(done,
    total)`` once at the start and after each chunk. Returns counts of chunks computed and
    skipped, and images recorded as skipped.
    """
    work, complete, total = start_chunks(plan, writer, progress, on_chunks)
    skipped = 0
    for i, w in enumerate(work, start=1):
        skipped += extract_chunk(model, diffusion, source, w, writer, settings, progress)
        if on_chunks:
            on_chunks(len(complete) + i, total)
    return {"chunks_written": len(work), "chunks_already_done": len(complete), "images_skipped": skipped}
