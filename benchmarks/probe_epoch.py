"""One epoch of the linear probe on cached features vs one epoch that recomputes the U-Net.

    python benchmarks/probe_epoch.py                     # block 24, t 90, pool 2, batch 128
    python benchmarks/probe_epoch.py --block 19 --repeats 5

Cached: read the train split's (block, t, pool) features from the store, standardise, and
run one epoch of `probe.linear.fit_sgd` (one head, batch 128) - the probe's own code.
Recompute, the way the original research code trains: per batch of 128 train images,
preprocess the images, draw fresh noise, q_sample at t, run the full U-Net forward with a
hook on the block, pool, and take one SGD step of the same linear head. Same model, images,
head and batch size. Repeats alternate; medians and their ratio are printed as JSON and
written to benchmarks/results/probe_epoch.json. Target (issue 3): ratio >= 100.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

warnings.simplefilter("ignore", FutureWarning)

from diffprobe.extract import job as jobs  # noqa: E402
from diffprobe.extract.unet import block_modules, build_model, load_checkpoint  # noqa: E402
from diffprobe.probe.data import FeatureData  # noqa: E402
from diffprobe.probe.linear import Standardise, feature_stats, fit_sgd  # noqa: E402
from diffprobe.store import open_store  # noqa: E402
from diffprobe.store.config import load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def cached_epoch(store_path: str, block: int, t: int, pool: int, batch: int) -> float:
    start = time.perf_counter()
    store = open_store(store_path)
    y = store.labels("train")
    n = len(y)
    settings = dataclasses.replace(load_config(REPO / "pipeline.toml").probe, sgd_epochs=1, sgd_batch_size=batch)
    data = FeatureData(
        store, "train", [(block, t, pool)], np.arange(n), y, np.ones(n, bool), memory_mb=settings.memory_mb
    )
    std = Standardise(*feature_stats(data), data.device)
    fit_sgd(data, std, len(store.class_names), [{"lr": 0.01, "weight_decay": 0.0}], settings, seed=0)
    return time.perf_counter() - start


def recompute_epoch(cfg, block: int, t: int, pool: int, batch: int, n_classes: int) -> float:
    job = jobs.prepare(cfg)
    model = build_model(job.spec).eval()
    load_checkpoint(model, job.checkpoint)
    index = job.source.split("train")
    channels = job.table[block].channels
    p = min(pool, job.table[block].spatial)
    head = torch.nn.Linear(channels * p * p, n_classes)
    opt = torch.optim.SGD(head.parameters(), lr=0.01)
    feats = {}
    hook = block_modules(model)[block - 1][1].register_forward_hook(lambda _m, _i, o: feats.__setitem__("x", o))
    start = time.perf_counter()
    order = np.random.default_rng(0).permutation(len(index))
    try:
        for lo in range(0, len(order), batch):
            idx = order[lo : lo + batch]
            x0 = torch.from_numpy(np.stack(job.source.load("train", [index.ids[i] for i in idx])))
            tt = torch.full((len(idx),), t)
            with torch.no_grad():
                model(job.diffusion.q_sample(x0, tt, torch.randn_like(x0)), tt)  # full forward, fresh noise
                z = F.adaptive_avg_pool2d(feats["x"], p).flatten(1)
            loss = F.cross_entropy(head(z), torch.from_numpy(index.labels[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        hook.remove()
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=str(REPO / "runs" / "digits-tiny.zarr"))
    ap.add_argument("--block", type=int, default=24)
    ap.add_argument("--t", type=int, default=90)
    ap.add_argument("--pool", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "probe_epoch.json")
    args = ap.parse_args()
    cfg = load_config(REPO / "pipeline.toml", {"store.path": args.store, "extract.device": "cpu"})
    n_classes = len(open_store(args.store).class_names)
    cached, recompute = [], []
    for r in range(args.repeats):
        cached.append(cached_epoch(args.store, args.block, args.t, args.pool, args.batch))
        recompute.append(recompute_epoch(cfg, args.block, args.t, args.pool, args.batch, n_classes))
        print(f"repeat {r}: cached {cached[-1]:.3f} s, recompute {recompute[-1]:.2f} s", flush=True)
    result = {
        "block": args.block,
        "t": args.t,
        "pool": args.pool,
        "batch": args.batch,
        "images": int(open_store(args.store).n_images("train")),
        "threads": torch.get_num_threads(),
        "cached_s": cached,
        "recompute_s": recompute,
        "cached_median_s": statistics.median(cached),
        "recompute_median_s": statistics.median(recompute),
        "ratio": statistics.median(recompute) / statistics.median(cached),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
