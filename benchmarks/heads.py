"""Time per epoch of the attention head, DifFormer and DifFeed on the embedded default; DifFeed's
time per step vs two plain U-Net forwards.

    python benchmarks/heads.py --store runs/digits-tiny.zarr            # 3 repeats, 2 threads
    flock /tmp/diffprobe-bench.lock python benchmarks/heads.py --store /work/cache/digits-tiny.zarr

Attention (block 24, t 150, pool 2) and DifFormer (blocks 19/24/30 x t 90/150/300, pool 2): one
epoch of `probe.train.train_heads` over the whole train split (batch heads.batch_size, the
default architecture), the maps already in memory, as the probe trains them. DifFeed (the
default feedback blocks 21/24/27/30/33/36 -> target 24, t 150): one training step of
heads.feedback_batch_size images (image loading, noise, the no-grad first pass, the second pass
with feedback, backward, SGD step), against two plain no-grad forwards of the same x_t through
the whole U-Net (`model(x_t, t)`), alternating within each repeat; its epoch time is the median
step times the steps of one epoch over train. Medians are printed as JSON and written to
benchmarks/results/heads.json.
"""

from __future__ import annotations

import argparse
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
from diffprobe.extract.unet import build_model, load_checkpoint  # noqa: E402
from diffprobe.probe import feedback as fb  # noqa: E402
from diffprobe.probe.heads import AttentionHead, FusionHead  # noqa: E402
from diffprobe.probe.train import seeded, train_heads  # noqa: E402
from diffprobe.store import open_store  # noqa: E402
from diffprobe.store.config import load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _epoch(model, inputs, y, h) -> float:
    """Seconds of one epoch of `train_heads` on ``inputs(idx)`` (the probe's loop, one lr)."""
    one = type(h)(**{**h.__dict__, "epochs": 1})
    gen = torch.Generator().manual_seed(0)

    def batches(_):
        order = torch.randperm(len(y), generator=gen)
        for lo in range(0, len(y), h.batch_size):
            idx = order[lo : lo + h.batch_size]
            yield inputs(idx), y[idx]

    start = time.perf_counter()
    train_heads([model], h.attention_lr[:1], one, batches, lambda m, x, yy: F.cross_entropy(m(x), yy))
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default=str(REPO / "runs/digits-tiny.zarr"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="DifFeed steps (and plain forward pairs) per repeat")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(REPO / "pipeline.toml", {"store.path": args.store})
    h = cfg.heads
    store = open_store(args.store)
    k = len(store.class_names)
    y = torch.from_numpy(store.labels("train"))

    x24 = torch.from_numpy(store.features("train", 24, 150, 2))
    att = seeded(lambda: AttentionHead(x24.shape[1], x24.shape[-1], k, h.dim, h.depth, h.num_heads, h.mlp_ratio), 0)
    blocks, ts = (19, 24, 30), (90, 150, 300)
    maps = [[torch.from_numpy(store.features("train", b, t, 2)) for b in blocks] for t in ts]
    fusion = seeded(
        lambda: FusionHead(
            [(m.shape[1], m.shape[-1]) for m in maps[0]], len(ts), k, h.dim, h.depth, h.num_heads, h.mlp_ratio
        ),
        0,
    )

    job = jobs.prepare(cfg)
    unet = build_model(job.spec)
    load_checkpoint(unet, job.checkpoint)
    unet.eval().requires_grad_(False)
    difeed = seeded(
        lambda: fb.DifFeed(
            unet, job.table, fb.skip_pairs(job.spec), h.feedback_blocks, h.feedback_target, h.pool, k, h
        ),
        0,
    )
    n_train = len(job.source.split("train"))
    data = fb.Images(
        job.source,
        job.diffusion,
        "train",
        np.arange(n_train),
        h.feedback_t,
        cfg.extract.noise_seed,
        torch.device("cpu"),
    )
    opt = torch.optim.SGD(difeed.parameters(), lr=h.feedback_lr[0])
    bs = h.feedback_batch_size
    tt = torch.full((bs,), h.feedback_t, dtype=torch.long)

    def step(i: int) -> float:
        idx = [(i * bs + j) % n_train for j in range(bs)]
        start = time.perf_counter()
        difeed.train()
        x = data.x_t(idx)
        loss = F.cross_entropy(difeed(x, tt), data.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    def plain(i: int) -> float:
        idx = [(i * bs + j) % n_train for j in range(bs)]
        x = data.x_t(idx)  # images and noise outside the timing: only the two forwards
        start = time.perf_counter()
        with torch.no_grad():
            unet(x, tt)
            unet(x, tt)
        return time.perf_counter() - start

    times = {"attention_epoch": [], "fusion_epoch": [], "difeed_step": [], "two_forwards": []}
    step(0)  # warm-up
    for r in range(args.repeats):
        times["attention_epoch"].append(_epoch(att, lambda i: x24[i].float(), y, h))
        times["fusion_epoch"].append(_epoch(fusion, lambda i: [[m[i].float() for m in per_t] for per_t in maps], y, h))
        for s in range(args.steps):
            pair = [("difeed_step", step), ("two_forwards", plain)]
            for name, fn in pair if (r + s) % 2 == 0 else pair[::-1]:
                times[name].append(fn(r * args.steps + s))
    med = {name: statistics.median(v) for name, v in times.items()}
    steps_per_epoch = -(-n_train // bs)
    result = {
        "store": args.store,
        "threads": args.threads,
        "repeats": args.repeats,
        "steps_per_repeat": args.steps,
        "train_images": int(len(y)),
        "attention": {"block": 24, "t": 150, "pool": 2, "batch": h.batch_size},
        "fusion": {"blocks": list(blocks), "timesteps": list(ts), "pool": 2, "batch": h.batch_size},
        "difeed": {
            "feedback_blocks": list(h.feedback_blocks),
            "target": h.feedback_target,
            "t": h.feedback_t,
            "batch": bs,
            "steps_per_epoch": steps_per_epoch,
        },
        "median_s": {k2: round(v, 4) for k2, v in med.items()},
        "difeed_epoch_s": round(med["difeed_step"] * steps_per_epoch, 2),
        "difeed_step_over_two_forwards": round(med["difeed_step"] / med["two_forwards"], 3),
        "all_s": {k2: [round(x, 4) for x in v] for k2, v in times.items()},
        "torch": torch.__version__,
    }
    out = REPO / "benchmarks" / "results" / "heads.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
