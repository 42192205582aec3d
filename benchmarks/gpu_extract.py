"""The GPU measurements of issue 12, prepared to run in a few minutes on one GPU (H100/H200).

    python benchmarks/gpu_extract.py                                  # ADM-256, cuda, bf16
    python benchmarks/gpu_extract.py --preset tiny --device cpu --images 32 --batches 2 --autocast none   # smoke test

Not yet run on a GPU (none was lent to the session that wrote it). It measures, on random
weights of the architecture (speed does not depend on their values; `extract run` gets a
checkpoint of them saved to a temporary file):

1. **Bare forward**: images/s and MFU at forward_batch 32, 64, 128, 256 (the best kept), to
   block 24 and full, under ``--autocast``; MFU = FLOPs per image (extract.cost, counted on the
   meta device) x images/s / the GPU's dense bf16 peak.
2. **`extract run` end to end** on synthetic 500x375 JPEGs at 256 px (blocks 19, 24, 30;
   t 90, 150, 300; pools 1, 2; loaders ``--loaders`` threads), its rows/s against the bare
   forward to block 30 at the same forward_batch (target: within 10%).
3. **The original code's way**: fp16 weights (guided-diffusion's ``convert_to_fp16``), fresh
   ``randn_like`` noise on the device, one full forward per block (blocks 19, 24, 30), rows/s.

Results go to benchmarks/results/gpu_extract.json; quote them in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.simplefilter("ignore", FutureWarning)
sys.path.insert(0, str(Path(__file__).parent))

from extract_pipeline import synthetic_jpegs  # noqa: E402

from diffprobe.extract.cost import GPU_PEAK_TFLOPS, forward_flops  # noqa: E402
from diffprobe.extract.extraction import autocast_context  # noqa: E402
from diffprobe.extract.report import Recorder  # noqa: E402
from diffprobe.extract.run import run as extract_run  # noqa: E402
from diffprobe.extract.unet import block_table, build_model, capture, preset  # noqa: E402
from diffprobe.store.config import load_config  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "gpu_extract.json"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rows_per_s(model, spec, device, rows: int, deepest: int | None, autocast: str, batches: int) -> float:
    """Rows/s of calls of ``rows`` rows (truncated after ``deepest``; None: the full forward)."""
    x = torch.randn(rows, 3, spec.image_size, spec.image_size, device=device)
    t = torch.full((rows,), 150, device=device)
    with torch.no_grad(), autocast_context(device, autocast):

        def call():
            return model(x, t) if deepest is None else capture(model, x, t, [deepest])

        call()
        _sync(device)
        start = time.perf_counter()
        for _ in range(batches):
            call()
        _sync(device)
    return rows * batches / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="adm-256-uncond")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--autocast", default="bf16", choices=["none", "bf16", "fp16"])
    ap.add_argument("--peak-tflops", type=float, default=GPU_PEAK_TFLOPS["H100/H200 SXM"])
    ap.add_argument("--batches", type=int, default=10, help="timed calls per setting")
    ap.add_argument("--images", type=int, default=2048, help="synthetic JPEGs for `extract run`")
    ap.add_argument("--loaders", type=int, default=12)
    ap.add_argument("--sizes", default="32,64,128,256")
    args = ap.parse_args()
    device = torch.device(args.device)
    spec = preset(args.preset)
    model = build_model(spec).to(device).eval()
    result: dict = {"preset": args.preset, "device": str(device), "autocast": args.autocast, "torch": torch.__version__}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    flops = {
        24: forward_flops(spec, 24),
        30: forward_flops(spec, 30),
        None: forward_flops(spec, len(block_table(spec))),
    }

    # 1. bare forward
    bare = {}
    for deepest, name in ((24, "to block 24"), (None, "full")):
        best = max(
            (
                (fb, rows_per_s(model, spec, device, fb, deepest, args.autocast, args.batches))
                for fb in map(int, args.sizes.split(","))
            ),
            key=lambda r: r[1],
        )
        mfu = best[1] * flops[deepest] / (args.peak_tflops * 1e12)
        bare[name] = {"forward_batch": best[0], "images_per_s": best[1], "mfu": mfu}
        print(name, bare[name], flush=True)
    result["bare"] = bare
    fb = bare["to block 24"]["forward_batch"]

    # 2. extract run end to end
    tmp = Path(tempfile.mkdtemp(prefix="diffprobe-gpu-"))
    try:
        synthetic_jpegs(tmp / "data", args.images)
        ckpt = tmp / "random.pt"
        torch.save(build_model(spec).state_dict(), ckpt)
        cfg = load_config(
            None,
            {
                "data.source": "imagefolder",
                "data.root": str(tmp / "data"),
                "data.splits": ["train"],
                "data.decode_threads": 2,
                "model.preset": args.preset,
                "model.checkpoint": str(ckpt),
                "extract.blocks": "19,24,30",
                "extract.timesteps": [90, 150, 300],
                "extract.pools": [1, 2],
                "extract.device": args.device,
                "extract.autocast": args.autocast,
                "extract.forward_batch": fb,
                "extract.batch_size": max(64, fb),
                "extract.loaders": args.loaders,
                "extract.prefetch": 2 * args.loaders,
                "store.chunk_images": 512,
                "store.path": str(tmp / "run.zarr"),
            },
        )
        rec = Recorder()
        extract_run(cfg, rec)
        seconds = time.perf_counter() - rec.started_at
        rows = args.images * 3
        bare30 = rows_per_s(model, spec, device, fb, 30, args.autocast, args.batches)
        result["extract_run"] = {
            "images": args.images,
            "forward_batch": fb,
            "seconds_from_first_chunk": seconds,
            "rows_per_s": rows / seconds,
            "images_per_s": args.images / seconds,
            "bare_rows_per_s_to_block_30": bare30,
            "ratio_to_bare": (rows / seconds) / bare30,
        }
        print("extract run", result["extract_run"], flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    # 3. the original code's way: fp16 weights, fresh noise on the device, one full forward per block
    old = build_model(spec).to(device).eval()
    if device.type == "cuda":
        old.convert_to_fp16()
        old.dtype = torch.float16
    x0 = torch.randn(fb, 3, spec.image_size, spec.image_size, device=device)
    t = torch.full((fb,), 150, device=device)
    with torch.no_grad():
        _sync(device)
        start = time.perf_counter()
        for _ in range(args.batches):
            for _block in (19, 24, 30):
                old(x0 + torch.randn_like(x0), t)
        _sync(device)
    old_rows = fb * args.batches / (time.perf_counter() - start)
    result["original_way"] = {"forward_batch": fb, "rows_per_s": old_rows, "blocks": [19, 24, 30]}
    print("original way", result["original_way"], flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
