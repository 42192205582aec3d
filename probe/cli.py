"""`probe`: heads on features cached by `extract run`.

    probe linear --block 24 --t 90                  # the paper's linear probe, pool 2, recipe sgd
    probe linear --block 19 --t 150 --recipe lbfgs --json
    probe linear --block 24 --t 90 --label-fraction 0.01   # or --shots 5, --subset 1percent.txt
    probe sweep                                     # every (block, t, pool) held; heatmaps
    probe sweep --blocks 19-30 --t 90,150 --pool 2 --shots 10 --json
    probe sweep --workers 2                         # cells spread over a local dask cluster
    probe knn --block 24 --t 90 [--k 10,20,100,200]  # DINOv2's kNN classifier; one ledger row per k
    probe sweep --head knn                          # the kNN classifier in every cell
    probe attention --block 24 --t 150 [--pool 16]    # attention head on the stored P x P map
    probe fusion --blocks 19,24,30 --t 90,150,300     # DifFormer over blocks x timesteps
    probe feedback [--block 24 --feedback-blocks 21,24,27,30,33,36 --t 150]   # DifFeed, runs the U-Net
    probe segment --blocks 24 --t 150 [--pool 8] [--eval-size 32]    # dense linear head on a store with masks
    probe sweep --head segment                      # block x t heatmaps of val mIoU

A thin typer layer over probe.linear, probe.knn, probe.sweep, probe.attention and probe.feedback; errors a user can fix print one line and exit with
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
from diffprobe.store.console import OneLineErrors, stopping, user_errors
from diffprobe.store.errors import ConfigError
from diffprobe.store.ranges import parse_int_list

probe_app = typer.Typer(
    cls=OneLineErrors,
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
LedgerOpt = typer.Option(None, "--ledger", help=_key("Results ledger CSV; relative: beside the store.", "probe.ledger"))
DeviceOpt = typer.Option(None, "--device", help=_key("auto, cpu, cuda, cuda:N, mps.", "probe.device"))
JsonOpt = typer.Option(False, "--json", help="Print one JSON object on stdout instead of tables.")
BlockOpt = typer.Option(..., "--block", help="The block the head reads (1-based, as in `extract blocks`).")
TOpt = typer.Option(..., "--t", min=0, help="Timestep t.")
OutOpt = typer.Option(
    None, "--out", help="Folder for the pictures (default: beside the ledger); checked writable before training."
)
NoPlotsOpt = typer.Option(False, "--no-plots", help="Write no pictures.")


def _config(config, store, ledger, *, seed=None, device=None, recipe=None, **probe):
    """The config of a probe command: pipeline.toml (or ``--config``) with the command's overrides
    (``probe``: more ``probe.*`` keys)."""
    return load_config(
        config,
        {
            "store.path": str(store) if store else None,
            "probe.recipe": recipe,
            "probe.seed": seed,
            "probe.device": device,
            "probe.ledger": ledger,
            **{f"probe.{key}": v for key, v in probe.items()},
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


ProbePoolOpt = typer.Option(
    None, "--pool", min=1, help=_key("Pool size p, capped at the block's map as stored.", "probe.pool")
)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


@probe_app.command()
def linear(
    block: int = BlockOpt,
    t: int = TOpt,
    pool: Optional[int] = ProbePoolOpt,
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
        cfg = _config(config, store, ledger, seed=seed, device=device, recipe=recipe, pool=pool)
        r = lin.run(
            cfg,
            block,
            t,
            cfg.probe.pool,
            subset=_subset(label_fraction, shots, subset),
            views=_views(views, noise_draws),
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
def knn(
    block: int = BlockOpt,
    t: int = TOpt,
    pool: Optional[int] = ProbePoolOpt,
    k: Optional[str] = typer.Option(
        None, "--k", help=_key("Numbers of neighbours, e.g. '10,20,100,200'.", "probe.knn_k")
    ),
    temperature: Optional[float] = typer.Option(
        None, "--temperature", help=_key("T of the exp(similarity / T) votes.", "probe.knn_temperature")
    ),
    weighting: Optional[str] = typer.Option(None, "--weighting", help=_key("exp or uniform.", "probe.knn_weighting")),
    metric: Optional[str] = typer.Option(None, "--metric", help=_key("cosine or l2.", "probe.knn_metric")),
    store: Optional[Path] = StoreOpt,
    config: Optional[Path] = ConfigOpt,
    seed: Optional[int] = SeedOpt,
    device: Optional[str] = DeviceOpt,
    label_fraction: Optional[float] = FractionOpt,
    shots: Optional[int] = ShotsOpt,
    subset: Optional[Path] = SubsetOpt,
    ledger: Optional[str] = LedgerOpt,
    as_json: bool = JsonOpt,
):
    """kNN classifier (DINOv2's) on train's cached (block, t, pool) features; top-1/top-5 on val for each k.

    No training: the fitted part of train is the database; the held-out part scores each k. One ledger row per k.
    """
    from diffprobe.probe import knn as kn

    with user_errors():
        cfg = _config(
            config,
            store,
            ledger,
            seed=seed,
            device=device,
            knn_k=k,
            knn_temperature=temperature,
            knn_weighting=weighting,
            knn_metric=metric,
            pool=pool,
        )
        r = kn.run(cfg, block, t, cfg.probe.pool, subset=_subset(label_fraction, shots, subset))
    if as_json:
        print(json.dumps(r))
        return
    hp = r["hyperparameters"]
    votes = f"exp(sim / {hp['temperature']:g})" if hp["weighting"] == "exp" else "uniform"
    table = Table(
        title=escape(f"kNN probe ({hp['metric']}, {votes}): block {r['block']}, t {r['t']}, pool {r['pool']}")
    )
    for col in ("k", "held-out top-1", "val top-1", "val top-5"):
        table.add_column(col, justify="right")
    for x in r["per_k"]:
        mark = " *" if x["hyperparameters"]["k"] == hp["k"] else ""
        table.add_row(f"{x['hyperparameters']['k']}{mark}", _pct(x["heldout_top1"]), _pct(x["top1"]), _pct(x["top5"]))
    out.print(table)
    pool_note = "" if r["stored_pool"] == r["pool"] else f" (stored at pool {r['stored_pool']})"
    for name, value in [
        ("chosen", f"k {hp['k']} (*: best held-out top-1)"),
        ("features", f"{r['dim']} per image{pool_note}"),
        (
            "images",
            f"{r['n_train']} in the database, {r['n_heldout']} held out, {r['n_val']} val, {r['n_classes']} classes",
        ),
        ("label subset", r["subset"] + ("" if r["subset_file"] is None else f" (ids: {r['subset_file']})")),
        ("time", f"{r['seconds']:.1f} s on {r['device']}" + (", streamed" if r["streamed"] else "")),
        ("store", f"{r['store']} ({r['fingerprint']})"),
        ("ledger", f"{r['ledger']} ({len(r['per_k'])} rows)"),
    ]:
        out.print(f"{name}: {escape(value)}", highlight=False)


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
    head: str = typer.Option(
        "linear",
        "--head",
        help="linear; knn (the kNN classifier; probe.knn_* keys); or segment (the dense head per (block, t); "
        "see `probe segment`).",
    ),
    k: Optional[str] = typer.Option(None, "--k", help=_key("--head knn: numbers of neighbours.", "probe.knn_k")),
    views: str = ViewsOpt,
    noise_draws: int = NoiseDrawsOpt,
    out_dir: Optional[Path] = OutOpt,
    no_plots: bool = NoPlotsOpt,
    as_json: bool = JsonOpt,
):
    """One linear probe (or kNN classifier, --head knn) per (block, t, pool) the train and val splits hold; heatmaps as PNG.

    Each cell appends a ledger row; cells already in the ledger for the same store, recipe, seed, label subset and settings are skipped, so an interrupted sweep resumes.
    With --head segment: one dense head per (block, t) of a store with masks, heatmaps of val mIoU.
    """
    if head == "segment":
        linear_only = {
            "--recipe": recipe,
            "--label-fraction": label_fraction,
            "--shots": shots,
            "--subset": subset,
            "--workers": workers or None,
            "--scheduler": scheduler,
            "--k": k,
            "--views": None if views == "1" else views,
            "--noise-draws": None if noise_draws == 1 else noise_draws,
        }
        return _segment_sweep(
            blocks, t, pool, store, config, seed, device, ledger, as_json, linear_only, out_dir, no_plots
        )

    from diffprobe.probe import sweep as sw

    with user_errors():
        cfg = _config(config, store, ledger, seed=seed, device=device, recipe=recipe, knn_k=k)
        lists = [
            None if v is None else parse_int_list(v, flag)
            for v, flag in ((blocks, "--blocks"), (t, "--t"), (pool, "--pool"))
        ]
        spec = _subset(label_fraction, shots, subset)
        bar, on_plan, on_cell = _sweep_bar(as_json, lambda key: f"block {key.block}, t {key.t}, pool {key.pool}")
        with stopping(bar):
            r = sw.run(
                cfg,
                *lists,
                subset=spec,
                on_plan=on_plan,
                on_cell=on_cell,
                workers=workers,
                scheduler=scheduler,
                head=head,
                views=_views(views, noise_draws),
                plots=not no_plots,
                out_dir=out_dir,
            )
    if as_json:
        print(json.dumps(r))
        return
    best = r["best"]
    what = "kNN sweep" if head == "knn" else f"linear-probe sweep ({r['recipe']})"
    table = Table(title=escape(f"{what}: {r['trained'] + r['skipped']} cells"), show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    for name, value in [
        ("trained", f"{r['trained']} (skipped {r['skipped']} already in the ledger)"),
        (
            "best val top-1",
            f"{_pct(best['top1'])} at block {best['block']}, t {best['t']}, pool {best['pool']}"
            + (f", k {best['k']}" if "k" in best else ""),
        ),
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
    _plots_line(r)
    for f in r["plots"]["files"]:
        out.print(f"  {escape(f)}", highlight=False)


def _plots_line(r: dict) -> None:
    folder = r["plots"]["folder"]
    if folder is None:
        out.print("plots: none (--no-plots)", highlight=False)
    else:
        out.print(f"plots: {escape(folder)}/ ({len(r['plots']['files'])} PNG files)", highlight=False)


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
        with stopping(bar):
            r = att.run_attention(
                cfg, block, t, pool, subset=_subset(label_fraction, shots, subset), on_step=on_step, views=protocol
            )
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
        with stopping(bar):
            r = att.run_fusion(
                cfg, *lists, pool, subset=_subset(label_fraction, shots, subset), on_step=on_step, views=protocol
            )
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
        None, "--block", help=_key("The block the head reads (its second-pass output).", "heads.feedback_target")
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

        with stopping(bar):
            r = fb.run(cfg, decoder, target, t, pool, subset=spec, on_step=on_step)
    if as_json:
        print(json.dumps(r.to_json()))
        return
    pairs = ", ".join(f"{d}->{e}" for d, e in r["pairs"].items())
    _head_table(r, f"DifFeed: feedback {pairs}; block {r['target']}, t {r['t']}, pool {r['stored_pool']}")


@probe_app.command()
def segment(
    blocks: str = typer.Option(..., "--blocks", "--block", help="Blocks, e.g. '24' or '19,24,30' (hypercolumns)."),
    t: str = typer.Option(..., "--t", help="Timesteps, e.g. '150' (every block at every t)."),
    pool: Optional[int] = typer.Option(
        None, "--pool", min=1, help="Pool P of the maps (segment.pool; default: the largest held for every block)."
    ),
    eval_size: Optional[int] = typer.Option(
        None, "--eval-size", min=1, help="Side of the masks scored (segment.eval_size; default: the stored masks')."
    ),
    store: Optional[Path] = StoreOpt,
    config: Optional[Path] = ConfigOpt,
    seed: Optional[int] = SeedOpt,
    device: Optional[str] = DeviceOpt,
    ledger: Optional[str] = LedgerOpt,
    out_dir: Optional[Path] = OutOpt,
    no_plots: bool = NoPlotsOpt,
    as_json: bool = JsonOpt,
):
    """Dense linear probe (DINOv2's BatchNorm + 1x1 conv head) on cached block maps of a store with masks;
    mIoU, per-class IoU and pixel accuracy on val.

    The lr is chosen on the held-out part of train. One ledger row (head segment: top1 = mIoU, top5 = pixel
    accuracy) and a PNG of val images with ground truth and prediction. Settings: [segment] in pipeline.toml.
    """
    from diffprobe.probe import segment as seg

    with user_errors():
        cfg = _config(config, store, ledger, seed=seed, device=device)
        cells = parse_int_list(blocks, "--blocks"), parse_int_list(t, "--t")
        r = seg.run(cfg, *cells, pool, eval_size, picture=not no_plots, out_dir=out_dir)
    if as_json:
        print(json.dumps(r.to_json()))
        return
    hp = r["hyperparameters"]
    table = Table(
        title=escape(
            f"dense probe ({r['recipe']}): blocks {','.join(map(str, r['blocks']))}, t "
            f"{','.join(map(str, sorted(set(r['timesteps']))))}, pool {r['pool']}"
        ),
        show_header=False,
    )
    table.add_column("", style="bold")
    table.add_column("")
    lrs = ", ".join(f"{g['lr']:g}: {_pct(g['heldout_miou'])}" for g in r["grid"])
    for name, value in [
        ("val mIoU", f"{_pct(r['miou'])} at {r['eval_size']}x{r['eval_size']} (masks stored at {r['mask_size']})"),
        ("val pixel accuracy", _pct(r["pixel_accuracy"])),
        ("held-out mIoU", f"{_pct(r['heldout_miou'])} (chose lr {hp['lr']:g}; {lrs})"),
        ("features", f"{r['dim']} channels at {r['map_size']}x{r['map_size']} (pools {r['stored_pools']})"),
        ("images", f"{r['n_train']} fitted, {r['n_heldout']} held out, {r['n_val']} val, {r['n_classes']} classes"),
        ("seed", str(r["seed"])),
        ("time", f"{r['seconds']:.1f} s on {r['device']}" + (" (streamed)" if r["streamed"] else "")),
        ("store", f"{r['store']} ({r['fingerprint']})"),
        ("picture", str(r["picture"])),
        ("ledger", str(r["ledger"])),
    ]:
        table.add_row(name, escape(value))
    out.print(table)
    out.print(
        "val IoU per class: " + ", ".join(f"{escape(k)} {_pct(v)}" for k, v in list(r["per_class_iou"].items())[:40]),
        highlight=False,
    )


def _sweep_bar(as_json: bool, name_cell):
    """A sweep's progress bar on stderr, cells done of the plan, shown once the plan is made:
    (bar, on_plan(total, done), on_cell(key, trained)); ``name_cell(key)`` names the cell
    trained last."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from diffprobe.store.console import err

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
            bar.update(task, advance=1, cell=name_cell(key))

    return bar, on_plan, on_cell


def _segment_sweep(blocks, t, pool, store, config, seed, device, ledger, as_json, linear_only, out_dir, no_plots):
    """`probe sweep --head segment`: one dense head per (block, t) held; heatmaps of val mIoU."""
    from diffprobe.probe import segment as seg
    from diffprobe.store.errors import ConfigError

    with user_errors():
        for flag, value in linear_only.items():
            if value is not None:
                raise ConfigError(f"{flag}: not used by the dense sweep (--head segment); its settings: [segment]")
        cfg = _config(config, store, ledger, seed=seed, device=device)
        pools = None if pool is None else parse_int_list(pool, "--pool")
        if pools is not None and len(pools) != 1:
            raise ConfigError(f"--pool: the dense sweep takes one pool (each block at most it), got {pool!r}")
        lists = [None if v is None else parse_int_list(v, flag) for v, flag in ((blocks, "--blocks"), (t, "--t"))]
        bar, on_plan, on_cell = _sweep_bar(as_json, lambda key: f"block {key[0]}, t {key[1]}")
        with stopping(bar):
            r = seg.sweep_run(
                cfg,
                *lists,
                pools[0] if pools else None,
                plots=not no_plots,
                on_plan=on_plan,
                on_cell=on_cell,
                out_dir=out_dir,
            )
    if as_json:
        print(json.dumps(r))
        return
    best = r["best"]
    out.print(
        f"dense sweep: {len(r['cells'])} cells ({r['trained']} trained, {r['skipped']} already in the ledger) in "
        f"{r['seconds']:.1f} s; best val mIoU {_pct(best['miou'])} at block {best['block']}, t {best['t']}, "
        f"pool {best['pool']}",
        highlight=False,
    )
    _plots_line(r)
    out.print(f"ledger: {escape(r['ledger'])}", highlight=False)


def probe_main():
    probe_app(prog_name="probe")
