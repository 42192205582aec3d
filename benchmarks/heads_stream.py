"""Streaming the heads' maps at the paper's shapes, the lr grid in one read, and the ImageNet
projection (issue 16's benchmarks).

    python benchmarks/heads_stream.py read --images 4096,16384      # images/s, GB/s, peak RSS
    python benchmarks/heads_stream.py versus --old ../previous       # this reader vs another checkout's
    python benchmarks/heads_stream.py wait --images 4096             # a GPU-speed head's data-wait fraction
    python benchmarks/heads_stream.py grid --images 2048             # 3-lr grid: one pass vs three
    python benchmarks/heads_stream.py project                        # hours per ImageNet epoch

``read``: for each N, a synthetic store of N x 1024 x 16 x 16 float16 maps (ADM block 24 at
pool 16: 512 KB an image; `store.synthetic.write_synthetic_store`, codec none, chunks of
``--chunk`` images) in a temporary folder. Each measurement runs in a fresh subprocess: one
epoch of `probe.data.FeatureData.batches` (batch 128, every train row) into a head that does
nothing, streamed at a budget (``--budgets``, MB), with prefetch on (`probe.data.PREFETCH`) and
off (0), page cache warm (read once before) and cold (every file of the store evicted with
posix_fadvise(DONTNEED) first: the reads then come from the disk). Reported: images/s, GB/s
of decoded float16 delivered, and peak RSS above the RSS after imports (ru_maxrss); beside
them, plain read() of the same chunk files, 1 and READ_THREADS files at once, cold and warm:
what the disk and page cache give with nothing on top. Writes
benchmarks/results/heads_stream_read.json.

``versus``: this checkout's reader against another checkout's (``--old``: its repository root,
imported as the package diffprobe through PYTHONPATH) on one synthetic store of ``--images``
at ``--budget`` MB, prefetch on, interleaved with plain reads of the store's chunk files (1 and
READ_THREADS files at once), cold and warm: per repeat, each of the four once, in turn, so they
see the same disk. ``--drop-every`` K: the readers read every row but each K-th, as the fitted
part of a probe does (its held-out rows are spread over every chunk); GB/s then counts the
whole store, the rate of a pass over it. Reported: median GB/s, every run's, and the cores
kept busy (CPU seconds of the process over wall seconds). Writes benchmarks/results/heads_stream_versus.json.

``wait``: the data-wait fraction of a head that keeps a GPU busy, emulated on CPU: one epoch of
the same stream (prefetch on) into a head whose every step (batch 128) sleeps ``--step-ms``
(its compute runs off the CPU, as on a GPU, so the reading threads have the cores). 12.1 ms is
the attention head's training step at the paper's shape on one H100 at 45% of its bf16 peak:
42.0 GFLOP an image forward and backward (`AttentionHead(1024, 16, 1000)`, counted with
torch.utils.flop_counter), 128 images, 445 TFLOP/s. DifFormer's step (294 GFLOP an image, 2.75
MB read) needs about as many bytes per second. 100 ms: a head 8x slower. Reported: the
fraction of the epoch the head waited for its batches (``waiting_fraction``: reading, and on
the CPU the batch gather, 64 MB a batch, which on a GPU runs on the device) and the part of it
spent waiting for a window's rows to come off the disk (``window_wait_fraction``: what a GPU
would still wait for), cold and warm (``--caches``). ``--grid`` G (default 3, the lr grid): also one pass
feeding G such heads (each batch's G steps one after another), against G passes of one head
each (G x the one-head epoch at that cache state: on an ImageNet store, larger than any page
cache, every pass reads from the disk). Writes benchmarks/results/heads_stream_wait.json.

``grid``: the attention head's 3-point lr grid (heads.attention_lr = 0.05, 0.01, 0.002) on a
streamed synthetic store, trained in one pass (`probe.attention._grid_train`: one read feeds
every head) vs three passes (one per lr, each reading the data again), alternating ``--repeats``
times: median seconds, their ratio,
and the fraction of each run spent waiting for batches. The head runs at ``--channels`` x
``--pool`` (defaults 128 x 8: on 2 CPU cores one step of the paper's 1024 x 16 x 16 head
takes about a minute, so at that shape reading would be invisible). Writes
benchmarks/results/heads_stream_grid.json.

``project``: hours per epoch and for 28 epochs at ImageNet scale (1,281,167 train images) of
attention (block 24 at pool 16: 512 KB an image) and DifFormer (blocks 19/24/30 x t 90/150/300
at pool <= 16: 2.75 MB an image) reading at the measured cold and warm GB/s, against
recomputing the U-Net online (0.64 TFLOP an image to block 24, 2.24 TFLOP the full U-Net per
timestep, counted with torch.utils.flop_counter) on one GPU at 45% of ``--peak-tflops`` (bf16
dense; default 989, an H100 SXM). From benchmarks/results/heads_stream_read.json.
"""

from __future__ import annotations

import argparse
import itertools
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
C, P, K = 1024, 16, 100
IMAGENET = 1_281_167

CHILD = r"""
import json, os, resource, sys, time
import numpy as np, torch
torch.set_num_threads(2)
from diffprobe.probe.data import FeatureData
from diffprobe.store.feature_store import open_store

def cpu_s():  # this process's CPU seconds, user and system, all threads
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024

a = json.loads(sys.argv[1])
store = open_store(a["store"])
if a["cold"]:
    for root, _, files in os.walk(a["store"]):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
n = store.n_images("train")
base = rss_mb()
if a.get("raw"):  # the disk's own rate: every chunk file of the train maps, plain reads, ``raw`` files at once
    from concurrent.futures import ThreadPoolExecutor
    folder = os.path.join(a["store"], store.feature_array("train", 24, 90, 16).path)
    paths = sorted(os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs if f != "zarr.json")
    bufs = [memoryview(bytearray(64 << 20)) for _ in range(a["raw"])]
    def plain(k):
        with open(paths[k], "rb", buffering=0) as fh:
            while fh.readinto(bufs[k % len(bufs)]):
                pass
    start, cpu = time.perf_counter(), cpu_s()
    with ThreadPoolExecutor(a["raw"]) as pool:  # file k on buffer k mod raw: at most raw files at once
        for k in range(0, len(paths), a["raw"]):
            list(pool.map(plain, range(k, min(k + a["raw"], len(paths)))))
    print(json.dumps({"images": n, "seconds": time.perf_counter() - start, "cpu_seconds": cpu_s() - cpu,
                      "peak_above_base_mb": 0, "base_mb": base}))
    sys.exit(0)
rows = np.arange(n) if not a.get("drop_every") else np.flatnonzero(np.arange(n) % a["drop_every"] != 0)
data = FeatureData(store, "train", [(24, 90, 16)], rows, store.labels("train")[rows], np.ones(n, bool),
                   memory_mb=a["budget"], stream=True, prefetch=a["prefetch"])
step = a.get("step_ms", 0) / 1000
filling = [0.0]  # seconds the consumer waited for a window's rows to come off the disk
name = "_filled" if hasattr(FeatureData, "_filled") else "_fill"  # before stop 22 the fill ran in line
real = getattr(FeatureData, name)
if name == "_filled":
    def timed(self, windows):
        it = real(self, windows)
        try:
            while True:
                t0 = time.perf_counter()
                got = next(it, None)
                filling[0] += time.perf_counter() - t0
                if got is None:
                    return
                yield got
        finally:
            it.close()
else:
    def timed(self, *args, **kw):
        t0 = time.perf_counter()
        try:
            return real(self, *args, **kw)
        finally:
            filling[0] += time.perf_counter() - t0
setattr(FeatureData, name, timed)
start, cpu = time.perf_counter(), cpu_s()
images, waited = 0, 0.0
batches = data.batches(128, torch.Generator().manual_seed(0))
while True:
    t0 = time.perf_counter()
    got = next(batches, None)
    waited += time.perf_counter() - t0
    if got is None:
        break
    images += len(got[1])
    if step:  # a head whose step runs off the CPU (as on a GPU): the CPU is free while it runs
        time.sleep(step)
secs = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"images": images, "seconds": secs, "cpu_seconds": cpu_s() - cpu, "waiting_fraction": waited / secs, "window_wait_fraction": filling[0] / secs,
                  "peak_above_base_mb": peak - base, "base_mb": base}))
"""


def _store(path: Path, n: int, chunk: int, channels: int = C, pool: int = P) -> Path:
    from diffprobe.store.feature_store import FeatureKey
    from diffprobe.store.synthetic import write_synthetic_store

    if (path / "zarr.json").exists():
        return path
    rng = np.random.default_rng(0)
    means = rng.normal(size=(K, channels, pool, pool)).astype(np.float16)
    noise = rng.normal(size=(chunk, channels, pool, pool)).astype(np.float16)
    y = np.arange(n) % K

    def rows(lo, hi):  # cheap and deterministic: one noise block, each image its class pattern
        return noise[: hi - lo] + means[y[lo:hi]]

    nv = max(256, n // 16)
    yv = np.arange(nv) % K

    def rows_val(lo, hi):
        return noise[: hi - lo] + means[yv[lo:hi]]

    key = FeatureKey(90, 24, pool)
    blocks = [{"number": b, "module": f"m{b}", "channels": channels, "spatial": pool} for b in range(1, 38)]
    made = write_synthetic_store(
        path, {"train": {key: rows}, "val": {key: rows_val}}, {"train": y, "val": yv}, chunk_images=chunk, blocks=blocks
    )
    os.sync()  # written back: a cold run's eviction then drops every page (dirty ones it would keep)
    return made


def _child(
    store: Path,
    budget: float,
    prefetch: int,
    cold: bool,
    raw: int = 0,
    step_ms: float = 0,
    env: dict | None = None,
    drop_every: int = 0,
) -> dict:
    arg = json.dumps(
        {
            "store": str(store),
            "budget": budget,
            "prefetch": prefetch,
            "cold": cold,
            "raw": raw,
            "step_ms": step_ms,
            "drop_every": drop_every,
        }
    )
    out = subprocess.run([sys.executable, "-c", CHILD, arg], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def read(args) -> None:
    from diffprobe.probe.data import PREFETCH, READ_THREADS

    out: dict = {"shape": [C, P, P], "chunk_images": args.chunk, "repeats": args.repeats, "runs": []}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for n in [int(v) for v in args.images.split(",")]:
            started = time.perf_counter()
            store = _store(Path(tmp) / f"n{n}.zarr", n, args.chunk)
            gb = n * C * P * P * 2 / 1e9
            print(f"N {n}: {gb:.2f} GB written in {time.perf_counter() - started:.0f} s", flush=True)
            for cold, files in itertools.product((True, False), (1, READ_THREADS)):  # the disk's and cache's own rates
                runs = [_child(store, 0, 0, cold, raw=files) for _ in range(args.repeats)]
                secs = statistics.median(r["seconds"] for r in runs)
                row = {
                    "images": n,
                    "GB": round(gb, 3),
                    "reader": f"plain read() of the chunk files, {files} at once",
                    "cache": "cold" if cold else "warm",
                    "seconds": round(secs, 2),
                    "GBps": round(gb / secs, 2),
                }
                out["runs"].append(row)
                print(row, flush=True)
            for budget in [float(v) for v in args.budgets.split(",")]:
                for prefetch in (PREFETCH, 0):
                    for cold in (True, False):  # the cold run reads the files into the page cache
                        runs = [_child(store, budget, prefetch, cold) for _ in range(args.repeats)]
                        secs = statistics.median(r["seconds"] for r in runs)
                        row = {
                            "images": n,
                            "GB": round(gb, 3),
                            "budget_mb": budget,
                            "prefetch": prefetch,
                            "cache": "cold" if cold else "warm",
                            "seconds": round(secs, 2),
                            "images_per_s": round(n / secs),
                            "GBps": round(gb / secs, 2),
                            "peak_rss_above_base_mb": round(max(r["peak_above_base_mb"] for r in runs)),
                        }
                        out["runs"].append(row)
                        print(row, flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "heads_stream_read.json").write_text(json.dumps(out, indent=2) + "\n")


def versus(args) -> None:
    """This checkout's reader against another's (``--old``, e.g. a `git worktree` of the previous
    main) on one store, interleaved with plain reads of its files (1 and READ_THREADS at once),
    so all four see the same disk: per repeat and cache state, each once, in turn."""
    from diffprobe.probe.data import PREFETCH, READ_THREADS

    out: dict = {
        "images": args.images,
        "budget_mb": args.budget,
        "drop_every": args.drop_every,
        "old": args.old,
        "repeats": args.repeats,
        "runs": [],
    }
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        (Path(tmp) / "old").mkdir()
        (Path(tmp) / "old" / "diffprobe").symlink_to(Path(args.old).resolve())  # the package diffprobe, from --old
        old_env = dict(os.environ, PYTHONPATH=str(Path(tmp) / "old"))
        store = _store(Path(tmp) / "s.zarr", args.images, args.chunk)
        gb = args.images * C * P * P * 2 / 1e9  # the store's bytes: the rate of a pass over it
        used = dict(drop_every=args.drop_every)
        kinds = {
            f"plain read, {READ_THREADS} files at once": dict(raw=READ_THREADS),
            "reader, this checkout": used,
            "reader, --old": dict(env=old_env, **used),
            "plain read, 1 file at once": dict(raw=1),
        }
        for cache in args.caches.split(","):
            rates: dict[str, list[float]] = {k: [] for k in kinds}
            cpus: dict[str, list[float]] = {k: [] for k in kinds}
            for _ in range(args.repeats):
                for name, kw in kinds.items():
                    r = _child(store, args.budget, PREFETCH, cache == "cold", **kw)
                    rates[name].append(gb / r["seconds"])
                    cpus[name].append(r["cpu_seconds"] / r["seconds"])
            for name in kinds:
                row = {
                    "cache": cache,
                    "what": name,
                    "GBps_median": round(statistics.median(rates[name]), 2),
                    "GBps_runs": [round(v, 2) for v in rates[name]],
                    "cores_busy_median": round(statistics.median(cpus[name]), 2),
                }
                out["runs"].append(row)
                print(row, flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "heads_stream_versus.json").write_text(json.dumps(out, indent=2) + "\n")


def wait(args) -> None:
    """The fraction of an epoch a head whose steps run off the CPU waits for its batches; with
    ``--grid`` G > 1, also G such heads fed by one read (one pass, each batch's G steps in turn)."""
    from diffprobe.probe.data import PREFETCH

    out: dict = {"shape": [C, P, P], "chunk_images": args.chunk, "repeats": args.repeats, "runs": []}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        n = args.images
        store = _store(Path(tmp) / f"n{n}.zarr", n, args.chunk)
        gb = n * C * P * P * 2 / 1e9
        for budget in [float(v) for v in args.budgets.split(",")]:
            for step_ms in [float(v) for v in args.step_ms.split(",")]:
                for cold in [c == "cold" for c in args.caches.split(",")]:
                    runs = [_child(store, budget, PREFETCH, cold, step_ms=step_ms) for _ in range(args.repeats)]
                    secs = statistics.median(r["seconds"] for r in runs)
                    row = {
                        "images": n,
                        "budget_mb": budget,
                        "step_ms": step_ms,
                        "cache": "cold" if cold else "warm",
                        "seconds": round(secs, 2),
                        "head_seconds": round(-(-n // 128) * step_ms / 1000, 2),
                        "waiting_fraction": round(statistics.median(r["waiting_fraction"] for r in runs), 3),
                        "window_wait_fraction": round(statistics.median(r["window_wait_fraction"] for r in runs), 3),
                        "GBps": round(gb / secs, 2),
                    }
                    if args.grid > 1:  # G heads, one read: each batch feeds G steps, one after another
                        grid = [
                            _child(store, budget, PREFETCH, cold, step_ms=args.grid * step_ms)
                            for _ in range(args.repeats)
                        ]
                        one = statistics.median(r["seconds"] for r in grid)
                        row[f"grid{args.grid}_one_pass_seconds"] = round(one, 2)
                        row[f"grid{args.grid}_passes_seconds"] = round(args.grid * secs, 2)  # G epochs at this cache
                        row[f"grid{args.grid}_ratio_passes_over_one"] = round(args.grid * secs / one, 2)
                    out["runs"].append(row)
                    print(row, flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "heads_stream_wait.json").write_text(json.dumps(out, indent=2) + "\n")


def grid(args) -> None:
    import dataclasses

    import torch
    import torch.nn.functional as F

    from diffprobe.probe import data as data_mod
    from diffprobe.probe.data import train_parts
    from diffprobe.probe.heads import AttentionHead
    from diffprobe.probe.protocol import select
    from diffprobe.probe.train import seeded, train_heads
    from diffprobe.store.config import HeadsConfig, ProbeConfig
    from diffprobe.store.feature_store import open_store

    torch.set_num_threads(2)
    lrs = (0.05, 0.01, 0.002)
    c, pool = args.channels, args.pool
    h = dataclasses.replace(HeadsConfig(), epochs=1, attention_lr=lrs, dim=c, num_heads=8)
    p = dataclasses.replace(ProbeConfig(), memory_mb=args.budget)
    out: dict = {"images": args.images, "shape": [c, pool, pool], "budget_mb": args.budget, "lrs": lrs}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        store = open_store(_store(Path(tmp) / "g.zarr", args.images, args.chunk, c, pool))
        sel = select(store, 0, p)
        waited = [0.0]
        real = data_mod.FeatureData._batches

        def timed_batches(self, *args):  # time spent waiting for each batch
            it = real(self, *args)
            while True:
                t0 = time.perf_counter()
                try:
                    item = next(it)
                except StopIteration:
                    return
                waited[0] += time.perf_counter() - t0
                yield item

        data_mod.FeatureData._batches = timed_batches
        build = lambda: AttentionHead(c, pool, K, c, h.depth, h.num_heads, h.mlp_ratio)
        inputs = lambda xs: xs[0].float()

        def run(grid_lrs):  # `probe.attention._grid_train`'s training, without the held-out scoring
            fit, held = train_parts(store, [(24, 90, pool)], sel, memory_mb=p.memory_mb, device="cpu")
            assert not fit.in_memory
            models = [seeded(build, 0) for _ in grid_lrs]
            gen = torch.Generator().manual_seed(0)
            train_heads(
                models,
                grid_lrs,
                h,
                lambda _e: fit.batches(h.batch_size, gen),
                lambda m, xs, y: F.cross_entropy(m(inputs(xs)), y),
            )

        times: dict[str, list[tuple[float, float]]] = {"one_pass": [], "three_passes": []}
        for _ in range(args.repeats):  # alternating, so load from other jobs hits both alike
            for name, passes in (("one_pass", [lrs]), ("three_passes", [(lr,) for lr in lrs])):
                waited[0] = 0.0
                t0 = time.perf_counter()
                for grid_lrs in passes:
                    run(grid_lrs)
                secs = time.perf_counter() - t0
                times[name].append((secs, waited[0] / secs))
                print(name, round(secs, 1), flush=True)
        data_mod.FeatureData._batches = real
        results = {
            name: {
                "seconds": round(statistics.median(s for s, _ in runs), 1),
                "runs": [round(s, 1) for s, _ in runs],
                "waiting_for_data_fraction": round(statistics.median(w for _, w in runs), 3),
            }
            for name, runs in times.items()
        }
        out.update(results)
        out["ratio_three_over_one"] = round(results["three_passes"]["seconds"] / results["one_pass"]["seconds"], 2)
    print(json.dumps(out, indent=2))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "heads_stream_grid.json").write_text(json.dumps(out, indent=2) + "\n")


def project(args) -> None:
    runs = json.loads((RESULTS / "heads_stream_read.json").read_text())["runs"]
    on = [r for r in runs if r.get("prefetch", 0) > 0]
    gbps = {cache: statistics.median(r["GBps"] for r in on if r["cache"] == cache) for cache in ("warm", "cold")}
    per_image = {"attention": C * P * P * 2, "difformer": 3 * (1024 * 8 * 8 + 1024 * 16 * 16 + 512 * 16 * 16) * 2}
    tflop = {"attention": 0.64, "difformer": 3 * 2.24}  # DifFormer: the full U-Net at 3 timesteps
    gpu = args.peak_tflops * 0.45
    out: dict = {"measured_GBps": gbps, "gpu_tflops_at_45pct": gpu, "imagenet_images": IMAGENET, "heads": {}}
    for head in per_image:
        tb = IMAGENET * per_image[head] / 1e12
        online_h = IMAGENET * tflop[head] / gpu / 3600
        row = {
            "TB_per_epoch": round(tb, 2),
            "online_h_per_epoch": round(online_h, 2),
            "online_h_28": round(28 * online_h, 1),
        }
        for cache, rate in gbps.items():
            h = tb * 1e3 / rate / 3600
            row[f"read_{cache}_h_per_epoch"] = round(h, 2)
            row[f"read_{cache}_h_28"] = round(28 * h, 1)
        out["heads"][head] = row
    print(json.dumps(out, indent=2))
    (RESULTS / "heads_stream_projection.json").write_text(json.dumps(out, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    r = sub.add_parser("read")
    r.add_argument("--images", default="4096,16384")
    r.add_argument("--budgets", default="256,1024")
    r.add_argument("--chunk", type=int, default=64)
    r.add_argument("--repeats", type=int, default=1)
    r.add_argument("--tmp", default=None, help="folder for the temporary stores (default: the system temp folder)")
    w = sub.add_parser("wait")
    w.add_argument("--images", type=int, default=4096)
    w.add_argument("--budgets", default="256,1024")
    w.add_argument("--step-ms", default="12.1,100", help="the head's step (batch 128), run off the CPU")
    w.add_argument("--grid", type=int, default=3, help="also G heads fed by one read (0: not measured)")
    w.add_argument("--caches", default="cold,warm", choices=["cold,warm", "cold", "warm"])
    w.add_argument("--chunk", type=int, default=64)
    w.add_argument("--repeats", type=int, default=2)
    w.add_argument("--tmp", default=None)
    g = sub.add_parser("grid")
    g.add_argument("--images", type=int, default=2048)
    g.add_argument("--channels", type=int, default=128)
    g.add_argument("--pool", type=int, default=8)
    g.add_argument("--budget", type=float, default=64)
    g.add_argument("--chunk", type=int, default=64)
    g.add_argument("--repeats", type=int, default=3)
    g.add_argument("--tmp", default=None)
    v = sub.add_parser("versus")
    v.add_argument("--old", required=True, help="a checkout of diffprobe to compare with (its repository root)")
    v.add_argument("--images", type=int, default=4096)
    v.add_argument("--budget", type=float, default=256)
    v.add_argument("--caches", default="cold,warm", choices=["cold,warm", "cold", "warm"])
    v.add_argument("--chunk", type=int, default=64)
    v.add_argument("--repeats", type=int, default=4)
    v.add_argument("--drop-every", type=int, default=0, help="K: the readers skip every K-th row, as a held-out part")
    v.add_argument("--tmp", default=None)
    pr = sub.add_parser("project")
    pr.add_argument("--peak-tflops", type=float, default=989.0)
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    {"read": read, "versus": versus, "wait": wait, "grid": grid, "project": project}[args.what](args)


if __name__ == "__main__":
    main()
