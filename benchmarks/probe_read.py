"""Read throughput from the store into the probe: GB/s of decoded float16 features.

    python benchmarks/probe_read.py                      # synthetic 65536 x 4096 store + the embedded default
    python benchmarks/probe_read.py --images 131072 --repeats 5

Two workloads, each read the way the probe reads (`probe.linear`), medians of ``--repeats``:

- synthetic: one ImageNet-width feature set (N x 1024 x 2 x 2 float16 = N x 4096: ADM block 24
  at pool 2), chunks of 512 images (``store.chunk_images``'s default), written into a temporary
  store with ``store.codec`` none and zstd, then read (a) whole, as a split that fits
  ``probe.memory_mb`` is read (`probe.data.FeatureData` in memory: chunk-aligned reads, finite
  check), and (b) streamed at a 256 MB budget, piece by piece with prefetch (`FeatureData.sequential`).
- embedded: every feature array of the embedded default store's train split (408 small
  arrays: latency, not bandwidth), read in memory the same way.

GB/s = decoded float16 bytes / seconds (1 GB = 1e9 bytes). The files are in the page cache
(just written, or read once before timing): this is the decode path, not the disk. Writes
benchmarks/results/probe_read.json. Target (issue 3): at least 1 GB/s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from diffprobe.probe.data import FeatureData
from diffprobe.store.config import ProbeConfig
from diffprobe.store.feature_store import FeatureKey, open_store
from diffprobe.store.synthetic import write_synthetic_store

REPO = Path(__file__).resolve().parents[1]
C, P, CHUNK = 1024, 2, 512


def write_synthetic(path: Path, n: int, codec: str) -> FeatureKey:
    key = FeatureKey(90, 24, P)
    blocks = [{"number": 24, "module": "output_blocks.4", "channels": C, "spatial": 8}]
    y = np.arange(n) % 1000
    rng = np.random.default_rng(0)
    rows = lambda lo, hi: rng.standard_normal((hi - lo, C, P, P), dtype=np.float32)  # chunks come in order
    write_synthetic_store(
        path,
        {"train": {key: rows}},
        {"train": y},
        class_names=[f"c{c}" for c in range(1000)],
        ids={"train": [f"i{i:07d}" for i in range(n)]},
        chunk_images=CHUNK,
        blocks=blocks,
        codec=codec,
    )
    return key


def timed(fn, repeats: int) -> float:
    fn()  # warm: page cache, zarr metadata
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read(store, key: FeatureKey, usable: np.ndarray, memory_mb: float) -> None:
    """Every usable row of ``key`` in train, as a probe reads it at ``memory_mb``."""
    rows = np.flatnonzero(usable)
    data = FeatureData(store, "train", [(key.block, key.t, key.pool)], rows, None, usable, memory_mb=memory_mb)
    for _ in data.sequential(CHUNK):
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=65536)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--embedded", default=str(REPO / "runs" / "digits-tiny.zarr"))
    args = ap.parse_args()
    out: dict = {"images": args.images, "dim": C * P * P, "chunk_images": CHUNK, "repeats": args.repeats}

    with tempfile.TemporaryDirectory(dir=REPO / "benchmarks") as tmp:
        for codec in ("none", "zstd"):
            path = Path(tmp) / f"{codec}.zarr"
            key = write_synthetic(path, args.images, codec)
            store = open_store(path)
            usable = np.ones(args.images, bool)
            gb = args.images * C * P * P * 2 / 1e9
            whole = timed(lambda: read(store, key, usable, 1e9), args.repeats)
            stream = timed(lambda: read(store, key, usable, 256), args.repeats)
            out[codec] = {
                "GB": round(gb, 3),
                "whole_s": round(whole, 3),
                "whole_GBps": round(gb / whole, 2),
                "streamed_256MB_s": round(stream, 3),
                "streamed_GBps": round(gb / stream, 2),
            }
            print(codec, out[codec], flush=True)

    if Path(args.embedded).exists():
        store = open_store(args.embedded)
        usable = ~store.skipped("train").astype(bool)
        keys = store.keys("train")
        gb = sum(int(np.prod(store.feature_array("train", k.block, k.t, k.pool).shape)) * 2 for k in keys) / 1e9
        secs = timed(lambda: [read(store, k, usable, ProbeConfig().memory_mb) for k in keys], args.repeats)
        out["embedded"] = {
            "arrays": len(keys),
            "GB": round(gb, 4),
            "s": round(secs, 3),
            "GBps": round(gb / secs, 3),
            "ms_per_array": round(1000 * secs / len(keys), 2),
        }
        print("embedded", out["embedded"], flush=True)
    out["target_GBps"] = 1.0
    print(json.dumps(out, indent=2))
    dest = REPO / "benchmarks" / "results" / "probe_read.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
