"""The extraction pipeline's own ceiling on CPU, and its overlap on the embedded default.

    python benchmarks/extract_pipeline.py ceiling --images 192            # ~2 min on 2 cores
    python benchmarks/extract_pipeline.py overlap --per-class 30 --repeats 3

``ceiling``: `extract run`'s pipeline (extract.extraction.extract_features: loaders, q_sample,
(image, t) rows, pooling, fp16, Zarr writes and completion records) over a synthetic
ImageFolder of 500x375 JPEGs at 256 px, with the U-Net replaced by a stand-in that returns
tensors of ADM-256's block shapes at no cost (blocks 19, 24, 30; t 90, 150, 300; pools 1, 2).
Measured with 1 and 2 loader threads (and processes), plus one loader's batch work alone
(decode, preprocess, noise: what scales with cores). On a GPU host the pooling runs on the
device; here it runs on the CPU, so these figures are a floor.

``overlap``: the embedded default (tiny U-Net, all 37 blocks, 6 t, pools 1 and 2) end to end
with the pipeline on (loaders 2, write_behind 1), off (loaders 0, write_behind 0: read,
noise and write in line, as before the pipeline) and with the writer thread only (loaders 0,
write_behind 1), and a bare forward of the same calls (`model(x_t, t)` on x_t made
beforehand), in rotated order; medians and per-repeat ratios. Each run is a fresh process:
run in one long process, the bare forward inherited the heap the extraction runs before it
had grown, and so paid fewer page faults than a process of its own. Each run also times its
own U-Net calls (`extraction.capture`), so its loop over its U-Net time is a ratio free of the
drift between runs (on a shared machine a bare forward alone varies by 10-20% run to run).
``--keep-freed`` runs every process with glibc keeping freed memory for reuse
(MALLOC_MMAP_THRESHOLD_ 1 GiB, MALLOC_TRIM_THRESHOLD_ 1 TiB): the allocator's page faults
then no longer differ between a loop that frees each activation and one that holds them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

warnings.simplefilter("ignore", FutureWarning)

from diffprobe.extract import extraction  # noqa: E402
from diffprobe.extract import job as jobs  # noqa: E402
from diffprobe.extract.extraction import extract_features, load_batch  # noqa: E402
from diffprobe.extract.report import Recorder  # noqa: E402
from diffprobe.extract.run import run as extract_run  # noqa: E402
from diffprobe.extract.unet import TINY_CHECKPOINT  # noqa: E402
from diffprobe.store.config import load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results"


# ------------------------------------------------------------------ ceiling


class _Returns(nn.Module):
    """A stand-in block: returns a fixed tensor of the real block's shape (no compute)."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out

    def forward(self, h, emb=None):
        return self.out[: len(h)]


class StandInUNet(nn.Module):
    """ADM-256's 37 blocks as `capture` sees them, each returning a fixed tensor of its shape."""

    def __init__(self, table, rows: int, blocks):
        super().__init__()
        outs = [
            torch.randn(rows, b.channels, b.spatial, b.spatial) if b.number in blocks else torch.zeros(1, 1, 1, 1)
            for b in table.blocks
        ]
        self.input_blocks = nn.ModuleList(_Returns(o) for o in outs[:18])
        self.middle_block = _Returns(outs[18])
        self.output_blocks = nn.ModuleList(_Returns(o) for o in outs[19:])

    def forward(self, x, t):
        for m in [*self.input_blocks, self.middle_block, *self.output_blocks]:
            h = m(x)  # every block sees the call's rows
        return h


def synthetic_jpegs(root: Path, n: int, classes: int = 4) -> None:
    """``n`` ImageNet-like 500x375 JPEGs (smooth colour fields with noise, quality 90) in train/."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
    for i in range(n):
        d = root / "train" / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        a, b, c = rng.uniform(0.005, 0.03, 3)
        img = np.stack([np.sin(xx * a + i), np.cos(yy * b), np.sin((xx + yy) * c)], -1) * 90 + 128
        img += rng.normal(0, 12, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{i:05d}.jpg", quality=90)


def ceiling(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="diffprobe-ceiling-"))
    try:
        synthetic_jpegs(tmp / "data", args.images)
        base = {
            "data.source": "imagefolder",
            "data.root": str(tmp / "data"),
            "data.splits": ["train"],
            "model.preset": "adm-256-uncond",
            "model.checkpoint": str(TINY_CHECKPOINT),  # never loaded: the stand-in replaces the U-Net
            "extract.blocks": "19,24,30",
            "extract.timesteps": [90, 150, 300],
            "extract.pools": [1, 2],
            "extract.device": "cpu",
            "extract.batch_size": 64,
            "extract.forward_batch": 32,
            "store.chunk_images": 64,
        }
        cfg = load_config(None, base)
        job = jobs.prepare(cfg)
        model = StandInUNet(job.table, cfg.extract.forward_batch, set(job.plan.blocks))
        ids = job.source.split("train").ids[:64]
        start = time.perf_counter()
        for _ in range(args.repeats):
            load_batch(job.source, "train", ids, (90, 150, 300), 0)
        one_loader = 64 * args.repeats / (time.perf_counter() - start)
        # the same, decoding on one thread (data.decode_threads = 1): a core's share
        single = dataclasses.replace(job, source=type(job.source)(tmp / "data", 256, ("train",), 0, 1))
        start = time.perf_counter()
        for _ in range(args.repeats):
            load_batch(single.source, "train", ids, (90, 150, 300), 0)
        per_core = 64 * args.repeats / (time.perf_counter() - start)
        rows = []
        for kind, workers in (("thread", 1), ("thread", 2), ("process", 1), ("process", 2)):
            times = []
            for r in range(args.repeats):
                c = load_config(
                    None,
                    {
                        **base,
                        "extract.loaders": workers,
                        "extract.loader_kind": kind,
                        "store.path": str(tmp / f"s{kind}{workers}{r}.zarr"),
                    },
                )
                j = dataclasses.replace(job, cfg=c)
                settings = jobs.compute_settings(c, torch.device("cpu"))
                with jobs.open_writer(j, "stand-in", torch.device("cpu"), torch.get_num_threads()) as writer:
                    start = time.perf_counter()
                    extract_features(model, j.diffusion, j.source, j.plan, writer, settings)
                    times.append(time.perf_counter() - start)
            med = statistics.median(times)
            rows.append({"loader_kind": kind, "loaders": workers, "seconds": times, "images_per_s": args.images / med})
            print(f"{kind} x {workers}: {args.images / med:.1f} images/s ({times})", flush=True)
        return {
            "images": args.images,
            "image_size": "500x375 JPEG -> 256",
            "blocks": [19, 24, 30],
            "timesteps": [90, 150, 300],
            "one_loader_batch_images_per_s": one_loader,
            "one_core_loader_images_per_s": per_core,
            "pipeline": rows,
            "extrapolated_16_core_loader_images_per_s": per_core * 14,  # 2 cores left to the model's thread and writer
            "needed_images_per_s_at_45pct_mfu": 230,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------ overlap


def bare_forward_seconds(job, calls: int) -> float:
    """``calls`` full forwards of forward_batch rows on x_t made beforehand (what the pipeline's
    calls cost with nothing around them); ``job``: `extract.job.prepare`'s (forward_batch resolved)."""
    cfg = job.cfg
    model, _ = jobs.load_model(job, torch.device("cpu"))
    fb = cfg.extract.forward_batch
    x = torch.from_numpy(
        np.stack(job.source.load(cfg.data.splits[0], list(job.source.split(cfg.data.splits[0]).ids[:fb])))
    )
    x_t = job.diffusion.q_sample(x, torch.full((len(x),), 90), torch.randn_like(x))
    t = torch.full((fb,), 90)
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(calls):
            model(x_t, t)
    return time.perf_counter() - start


VARIANTS = {
    "pipeline on": {"extract.loaders": 2, "extract.write_behind": 1},
    "pipeline off": {"extract.loaders": 0, "extract.write_behind": 0},
    "write behind only": {"extract.loaders": 0, "extract.write_behind": 1},
}


def one_run(name: str, per_class: int, store: Path) -> dict:
    """One measurement, in this (fresh) process: a variant's loop seconds and the seconds inside
    its U-Net calls, or the bare forward of the same number of calls."""
    over = {"data.max_per_class": per_class, "extract.device": "cpu", "store.path": str(store)}
    cfg = load_config(REPO / "pipeline.toml", {**over, **VARIANTS.get(name, {})})
    if name == "bare forward":
        from diffprobe.extract.cost import calls_and_padding

        job = jobs.prepare(cfg)  # forward_batch 0 (auto) resolved: the runs' own call shape
        calls, _ = calls_and_padding(
            job.plan.split_sizes,
            cfg.store.chunk_images,
            cfg.extract.batch_size,
            job.cfg.extract.forward_batch,
            len(cfg.extract.timesteps),
        )
        return {"seconds": bare_forward_seconds(job, calls), "calls": calls}
    in_unet = [0.0, 0]
    real_capture = extraction.capture

    def timed_capture(*a, **k):
        start = time.perf_counter()
        try:
            return real_capture(*a, **k)
        finally:
            in_unet[0] += time.perf_counter() - start
            in_unet[1] += 1

    extraction.capture = timed_capture
    rec = Recorder()
    extract_run(cfg, rec)
    loop = time.perf_counter() - rec.started_at  # the loop: model loaded, store open
    return {"seconds": loop, "unet_seconds": in_unet[0], "calls": in_unet[1]}


def overlap(args) -> dict:
    """Each measurement in a fresh process (no allocator, thread-pool or cache state carried from
    one variant to the next), in rotated order; medians of the per-repeat ratios."""
    import os
    import subprocess
    import sys

    tmp = Path(tempfile.mkdtemp(prefix="diffprobe-overlap-"))
    names = [*VARIANTS, "bare forward"]
    env = dict(os.environ)
    if args.keep_freed:  # glibc: large blocks from the heap, never trimmed (freed memory is reused, not re-faulted)
        env |= {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
    runs: dict[str, list[dict]] = {k: [] for k in names}
    try:
        for r in range(args.repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate which goes first
                cmd = [sys.executable, __file__, "_one", "--variant", name, "--per-class", str(args.per_class)]
                cmd += ["--store", str(tmp / f"{r}-{name.replace(' ', '-')}.zarr")]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
                runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print({k: round(v[-1]["seconds"], 2) for k, v in runs.items() if v}, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    bare = [b["seconds"] for b in runs["bare forward"]]

    def median_ratio(num, den) -> float:
        return statistics.median(a / b for a, b in zip(num, den)) - 1

    return {
        "per_class": args.per_class,
        "threads": torch.get_num_threads(),
        "fresh_process_per_run": True,
        "keep_freed": args.keep_freed,
        "runs": runs,
        "medians": {k: statistics.median(x["seconds"] for x in v) for k, v in runs.items()},
        "overhead_median_of_ratios": {k: median_ratio([x["seconds"] for x in runs[k]], bare) for k in VARIANTS},
        "loop_over_its_unet_calls_median": {
            k: median_ratio([x["seconds"] for x in runs[k]], [x["unet_seconds"] for x in runs[k]]) for k in VARIANTS
        },
        "unet_calls_over_bare_forward_median": {
            k: median_ratio([x["unet_seconds"] for x in runs[k]], bare) for k in VARIANTS
        },
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["ceiling", "overlap", "_one"])
    ap.add_argument("--images", type=int, default=192, help="ceiling: synthetic JPEGs")
    ap.add_argument("--per-class", type=int, default=0, help="overlap: digits per class per split (0 = all)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--keep-freed",
        action="store_true",
        help="overlap: every run with glibc's allocator keeping freed memory (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_)",
    )
    ap.add_argument("--variant", choices=[*VARIANTS, "bare forward"], help="_one: what one fresh process measures")
    ap.add_argument("--store", type=Path, help="_one: the store to write")
    args = ap.parse_args()
    if args.what == "_one":
        print(json.dumps(one_run(args.variant, args.per_class, args.store)))
        return
    result = ceiling(args) if args.what == "ceiling" else overlap(args)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"extract_pipeline_{args.what}{'_keep_freed' if args.keep_freed else ''}.json").write_text(
        json.dumps(result, indent=1) + "\n"
    )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
