"""Two parts of `extract run`'s loop, timed alone (what the overlap benchmark's in-run ratios break down into).

    python benchmarks/extract_parts.py calls --rounds 25     # bare forward vs capture vs capture + pooling
    python benchmarks/extract_parts.py write --rounds 3      # one chunk of 444 arrays: Zarr vs write_rows

``calls``: the embedded default's U-Net on one forward_batch of digits at t 90, interleaved
``--rounds`` times: ``model(x_t, t)``; `extract.unet.capture` of all 37 blocks; the same plus
`extract.extraction.pool_features` to pools 1 and 2 and the cast to float16 (what
`forward_rows` does per call). Median milliseconds per call.

``write``: 444 float16 arrays of 1,437 x 128 x p x p (p 1 and 2, chunks of 512 images, no
codec), like the embedded default's train split. Each of the three chunks is written with
Zarr's setitem and with `store.feature_store.write_rows` (the chunk file straight), both
through `feature_store._parallel` as `write_chunk` calls them. Seconds per chunk.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.simplefilter("ignore", FutureWarning)

REPO = Path(__file__).resolve().parents[1]


def calls(rounds: int) -> None:
    from diffprobe.extract import job as jobs
    from diffprobe.extract.extraction import pool_features
    from diffprobe.extract.unet import capture
    from diffprobe.store.config import load_config

    cfg = load_config(REPO / "pipeline.toml", {"extract.device": "cpu", "store.path": tempfile.mkdtemp() + "/s.zarr"})
    job = jobs.prepare(cfg)
    model, _ = jobs.load_model(job, torch.device("cpu"))
    fb = job.cfg.extract.forward_batch
    x = torch.from_numpy(np.stack(job.source.load("train", list(job.source.split("train").ids[:fb]))))
    t = torch.full((fb,), 90)
    x_t = job.diffusion.q_sample(x, t, torch.randn_like(x))
    blocks = list(range(1, len(job.table) + 1))

    def bare():
        model(x_t, t)

    def captured():
        capture(model, x_t, t, blocks)

    def pooled():
        out = capture(model, x_t, t, blocks)
        [pool_features(out[b].float(), p).to(torch.float16) for b in blocks for p in (1, 2)]

    runs = {"bare forward": bare, "capture": captured, "capture + pooling": pooled}
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    with torch.no_grad():
        for fn in runs.values():
            fn()  # warm
        for _ in range(rounds):
            for name, fn in runs.items():
                start = time.perf_counter()
                fn()
                seconds[name].append(time.perf_counter() - start)
    print(f"forward_batch {fb}, {torch.get_num_threads()} torch threads, {rounds} rounds")
    for name, v in seconds.items():
        print(f"{name}: {statistics.median(v) * 1000:.1f} ms a call (median)")


def write(rounds: int) -> None:
    import zarr

    from diffprobe.store import feature_store as fs

    n, chunk = 1437, 512
    g = zarr.open_group(tempfile.mkdtemp(), mode="w")
    arrays = [
        g.create_array(
            f"a{i}",
            shape=(n, 128, p, p),
            chunks=(chunk, 128, p, p),
            dtype="float16",
            fill_value=float("nan"),
            compressors=None,
        )
        for i, p in enumerate([1, 2] * 222)
    ]
    rng = np.random.default_rng(0)
    data = [rng.standard_normal((chunk, *a.shape[1:])).astype(np.float16) for a in arrays]
    ways = {"zarr setitem": lambda a, lo, d: a.__setitem__(slice(lo, lo + len(d)), d), "write_rows": fs.write_rows}
    for r in range(rounds):
        for name, fn in ways.items():
            times = []
            for lo in range(0, n, chunk):
                rows = min(chunk, n - lo)
                start = time.perf_counter()
                fs._parallel(lambda ad, fn=fn, lo=lo, rows=rows: fn(ad[0], lo, ad[1][:rows]), zip(arrays, data))
                times.append(time.perf_counter() - start)
            print(f"round {r}, {name}: " + ", ".join(f"{s:.3f}" for s in times) + " s per chunk", flush=True)
    for a, d in zip(arrays[:2], data):  # both ways wrote the same rows
        assert np.asarray(a[1024:n]).tobytes() == d[: n - 1024].tobytes()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["calls", "write"])
    ap.add_argument("--rounds", type=int, default=0, help="default: 25 for calls, 3 for write")
    args = ap.parse_args()
    if args.what == "calls":
        calls(args.rounds or 25)
    else:
        write(args.rounds or 3)


if __name__ == "__main__":
    main()
