"""`extract run` as a function: prepare the job, load the model, open the store, fill what is
missing; in this process, or on dask workers with ``extract.workers`` / ``extract.scheduler``.

    from diffprobe.extract.run import run
    result = run(load_config("pipeline.toml"))   # the dict `extract run --json` prints
"""

from __future__ import annotations

import torch

from diffprobe.extract.extraction import extract_features, warm_up
from diffprobe.extract.job import compute_settings, load_model, open_writer, prepare
from diffprobe.extract.report import Reporter
from diffprobe.store.config import Config
from diffprobe.store.device import resolve_device


def run(cfg: Config, report: Reporter | None = None) -> dict:
    """The whole `extract run`. ``report`` (`extract.report.Reporter`) hears the run's start, every
    U-Net call, every chunk and any line worth showing. Returns what was done: the store, device,
    images, timesteps, chunks written and found complete, images skipped (and ``compile_seconds``
    with ``extract.compile``; ``workers`` and ``cluster`` on dask)."""
    report = report or Reporter()
    job = prepare(cfg)
    if cfg.extract.workers or cfg.extract.scheduler:
        from diffprobe.extract.dask_client import run_distributed  # dask.distributed only when asked for

        return run_distributed(job, report)
    device = resolve_device(cfg.extract.device)
    if cfg.extract.threads:
        torch.set_num_threads(cfg.extract.threads)
    model, sha = load_model(job, device)
    settings = compute_settings(cfg, device)
    extra = {}
    if cfg.extract.compile:  # compiled on the first call of the run's shape: timed apart
        extra["compile_seconds"] = round(warm_up(model, settings, job.plan.blocks, job.spec.image_size), 3)
    with open_writer(job, sha, device, torch.get_num_threads()) as writer:  # CPU bits follow the thread count
        stats = extract_features(model, job.diffusion, job.source, job.plan, writer, settings, report, job)
    return {
        "store": str(cfg.store.path),
        "device": str(device),
        "images": sum(job.plan.split_sizes.values()),
        "timesteps": list(job.plan.timesteps),
        **stats,
        **extra,
    }
