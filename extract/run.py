"""`extract run` as a function: prepare the job, load the model, open the store, fill what is
missing; in this process, or on dask workers with ``extract.workers`` / ``extract.scheduler``.

    from diffprobe.extract.run import run
    result = run(load_config("pipeline.toml"))   # the dict `extract run --json` prints
"""

from __future__ import annotations

import torch

from diffprobe.extract.extraction import chunk_work, extract_features, warm_up
from diffprobe.extract.job import (
    check_forward_batch,
    checkpoint_sha256,
    compute_settings,
    load_model,
    open_writer,
    prepare,
    store_attrs,
)
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
    cfg = job.cfg  # forward_batch resolved
    device = resolve_device(cfg.extract.device)
    if cfg.extract.threads:
        torch.set_num_threads(cfg.extract.threads)
    settings = compute_settings(cfg, device)
    stored = store_attrs(cfg)
    # Every refusal, and the no-op rerun of a complete store, before the model is loaded; a
    # store's lock before the model too. Only a new store loads the model first: a checkpoint
    # that does not fit the architecture is then refused before anything is written.
    check_forward_batch(job, stored)
    sha = checkpoint_sha256(job, stored)
    extra: dict = {}
    model = None
    if stored is None:
        model = _load(job, device, sha, settings, extra)
    with open_writer(job, sha, device, torch.get_num_threads()) as writer:  # CPU bits follow the thread count
        if model is None and chunk_work(job.plan, writer)[0]:
            model = _load(job, device, sha, settings, extra)
        stats = extract_features(model, job.diffusion, job.source, job.plan, writer, settings, report, job)
    return {
        "store": str(cfg.store.path),
        "device": str(device),
        "images": sum(job.plan.split_sizes.values()),
        "timesteps": list(job.plan.timesteps),
        **stats,
        **extra,
    }


def _load(job, device, sha: str, settings, extra: dict):
    model, _ = load_model(job, device, sha)
    if job.cfg.extract.compile:  # compiled on the first call of the run's shape: timed apart
        extra["compile_seconds"] = round(warm_up(model, settings, job.plan.blocks, job.spec.image_size), 3)
    return model
