"""CKA benchmarks (issue 4): the 37 x 37 block matrix of a store, and a large synthetic pair
against a direct Gram-matrix implementation.

    python benchmarks/cka.py matrix --store runs/digits-tiny.zarr --repeats 5
    python benchmarks/cka.py pair --n 50000 --d 4096 --gram-n 2500,5000,10000

``matrix``: `analyze cka --t 90` (block x block, every block held, the default estimator and
pool) as a fresh process per repeat (imports, planning, reads, the matrix, heatmap and CSV),
plus the matrix alone (`probe.cka.cka_matrix` on the planned sources) in this process. The
store is only read: it is linked into a temporary folder so the outputs land there.

``pair``: writes a synthetic store of two related (N, D) float16 arrays (chunks of 512
images) in a temporary folder, then, each in a fresh process so that peak RSS is its own:
ours (out of core, feature-space form forced; float32 and float64 chunk products) on all N, and a
direct Gram implementation (K = Xc Xc^T, L = Yc Yc^T in float64, <HKH, HLH>) on the first n
images for each ``--gram-n``; the Gram form needs 2 N^2 float64 (40 GB at N = 50,000), so it
runs where it fits and the table says so. Each process reports wall time, peak RSS
(ru_maxrss) and the CKA value; ours is also run on the first n images to check agreement.

Prints one JSON object and writes benchmarks/results/cka-<mode>.json. Run under
`flock /tmp/diffprobe-bench.lock` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def _child(code: str, env_threads: int) -> dict:
    """Run ``code`` in a fresh Python; it prints one JSON line (with its own peak RSS); add the process wall."""
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(env_threads),
        MKL_NUM_THREADS=str(env_threads),
        OPENBLAS_NUM_THREADS=str(env_threads),
        PYTHONWARNINGS="ignore",
    )
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"child failed:\n{p.stderr[-3000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out.update(process_wall_s=round(wall, 2))
    return out


# ------------------------------------------------------------------ matrix


def matrix(args) -> dict:
    import torch

    from diffprobe.analyze import cka as ck
    from diffprobe.store.feature_store import open_store

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        link = Path(tmp) / Path(args.store).name
        link.symlink_to(Path(args.store).resolve())
        cli = [
            sys.executable,
            "-c",
            "from probe.analyze_cli import analyze_main; analyze_main()",
            "cka",
            "--t",
            str(args.t),
            "--store",
            str(link),
            "--json",
        ]
        env = dict(
            os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore"
        )
        cli_walls, res = [], None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            p = subprocess.run(cli, capture_output=True, text=True, env=env, cwd=REPO)
            cli_walls.append(round(time.perf_counter() - t0, 2))
            if p.returncode:
                raise SystemExit(p.stderr)
            res = json.loads(p.stdout)
        store = open_store(link)
        plan_walls, mat_walls = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            pl = ck.plan(store, "val", t=(args.t,))
            t1 = time.perf_counter()
            r = ck.cka_matrix(pl["rows"], None, pl["n"], ck.CkaOptions())
            t2 = time.perf_counter()
            plan_walls.append(round(t1 - t0, 3))
            mat_walls.append(round(t2 - t1, 3))
        assert np.allclose(r["matrix"], res["matrix"], atol=1e-12)
    m = np.asarray(res["matrix"])
    return {
        "store": args.store,
        "t": args.t,
        "pool": res["pool"],
        "estimator": res["estimator"],
        "form": res["form"],
        "shape": list(m.shape),
        "n_images": res["n_images"],
        "threads": args.threads,
        "repeats": args.repeats,
        "cli_wall_s": cli_walls,
        "cli_wall_s_median": statistics.median(cli_walls),
        "plan_s_median": statistics.median(plan_walls),
        "matrix_s": mat_walls,
        "matrix_s_median": statistics.median(mat_walls),
        "target_s": 10,
        "meets_target": statistics.median(cli_walls) < 10,
        "mean_off_diagonal": float(m[~np.eye(len(m), dtype=bool)].mean()),
    }


# ------------------------------------------------------------------ pair


def write_pair(path: Path, n: int, d: int, chunk: int = 512, latent: int = 256, seed: int = 0) -> None:
    """Two related float16 representations of n images, written chunk by chunk (never whole in memory)."""
    from diffprobe.store.feature_store import FeatureKey
    from diffprobe.store.synthetic import write_synthetic_store

    rng = np.random.default_rng(seed)
    wx = rng.normal(size=(latent, d)).astype(np.float32) / np.sqrt(latent)
    wy = rng.normal(size=(d, d)).astype(np.float32) / np.sqrt(d)
    made: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # one chunk's (x, y), drawn once for both arrays

    def pair(lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        if lo not in made:
            made.clear()
            m = hi - lo
            z = rng.normal(size=(m, latent)).astype(np.float32)
            x = z @ wx + 0.5 * rng.normal(size=(m, d)).astype(np.float32) + 1.0
            y = np.tanh(x @ wy) + 0.5 * rng.normal(size=(m, d)).astype(np.float32)
            made[lo] = (x.reshape(m, d, 1, 1).astype(np.float16), y.reshape(m, d, 1, 1).astype(np.float16))
        return made[lo]

    write_synthetic_store(
        path,
        {
            "val": {
                FeatureKey(0, 1, 1): lambda lo, hi: pair(lo, hi)[0],
                FeatureKey(0, 2, 1): lambda lo, hi: pair(lo, hi)[1],
            }
        },
        {"val": np.zeros(n, int)},
        class_names=["x"],
        ids={"val": [f"img/{i:06d}" for i in range(n)]},
        chunk_images=chunk,
        blocks=[{"number": b, "module": f"m{b}", "channels": d, "spatial": 1} for b in (1, 2)],
        tag="cka-pair",
    )


OURS = """
import json, resource, time, torch, numpy as np
torch.set_num_threads({threads})
from diffprobe.analyze import cka as ck
from diffprobe.store.feature_store import open_store
s = open_store({path!r})
rows = np.arange({n})
t0 = time.perf_counter()
x = ck.store_source(s, "val", 1, 0, 1, rows, "x", "x")
y = ck.store_source(s, "val", 2, 0, 1, rows, "y", "y")
r = ck.cka_matrix([x], [y], {n}, ck.CkaOptions(precision={precision!r}, memory_mb=4096), form="feature")
print(json.dumps({{"impl": "ours", "precision": {precision!r}, "n": {n}, "form": r["form"],
                  "cka": r["matrix"][0][0], "wall_s": round(time.perf_counter() - t0, 2),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}}))
"""

GRAM = """
import json, resource, time, torch, numpy as np
torch.set_num_threads({threads})
from diffprobe.store.feature_store import open_store
s = open_store({path!r})
t0 = time.perf_counter()
x = torch.from_numpy(s.features("val", 1, 0, 1)[:{n}].reshape({n}, -1).astype(np.float64))
y = torch.from_numpy(s.features("val", 2, 0, 1)[:{n}].reshape({n}, -1).astype(np.float64))
def centred_gram(a):
    a = a - a.mean(0)
    k = a @ a.T
    m = k.mean(0)
    return k - m[None, :] - m[:, None] + m.mean()
k = centred_gram(x); del x
l = centred_gram(y); del y
v = float((k * l).sum() / torch.sqrt((k * k).sum() * (l * l).sum()))
print(json.dumps({{"impl": "gram", "n": {n}, "cka": v, "wall_s": round(time.perf_counter() - t0, 2),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}}))
"""


def pair(args) -> dict:
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        path = Path(tmp) / "pair.zarr"
        t0 = time.perf_counter()
        write_pair(path, args.n, args.d)
        write_s = round(time.perf_counter() - t0, 1)
        runs = []
        for _rep in range(args.repeats):
            for precision in ("float32", "float64"):
                runs.append(
                    _child(
                        OURS.format(threads=args.threads, path=str(path), n=args.n, precision=precision), args.threads
                    )
                )
        checks = []
        for n in args.gram_n:
            g = _child(GRAM.format(threads=args.threads, path=str(path), n=n), args.threads)
            o = _child(OURS.format(threads=args.threads, path=str(path), n=n, precision="float32"), args.threads)
            checks.append({"n": n, "gram": g, "ours": o, "abs_diff": abs(g["cka"] - o["cka"])})
    ours32 = [r for r in runs if r["precision"] == "float32"]
    ours64 = [r for r in runs if r["precision"] == "float64"]
    med = statistics.median(r["wall_s"] for r in ours32)
    peak = max(r["peak_rss_mb"] or 0 for r in ours32)
    return {
        "n": args.n,
        "d": args.d,
        "threads": args.threads,
        "repeats": args.repeats,
        "store_write_s": write_s,
        "ours_float32": ours32,
        "ours_float64": ours64,
        "ours_float32_wall_s_median": med,
        "ours_float64_wall_s_median": statistics.median(r["wall_s"] for r in ours64),
        "ours_float32_peak_rss_mb": peak,
        "gram_at_n": checks,
        "gram_bytes_at_full_n": 2 * 8 * args.n**2,
        "target": {"wall_s": 30, "rss_mb": 4096},
        "meets_target": med < 30 and peak < 4096,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    m = sub.add_parser("matrix")
    m.add_argument("--store", default=str(REPO / "runs" / "digits-tiny.zarr"))
    m.add_argument("--t", type=int, default=90)
    m.add_argument("--repeats", type=int, default=5)
    m.add_argument("--threads", type=int, default=2)
    p = sub.add_parser("pair")
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--gram-n", type=lambda s: [int(v) for v in s.split(",")], default=[2500, 5000, 10000])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tmp", default=None, help="folder for the synthetic store (default: the system's)")
    args = ap.parse_args()
    result = matrix(args) if args.mode == "matrix" else pair(args)
    result["machine"] = f"{os.cpu_count()} CPUs, shared with other jobs"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"cka-{args.mode}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
