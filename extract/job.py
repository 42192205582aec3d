"""From a config to the parts of an extraction: source, spec, plan, fingerprints, compute
settings, the loaded model and the opened store. Shared by the single-process run
(`extract.run`) and the dask workers and client (`extract.dask_worker`, `extract.dask_client`);
imports neither.

`prepare` is cheap (no weights, no images decoded) so `extract plan` can show everything
before any work.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import torch

from diffprobe.extract.extraction import ComputeSettings
from diffprobe.extract.images import (
    PREPROCESSING,
    Augmentation,
    DigitsSource,
    ImageFolderSource,
    ImageSource,
    check_readable,
)
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
    compile_blocks,
    file_sha256,
    load_checkpoint,
    preset,
)
from diffprobe.store.config import Config, per_split
from diffprobe.store.errors import CheckpointError, ConfigError, DiffprobeError, FingerprintMismatch, StoreError
from diffprobe.store.feature_store import StoreWriter, open_store


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


def augmentation(cfg: Config) -> Augmentation:
    """The views' settings: ``data.flip`` "auto" is off for digits (a mirrored digit is another
    glyph), on for image folders; draws are keyed by ``extract.noise_seed``."""
    flip = cfg.data.flip if isinstance(cfg.data.flip, bool) else cfg.data.source != "digits"
    return Augmentation(tuple(cfg.data.crop_scale), flip, cfg.extract.noise_seed)


def image_source(cfg: Config, image_size: int) -> ImageSource:
    d = cfg.data
    if d.masks or d.source == "segfolder":
        from diffprobe.extract.masks import mask_source

        return mask_source(cfg, image_size)
    if d.source == "digits":
        return DigitsSource(image_size, d.splits, d.val_fraction, d.split_seed, d.max_per_class, augmentation(cfg))
    if not d.root:
        raise ConfigError("data.root: required when data.source = 'imagefolder'")
    return ImageFolderSource(d.root, image_size, d.splits, d.max_per_class, d.decode_threads, augmentation(cfg))


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
    if getattr(source, "mask_settings", None) and any(per_split(e.views, s) > 1 for s in sizes):
        raise ConfigError(
            "extract.views: a store with masks (data.masks = true) holds the center crop only, the view "
            "its masks are of; set extract.views = 1 (noise draws are allowed)"
        )
    plan = job_plan(cfg, spec, table, sizes)
    return Job(with_forward_batch(cfg, plan), spec, table, diffusion, source, plan, ckpt)


def job_plan(cfg: Config, spec: ModelSpec, table: BlockTable, sizes: dict[str, int]) -> Plan:
    """The plan of ``cfg``'s blocks, timesteps, pools, views, noise draws and masks (data.masks)
    for ``sizes`` images per split (a split named in extract.views or extract.noise_draws must
    be one of them)."""
    e = cfg.extract
    for key in ("views", "noise_draws"):
        value = getattr(e, key)
        unknown = [s for s, _ in value if s not in sizes] if not isinstance(value, int) else []
        if unknown:
            raise ConfigError(f"extract.{key}.{unknown[0]}: not a split being extracted; allowed: {', '.join(sizes)}")
    return make_plan(
        table,
        sizes,
        e.blocks,
        e.timesteps,
        e.pools,
        cfg.store.dtype,
        spec.diffusion_steps,
        {s: per_split(e.views, s) for s in sizes},
        {s: per_split(e.noise_draws, s) for s in sizes},
        spec.image_size if cfg.data.masks else 0,
    )


def with_forward_batch(cfg: Config, plan: Plan) -> Config:
    """``cfg`` with ``extract.forward_batch = 0`` (auto) resolved for ``plan``: resolved once,
    so every later step sees one number."""
    e = cfg.extract
    if e.forward_batch:
        return cfg
    rows_per_image = len(e.timesteps) * max(plan.variants(s) for s in plan.split_sizes)
    fb = auto_forward_batch(plan.split_sizes, e.batch_size, cfg.store.chunk_images, rows_per_image, store_attrs(cfg))
    return dataclasses.replace(cfg, extract=dataclasses.replace(e, forward_batch=fb))


AUTO_FORWARD_BATCH = 32  # the most rows per call auto chooses: memory and kernel efficiency both fine there


def auto_forward_batch(sizes: dict[str, int], batch_size: int, chunk_images: int, n_t: int, stored: dict | None) -> int:
    """``extract.forward_batch = 0``: an existing store's own; else the fewest calls of at most
    AUTO_FORWARD_BATCH rows for the largest batch's rows (``n_t`` per image: its timesteps x
    views and noise draws), split evenly (18 images x 2 t = 36 rows: 2 calls of 18, no padding,
    where 32 would pad 28 rows)."""
    if stored:
        fb = stored.get("fingerprints", {}).get("compute", {}).get("forward_batch")
        if fb:
            return int(fb)
    rows = max(min(batch_size, chunk_images, n) for n in sizes.values()) * n_t
    return -(-rows // -(-rows // AUTO_FORWARD_BATCH))


def store_attrs(cfg: Config) -> dict | None:
    """The root attributes of the store at ``store.path`` if one is there and whole, else None."""
    from pathlib import Path

    if not (Path(cfg.store.path) / "zarr.json").is_file():
        return None
    try:
        return open_store(cfg.store.path).attrs
    except StoreError:
        return None


def check_forward_batch(job: Job, stored: dict | None) -> None:
    """Refuse, with the fix, a ``forward_batch`` unlike the store's (before any model is loaded)."""
    have = (stored or {}).get("fingerprints", {}).get("compute", {}).get("forward_batch")
    want = job.cfg.extract.forward_batch
    if have and have != want:
        raise FingerprintMismatch(
            f"{job.cfg.store.path}: refusing to extend a store made with a different compute: "
            f"compute.forward_batch: store has {have}, this run has {want}; set extract.forward_batch = {have} "
            f"(or 0, which adopts the store's) to continue this store"
        )


def checkpoint_file(path: str) -> dict:
    """What identifies a checkpoint file's contents cheaply: its resolved path, size and mtime."""
    from pathlib import Path

    st = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def checkpoint_sha256(job: Job, stored: dict | None) -> str:
    """The checkpoint's sha256: recorded by an earlier run of this store for the same file (path,
    size and mtime: `checkpoint_file`), else computed (seconds for a 2 GB file)."""
    from pathlib import Path

    if not Path(job.checkpoint).is_file():
        raise CheckpointError(f"model.checkpoint: no such file {job.checkpoint!r}")
    here = checkpoint_file(job.checkpoint)
    for run in reversed((stored or {}).get("runs", [])):
        seen = run.get("checkpoint_file") or {}
        if {k: seen.get(k) for k in here} == here and seen.get("sha256"):
            return seen["sha256"]
    return file_sha256(job.checkpoint)


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
    for option in ("channels_last", "compile"):  # other kernels, other bits; recorded only when on
        if getattr(e, option):
            compute[option] = True
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
        loaders=e.loaders,
        loader_kind=e.loader_kind,
        prefetch=e.prefetch,
        write_behind=e.write_behind,
        channels_last=e.channels_last,
    )


def load_model(job: Job, device: torch.device, sha256: str | None = None):
    """The U-Net with the job's weights, on ``device``, in eval mode (channels-last and compiled
    blocks as ``extract.channels_last`` / ``extract.compile`` ask); and the checkpoint's sha256
    (``sha256`` if already known)."""
    model = build_model(job.spec)
    sha = load_checkpoint(model, job.checkpoint, sha256)
    model = model.to(device).eval()
    if job.cfg.extract.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if job.cfg.extract.compile:
        compile_blocks(model)
    return model, sha


def _held_augmentation(path) -> dict | None:
    """The augmentation settings recorded in the store at ``path`` (None: no store, or none recorded)."""
    try:
        return open_store(path).fingerprints.get("preprocessing", {}).get("augmentation")
    except StoreError:
        return None


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
        "checkpoint_file": {**checkpoint_file(job.checkpoint), "sha256": checkpoint_sha256},
        "source": job.source.describe(),
        "config": cfg.to_dict(),
        **provenance,
    }
    fps = fingerprints(job, checkpoint_sha256, device, cpu_threads)
    # Views' settings: compared with a store that records them; recorded (below, under the lock)
    # by the first run that writes views; not asked of a store without views (view 0 and noise
    # draws do not depend on them), so stores made before views existed stay valid.
    views = augmentation(cfg).fingerprint()
    held = _held_augmentation(cfg.store.path)
    if held is not None:
        fps["preprocessing"]["augmentation"] = views
    writer = StoreWriter.create(
        cfg.store.path,
        fingerprints=fps,
        provenance=record,
        blocks=job.table.to_list(),
        class_names=list(job.source.class_names),
        splits={s: (list(job.source.split(s).ids), job.source.split(s).labels) for s in cfg.data.splits},
        chunk_images=cfg.store.chunk_images,
        files={s: job.source.split(s).files for s in cfg.data.splits},
        before_create=(lambda: check_readable(job.source, cfg.data.splits)) if cfg.data.on_corrupt == "error" else None,
    )
    try:
        if held is None and job.plan.has_views:
            writer.add_fingerprint("preprocessing", "augmentation", views)
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
