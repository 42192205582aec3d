"""Wall time of `extract run` on the embedded default: this process alone vs a local dask
cluster of 1 and of 2 worker processes.

    flock /tmp/diffprobe-bench.lock python benchmarks/extract_workers.py            # ~10 min on 2 cores
    flock /tmp/diffprobe-bench.lock python benchmarks/extract_workers.py --repeats 1 --per-class 40

Each repeat runs the three variants into fresh stores, in a rotating order (so drift on a
shared machine hits all alike), timed end to end (`extract.run.run`: cluster start, model
loads, store, extraction, cluster shutdown) and from ``report.start`` to the end (the chunks
alone, once every worker holds the model). Torch CPU threads: the single process and the
1-worker cluster use all the cores; the 2-worker cluster gives each worker cores / 2
(`extract.threads_per_worker = 0`), so no variant oversubscribes the machine. The first
repeat also checks which stores are bit-identical (on CPU the bits follow the torch thread
count, not the process).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

warnings.simplefilter("ignore", FutureWarning)

from diffprobe.extract import job as jobs  # noqa: E402
from diffprobe.extract.dask_client import local_threads  # noqa: E402
from diffprobe.extract.report import Recorder  # noqa: E402
from diffprobe.extract.run import run as extract_run  # noqa: E402
from diffprobe.store.config import load_config  # noqa: E402
from diffprobe.store.feature_store import open_store  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def variants(cores: int) -> dict[str, dict]:
    return {
        "single process": {"extract.threads": cores},
        "1 worker": {"extract.workers": 1, "extract.threads_per_worker": local_threads(1, 0)},
        "2 workers": {"extract.workers": 2, "extract.threads_per_worker": local_threads(2, 0)},
    }


def timed_run(cfg) -> tuple[float, float]:
    marks = {}
    start = time.perf_counter()
    extract_run(cfg, mark := Recorder())
    marks["chunks"] = mark.started_at
    end = time.perf_counter()
    return end - start, end - marks["chunks"]


def same_store(a: Path, b: Path) -> bool:
    sa, sb = open_store(a), open_store(b)
    return all(
        sa.features(s, k.block, k.t, k.pool).tobytes() == sb.features(s, k.block, k.t, k.pool).tobytes()
        for s in sa.splits
        for k in sa.keys(s)
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-class", type=int, default=0, help="images per class per split (0 = all 1797)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "extract_workers.json")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    tmp = Path(tempfile.mkdtemp(prefix="diffprobe-workers-"))
    names = list(variants(cores))
    wall = {n: [] for n in names}
    chunks = {n: [] for n in names}
    identical = {}
    try:
        for r in range(args.repeats):
            order = names[r % 3 :] + names[: r % 3]
            for name in order:
                path = tmp / f"{r}-{name.replace(' ', '-')}.zarr"
                cfg = load_config(
                    REPO / "pipeline.toml",
                    {
                        "data.max_per_class": args.per_class,
                        "store.path": str(path),
                        "extract.device": "cpu",
                        **variants(cores)[name],
                    },
                )
                total, inner = timed_run(cfg)
                wall[name].append(total)
                chunks[name].append(inner)
                print(f"repeat {r}: {name}: {total:.1f} s end to end, {inner:.1f} s of chunks", flush=True)
            if r == 0:
                ref = tmp / "0-single-process.zarr"
                identical = {n: same_store(ref, tmp / f"0-{n.replace(' ', '-')}.zarr") for n in names[1:]}
            for p in tmp.glob(f"{r}-*.zarr"):
                if r > 0:
                    shutil.rmtree(p)
        plan = jobs.prepare(cfg).plan
        images = sum(plan.split_sizes.values())
        result = {
            "images": images,
            "forwards": plan.forwards,
            "cores": cores,
            "chunk_images": cfg.store.chunk_images,
            "chunks": sum(-(-n // cfg.store.chunk_images) for n in plan.split_sizes.values()),
            "torch_threads": {
                n: v.get("extract.threads", v.get("extract.threads_per_worker")) for n, v in variants(cores).items()
            },
            "wall_s": wall,
            "chunks_s": chunks,
            "wall_median_s": {n: statistics.median(v) for n, v in wall.items()},
            "chunks_median_s": {n: statistics.median(v) for n, v in chunks.items()},
            # ratios per repeat (variants measured side by side), then their median
            "wall_vs_single": {
                n: statistics.median(a / b for a, b in zip(wall[n], wall["single process"])) for n in names[1:]
            },
            "identical_to_single_process": identical,
            "load_average_at_end": os.getloadavg(),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
