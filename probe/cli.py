"""`probe`: heads on features cached by `extract run`.

    probe linear --block 24 --t 90                  # the paper's linear probe, pool 2, recipe sgd
    probe linear --block 19 --t 150 --recipe lbfgs --json
    probe linear --block 24 --t 90 --label-fraction 0.01   # or --shots 5, --subset 1percent.txt
    probe sweep                                     # every (block, t, pool) held; heatmaps
    probe sweep --blocks 19-30 --t 90,150 --pool 2 --shots 10 --json
    probe sweep --workers 2                         # cells spread over a local dask cluster
    probe attention --block 24 --t 150 [--pool 16]    # attention head on the stored P x P map
    probe fusion --blocks 19,24,30 --t 90,150,300     # DifFormer over blocks x timesteps
    probe feedback [--block 24 --feedback-blocks 21,24,27,30,33,36 --t 150]   # DifFeed, runs the U-Net

A thin typer layer over probe.linear, probe.sweep, probe.attention and probe.feedback; errors a user can fix print one line and exit with
code 2. Every command starts the same way: `_config` loads pipeline.toml with the command's
overrides, then the library's `probe.command.prepare` (threads, ledger check, store, selection).

Conventions shared by every command: ``--block`` is the block the head reads (DifFeed's fed-back
decoder blocks are ``--feedback-blocks``); ``--pool`` is the pool size P of the maps read, capped
at each block's map as stored, and its default is shown in ``--help``; options left unset take
the config key named in their help, whose built-in default is shown beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from diffprobe.store.config import Config, load_config
from diffprobe.store.console import user_errors
from diffprobe.store.errors import ConfigError
from diffprobe.store.ranges import parse_int_list

probe_app = typer.Typer(
    help="Train heads on features cached by `extract run` (linear, attention, DifFormer) or online (DifFeed).",
    add_completion=False,
    rich_markup_mode=None,  # help text is plain: "[heads]" is a config section, not rich markup; flags show no metavar
)
out = Console()


@probe_app.callback(invoke_without_command=True)
def _probe(ctx: typer.Context):
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())


FractionOpt = typer.Option(None, "--label-fraction", help="Fit on this fraction of each class (e.g. 0.01, 0.1).")
ShotsOpt = typer.Option(None, "--shots", help="Fit on K images per class.")
SubsetOpt = typer.Option(None, "--subset", help="Fit on the train image ids listed in this file (one per line).")
LedgerOpt = typer.Option(None, "--ledger", help="Results ledger CSV (probe.ledger; relative: beside the store).")


def _subset(label_fraction, shots, subset) -> str:
    from diffprobe.probe.subsets import subset_spec

    return subset_spec(label_fraction, shots, subset)


def _key(text: str, key: str) -> str:
    """Help text naming the config key an unset option takes, with its built-in default."""
    section, name = key.split(".")
    value = getattr(getattr(Config(), section), name)
    shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
    return f"{text} (default: {key}, built-in {shown})"


StoreOpt = typer.Option(None, "--store", help=_key("Store path.", "store.path"))
ConfigOpt = typer.Option(
    None, "--config", help="pipeline.toml to use (default: ./pipeline.toml, else built-in defaults)."
)
RecipeOpt = typer.Option(None, "--recipe", help=_key("sgd or lbfgs.", "probe.recipe"))
SeedOpt = typer.Option(
    None, "--seed", min=0, help=_key("Seed of held-out part, label subset, init, batches.", "probe.seed")
)
DeviceOpt = typer.Option(None, "--device", help=_key("auto, cpu, cuda, cuda:N, mps.", "probe.device"))
JsonOpt = typer.Option(False, "--json", help="Print one JSON object on stdout instead of tables.")
BlockOpt = typer.Option(..., "--block", min=1, help="The block the head reads (1-based, as in `extract blocks`).")
TOpt = typer.Option(..., "--t", min=0, help="Timestep t.")


def _config(config, store, ledger, *, seed=None, device=None, recipe=None):
    """The config of a probe command: pipeline.toml (or ``--config``) with the command's overrides."""
    return load_config(
        config,
        {
            "store.path": str(store) if store else None,
            "probe.recipe": recipe,
            "probe.seed": seed,
            "probe.device": device,
            "probe.ledger": ledger,
        },
    )


def _train_bar(name: str, as_json: bool):
    """A rich progress bar of head training on stderr (epoch, step, loss, images/s, ETA) and the
    ``on_step(train.Step)`` that drives it; off with --json. Returns (bar, on_step)."""
    import time

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from diffprobe.store.console import err

    bar = Progress(
        TextColumn(f"[bold]{name}"),
        BarColumn(),
        TextColumn("epoch {task.fields[epoch]}, step {task.fields[step]}"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[rate]} images/s"),
        TimeRemainingColumn(),
        console=err,
        disable=as_json,
    )
    task = bar.add_task(name, total=None, epoch="-", step="-", loss="-", rate="-")
    seen = {"images": 0, "start": None}

    def on_step(s):
        if seen["start"] is None:
            seen["start"] = time.perf_counter()
            bar.start()  # not before: an error in the setup prints one line only
        seen["images"] += s.images
        rate = seen["images"] / max(time.perf_counter() - seen["start"], 1e-9)
        bar.update(
            task,
            total=None if s.steps is None else s.epochs * s.steps,
            completed=s.epoch * (s.steps or 0) + s.step,
            epoch=f"{s.epoch + 1}/{s.epochs}",
            step=f"{s.step}/{s.steps or '?'}",
            loss=f"{s.loss:.4f}",
            rate=f"{rate:.0f}",
        )

    return bar, on_step


ViewsOpt = typer.Option(
    "1", "--views", help="Stored train views per epoch: all, 1 (view 0, the center crop) or K (extract.views)."
)
NoiseDrawsOpt = typer.Option(
    1, "--noise-draws", min=1, help="Average val logits over M stored noise draws (extract.noise_draws)."
)


def _views(views: str, noise_draws: int):
    """`--views all|1|K` and `--noise-draws M` as `probe.data.Views` (checked against the store later)."""
    from diffprobe.probe.data import Views

    if views == "all":
        return Views("all", noise_draws)
    if not views.isdigit() or int(views) < 1:
        raise ConfigError(f"--views: {views!r} is not allowed; allowed: all, 1 or a count K >= 1")
    return Views(int(views), noise_draws)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


@probe_app.command()
def linear(
    block: int = BlockOpt,
    t: int = TOpt,
    pool: int = typer.Option(
        2, "--pool", min=1, help="Pool size p (capped at the block's map, as stored); the paper's 2."
    ),
    store: Optional[Path] = StoreOpt,
    config: Optional[Path] = ConfigOpt,
    recipe: Optional[str] = RecipeOpt,
    seed: Optional[int] = SeedOpt,
    device: Optional[str] = DeviceOpt,
    label_fraction: Optional[float] = FractionOpt,
    shots: Optional[int] = ShotsOpt,
    subset: Optional[Path] = SubsetOpt,
    ledger: Optional[str] = LedgerOpt,
    views: str = ViewsOpt,
    noise_draws: int = NoiseDrawsOpt,
    as_json: bool = JsonOpt,
):
    """Train a linear classifier on train's cached (block, t, pool) features; top-1/top-5 on val.

    Hyperparameters are chosen on a seeded held-out part of train, never on val. One row is appended to the results ledger beside the store (probe.ledger).
    """
    from diffprobe.probe import linear as lin

    with user_errors():
        cfg = _config(config, store, ledger, seed=seed, device=device, recipe=recipe)
        r = lin.run(
            cfg, block, t, pool, subset=_subset(label_fraction, shots, subset), views=_views(views, noise_draws)
        )
    if as_json:
        print(json.dumps(r.to_json()))
        return
    title = f"linear probe ({r['recipe']}): block {r['block']}, t {r['t']}, pool {r['pool']}"
    table = Table(title=escape(title), show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    pool_note = "" if r["stored_pool"] == r["pool"] else f" (stored at pool {r['stored_pool']})"
    hp = ", ".join(f"{k} {v:g}" for k, v in r["hyperparameters"].items())
    for name, value in [
        ("val top-1", _pct(r["top1"])),
        ("val top-5", _pct(r["top5"])),
        ("held-out top-1", f"{_pct(r['heldout_top1'])} (chose {hp} from {len(r['grid'])})"),
        ("features", f"{r['dim']} per image{pool_note}"),
        ("images", f"{r['n_train']} fitted, {r['n_heldout']} held out, {r['n_val']} val, {r['n_classes']} classes"),
        ("seed", str(r["seed"])),
        ("label subset", r["subset"] + ("" if r["subset_file"] is None else f" (ids: {r['subset_file']})")),
        ("time", f"{r['seconds']:.1f} s on {r['device']}"),
        ("store", f"{r['store']} ({r['fingerprint']})"),
        ("ledger", str(r["ledger"])),
    ]:
        table.add_row(name, escape(value))
    out.print(table)
    per_class = r["per_class"]
    if len(per_class) <= 20:
        out.print(
            "val top-1 per class: " + ", ".join(f"{escape(k)} {_pct(v)}" for k, v in per_class.items()), highlight=False
        )
    else:  # the full list is in --json and the ledger
        ranked = sorted((v, k) for k, v in per_class.items() if v is not None)
        out.print("worst classes: " + ", ".join(f"{escape(k)} {_pct(v)}" for v, k in ranked[:5]), highlight=False)


@probe_app.command()
def sweep(
    blocks: Optional[str] = typer.Option(
        None, "--blocks", help="Blocks, e.g. '1-37' or '19,24,30' (default: all held)."
    ),
    t: Optional[str] = typer.Option(None, "--t", help="Timesteps, e.g. '90,150' (default: all held)."),
    pool: Optional[str] = typer.Option(
        None,
        "--pool",
        help="Pool sizes, e.g. '1,2', each capped at the block's map as stored (default: every pool held).",
    ),
    store: Optional[Path] = StoreOpt,
    config: Optional[Path] = ConfigOpt,
    recipe: Optional[str] = RecipeOpt,
    seed: Optional[int] = SeedOpt,
    device: Optional[str] = DeviceOpt,
    label_fraction: Optional[float] = FractionOpt,
    shots: Optional[int] = ShotsOpt,
    subset: Optional[Path] = SubsetOpt,
    ledger: Optional[str] = LedgerOpt,
    workers: int = typer.Option(
        0,
        "--workers",
        min=0,
        help="Spread the cells over a local dask cluster of N worker processes (0: this process).",
    ),
    scheduler: Optional[str] = typer.Option(
        None, "--scheduler", help="Spread the cells over the dask cluster at this address (tcp://host:8786)."
    ),
    views: str = ViewsOpt,
    noise_draws: int = NoiseDrawsOpt,
    as_json: bool = JsonOpt,
):
    """One linear probe per (block, t, pool) the train and val splits hold; heatmaps as PNG.

    Each cell appends a ledger row; cells already in the ledger for the same store, recipe, seed, label subset and settings are skipped, so an interrupted sweep resumes.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from diffprobe.probe import sweep as sw
    from diffprobe.store.console import err

    with user_errors():
        cfg = _config(config, store, ledger, seed=seed, device=device, recipe=recipe)
        lists = [
            None if v is None else parse_int_list(v, flag)
            for v, flag in ((blocks, "--blocks"), (t, "--t"), (pool, "--pool"))
        ]
        spec = _subset(label_fraction, shots, subset)
        bar = Progress(
            TextColumn("[bold]sweep"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("cells"),
            TextColumn("{task.fields[cell]}"),
            TimeRemainingColumn(),
            console=err,
            disable=as_json,
        )
        task = bar.add_task("sweep", total=None, cell="")

        def on_plan(total, done):
            bar.update(task, total=total, completed=done)
            bar.start()

        def on_cell(key, trained):
            if trained:
                bar.update(task, advance=1, cell=f"block {key.block}, t {key.t}, pool {key.pool}")

        try:
            r = sw.run(
                cfg,
                *lists,
                subset=spec,
                on_plan=on_plan,
                on_cell=on_cell,
                workers=workers,
                scheduler=scheduler,
                views=_views(views, noise_draws),
            )
        finally:
            bar.stop()
    if as_json:
        print(json.dumps(r))
        return
    best = r["best"]
    table = Table(title=escape(f"linear-probe sweep ({r['recipe']}): {len(r['cells'])} cells"), show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    for name, value in [
        ("trained", f"{r['trained']} (skipped {r['skipped']} already in the ledger)"),
        ("best val top-1", f"{_pct(best['top1'])} at block {best['block']}, t {best['t']}, pool {best['pool']}"),
        (
            "label subset",
            f"{r['subset']}, {r['n_train']} images fitted"
            + ("" if r["subset_file"] is None else f" (ids: {r['subset_file']})"),
        ),
        ("seed", str(r["seed"])),
        ("time", f"{r['seconds']:.1f} s"),
        ("store", f"{r['store']} ({r['fingerprint']})"),
        ("ledger", r["ledger"]),
    ]:
        table.add_row(name, escape(value))
    out.print(table)
    out.print(f"plots: {escape(str(r['plots']['folder']))}/ ({len(r['plots']['files'])} PNG files)", highlight=False)
    for f in r["plots"]["files"]:
        out.print(f"  {escape(f)}", highlight=False)


def _head_table(r: dict, title: str) -> None:
    """The result of an attention, fusion or feedback head as a table (the rest is in --json)."""
    a = r["architecture"]
    table = Table(title=escape(title), show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    lrs = ", ".join(f"{g['lr']:g}: {_pct(g['heldout_top1'])}" for g in r["grid"])
    for name, value in [
        ("val top-1", _pct(r["top1"])),
        ("val top-5", _pct(r["top5"])),
        ("held-out top-1", f"{_pct(r['heldout_top1'])} (chose lr {r['hyperparameters']['lr']:g}; {lrs})"),
        (
            "head",
            f"D {a['dim']}, {a['depth']} blocks, {a['num_heads']} heads, MLP x{a['mlp_ratio']:g}, "
            f"{a['tokens']} tokens + CLS, {a['parameters']:,} trained parameters",
        ),
        ("images", f"{r['n_train']} fitted, {r['n_heldout']} held out, {r['n_val']} val, {r['n_classes']} classes"),
        ("seed", str(r["seed"])),
        ("label subset", r["subset"] + ("" if r["subset_file"] is None else f" (ids: {r['subset_file']})")),
        ("time", f"{r['seconds']:.1f} s on {r['device']}"),
        ("store", f"{r['store']} ({r['fingerprint']})"),
        ("ledger", str(r["ledger"])),
    ]:
        table.add_row(name, escape(value))
    out.print(table)


HeadPoolOpt = typer.Option(
    None,
    "--pool",
    min=1,
    help="Pool size P: P*P tokens per block, capped at each block's map as stored "
    f"(default: the largest the store holds up to heads.pool, built-in {Config().heads.pool}).",
)


@probe_app.command()
def attention(
    block: int = BlockOpt,
    t: int = TOpt,
    pool: Optional[int] = HeadPoolOpt,
    store: Optional[Path] = StoreOpt,
    config: Optional[Path] = ConfigOpt,
    seed: Optional[int] = SeedOpt,
    device: Optional[str] = DeviceOpt,
    label_fraction: Optional[float] = FractionOpt,
    shots: Optional[int] = ShotsOpt,
    subset: Optional[Path] = SubsetOpt,
    ledger: Optional[str] = LedgerOpt,
    views: str = ViewsOpt,
    noise_draws: int = NoiseDrawsOpt,
    as_json: bool = JsonOpt,
):
    """Train an attention head (LayerNorm + 1x1 projection to tokens, CLS, transformer) on train's cached
    (block, t, pool) map; top-1/top-5 on val.

    Architecture and recipe: [heads] in pipeline.toml. The lr is chosen on the held-out part of train, never on val. One ledger row.
    """
    from diffprobe.probe import attention as att

    with user_errors():
        cfg = _config(config, store, ledger, seed=seed, device=device)
        protocol = _views(views, noise_draws)
        bar, on_step = _train_bar("attention", as_json)
        try:
            r = att.run_attention(
                cfg, block, t, pool, subset=_subset(label_fraction, shots, subset), on_step=on_step, views=protocol
            )
        finally:
            bar.stop()
    if as_json:
        print(json.dumps(r.to_json()))
        return
    _head_table(r, f"attention head: block {r['block']}, t {r['t']}, pool {r['stored_pool']}")


@probe_app.command()
def fusion(
    blocks: Optional[str] = typer.Option(
        None, "--blocks", help=_key("The blocks the head reads.", "heads.fusion_blocks")
    ),
    t: Optional[str] = typer.Option(None, "--t", help=_key("Timesteps.", "heads.fusion_timesteps")),
    pool: Optional[int] = HeadPoolOpt,
    store: Optional[Path] = StoreOpt,
    config: Optional[Path] = ConfigOpt,
    seed: Optional[int] = SeedOpt,
    device: Optional[str] = DeviceOpt,
    label_fraction: Optional[float] = FractionOpt,
    shots: Optional[int] = ShotsOpt,
    subset: Optional[Path] = SubsetOpt,
    ledger: Optional[str] = LedgerOpt,
    views: str = ViewsOpt,
    noise_draws: int = NoiseDrawsOpt,
    as_json: bool = JsonOpt,
):
    """DifFormer: per timestep, the tokens of every block through one shared transformer; the CLS outputs of all
    timesteps into a linear classifier. On cached features; top-1/top-5 on val.

    A (block, t, pool) the store lacks is named with the `extract run` that adds it. One ledger row.
    """
    from diffprobe.probe import attention as att

    with user_errors():
        cfg = _config(config, store, ledger, seed=seed, device=device)
        lists = [None if v is None else parse_int_list(v, flag) for v, flag in ((blocks, "--blocks"), (t, "--t"))]
        protocol = _views(views, noise_draws)
        bar, on_step = _train_bar("DifFormer", as_json)
        try:
            r = att.run_fusion(
                cfg, *lists, pool, subset=_subset(label_fraction, shots, subset), on_step=on_step, views=protocol
            )
        finally:
            bar.stop()
    if as_json:
        print(json.dumps(r.to_json()))
        return
    _head_table(
        r,
        f"DifFormer: blocks {','.join(map(str, r['blocks']))} x t {','.join(map(str, r['timesteps']))}, "
        f"pools {','.join(map(str, r['stored_pools']))}",
    )


@probe_app.command()
def feedback(
    target: Optional[int] = typer.Option(
        None, "--block", min=1, help=_key("The block the head reads (its second-pass output).", "heads.feedback_target")
    ),
    blocks: Optional[str] = typer.Option(
        None, "--feedback-blocks", help=_key("Decoder blocks fed back.", "heads.feedback_blocks")
    ),
    t: Optional[int] = typer.Option(None, "--t", min=0, help=_key("Timestep t.", "heads.feedback_t")),
    pool: Optional[int] = typer.Option(
        None,
        "--pool",
        min=1,
        help=f"Pool size P of the map the head reads, capped at the block's map (default: heads.pool, built-in {Config().heads.pool}).",
    ),
    store: Optional[Path] = typer.Option(
        None, "--store", help=_key("Store path: the ledger is written beside it.", "store.path")
    ),
    config: Optional[Path] = ConfigOpt,
    seed: Optional[int] = SeedOpt,
    device: Optional[str] = DeviceOpt,
    label_fraction: Optional[float] = FractionOpt,
    shots: Optional[int] = ShotsOpt,
    subset: Optional[Path] = SubsetOpt,
    ledger: Optional[str] = LedgerOpt,
    as_json: bool = JsonOpt,
):
    """DifFeed: runs the config's U-Net on its images twice per step (decoder features fed back to their
    skip-connected encoder blocks); trains the feedback layers and an attention head; top-1/top-5 on val.

    Model and images: [model] and [data] as for `extract run`. One ledger row.
    """
    from rich.progress import Progress, TextColumn, TimeElapsedColumn

    from diffprobe.probe import feedback as fb
    from diffprobe.store.console import err

    with user_errors():
        cfg = _config(config, store, ledger, seed=seed, device=device)
        decoder = None if blocks is None else parse_int_list(blocks, "--feedback-blocks")
        spec = _subset(label_fraction, shots, subset)
        bar = Progress(
            TextColumn("[bold]DifFeed"),
            TextColumn("{task.completed} steps"),
            TimeElapsedColumn(),
            console=err,
            disable=as_json,
        )
        task = bar.add_task("feedback", total=None)

        def on_step(n):
            if n == 1:
                bar.start()  # not before: an error in the setup prints one line only
            bar.update(task, completed=n)

        try:
            r = fb.run(cfg, decoder, target, t, pool, subset=spec, on_step=on_step)
        finally:
            bar.stop()
    if as_json:
        print(json.dumps(r.to_json()))
        return
    pairs = ", ".join(f"{d}->{e}" for d, e in r["pairs"].items())
    _head_table(r, f"DifFeed: feedback {pairs}; block {r['target']}, t {r['t']}, pool {r['stored_pool']}")


def probe_main():
    probe_app(prog_name="probe")
