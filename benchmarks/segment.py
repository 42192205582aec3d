"""Dense probes: the time of one `probe segment`, mIoU per block at one t, and an ADE20K plan.

    python benchmarks/segment.py probe --store runs/digits-dense.zarr         # 3 repeats of blocks 24 / 24+33
    python benchmarks/segment.py blocks --store runs/digits-dense.zarr --t 150  # mIoU of every block at t 150
    python benchmarks/segment.py ade20k                                       # `extract plan` for ADE20K
    python benchmarks/segment.py forward --repeats 2                          # ADM-256 forward to block 30, CPU

``probe``: `probe.segment.segment_probe` (the default [segment] settings, no ledger, no picture)
on block 24 and on blocks 24+33 at t 150, ``--repeats`` times each, alternating; medians.
``blocks``: one head per block held at ``--t`` (each at its largest stored pool), sorted by val mIoU.
``ade20k``: a segfolder tree of empty files with ADE20K's split sizes (20,210 train, 2,000 val;
150 classes) planned with ADM-256 (256 px) at blocks 19/24/30, pool 16, ``--t`` timesteps: the
plan's arrays, bytes and U-Net forwards (the feature bytes; the masks add N x 256 x 256 bytes
before compression), and ``--seconds-per-forward`` (if given) turned into a time.
``forward``: seconds of one ADM-256 forward (random weights: the time does not depend on them)
of ``--batch`` 256-px images at t 150 through `extract.unet.capture` up to block 30 (blocks
19/24/30), on this machine's CPU: the ``--seconds-per-forward`` of the ADE20K estimate.
Results are printed as JSON and written to benchmarks/results/segment-<what>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.simplefilter("ignore", FutureWarning)

from diffprobe.probe.segment import segment_probe  # noqa: E402
from diffprobe.store import open_store  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def bench_probe(store_path: str, repeats: int) -> dict:
    store = open_store(store_path)
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # torch.optim's first import (~5 s) out of the timing
    cases = {"24": [(24, 150)], "24+33": [(24, 150), (33, 150)]}
    times: dict[str, list[float]] = {k: [] for k in cases}
    scores = {}
    for _ in range(repeats):
        for name, cells in cases.items():
            start = time.perf_counter()
            r = segment_probe(store, cells)
            times[name].append(time.perf_counter() - start)
            scores[name] = {"miou": r.top1, "pixel_accuracy": r.top5, "lr": r.hyperparameters["lr"]}
    return {name: {"median_s": statistics.median(t), "times_s": t, **scores[name]} for name, t in times.items()} | {
        "threads": torch.get_num_threads()
    }


def bench_blocks(store_path: str, t: int) -> dict:
    store = open_store(store_path)
    held = set(store.keys("train")) & set(store.keys("val"))
    rows = []
    for block in sorted({k.block for k in held if k.t == t}):
        pool = max(k.pool for k in held if k.t == t and k.block == block)
        start = time.perf_counter()
        r = segment_probe(store, [(block, t)], pool=pool)
        rows.append(
            {
                "block": block,
                "pool": pool,
                "miou": r.top1,
                "pixel_accuracy": r.top5,
                "lr": r.hyperparameters["lr"],
                "seconds": time.perf_counter() - start,
            }
        )
    return {"t": t, "cells": sorted(rows, key=lambda c: -c["miou"])}


def bench_ade20k(ts: list[int], seconds_per_forward: float | None) -> dict:
    from diffprobe.extract import job as jobs
    from diffprobe.store.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ade"
        for split, n in (("train", 20210), ("val", 2000)):
            images = root / split / "images"
            images.mkdir(parents=True)
            for i in range(n):
                (images / f"ADE_{split}_{i + 1:08d}.jpg").touch()
        (root / "classes.txt").write_text("\n".join(f"class{i}" for i in range(150)) + "\n")
        (Path(tmp) / "fake.pt").touch()
        cfg = load_config(
            None,
            {
                "data.source": "segfolder",
                "data.root": str(root),
                "data.masks": True,
                "model.preset": "adm-256-uncond",
                "model.checkpoint": str(Path(tmp) / "fake.pt"),
                "extract.blocks": "19,24,30",
                "extract.timesteps": ts,
                "extract.pools": [16],
                "store.path": str(Path(tmp) / "ade.zarr"),
            },
        )
        plan = jobs.prepare(cfg).plan
    sizes = plan.split_sizes
    masks = sum(sizes.values()) * 256 * 256
    out = {
        "splits": sizes,
        "timesteps": ts,
        "arrays": [
            {"split": a.split, "name": a.key.name, "shape": list(a.shape), "bytes": a.nbytes} for a in plan.arrays
        ],
        "feature_bytes": plan.nbytes,
        "mask_bytes_uncompressed": masks,
        "forwards": plan.forwards,
        "deepest_block": max(plan.blocks),
    }
    if seconds_per_forward:
        out["seconds_per_forward"] = seconds_per_forward
        out["hours"] = plan.forwards * seconds_per_forward / 3600
    return out


def bench_forward(repeats: int, batch: int) -> dict:
    from diffprobe.extract.unet import build_model, capture, preset

    model = build_model(preset("adm-256-uncond")).eval()
    x = torch.randn(batch, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    t = torch.full((batch,), 150, dtype=torch.long)
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            capture(model, x, t, [19, 24, 30])
            times.append(time.perf_counter() - start)
    return {
        "batch": batch,
        "times_s": times,
        "seconds_per_forward": statistics.median(times) / batch,
        "threads": torch.get_num_threads(),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("probe", "blocks", "ade20k", "forward"))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--store", default="runs/digits-dense.zarr")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--t", default="150")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds-per-forward", type=float, default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ts = [int(v) for v in a.t.split(",")]
    if a.what == "probe":
        result = bench_probe(a.store, a.repeats)
    elif a.what == "forward":
        result = bench_forward(a.repeats, a.batch)
    elif a.what == "blocks":
        result = bench_blocks(a.store, ts[0])
    else:
        result = bench_ade20k(ts, a.seconds_per_forward)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"segment-{a.what}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result if a.what != "ade20k" else {k: v for k, v in result.items() if k != "arrays"}, indent=1))


if __name__ == "__main__":
    main()
