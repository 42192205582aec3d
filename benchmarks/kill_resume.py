"""Fault campaign: `extract run` SIGKILLed at random moments of a whole run and over the store's
creation window, then run again; every resumed store is compared with an uninterrupted one.

    python benchmarks/kill_resume.py                       # 20 random moments + 12 in the creation window
    python benchmarks/kill_resume.py --random 30 --window 20 --seed 1

Each kill is a real SIGKILL of a real `extract run` process. Random moments are uniform over
the uninterrupted run's wall time (process start to exit). Creation-window moments are N ms
after the store's lock file appears (the start of `StoreWriter.create`), N spread evenly over
the time from then to the first chunk's completion record. After each kill the same command
runs again to the end; the store must then equal the reference bit for bit
(`FeatureStore.contents`: every array, record and id), hold no ``*.partial`` file and no
creation folder beside it, and the resumed run must print no zarr warning. Prints one JSON
object: "N/N bit-identical" and what each kill left behind.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from diffprobe.store.feature_store import lock_path, open_store

CONFIG = """
[data]
max_per_class = 5
[extract]
blocks = "3,8,16,19,24,30"
timesteps = [90, 300]
pools = [1, 2]
batch_size = 8
forward_batch = 8
device = "cpu"
threads = 1
[store]
chunk_images = 8
path = "{path}"
"""


def _extract(toml: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "diffprobe.extract.cli", "run", "--config", str(toml)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _config(folder: Path, name: str) -> tuple[Path, Path]:
    path = folder / name
    toml = folder / f"{name}.toml"
    toml.write_text(CONFIG.format(path=path))
    return toml, path


def _first_record(path: Path) -> bool:
    done = path / "train" / "done" / "c"
    return done.is_dir() and any(done.iterdir())


def _check(path: Path, toml: Path, reference: dict) -> dict:
    proc = _extract(toml)
    err = proc.communicate(timeout=600)[1].decode()
    identical = proc.returncode == 0 and open_store(path).contents() == reference
    partial = [str(p) for p in path.rglob("*.partial")]
    creating = list(path.parent.glob(f".{path.name}.creating-*"))
    return {
        "resume_rc": proc.returncode,
        "identical": identical and not partial and not creating and "not recognized" not in err,
        "partial_left": partial,
        "warnings": [line for line in err.splitlines() if "warning" in line.lower()][:3],
    }


def _left(path: Path) -> str:
    if not path.exists():
        return "no store"
    try:
        s = open_store(path).status()
    except Exception as e:  # whatever the kill left: report it, the resume decides
        return f"unopenable: {str(e)[:80]}"
    done = sum(a["chunks_done"] for sp in s["splits"].values() for a in sp["arrays"].values())
    total = sum(a["chunks"] for sp in s["splits"].values() for a in sp["arrays"].values())
    return f"{done}/{total} array chunks"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--random", type=int, default=20, help="kills at random moments of a whole run")
    ap.add_argument("--window", type=int, default=12, help="kills spread over the creation window")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    folder = Path(tempfile.mkdtemp(prefix="kill-resume-"))
    toml, ref = _config(folder, "ref.zarr")
    start = time.perf_counter()
    proc = _extract(toml)
    lock_seen = first_seen = None
    while proc.poll() is None:  # timings of the uninterrupted run, polled every 2 ms
        now = time.perf_counter() - start
        if lock_seen is None and lock_path(ref).exists():
            lock_seen = now
        if first_seen is None and _first_record(ref):
            first_seen = now
        time.sleep(0.002)
    whole = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr.read().decode() if proc.stderr else ""
    reference = open_store(ref).contents()
    moments = [("random", rng.uniform(0, whole)) for _ in range(args.random)]
    window = (first_seen or whole) - (lock_seen or 0)
    moments += [("window", window * i / max(1, args.window - 1)) for i in range(args.window)]
    results = []
    for i, (kind, at) in enumerate(moments):
        toml, path = _config(folder, f"k{i}.zarr")
        begin = time.perf_counter()
        proc = _extract(toml)
        if kind == "window":  # N ms after the lock appears
            while not lock_path(path).exists() and proc.poll() is None:
                time.sleep(0.0005)
            begin = time.perf_counter()
        while time.perf_counter() - begin < at and proc.poll() is None:
            time.sleep(0.0005)
        proc.send_signal(signal.SIGKILL)
        rc = proc.wait()
        left = _left(path)
        results.append(
            {"kind": kind, "at_s": round(at, 4), "kill_rc": rc, "left": left, **_check(path, toml, reference)}
        )
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    ok = sum(r["identical"] for r in results)
    print(
        json.dumps(
            {
                "bit_identical": f"{ok}/{len(results)} bit-identical",
                "random": args.random,
                "window": args.window,
                "whole_run_s": round(whole, 2),
                "creation_window_s": round(window, 4),
                "killed_before_exit": sum(r["kill_rc"] == -signal.SIGKILL for r in results),
                "results": results,
                "folder": str(folder),
                "pid": os.getpid(),
            }
        )
    )


if __name__ == "__main__":
    main()
