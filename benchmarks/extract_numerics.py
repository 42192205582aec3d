"""Numerics of autocast on the embedded default (CPU): bf16 and fp16 against float32.

    python benchmarks/extract_numerics.py                 # ~5-10 min on 2 cores
    python benchmarks/extract_numerics.py --images 64 --seeds 3
    python benchmarks/extract_numerics.py --images 0 --seeds 5   # the probe's top-1 alone

1. Per block, the relative error ||x_autocast - x_fp32|| / ||x_fp32|| of the full-resolution
   block output, on the same x_t (``--images`` val digits at t 90 and 300, forward_batch rows).
2. The linear probe's val top-1 (block 24, t 90, pool 2; `probe linear`) on stores extracted
   in float32 and under bf16 autocast, over ``--seeds`` probe seeds (seed noise: their spread).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.simplefilter("ignore", FutureWarning)

from diffprobe.extract import job as jobs  # noqa: E402
from diffprobe.extract.extraction import autocast_context  # noqa: E402
from diffprobe.extract.noise import batch_noise  # noqa: E402
from diffprobe.extract.run import run as extract_run  # noqa: E402
from diffprobe.extract.unet import capture  # noqa: E402
from diffprobe.store.config import load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "extract_numerics.json"


def block_errors(images: int) -> dict:
    cfg = load_config(REPO / "pipeline.toml", {"extract.device": "cpu"})
    job = jobs.prepare(cfg)
    model, _ = jobs.load_model(job, torch.device("cpu"))
    ids = list(job.source.split("val").ids[:images])
    x0 = torch.from_numpy(np.stack(job.source.load("val", ids)))
    out: dict = {}
    for t in (90, 300):
        x_t = job.diffusion.q_sample(x0, torch.full((len(x0),), t), batch_noise(0, ids, t, (3, 32, 32)))
        tt = torch.full((len(x0),), t)
        feats = {}
        for mode in ("none", "bf16", "fp16"):
            with torch.no_grad(), autocast_context(torch.device("cpu"), mode):
                feats[mode] = {b: v.float() for b, v in capture(model, x_t, tt, range(1, 38)).items()}
        for mode in ("bf16", "fp16"):
            out[f"t{t}_{mode}"] = {
                b: float((feats[mode][b] - feats["none"][b]).norm() / feats["none"][b].norm()) for b in range(1, 38)
            }
    return out


def probe_top1(seeds: int, tmp: Path) -> dict:
    from typer.testing import CliRunner

    from diffprobe.probe.cli import probe_app as app

    result = {}
    for mode in ("none", "bf16"):
        store = tmp / f"{mode}.zarr"
        over = {
            "extract.device": "cpu",
            "extract.blocks": "24",
            "extract.timesteps": [90],
            "extract.pools": [2],
            "extract.autocast": mode,
            "store.path": str(store),
        }
        extract_run(load_config(REPO / "pipeline.toml", over))
        tops = []
        for seed in range(seeds):
            r = CliRunner().invoke(
                app,
                ["linear", "--store", str(store), "--block", "24", "--t", "90", "--pool", "2", "--seed", str(seed)]
                + ["--ledger", str(tmp / "ledger.csv"), "--json"],
            )
            assert r.exit_code == 0, r.output
            tops.append(json.loads(r.stdout.strip().splitlines()[-1])["top1"])
        result[mode] = {"top1": tops, "mean": statistics.mean(tops), "stdev": statistics.pstdev(tops)}
        print(mode, result[mode], flush=True)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64, help="val digits for the per-block errors (0 = skip them)")
    ap.add_argument("--seeds", type=int, default=5, help="probe seeds per store (0 = skip the probe)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="diffprobe-numerics-"))
    try:
        errors = block_errors(args.images) if args.images else {}  # 0: the probe alone
        for k, v in errors.items():
            print(k, "median", statistics.median(v.values()), "max", max(v.values()), flush=True)
        result = {"images": args.images, "relative_error": errors}
        if args.seeds:  # 0: the per-block errors alone
            result["probe"] = probe_top1(args.seeds, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "relative_error"}, indent=1))


if __name__ == "__main__":
    main()
