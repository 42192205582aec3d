"""kNN benchmarks: `probe sweep --head knn` on the embedded default, `probe knn` at scale, `analyze
align` matrices, and kNN next to the linear probe.

    python benchmarks/knn.py sweep [--repeats 2]                 # full default sweep, all ks
    python benchmarks/knn.py scale --n 25000,50000 --val 10000   # synthetic N x 4,096 train
    python benchmarks/knn.py align [--n 1000,2000,4000]          # 37 x 37 on the store; N for a minute
    python benchmarks/knn.py compare [--top 5]                   # top-1 at k 10/20 vs linear, best cells

``sweep``: `probe sweep --head knn` (`probe.sweep.run`, in this process, 1 torch thread as
benchmarks/probe_sweep.py) over every (block, t, pool) the store holds, default ks (10, 20,
100, 200), into a ledger in a temporary folder, plots included.
``scale``: a synthetic store of N train x ``--val`` val images of 1,024 x 2 x 2 = 4,096 float16
features (100 classes, chunks of 512), then `probe knn` (ks 10, 20, 100, 200) in a fresh process:
wall seconds and peak RSS (``ru_maxrss`` of the child); queries are val plus the held-out 10% of
train, all against the fitted 90%. ``align``: `analyze align --t 90` (mutual-knn and cknna, k 10)
on the store as a fresh process, then 37 synthetic sources of the store's pool-1 widths at
growing N (`align_matrix` in a fresh process) to find the N at which a 37 x 37 matrix takes a
minute. ``compare``: the kNN and linear rows of the same cells. Results go to
benchmarks/results/knn-<part>.json and are printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STORE = REPO / "runs" / "digits-tiny.zarr"
BIN = Path(sys.executable).parent


def _child(cmd: list[str]) -> tuple[float, str]:
    """(wall s, stdout) of one fresh process."""
    started = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - started
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    return wall, p.stdout


def _save(part: str, result: dict) -> None:
    print(json.dumps(result, indent=2))
    out = REPO / "benchmarks" / "results" / f"knn-{part}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def sweep(args) -> None:
    from diffprobe.probe import sweep as sw
    from diffprobe.store.config import load_config

    runs = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = load_config(
                REPO / "pipeline.toml",
                {
                    "store.path": args.store,
                    "probe.threads": args.threads,
                    "probe.device": "cpu",
                    "probe.ledger": str(Path(tmp) / "l.csv"),
                },
            )
            started = time.perf_counter()
            r = sw.run(cfg, head="knn")
            runs.append({"wall_s": round(time.perf_counter() - started, 2)})
            print(json.dumps(runs[-1]), flush=True)
    _save(
        "sweep",
        {
            "store": args.store,
            "threads": args.threads,
            "cells": r["trained"] + r["skipped"],
            "ks": sorted({c["k"] for c in r["cells"]}),
            "rows": len(r["cells"]),
            "plots": len(r["plots"]["files"]),
            "runs": runs,
            "wall_s_median": statistics.median(x["wall_s"] for x in runs),
            "best": {k: r["best"][k] for k in ("block", "t", "pool", "k", "top1")},
        },
    )


_SCALE_CHILD = """
import json, resource, sys, time
from diffprobe.store.config import load_config
from diffprobe.probe import knn
cfg = load_config(None, {"store.path": sys.argv[1], "probe.memory_mb": float(sys.argv[2]), "probe.device": "cpu"})
t = time.perf_counter()
r = knn.run(cfg, 24, 90, 2, ledger=False)
print(json.dumps({"seconds": time.perf_counter() - t, "streamed": r["streamed"], "n_train": r["n_train"],
                  "n_heldout": r["n_heldout"], "n_val": r["n_val"], "top1": [x["top1"] for x in r["per_k"]],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _synthetic(path: Path, n_train: int, n_val: int) -> None:
    import numpy as np

    from diffprobe.store.feature_store import FeatureKey
    from diffprobe.store.synthetic import write_synthetic_store

    classes, c = 100, 1024
    means = np.random.default_rng(0).normal(size=(classes, c * 4)).astype(np.float32) * 0.3

    def rows(seed, n):
        def make(lo, hi):
            rng = np.random.default_rng([seed, lo])
            y = np.arange(lo, hi) % classes
            return (means[y] + rng.standard_normal((hi - lo, c * 4), dtype=np.float32)).reshape(-1, c, 2, 2)

        return make

    key = FeatureKey(90, 24, 2)
    blocks = [{"number": b, "module": f"m{b}", "channels": c, "spatial": 2} for b in range(1, 38)]
    write_synthetic_store(
        path,
        {"train": {key: rows(1, n_train)}, "val": {key: rows(2, n_val)}},
        {"train": np.arange(n_train) % classes, "val": np.arange(n_val) % classes},
        blocks=blocks,
        chunk_images=512,
    )


def scale(args) -> None:
    out = []
    for n in (int(v) for v in args.n.split(",")):
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            path = Path(tmp) / "s.zarr"
            t = time.perf_counter()
            _synthetic(path, n, args.val)
            written = time.perf_counter() - t
            wall, stdout = _child([sys.executable, "-c", _SCALE_CHILD, str(path), str(args.memory_mb)])
            r = json.loads(stdout)
            queries = r["n_heldout"] + r["n_val"]
            out.append(
                {
                    "n_train": n,
                    "n_database": r["n_train"],
                    "n_queries": queries,
                    "memory_mb": args.memory_mb,
                    "streamed": r["streamed"],
                    "write_s": round(written, 1),
                    "wall_s": round(wall, 1),
                    "knn_s": round(r["seconds"], 1),
                    "peak_rss_mb": round(r["peak_rss_mb"]),
                    "gflop": round(2 * queries * r["n_train"] * 4096 / 1e9),
                    "gflop_per_s": round(2 * queries * r["n_train"] * 4096 / 1e9 / r["seconds"], 1),
                    "top1": r["top1"],
                }
            )
            print(json.dumps(out[-1]), flush=True)
    # time ~ queries x database: extrapolate at the measured rate of the largest run
    rate = out[-1]["gflop_per_s"]
    target = 200_000
    q = args.val + round(0.1 * target)
    est = 2 * q * (target - round(0.1 * target)) * 4096 / 1e9 / rate
    _save(
        "scale",
        {"runs": out, "extrapolated_200k": {"n_queries": q, "gflop_per_s": rate, "seconds": round(est)}},
    )


_ALIGN_CHILD = """
import json, sys, time
import numpy as np
from diffprobe.analyze.engine import array_source
from diffprobe.analyze.knn import AlignOptions, align_matrix
n, metric, dims = int(sys.argv[1]), sys.argv[2], [int(d) for d in sys.argv[3].split(",")]
rng = np.random.default_rng(0)
base = rng.standard_normal((n, 16), dtype=np.float32)
srcs = [array_source((base @ rng.standard_normal((16, d), dtype=np.float32)
                      + rng.standard_normal((n, d), dtype=np.float32)).astype(np.float16), i)
        for i, d in enumerate(dims)]
t = time.perf_counter()
r = align_matrix(srcs, None, n, AlignOptions(knn_metric=metric, knn_k=10))
print(json.dumps({"seconds": time.perf_counter() - t}))
"""


def align(args) -> None:
    from diffprobe.store.feature_store import open_store

    store = open_store(args.store)
    dims = [int(store.feature_array("val", b, 90, 1).shape[1]) for b in range(1, 38)]
    on_store = {}
    for metric in ("mutual-knn", "cknna"):
        walls = []
        for _ in range(args.repeats):
            cmd = [str(BIN / "analyze"), "align", "--t", "90", "--store", args.store, "--metric", metric, "--json"]
            wall, stdout = _child(cmd)
            walls.append(round(wall, 2))
        r = json.loads(stdout)
        on_store[metric] = {"wall_s": walls, "matrix_s": r["seconds"], "n_images": r["n_images"]}
    grow = []
    for n in (int(v) for v in args.n.split(",")):
        _, stdout = _child([sys.executable, "-c", _ALIGN_CHILD, str(n), "cknna", ",".join(map(str, dims))])
        grow.append({"n": n, "seconds": round(json.loads(stdout)["seconds"], 2)})
        print(json.dumps(grow[-1]), flush=True)
    # exact kNN is N^2: seconds ~ c N^2 from the largest run; the N where that is 60 s
    last = grow[-1]
    n_minute = int(last["n"] * (60.0 / last["seconds"]) ** 0.5)
    _save("align", {"store": args.store, "dims": dims, "on_store": on_store, "synthetic": grow, "n_for_60s": n_minute})


def compare(args) -> None:
    from diffprobe.probe import knn
    from diffprobe.probe import linear as lin
    from diffprobe.store.config import load_config
    from diffprobe.store.feature_store import open_store

    cfg = load_config(None, {"store.path": args.store, "probe.device": "cpu", "probe.threads": 1})
    src = json.loads((REPO / "benchmarks" / "results" / "knn-sweep.json").read_text())
    store = open_store(args.store)
    # the best cells by kNN (k 20 val top-1) over the whole sweep, recomputed here (cheap)
    from diffprobe.probe import sweep as sw

    cells, _ = sw.plan(store)
    scored = []
    for key in cells:
        r = knn.knn_probe(store, key.block, key.t, key.pool, ks=(10, 20), settings=cfg.probe)
        scored.append((r[1]["top1"], r[0]["top1"], key))
    scored.sort(key=lambda s: (-s[0], -s[1], s[2]))
    rows = []
    for top20, top10, key in scored[: args.top] + [(None, None, k) for k in args.extra]:
        if top20 is None:
            r = knn.knn_probe(store, key.block, key.t, key.pool, ks=(10, 20), settings=cfg.probe)
            top10, top20 = r[0]["top1"], r[1]["top1"]
        linr = lin.linear_probe(store, key.block, key.t, key.pool, settings=cfg.probe)
        rows.append(
            {
                "block": key.block,
                "t": key.t,
                "pool": key.pool,
                "knn_k10_top1": top10,
                "knn_k20_top1": top20,
                "linear_top1": linr["top1"],
                "linear_hyperparameters": linr["hyperparameters"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    _save("compare", {"store": args.store, "sweep_best": src.get("best"), "rows": rows})


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="part", required=True)
    s = sub.add_parser("sweep")
    s.add_argument("--store", default=str(STORE))
    s.add_argument("--repeats", type=int, default=1)
    s.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (probe.threads), as benchmarks/probe_sweep.py"
    )
    s = sub.add_parser("scale")
    s.add_argument("--n", default="25000,50000")
    s.add_argument("--val", type=int, default=10000)
    s.add_argument("--memory-mb", type=float, default=2048)
    s.add_argument("--tmp", default=None, help="folder for the synthetic store (default: the system's)")
    s = sub.add_parser("align")
    s.add_argument("--store", default=str(STORE))
    s.add_argument("--repeats", type=int, default=1)
    s.add_argument("--n", default="1000,2000,4000")
    s = sub.add_parser("compare")
    s.add_argument("--store", default=str(STORE))
    s.add_argument("--top", type=int, default=5)
    args = ap.parse_args()
    if args.part == "compare":
        from diffprobe.store.feature_store import FeatureKey

        args.extra = [FeatureKey(150, 29, 2)]  # the linear sweep's best cell (README)
    {"sweep": sweep, "scale": scale, "align": align, "compare": compare}[args.part](args)


if __name__ == "__main__":
    main()
