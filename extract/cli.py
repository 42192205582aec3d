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

from diffprobe.store.config import load_config
from diffprobe.store.console import err, user_errors
from diffprobe.store.feature_store import open_store
from diffprobe.store.ranges import format_int_list

app = typer.Typer(help=__doc__.split("\n\n")[0], no_args_is_help=True, add_completion=False)
out = Console()

ConfigOpt = typer.Option(
    None, "--config", help="pipeline.toml to use (default: ./pipeline.toml, else built-in defaults)."
)
StoreOpt = typer.Option(None, "--store", help="Store path (overrides store.path).")
JsonOpt = typer.Option(False, "--json", help="Print one JSON object on stdout instead of tables.")


def _config(config, store, **flags):
    overrides = {"store.path": str(store) if store else None}
    overrides.update({k: v for k, v in flags.items()})
    return load_config(config, overrides)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


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
    from diffprobe.extract.report import BarReporter
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
        report = BarReporter(err, disable=as_json)  # appears once the config, store and model are accepted
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


@app.command()
def plan(
    config: Optional[Path] = ConfigOpt,
    store: Optional[Path] = StoreOpt,
    blocks: Optional[str] = typer.Option(None, "--blocks", help="Blocks (extract.blocks)."),
    t: Optional[str] = typer.Option(None, "--t", help="Timesteps (extract.timesteps)."),
    pool: Optional[str] = typer.Option(None, "--pool", help="Pool sizes (extract.pools)."),
    as_json: bool = JsonOpt,
):
    """Show the arrays, shapes and bytes a run would write, and the U-Net forwards, before any work."""
    from diffprobe.extract import job as jobs

    with user_errors():
        cfg = _config(config, store, **{"extract.blocks": blocks, "extract.timesteps": t, "extract.pools": pool})
        p = jobs.prepare(cfg).plan
    if as_json:
        print(json.dumps({"store": cfg.store.path, **p.to_dict()}))
        return
    table = Table(title=escape(f"plan for {cfg.store.path}"))
    for col in ("split", "array", "t", "block", "pool", "shape", "dtype", "bytes"):
        table.add_column(col, justify="right" if col in ("t", "block", "pool", "bytes") else "left")
    for a in p.arrays:
        table.add_row(
            a.split,
            a.key.name,
            str(a.key.t),
            str(a.key.block),
            str(a.key.pool),
            "x".join(map(str, a.shape)),
            a.dtype,
            _human(a.nbytes),
        )
    out.print(table)
    for b, r, s in p.capped:
        out.print(f"block {b}: pool {r} capped at its {s}x{s} map (stored as pool {s})", highlight=False)
    variants = any(p.variants(s) > 1 for s in p.split_sizes)
    per_split = " + ".join(f"{n} {s}" + (f" x {p.variants(s)}" if variants else "") for s, n in p.split_sizes.items())
    out.print(
        f"{len(p.arrays)} arrays, {_human(p.nbytes)} in total; "
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
            out.print(
                f"  complete: blocks {format_int_list(a['block'] for a in complete)} at t "
                f"{format_int_list(a['t'] for a in complete)}, pools {format_int_list(a['pool'] for a in complete)}",
                highlight=False,
            )
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
    """The block table: number -> module, channels, spatial size (derived from the model)."""
    from diffprobe.extract import job as jobs
    from diffprobe.extract.unet import block_table

    with user_errors():
        cfg = _config(config, store, **{"model.preset": preset_name})
        spec = jobs.model_spec(cfg)
        table = block_table(spec)
    if as_json:
        print(json.dumps({"preset": cfg.model.preset, "image_size": spec.image_size, "blocks": table.to_list()}))
        return
    t = Table(title=f"blocks of {cfg.model.preset} at {spec.image_size}x{spec.image_size}")
    for col in ("block", "module", "channels", "spatial"):
        t.add_column(col, justify="left" if col == "module" else "right")
    for b in table.blocks:
        t.add_row(str(b.number), b.module, str(b.channels), f"{b.spatial}x{b.spatial}")
    out.print(t)


def main():  # console-script entry point
    app(prog_name="extract")


if __name__ == "__main__":
    sys.exit(main())
