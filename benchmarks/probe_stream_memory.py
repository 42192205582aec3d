"""Peak memory of the linear probe on a split larger than ``probe.memory_mb``: streamed vs in memory.

    python benchmarks/probe_stream_memory.py                     # 131072 x 4096 train (1.07 GB fp16)
    python benchmarks/probe_stream_memory.py --images 262144 --budgets 64,256

Writes a synthetic store (train ``--images`` x 1024 x 2 x 2 float16 = ADM block 24 at pool 2,
100 classes with a planted signal; val 8192 images; chunks of 512), then runs
`probe.linear.linear_probe` (sgd, one epoch, lr 0.01 alone: memory, not accuracy, is measured)
once per budget, each in a fresh subprocess, and reports its peak RSS (ru_maxrss) above the
RSS after imports, next to the budget and the split's size. The last budget is large enough
to read the split whole: the in-memory path for comparison. Writes
benchmarks/results/probe_stream_memory.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
C, P, K, CHUNK = 1024, 2, 100, 512

CHILD = r"""
import dataclasses, json, resource, sys, time
import torch
torch.set_num_threads(2)
from diffprobe.probe.linear import linear_probe
from diffprobe.store.config import ProbeConfig
from diffprobe.store.feature_store import open_store
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
base = rss_mb()
p = dataclasses.replace(ProbeConfig(), memory_mb=float(sys.argv[2]), sgd_epochs=1, sgd_lr=(0.01,))
start = time.perf_counter()
r = linear_probe(open_store(sys.argv[1]), 24, 90, 2, recipe="sgd", settings=p)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"budget_mb": float(sys.argv[2]), "streamed": r["streamed"], "top1": r["top1"],
                  "seconds": round(time.perf_counter() - start, 1), "rss_after_imports_mb": round(base),
                  "peak_rss_mb": round(peak), "peak_above_imports_mb": round(peak - base)}))
"""


def write(path: Path, n_train: int, n_val: int):
    from diffprobe.store.feature_store import FeatureKey
    from diffprobe.store.synthetic import write_synthetic_store

    key = FeatureKey(90, 24, P)
    blocks = [{"number": 24, "module": "output_blocks.4", "channels": C, "spatial": 8}]
    means = np.random.default_rng(0).standard_normal((K, C * P * P), dtype=np.float32) * 0.2
    sizes = {"train": n_train, "val": n_val}
    labels = {s: np.arange(n) % K for s, n in sizes.items()}

    def planted(split: str, seed: int):
        rng = np.random.default_rng(seed)  # chunks are written in order, so one generator per split

        def rows(lo: int, hi: int) -> np.ndarray:
            x = rng.standard_normal((hi - lo, C * P * P), dtype=np.float32) + means[labels[split][lo:hi]]
            return x.reshape(hi - lo, C, P, P)

        return rows

    write_synthetic_store(
        path,
        {s: {key: planted(s, seed + 1)} for seed, s in enumerate(sizes)},
        labels,
        class_names=[f"c{c}" for c in range(K)],
        ids={s: [f"{s}/{i:07d}" for i in range(n)] for s, n in sizes.items()},
        chunk_images=CHUNK,
        blocks=blocks,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=131072)
    ap.add_argument("--budgets", default="64,256", help="MB; a whole-split budget is added")
    ap.add_argument("--no-whole", action="store_true", help="skip the in-memory run")
    args = ap.parse_args()
    split_mb = args.images * C * P * P * 2 / 2**20  # as the budget counts it: float16, 2 bytes a value
    budgets = [float(b) for b in args.budgets.split(",")] + ([] if args.no_whole else [split_mb * 1.01])
    out = {
        "images": args.images,
        "dim": C * P * P,
        "split_fp16_mb": round(split_mb),
        "runs": [],
    }
    with tempfile.TemporaryDirectory(dir=REPO / "benchmarks") as tmp:
        path = Path(tmp) / "s.zarr"
        write(path, args.images, 8192)
        for budget in budgets:
            res = subprocess.run(
                [sys.executable, "-c", CHILD, str(path), str(budget)], capture_output=True, text=True, check=True
            )
            run = json.loads(res.stdout.strip().splitlines()[-1])
            print(run, flush=True)
            out["runs"].append(run)
    print(json.dumps(out, indent=2))
    dest = REPO / "benchmarks" / "results" / "probe_stream_memory.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
