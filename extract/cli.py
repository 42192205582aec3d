"""`extract`: run the U-Net once per (image, timestep) and keep every requested block.

    extract run                      # the embedded default: digits x tiny U-Net
    extract plan --blocks 19,24 --t 90,150
    extract status --json
    extract blocks --preset adm-256-uncond

A thin typer layer over extract.job and store/; errors a user can fix print one line and
exit with code 2.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from diffprobe.extract.report import BarReporter
from diffprobe.store.config import load_config
from diffprobe.store.console import OneLineErrors, err, user_errors, warn
from diffprobe.store.feature_store import FeatureKey, describe_keys, open_store
from diffprobe.store.files import human_bytes

app = typer.Typer(help=__doc__.split("\n\n")[0], no_args_is_help=True, add_completion=False, cls=OneLineErrors)
out = Console()

ConfigOpt = typer.Option(
    None, "--config", help="pipeline.toml to use (default: ./pipeline.toml, else built-in defaults)."
)
StoreOpt = typer.Option(None, "--store", help="Store path (store.path).")
JsonOpt = typer.Option(False, "--json", help="Print one JSON object on stdout instead of tables.")


def _config(config, store, **flags):
    overrides = {"store.path": str(store) if store else None}
    overrides.update({k: v for k, v in flags.items()})
    return load_config(config, overrides)


@app.command()
def run(
    config: Optional[Path] = ConfigOpt,
    store: Optional[Path] = StoreOpt,
    blocks: Optional[str] = typer.Option(None, "--blocks", help="Blocks, e.g. 1-37 or 19,24,30 (extract.blocks)."),
    t: Optional[str] = typer.Option(None, "--t", help="Timesteps, e.g. 90,150,300 (extract.timesteps)."),
    pool: Optional[str] = typer.Option(None, "--pool", help="Pool sizes, e.g. 1,2 (extract.pools)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per step (extract.batch_size)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N, mps (extract.device)."),
    workers: Optional[int] = typer.Option(
        None,
        "--workers",
        min=0,
        max=4096,
        help="Worker processes of a local dask cluster; one per GPU (extract.workers).",
    ),
    scheduler: Optional[str] = typer.Option(
        None, "--scheduler", help="Address of a dask scheduler, e.g. tcp://host:8786 (extract.scheduler)."
    ),
    as_json: bool = JsonOpt,
):
    """Extract features into the store; resumes where a previous run stopped."""
    from diffprobe.extract.run import run as run_extraction

    with user_errors():
        cfg = _config(
            config,
            store,
            **{
                "extract.blocks": blocks,
                "extract.timesteps": t,
                "extract.pools": pool,
                "extract.batch_size": batch_size,
                "extract.device": device,
                "extract.workers": workers,
                "extract.scheduler": scheduler,
            },
        )
        started = time.perf_counter()
        report = _RunBar(err, disable=as_json)  # appears once the config, store and model are accepted
        try:
            result = run_extraction(cfg, report)
        finally:
            report.stop()
        result["seconds"] = round(time.perf_counter() - started, 2)
    if as_json:
        print(json.dumps(result))
    else:
        out.print(
            f"store {escape(result['store'])}: {result['images']} images x {len(result['timesteps'])} timesteps; "
            f"{result['chunks_written']} chunks written, {result['chunks_already_done']} already complete, "
            f"{result['images_skipped']} images skipped; {result['seconds']:.1f} s on {result['device']}"
            + (f" ({result['workers']} dask workers)" if "workers" in result else ""),
            highlight=False,
        )


class _RunBar(BarReporter):
    """`extract run`'s progress bar, with a warning for each class that has no images in a
    split, given when the run starts."""

    def start(self, job, totals):
        for name, split in job.source.empty_classes():
            warn(f"class {name!r} has no images in split {split!r}: no probe can learn or score it there")
        super().start(job, totals)


@app.command()
def plan(
    config: Optional[Path] = ConfigOpt,
    store: Optional[Path] = StoreOpt,
    blocks: Optional[str] = typer.Option(None, "--blocks", help="Blocks (extract.blocks)."),
    t: Optional[str] = typer.Option(None, "--t", help="Timesteps (extract.timesteps)."),
    pool: Optional[str] = typer.Option(None, "--pool", help="Pool sizes (extract.pools)."),
    images: Optional[str] = typer.Option(
        None,
        "--images",
        help="Plan from image counts alone, without the data, e.g. train=1281167,val=50000.",
    ),
    calibrate: bool = typer.Option(
        True, "--calibrate/--no-calibrate", help="Time a few U-Net calls on this CPU for its estimate."
    ),
    as_json: bool = JsonOpt,
):
    """Show the arrays, shapes and bytes a run would write, the U-Net forwards, FLOPs, memory and
    time, before any work."""
    from diffprobe.extract import job as jobs
    from diffprobe.extract.cost import estimate
    from diffprobe.store.device import resolve_device

    with user_errors():
        cfg = _config(config, store, **{"extract.blocks": blocks, "extract.timesteps": t, "extract.pools": pool})
        if images is None:
            job = jobs.prepare(cfg)
            cfg, p, spec = job.cfg, job.plan, job.spec
        else:
            cfg, p, spec = _plan_from_counts(cfg, _counts(images))
        free = _free_bytes(cfg.store.path)
        cost = estimate(cfg, p, spec, resolve_device(cfg.extract.device), calibrate)
    if free is not None and free < p.nbytes:
        warn(
            f"the plan needs {human_bytes(p.nbytes)} (uncompressed) but the file system of {cfg.store.path} "
            f"has {human_bytes(free)} free"
        )
    if as_json:
        print(json.dumps({"store": cfg.store.path, **p.to_dict(), "free_bytes": free, "cost": cost.to_dict()}))
        return
    table = Table(title=escape(f"plan for {cfg.store.path}"))
    for col in ("split", "t", "block", "pool", "per image", "dtype", "bytes"):
        table.add_column(col, justify="left" if col in ("split", "per image", "dtype") else "right")
    for a in p.arrays:
        table.add_row(
            a.split,
            str(a.key.t),
            str(a.key.block),
            str(a.key.pool),
            "x".join(map(str, a.shape[1:])),
            a.dtype,
            human_bytes(a.nbytes),
        )
    out.print(table)
    for b, r, s in p.capped:
        out.print(f"block {b}: pool {r} capped at its {s}x{s} map (stored as pool {s})", highlight=False)
    for split, n in p.split_sizes.items():
        mine = [a for a in p.arrays if a.split == split]
        masks = p.mask_bytes(split)
        out.print(
            f"{split}: {n} images, {len(mine)} arrays, {human_bytes(sum(a.nbytes for a in mine) + masks)}"
            + (f" (masks {n}x{p.mask_size}x{p.mask_size} uint8: {human_bytes(masks)})" if masks else ""),
            highlight=False,
        )
    variants = any(p.variants(s) > 1 for s in p.split_sizes)
    per_split = " + ".join(f"{n} {s}" + (f" x {p.variants(s)}" if variants else "") for s, n in p.split_sizes.items())
    out.print(
        f"{len(p.arrays)} arrays, {human_bytes(p.nbytes)} in total; "
        f"{p.forwards} U-Net forwards ({f'({per_split}) image inputs' if variants else f'{per_split} images'} "
        f"x {len(p.timesteps)} timesteps), each stopping after block {max(p.blocks)}",
        highlight=False,
    )
    for s in p.split_sizes if variants else ():
        k, m = p.views.get(s, 1), p.noise_draws.get(s, 1)
        out.print(
            f"{s}: {k} view{'s' if k != 1 else ''} and {m} noise draw{'s' if m != 1 else ''}: "
            f"{p.variants(s)}x the forwards and bytes of the center crop alone",
            highlight=False,
        )
    _print_cost(cost)


def _duration(seconds: float) -> str:
    for unit, size in (("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.2g} s"


def _print_cost(c) -> None:
    """`extract plan`'s FLOPs, calls, memory and time lines (extract.cost.Estimate)."""
    out.print(
        f"{c.flops_per_image / 1e12:.3g} TFLOP per image to block {c.deepest}; {c.total_flops / 1e12:.4g} TFLOP "
        f"in {c.calls} U-Net calls of {c.forward_batch} rows ({c.rows} rows of (image, t) + {c.padded_rows} padding, "
        f"{c.padding_share:.0%})",
        highlight=False,
    )
    fit = c.largest_forward_batch
    free = (
        f", {human_bytes(c.free_bytes)} free on {c.device} (forward_batch up to {fit} fits)" if fit is not None else ""
    )
    out.print(
        f"peak memory of one call: {human_bytes(c.peak_bytes)} ({human_bytes(c.weight_bytes)} float32 weights + "
        f"{human_bytes(c.call_bytes)} activations){free}",
        highlight=False,
    )
    out.print(
        "estimated time: " + "; ".join(f"{name} {_duration(hours * 3600)}" for name, hours in c.hours().items()),
        highlight=False,
    )
    for w in c.warnings():
        err.print(f"warning: {escape(w)}", highlight=False)


def _counts(text: str) -> dict[str, int]:
    """``train=1281167,val=50000`` -> {"train": 1281167, "val": 50000} (one-line errors)."""
    from diffprobe.store.errors import ConfigError

    counts: dict[str, int] = {}
    for part in text.split(","):
        name, _, value = part.strip().partition("=")
        if not name or not value.strip().isdigit() or int(value) < 1 or name in counts:
            raise ConfigError(
                f"--images: {part.strip()!r} is not SPLIT=COUNT with a count of 1 or more, "
                f"each split once (e.g. train=1281167,val=50000)"
            )
        counts[name] = int(value)
    return counts


def _plan_from_counts(cfg, counts: dict[str, int]):
    """``cfg`` (forward_batch resolved), the plan of its model, blocks, timesteps and pools for
    these image counts, and the model's spec: no data read."""
    from diffprobe.extract import job as jobs
    from diffprobe.extract.unet import block_table

    spec = jobs.model_spec(cfg)
    plan = jobs.job_plan(cfg, spec, block_table(spec), counts)
    return jobs.with_forward_batch(cfg, plan), plan, spec


def _free_bytes(path) -> int | None:
    """Free bytes of the file system the store is (or would be) on; None if it cannot be told."""
    import shutil

    from diffprobe.store.files import nearest_existing

    try:
        return shutil.disk_usage(nearest_existing(path)).free
    except OSError:
        return None


@app.command()
def status(store: Optional[Path] = StoreOpt, config: Optional[Path] = ConfigOpt, as_json: bool = JsonOpt):
    """What the store holds and how complete it is."""
    with user_errors():
        cfg = _config(config, store)
        s = open_store(cfg.store.path).status()
    if as_json:
        print(json.dumps(s))
        return
    for split, info in s["splits"].items():
        arrays = info["arrays"].values()
        complete = [a for a in arrays if a["chunks_done"] == a["chunks"]]
        partial = [a for a in arrays if a["chunks_done"] != a["chunks"]]
        out.print(
            f"[bold]{split}[/bold]: {info['images']} images in {info['chunks']} chunks, "
            f"{info['skipped']} skipped; {len(complete)}/{len(info['arrays'])} arrays complete",
            highlight=False,
        )
        if complete:
            keys = sorted({FeatureKey(a["t"], a["block"], a["pool"]) for a in complete})
            out.print(f"  complete: {describe_keys(keys)}", highlight=False)
        views = 1 + max((a.get("view", 0) for a in complete), default=0)
        draws = 1 + max((a.get("draw", 0) for a in complete), default=0)
        if views > 1 or draws > 1:
            out.print(
                f"  views 0-{views - 1}, noise draws 0-{draws - 1} (extract.views, extract.noise_draws)",
                highlight=False,
            )
        for a in partial:
            variant = f" view {a['view']}" if "view" in a else f" noise draw {a['draw']}" if "draw" in a else ""
            out.print(
                f"  incomplete: t {a['t']} block {a['block']} pool {a['pool']}{variant}: "
                f"{a['chunks_done']}/{a['chunks']} chunks",
                highlight=False,
            )


@app.command()
def blocks(
    config: Optional[Path] = ConfigOpt,
    store: Optional[Path] = StoreOpt,
    preset_name: Optional[str] = typer.Option(None, "--preset", help="A model preset (model.preset)."),
    as_json: bool = JsonOpt,
):
    """The block table: number -> module, channels, spatial size (derived from the model; with
    --store, the table recorded in that store)."""
    from diffprobe.extract import job as jobs
    from diffprobe.extract.unet import block_table

    with user_errors():
        if store is not None and preset_name is None:
            s = open_store(store)
            rows, title = s.attrs["blocks"], f"blocks of the store {store}"
            head = {"store": str(store), "blocks": rows}
        else:
            cfg = _config(config, store, **{"model.preset": preset_name})
            spec = jobs.model_spec(cfg)
            rows = block_table(spec).to_list()
            title = f"blocks of {cfg.model.preset} at {spec.image_size}x{spec.image_size}"
            head = {"preset": cfg.model.preset, "image_size": spec.image_size, "blocks": rows}
    if as_json:
        print(json.dumps(head))
        return
    t = Table(title=escape(title))
    for col in ("block", "module", "channels", "spatial"):
        t.add_column(col, justify="left" if col == "module" else "right")
    for b in rows:
        t.add_row(str(b["number"]), b["module"], str(b["channels"]), f"{b['spatial']}x{b['spatial']}")
    out.print(t)


def main():  # console-script entry point
    app(prog_name="extract")


if __name__ == "__main__":
    sys.exit(main())
