"""The protocol gap (issue 13, section 3): probes on one cached view vs K cached views vs the
online protocol (a fresh crop, flip and noise in every forward), and noise-draw averaging at val.

    python benchmarks/views_gap.py                        # the embedded default, sized for a shared CPU
    python benchmarks/views_gap.py --per-class 0 --online-seeds 3    # every digit, the full comparison

1. Extract one store: block 24 at t 90 and 150, pool 2, train with ``--views`` (8) views,
   val with ``--views`` noise draws (`extract.views`, `extract.noise_draws`).
2. Cached: for every seed, the linear probe (sgd, pipeline.toml's recipe: 28 epochs, lr grid
   chosen on the held-out part) at t 90 and 150 with 1, 4 and 8 views (`probe.data.Views`),
   and the attention head at t 90 with 1, 4 and 8 views; val at view 0. Noise-draw averaging:
   the linear probe with 1 view scored over M = 1, 4, 8 val draws.
3. Online, as diffssl's finetune.py trains (benchmarks/probe_epoch.py's recompute path with
   augmentation): every epoch, every fitted image gets a fresh random crop and flip
   (`Augmentation.view` with a new view number per epoch, the store's crop and flip settings)
   and fresh noise, the U-Net runs to block 24, and the same linear head (the same
   initialisation, standardisation, lr, StepLR, batch size and epochs as the cached probe of
   that seed, its lr the one the 1-view probe chose) takes its steps. Val: the stored view 0.

Top-1 per (protocol, seed), medians and spread (min-max) over seeds, and U-Net forwards of each
protocol are printed as JSON and written to benchmarks/results/views_gap.json.
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
from diffprobe.extract.run import run as extract_run  # noqa: E402
from diffprobe.extract.unet import build_model, capture, load_checkpoint  # noqa: E402
from diffprobe.probe.attention import attention_probe  # noqa: E402
from diffprobe.probe.data import FeatureData, Views  # noqa: E402
from diffprobe.probe.linear import Standardise, _init, feature_stats, linear_probe  # noqa: E402
from diffprobe.probe.metrics import topk_accuracy  # noqa: E402
from diffprobe.probe.protocol import select  # noqa: E402
from diffprobe.store import open_store  # noqa: E402
from diffprobe.store.config import load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BLOCK, POOL, TS = 24, 2, (90, 150)


def online_linear(cfg, store, seed: int, lrs: dict[int, float], epochs: int) -> tuple[dict[int, float], int]:
    """Train one linear head per t of ``lrs`` the online way; returns {t: val top-1} and the forwards run."""
    p = cfg.probe
    job = jobs.prepare(cfg)
    model = build_model(job.spec).eval()
    load_checkpoint(model, job.checkpoint)
    aug, size = job.source.augmentation, job.spec.image_size
    sel = select(store, seed, p, "all")
    rows = np.flatnonzero(sel.usable)[sel.fit]
    ids = store.ids("train")[rows]
    y = torch.from_numpy(sel.y[sel.fit])
    images = {i: job.source.open("train", i) for i in ids}
    k = len(store.class_names)
    heads, stds = {}, {}
    for t in lrs:  # the cached probe's standardisation and initialisation (probe.linear.fit_sgd)
        fit = FeatureData(store, "train", [(BLOCK, t, POOL)], rows, sel.y[sel.fit], sel.usable, memory_mb=p.memory_mb)
        stds[t] = Standardise(*feature_stats(fit), torch.device("cpu"))
        w, b = _init(fit.dims[0], k, torch.Generator().manual_seed(seed), "cpu")
        heads[t] = (w.clone(), b.clone())
    noise_gen = torch.Generator().manual_seed(10_000 + seed)
    order_gen = torch.Generator().manual_seed(seed)
    forwards = 0
    for epoch in range(epochs):
        decay = p.sgd_gamma ** (epoch // p.sgd_step_size)
        perm = torch.randperm(len(ids), generator=order_gen)
        for lo in range(0, len(ids), p.sgd_batch_size):
            idx = perm[lo : lo + p.sgd_batch_size]
            # a fresh crop and flip per (epoch, image): view number 1 + epoch, never reused
            x0 = torch.from_numpy(np.stack([aug.view(images[ids[i]], ids[i], 1 + epoch, size) for i in idx.tolist()]))
            for t in lrs:
                tt = torch.full((len(idx),), t)
                noise = torch.randn(x0.shape, generator=noise_gen)
                with torch.no_grad():
                    z = capture(model, job.diffusion.q_sample(x0, tt, noise), tt, [BLOCK])[BLOCK]
                    z = F.adaptive_avg_pool2d(z, POOL).to(torch.float16)  # as stored
                forwards += len(idx)
                w, b = heads[t]
                w.requires_grad_(True)
                b.requires_grad_(True)
                logits = stds[t]([z])[0] @ w + b
                gw, gb = torch.autograd.grad(F.cross_entropy(logits, y[idx]), (w, b))
                with torch.no_grad():
                    heads[t] = (w - lrs[t] * decay * gw, b - lrs[t] * decay * gb)
    top1 = {}
    for t in lrs:
        val = FeatureData(
            store,
            "val",
            [(BLOCK, t, POOL)],
            np.flatnonzero(sel.usable_val),
            sel.y_val,
            sel.usable_val,
            memory_mb=p.memory_mb,
        )
        w, b = heads[t]
        logits = torch.cat([stds[t](xs)[0] @ w.detach() + b.detach() for xs, _ in val.sequential(512)])
        top1[t] = topk_accuracy(logits, torch.from_numpy(sel.y_val), 1)
    return top1, forwards


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=str(REPO / "runs" / "views-gap.zarr"))
    ap.add_argument("--per-class", type=int, default=30, help="data.max_per_class (0: every digit)")
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--online-seeds", type=int, default=1)
    ap.add_argument("--online-epochs", type=int, default=28)
    ap.add_argument("--online-t", default="90,150", help="timesteps of the online protocol")
    ap.add_argument("--no-attention", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "views_gap.json")
    args = ap.parse_args()
    cfg = load_config(
        REPO / "pipeline.toml",
        {
            "store.path": args.store,
            "data.max_per_class": args.per_class,
            "extract.blocks": str(BLOCK),
            "extract.timesteps": list(TS),
            "extract.pools": [POOL],
            "extract.device": "cpu",
            "extract.views": {"train": args.views},
            "extract.noise_draws": {"val": args.views},
            "probe.device": "cpu",
        },
    )
    started = time.perf_counter()
    plan = jobs.prepare(cfg).plan
    extracted = extract_run(cfg)
    extract_s = time.perf_counter() - started
    store = open_store(args.store)
    n_train, n_val = store.n_images("train"), store.n_images("val")
    print(
        f"store: {n_train} train x {args.views} views, {n_val} val x {args.views} draws; {extract_s:.0f} s", flush=True
    )
    p = cfg.probe
    out: dict = {
        "images": {"train": n_train, "val": n_val},
        "extract": {"forwards": plan.forwards, "seconds": round(extract_s, 1), **extracted},
        "threads": torch.get_num_threads(),
        "cached": {},
        "noise_draws": {},
        "online": {},
    }
    view_counts = sorted({1, 4, args.views} & set(range(1, args.views + 1)))
    chosen_lr: dict[tuple[int, int], float] = {}
    for t in TS:
        for k in view_counts:
            top1 = []
            for seed in range(args.seeds):
                r = linear_probe(store, BLOCK, t, POOL, seed=seed, settings=p, views=Views(k))
                top1.append(r.top1)
                if k == 1:
                    chosen_lr[(t, seed)] = r.hyperparameters["lr"]
            out["cached"][f"linear t{t} views {k}"] = {**summary(top1), "forwards": n_train * k + n_val}
            print(f"linear t {t}, {k} views: {top1}", flush=True)
        for m in view_counts:
            top1 = [
                linear_probe(store, BLOCK, t, POOL, seed=s, settings=p, views=Views(1, m)).top1
                for s in range(args.seeds)
            ]
            out["noise_draws"][f"linear t{t} draws {m}"] = summary(top1)
            print(f"linear t {t}, {m} val draws: {top1}", flush=True)
    if not args.no_attention:
        for k in view_counts:
            top1 = [
                attention_probe(store, BLOCK, 90, POOL, seed=s, heads=cfg.heads, settings=p, views=Views(k)).top1
                for s in range(args.seeds)
            ]
            out["cached"][f"attention t90 views {k}"] = {**summary(top1), "forwards": n_train * k + n_val}
            print(f"attention t 90, {k} views: {top1}", flush=True)
    online_ts = [int(v) for v in args.online_t.split(",")]
    online: dict[int, list[float]] = {t: [] for t in online_ts}
    online_s, online_forwards = [], 0
    for seed in range(args.online_seeds):
        start = time.perf_counter()
        o_cfg = dataclasses.replace(cfg, probe=dataclasses.replace(p, seed=seed))
        top1, online_forwards = online_linear(
            o_cfg, store, seed, {t: chosen_lr[(t, seed)] for t in online_ts}, args.online_epochs
        )
        online_s.append(time.perf_counter() - start)
        for t in online_ts:
            online[t].append(top1[t])
        print(f"online seed {seed}: {top1} in {online_s[-1]:.0f} s", flush=True)
    for t in online_ts:
        out["online"][f"linear t{t}"] = {
            **summary(online[t]),
            "epochs": args.online_epochs,
            "forwards_per_t": online_forwards // len(online_ts),
            "seconds_per_seed": online_s,
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
