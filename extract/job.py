"""From a config to the parts of an extraction (source, spec, plan, fingerprints) and a run.

`prepare` is cheap (no weights, no images decoded) so `extract plan` can show everything
before any work; `run` loads the model, opens the store and fills it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import torch

from diffprobe.extract.extraction import ComputeSettings, extract_features
from diffprobe.extract.images import PREPROCESSING, DigitsSource, ImageFolderSource, ImageSource
from diffprobe.extract.noise import DERIVATION
from diffprobe.extract.plan import Plan, make_plan
from diffprobe.extract.unet import (
    TINY_CHECKPOINT,
    BlockTable,
    ModelSpec,
    SpacedDiffusion,
    block_table,
    build_diffusion,
    build_model,
    load_checkpoint,
    preset,
)
from diffprobe.store.config import Config
from diffprobe.store.device import resolve_device
from diffprobe.store.errors import ConfigError, DiffprobeError
from diffprobe.store.feature_store import StoreWriter


def tool_version() -> str:
    try:
        return version("diffprobe")
    except PackageNotFoundError:
        return "unknown"


def model_spec(cfg: Config) -> ModelSpec:
    """The preset's flags with ``[model.arch]`` overrides, each checked against its type."""
    base = preset(cfg.model.preset)
    fields = {f.name: f for f in dataclasses.fields(ModelSpec)}
    overrides = {}
    for key, value in cfg.model.arch:
        if key not in fields:
            raise ConfigError(f"model.arch.{key}: unknown flag; allowed: {', '.join(fields)}")
        want = type(getattr(base, key))
        if want is tuple:
            ok = isinstance(value, list) and all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value
            )
            value = tuple(value) if ok else value
        elif want is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if not ok or (want is int and value <= 0):
            raise ConfigError(
                f"model.arch.{key}: {value!r} is not a valid {want.__name__}"
                f"{' of positive integers' if want is tuple else ''}"
            )
        overrides[key] = value
    return dataclasses.replace(base, **overrides)


def checkpoint_path(cfg: Config) -> str:
    if cfg.model.checkpoint:
        return cfg.model.checkpoint
    if cfg.model.preset == "tiny" and not cfg.model.arch:
        return str(TINY_CHECKPOINT)
    raise ConfigError(
        f"model.checkpoint: preset {cfg.model.preset!r}"
        f"{' with [model.arch] overrides' if cfg.model.arch else ''} needs a checkpoint path "
        f"(the shipped weights fit only the plain 'tiny' preset)"
    )


def image_source(cfg: Config, image_size: int) -> ImageSource:
    d = cfg.data
    if d.masks or d.source == "segfolder":
        from diffprobe.extract.masks import mask_source

        return mask_source(cfg, image_size)
    if d.source == "digits":
        return DigitsSource(image_size, d.splits, d.val_fraction, d.split_seed, d.max_per_class)
    if not d.root:
        raise ConfigError("data.root: required when data.source = 'imagefolder'")
    return ImageFolderSource(d.root, image_size, d.splits, d.max_per_class, d.decode_threads)


@dataclass(frozen=True)
class Job:
    cfg: Config
    spec: ModelSpec
    table: BlockTable
    diffusion: SpacedDiffusion
    source: ImageSource
    plan: Plan
    checkpoint: str


def prepare(cfg: Config, source: ImageSource | None = None) -> Job:
    """Resolve a config into spec, block table, image index and plan. Loads no weights.

    ``source``: an image source already built from this config (a dask worker gets the
    client's, so that it neither rescans a folder tree nor sees a different listing)."""
    spec = model_spec(cfg)
    try:  # guided-diffusion checks its flags with asserts and assorted exceptions
        table = block_table(spec)
        diffusion = build_diffusion(spec)
    except DiffprobeError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ConfigError(
            f"model.arch: the flags of preset {cfg.model.preset!r} with overrides "
            f"{dict(cfg.model.arch)} do not build a guided-diffusion U-Net "
            f"({type(e).__name__}: {first})"
        ) from None
    ckpt = checkpoint_path(cfg)
    source = image_source(cfg, spec.image_size) if source is None else source
    sizes = {s: len(source.split(s)) for s in cfg.data.splits}
    e = cfg.extract
    plan = make_plan(table, sizes, e.blocks, e.timesteps, e.pools, cfg.store.dtype, spec.diffusion_steps)
    return Job(cfg, spec, table, diffusion, source, plan, ckpt)


def fingerprints(job: Job, checkpoint_sha256: str, device: torch.device, cpu_threads: int = 0) -> dict:
    """What must match for two runs to write into one store (device type included: CPU and
    GPU kernels round differently, and a store's features come from one kind of device).

    On CPU, ``cpu_threads`` (the torch thread count of whatever runs the U-Net) is part of it:
    CPU kernels split their sums by thread count, so 1 and 2 threads can differ in the last bit
    (measured: up to 0.33% of fp16 values at forward_batch 8), and one store never mixes them."""
    e = job.cfg.extract
    compute = {
        "device_type": device.type,
        "forward_batch": e.forward_batch,
        "autocast": e.autocast,
        "dtype": job.cfg.store.dtype,
    }
    if device.type == "cpu":
        compute["cpu_threads"] = cpu_threads
    masks = getattr(job.source, "mask_settings", None)  # a dense source's mask settings; none: as before
    return {
        "model": {"checkpoint_sha256": checkpoint_sha256, "arch": job.spec.to_dict()},
        "preprocessing": {
            "name": PREPROCESSING,
            "image_size": job.spec.image_size,
            "range": [-1, 1],
            **({"masks": masks()} if masks else {}),
        },
        "noise": {
            "seed": e.noise_seed,
            "derivation": DERIVATION,
            "schedule": job.spec.noise_schedule,
            "diffusion_steps": job.spec.diffusion_steps,
        },
        "compute": compute,
        "dataset": {
            "classes": list(job.source.class_names),
            **{s: job.source.split(s).fingerprint() for s in job.cfg.data.splits},
        },
    }


def compute_settings(cfg: Config, device: torch.device) -> ComputeSettings:
    e = cfg.extract
    return ComputeSettings(
        device=device,
        forward_batch=e.forward_batch,
        autocast=e.autocast,
        noise_seed=e.noise_seed,
        batch_size=e.batch_size,
        on_corrupt=cfg.data.on_corrupt,
    )


def load_model(job: Job, device: torch.device):
    """The U-Net with the job's weights, on ``device``, in eval mode; and the checkpoint's sha256."""
    model = build_model(job.spec)
    sha = load_checkpoint(model, job.checkpoint)
    return model.to(device).eval(), sha


def open_writer(job: Job, checkpoint_sha256: str, device: torch.device, cpu_threads: int, **provenance) -> StoreWriter:
    """Create or open the job's store (taking its lock), record this run, create missing arrays.

    ``cpu_threads``: torch threads of the processes running the U-Net (part of a CPU store's
    fingerprint). ``provenance`` adds to the recorded run (a distributed run's workers)."""
    cfg = job.cfg
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tool_version": tool_version(),
        "torch": torch.__version__,
        "device": str(device),
        "checkpoint": job.checkpoint,
        "source": job.source.describe(),
        "config": cfg.to_dict(),
        **provenance,
    }
    writer = StoreWriter.create(
        cfg.store.path,
        fingerprints=fingerprints(job, checkpoint_sha256, device, cpu_threads),
        provenance=record,
        blocks=job.table.to_list(),
        class_names=list(job.source.class_names),
        splits={s: (list(job.source.split(s).ids), job.source.split(s).labels) for s in cfg.data.splits},
        chunk_images=cfg.store.chunk_images,
    )
    try:
        writer.record_run(record)
        for split in job.plan.split_sizes:
            if hasattr(job.source, "mask_classes"):  # a dense source: masks beside the features
                from diffprobe.extract.masks import PREVIEW_IMAGES

                writer.ensure_masks(split, job.spec.image_size, list(job.source.mask_classes), PREVIEW_IMAGES)
            writer.ensure_arrays(
                split,
                {a.key: a.shape[1] for a in job.plan.arrays if a.split == split},
                cfg.store.dtype,
                cfg.store.codec,
            )
    except BaseException:
        writer.close()
        raise
    return writer


def run(
    cfg: Config,
    progress: Callable[[int, bool], None] | None = None,
    on_start: Callable[[Job], None] | None = None,
    on_chunks: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """The whole `extract run`: prepare, load the model, open the store, fill what is missing.

    ``progress(n, computed)``: n more images done (computed False: found complete).
    ``on_chunks(done, total)``: image chunks complete so far, of all chunks of the run.
    ``log(line)``: a line worth showing (a distributed run's cluster and dashboard).
    With ``extract.workers`` or ``extract.scheduler`` the chunks run on dask workers
    (extract.distributed); otherwise in this process.
    """
    if cfg.extract.workers or cfg.extract.scheduler:
        from diffprobe.extract.distributed import run_distributed  # dask.distributed only when asked for

        return run_distributed(prepare(cfg), progress, on_start, on_chunks, log)
    job = prepare(cfg)
    device = resolve_device(cfg.extract.device)
    if cfg.extract.threads:
        torch.set_num_threads(cfg.extract.threads)
    model, sha = load_model(job, device)
    with open_writer(job, sha, device, torch.get_num_threads()) as writer:  # CPU bits follow the thread count
        if on_start:
            on_start(job)
        stats = extract_features(
            model, job.diffusion, job.source, job.plan, writer, compute_settings(cfg, device), progress, on_chunks
        )
    return {
        "store": str(cfg.store.path),
        "device": str(device),
        "images": sum(job.plan.split_sizes.values()),
        "timesteps": list(job.plan.timesteps),
        **stats,
    }
