"""Stores written without a U-Net: the one writer of synthetic stores for tests and benchmarks.

    from diffprobe.store.feature_store import FeatureKey
    from diffprobe.store.synthetic import write_synthetic_store
    write_synthetic_store(path, {"train": {FeatureKey(90, 24, 2): x_tr}, "val": {...}},
                          labels={"train": y_tr, "val": y_val})

Each array is either an (N, C, P, P) array or a function ``(lo, hi) -> rows lo..hi`` for
stores too large to hold in memory (it is called once per chunk, in order). Everything goes
through `StoreWriter`, so the result is a real store: fingerprints, block table, completion
records, skipped flags.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from .feature_store import FeatureKey, StoreWriter

Rows = np.ndarray | Callable[[int, int], np.ndarray]
N_BLOCKS = 37  # ADM's topology, which the tiny U-Net shares


def write_synthetic_store(
    path: str | Path,
    features: Mapping[str, Mapping[FeatureKey, Rows]],
    labels: Mapping[str, np.ndarray],
    *,
    class_names: list[str] | None = None,
    ids: Mapping[str, list[str]] | None = None,
    skipped: Mapping[str, np.ndarray | list[int]] | None = None,
    chunk_images: int = 64,
    blocks: list[dict] | None = None,
    tag: str = "synthetic",
    dtype: str = "float16",
    codec: str = "none",
) -> Path:
    """Write ``features[split][key]`` with ``labels[split]`` and return ``path``.

    ``blocks`` defaults to 37 blocks whose channels and spatial size are those of the first
    array given (every block alike); ``ids`` default to ``"<split>/<index>"``; ``tag`` goes
    into the model fingerprint, so two synthetic stores can be told apart.
    """
    path = Path(path)
    labels = {s: np.asarray(y) for s, y in labels.items()}
    if set(labels) != set(features):
        raise ValueError(f"features has splits {sorted(features)}, labels {sorted(labels)}")
    n_classes = int(max(y.max() for y in labels.values())) + 1
    if blocks is None:
        channels, spatial = _first_shape(features)
        blocks = [
            {"number": b, "module": f"m{b}", "channels": channels, "spatial": spatial} for b in range(1, N_BLOCKS + 1)
        ]
    ids = ids or {s: [f"{s}/{i:06d}" for i in range(len(y))] for s, y in labels.items()}
    fingerprints = {"model": {"synthetic": tag}, "preprocessing": {}, "noise": {}, "compute": {}, "dataset": {}}
    with StoreWriter.create(
        path,
        fingerprints=fingerprints,
        provenance={},
        blocks=blocks,
        class_names=class_names or [str(c) for c in range(n_classes)],
        splits={s: (list(ids[s]), labels[s]) for s in labels},
        chunk_images=chunk_images,
    ) as w:
        for split, arrays in features.items():
            n = len(labels[split])
            w.ensure_arrays(split, {k: _channels(x, blocks, k) for k, x in arrays.items()}, dtype, codec)
            chunk = w.chunk_images(split)
            for c in range(-(-n // chunk)):
                lo, hi = c * chunk, min(n, (c + 1) * chunk)
                w.write_chunk(split, c, {k: _rows(x, lo, hi).astype(dtype, copy=False) for k, x in arrays.items()})
            w.write_skipped(split, np.asarray((skipped or {}).get(split, ()), dtype=int))
    return path


def _rows(x: Rows, lo: int, hi: int) -> np.ndarray:
    return x(lo, hi) if callable(x) else np.asarray(x[lo:hi])


def _channels(x: Rows, blocks: list[dict], key: FeatureKey) -> int:
    if callable(x):
        return next(b["channels"] for b in blocks if b["number"] == key.block)
    return int(np.shape(x)[1])


def _first_shape(features) -> tuple[int, int]:
    for arrays in features.values():
        for x in arrays.values():
            shape = np.shape(_rows(x, 0, 1))
            return int(shape[1]), int(shape[2])
    raise ValueError("no feature arrays given")
