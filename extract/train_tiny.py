"""Train the embedded default U-Net (preset ``tiny``) on the digits train split.

    python -m diffprobe.extract.train_tiny                 # 2000 steps, ~20-30 min on 2 CPU cores
    python -m diffprobe.extract.train_tiny --steps 50 --out /tmp/tiny   # a quick smoke run

Writes to ``--out`` (default: extract/assets): ``tiny-unet.pt`` (EMA weights, float16 state
dict), ``training_log.json`` (recipe, loss curve, evaluation), ``reconstructions.png`` and
``MODEL_CARD.md``. The objective is guided-diffusion's own (epsilon MSE + the learned-sigma
VB term), timesteps drawn uniformly; seeded, so a rerun on the same machine repeats it.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffprobe.extract.images import DigitsSource
from diffprobe.extract.unet import ASSETS, build_diffusion, build_model, load_checkpoint, preset

EVAL_T = (90, 150, 300)


def eps_mse(model, diffusion, x0: torch.Tensor, t: int, seed: int) -> float:
    """Mean squared error of the predicted noise at timestep ``t`` (fixed, seeded noise)."""
    g = torch.Generator().manual_seed(seed + t)
    noise = torch.randn(x0.shape, generator=g)
    tt = torch.full((len(x0),), t, dtype=torch.long)
    with torch.no_grad():
        eps = model(diffusion.q_sample(x0, tt, noise), tt)[:, :3]
    return float(((eps - noise) ** 2).mean())


def reconstructions(model, diffusion, x0: torch.Tensor, path: Path, seed: int) -> None:
    """A PNG grid: per timestep, rows of clean / noised / one-step denoised (x0 prediction)."""
    rows = []
    for t in EVAL_T:
        g = torch.Generator().manual_seed(seed + t)
        noise = torch.randn(x0.shape, generator=g)
        tt = torch.full((len(x0),), t, dtype=torch.long)
        x_t = diffusion.q_sample(x0, tt, noise)
        with torch.no_grad():
            pred = diffusion._predict_xstart_from_eps(x_t, tt, model(x_t, tt)[:, :3]).clamp(-1, 1)
        rows += [x0, x_t.clamp(-1, 1), pred]
    grid = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)  # (3, rows*S, n*S)
    arr = ((grid.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    Image.fromarray(arr).resize((arr.shape[1] * 3, arr.shape[0] * 3), Image.NEAREST).save(path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ASSETS)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    spec = preset("tiny")
    source = DigitsSource(spec.image_size)  # the same seeded split extraction uses by default
    train_ids, val_ids = source.split("train").ids, source.split("val").ids
    x_train = torch.from_numpy(np.stack(source.load("train", list(train_ids))))
    x_val = torch.from_numpy(np.stack(source.load("val", list(val_ids))))

    model = build_model(spec)
    untrained = copy.deepcopy(model).eval()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    diffusion = build_diffusion(spec)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * s / args.steps))
    )
    gen = torch.Generator().manual_seed(args.seed)

    def model_fp32(x, t):  # bf16 autocast for speed on CPU, loss math in float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x, t).float()

    curve, t0 = [], time.time()
    model.train()
    for step in range(args.steps):
        idx = torch.randint(len(x_train), (args.batch,), generator=gen)
        t = torch.randint(spec.diffusion_steps, (args.batch,), generator=gen)
        noise = torch.randn(x_train[idx].shape, generator=gen)
        loss = diffusion.training_losses(model_fp32, x_train[idx], t, noise=noise)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        curve.append(float(loss))
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {np.mean(curve[-50:]):.4f}  {time.time() - t0:7.1f}s", flush=True)
    train_seconds = time.time() - t0

    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.out / "tiny-unet.pt"
    torch.save({k: v.half() for k, v in ema.state_dict().items()}, ckpt)
    shipped = build_model(spec).eval()
    sha = load_checkpoint(shipped, ckpt)  # evaluate exactly what ships (float16 weights)
    evaluation = {
        str(t): {
            "trained": eps_mse(shipped, diffusion, x_val, t, args.seed),
            "untrained": eps_mse(untrained, diffusion, x_val, t, args.seed),
        }
        for t in EVAL_T
    }
    reconstructions(shipped, diffusion, x_val[:8], args.out / "reconstructions.png", args.seed)
    log = {
        "preset": "tiny",
        "spec": spec.to_dict(),
        "data": source.describe(),
        "n_train": len(train_ids),
        "n_val": len(val_ids),
        "recipe": {
            "steps": args.steps,
            "batch": args.batch,
            "lr": args.lr,
            "warmup": args.warmup,
            "schedule": "linear warmup + cosine",
            "optimizer": "AdamW",
            "ema": args.ema,
            "autocast": "cpu bf16",
            "seed": args.seed,
            "threads": args.threads,
            "objective": "guided-diffusion training_losses (eps MSE + VB, learn_sigma)",
        },
        "train_seconds": round(train_seconds, 1),
        "loss_curve_every_10_steps": [round(float(np.mean(curve[i : i + 10])), 5) for i in range(0, len(curve), 10)],
        "final_loss_last_100_steps": float(np.mean(curve[-100:])),
        "val_eps_mse": evaluation,
        "sha256": sha,
        "torch": torch.__version__,
    }
    (args.out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    (args.out / "MODEL_CARD.md").write_text(model_card(log))
    print(json.dumps({"sha256": sha, "val_eps_mse": evaluation}, indent=1))


def model_card(log: dict) -> str:
    rows = "\n".join(f"| {t} | {v['trained']:.4f} | {v['untrained']:.4f} |" for t, v in log["val_eps_mse"].items())
    r = log["recipe"]
    return f"""# tiny-unet.pt — the embedded default model of diffprobe

An unconditional guided-diffusion U-Net with ADM-256's 37-block topology at 32x32
(preset `tiny`: num_channels 32, channel_mult 1,1,2,2,4,4, 2 res blocks per level,
attention at 4,2,1 px with 32 channels per head, resblock_updown, scale-shift norm,
learn_sigma, linear schedule, 1000 steps).

- Data: scikit-learn's digits, train split ({log["n_train"]} images; stratified, val_fraction
  {log["data"]["val_fraction"]}, split_seed {log["data"]["split_seed"]}), upsampled 8 -> 32 px, grey as RGB.
- Training: {r["steps"]} steps, batch {r["batch"]}, {r["optimizer"]} lr {r["lr"]} ({r["schedule"]},
  warmup {r["warmup"]}), EMA {r["ema"]}, {r["autocast"]} autocast, seed {r["seed"]}, {r["threads"]} threads;
  objective: {r["objective"]}. {log["train_seconds"]:.0f} s on the machine that trained it.
- Final training loss (mean of the last 100 steps): {log["final_loss_last_100_steps"]:.4f}.
  The whole curve is in `training_log.json`.
- Weights: the EMA weights in float16 (loaded into a float32 model).
  sha256 `{log["sha256"]}`.

## Did it learn?

Noise-prediction MSE on all {log["n_val"]} val images (fixed seeded noise), the shipped
weights vs the same network untrained (whose zero-initialised output layer predicts 0):

| t | trained | untrained |
|---|---|---|
{rows}

`reconstructions.png`: for t = {", ".join(str(t) for t in EVAL_T)} (top to bottom), rows of
clean val images, x_t, and the one-step x0 prediction.

## Retrain

    python -m diffprobe.extract.train_tiny            # writes this folder's four files
"""


if __name__ == "__main__":
    main()
