"""Extraction throughput of the embedded default vs a bare U-Net forward, and the codec choice.

    python benchmarks/extract_throughput.py                 # ~6 min on 2 cores
    python benchmarks/extract_throughput.py --per-class 20 --repeats 3

Pipeline: `extract.run.run` into a fresh store (all 37 blocks, the default timesteps,
pools 1 and 2), timed end to end (imports aside: model build and load, checkpoint sha256,
store and array creation) and its extraction loop alone (image preprocessing, noise,
capture, pooling, fp16 encoding, Zarr writes and completion records). Bare: `model(x_t, t)` on the same x_t (made beforehand), the same call
shape (forward_batch rows) and the same number of calls. Runs alternate (and which goes first alternates); medians reported.
Codecs: every feature array of the pipeline's store rewritten with each codec.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import zarr

warnings.simplefilter("ignore", FutureWarning)

from diffprobe.extract import job as jobs  # noqa: E402
from diffprobe.extract.noise import batch_noise  # noqa: E402
from diffprobe.extract.report import Recorder  # noqa: E402
from diffprobe.extract.run import run as extract_run  # noqa: E402
from diffprobe.extract.unet import build_diffusion, build_model, load_checkpoint  # noqa: E402
from diffprobe.store.config import load_config  # noqa: E402
from diffprobe.store.feature_store import _codecs, open_store  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def bare_forward_seconds(cfg) -> float:
    """Full forwards over every (image, t) in calls of forward_batch rows; x_t made beforehand."""
    job = jobs.prepare(cfg)
    model = build_model(job.spec).eval()
    load_checkpoint(model, job.checkpoint)
    diffusion = build_diffusion(job.spec)
    fb = cfg.extract.forward_batch
    batches = []
    for split in cfg.data.splits:
        ids = list(job.source.split(split).ids)
        x0 = torch.from_numpy(np.stack(job.source.load(split, ids)))
        chunk = cfg.store.chunk_images
        for t in cfg.extract.timesteps:
            x_t = diffusion.q_sample(x0, torch.full((len(x0),), t), batch_noise(0, ids, t, tuple(x0.shape[1:])))
            for c0 in range(0, len(ids), chunk):  # the same padded groups per chunk as the pipeline
                xc = x_t[c0 : c0 + chunk]
                for lo in range(0, len(xc), fb):
                    g = xc[lo : lo + fb]
                    if len(g) < fb:
                        g = torch.cat([g, g.new_zeros((fb - len(g), *g.shape[1:]))])
                    batches.append((g, torch.full((fb,), t)))
    start = time.perf_counter()
    with torch.no_grad():
        for x, t in batches:
            model(x, t)
    return time.perf_counter() - start


def pipeline_seconds(cfg) -> tuple[float, float]:
    """(end to end, the extraction loop alone): the loop starts once the model is loaded and
    the store and its arrays exist, i.e. when `run` calls ``report.start``."""
    marks = {}
    start = time.perf_counter()
    extract_run(cfg, mark := Recorder())
    marks["loop"] = mark.started_at
    end = time.perf_counter()
    return end - start, end - marks["loop"]


def codec_table(store_path: Path, tmp: Path) -> list[dict]:
    s = open_store(store_path)
    arrays = [s.features(split, k.block, k.t, k.pool) for split in s.splits for k in s.keys(split)]
    raw = sum(a.nbytes for a in arrays)
    rows = []
    for codec in ("none", "zstd", "blosc-lz4"):
        root = zarr.open_group(str(tmp / f"codec-{codec}.zarr"), mode="w")
        t0 = time.perf_counter()
        for i, a in enumerate(arrays):
            z = root.create_array(f"a{i}", shape=a.shape, chunks=(256, *a.shape[1:]), dtype=a.dtype, **_codecs(codec))
            z[:] = a
        write = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(len(arrays)):
            root[f"a{i}"][:]
        read = time.perf_counter() - t0
        disk = sum(p.stat().st_size for p in (tmp / f"codec-{codec}.zarr").rglob("*") if p.is_file())
        rows.append({"codec": codec, "ratio": raw / disk, "write_s": write, "read_s": read, "bytes": disk})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-class", type=int, default=0, help="images per class per split (0 = all 1797)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "extract_throughput.json")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    tmp = Path(tempfile.mkdtemp(prefix="diffprobe-bench-"))
    try:
        pipe, loop, bare = [], [], []
        for r in range(args.repeats):
            path = tmp / f"run{r}.zarr"
            cfg = load_config(
                REPO / "pipeline.toml",
                {"data.max_per_class": args.per_class, "store.path": str(path), "extract.device": "cpu"},
            )
            if r % 2:  # alternate which goes first, so drift on a shared machine hits both alike
                total, inner = pipeline_seconds(cfg)
                bare.append(bare_forward_seconds(cfg))
            else:
                bare.append(bare_forward_seconds(cfg))
                total, inner = pipeline_seconds(cfg)
            pipe.append(total)
            loop.append(inner)
            print(f"repeat {r}: pipeline {total:.1f} s (loop {inner:.1f} s), bare forward {bare[-1]:.1f} s", flush=True)
        plan = jobs.prepare(cfg).plan
        n_images = sum(plan.split_sizes.values())
        result = {
            "images": n_images,
            "timesteps": list(plan.timesteps),
            "forwards": plan.forwards,
            "blocks": len(plan.blocks),
            "pools": list(plan.pools),
            "forward_batch": cfg.extract.forward_batch,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "pipeline_s": pipe,
            "loop_s": loop,
            "bare_s": bare,
            "pipeline_median_s": statistics.median(pipe),
            "loop_median_s": statistics.median(loop),
            "bare_median_s": statistics.median(bare),
            "images_per_s": n_images / statistics.median(pipe),
            "forwards_per_s": plan.forwards / statistics.median(pipe),
            "overhead_end_to_end": statistics.median(p / b for p, b in zip(pipe, bare)) - 1,
            "overhead_loop": statistics.median(p / b for p, b in zip(loop, bare)) - 1,
            "codecs": codec_table(tmp / "run0.zarr", tmp),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
