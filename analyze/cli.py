"""`analyze`: analyses of features cached by `extract run`.

    analyze cka --t 90                          # block x block CKA at t 90 (every block held)
    analyze cka --block 24                      # t x t CKA at block 24
    analyze cka --t 90 --against other.zarr     # this store's blocks x the other's, same images
    analyze cka --t 90 --estimator linear-unbiased --bootstrap 200 --permutations 20 --json
    analyze align --t 90 [--metric cknna] [--k 10]   # kNN alignment, the same modes and outputs

A thin typer layer over analyze.cka and analyze.align; errors a user can fix print one line and exit with code 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from diffprobe.store.config import load_config
from diffprobe.store.console import OneLineErrors, user_errors
from diffprobe.store.ranges import parse_int_list

analyze_app = typer.Typer(
    cls=OneLineErrors,
    help="Analyse cached features: `analyze cka` compares representations (block x block at one t, "
    "t x t at one block, or two stores' blocks) by centered kernel alignment; `analyze align` by "
    "kNN alignment (mutual-knn, cknna).",
    add_completion=False,
)
out = Console()


@analyze_app.callback(invoke_without_command=True)
def _analyze(ctx: typer.Context):
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())


# options shared by `analyze cka` and `analyze align`
TOpt = typer.Option(
    None,
    "--t",
    help="Timestep: one for block x block (--t 90); with --block, the timesteps of the t x t matrix (default: all held).",
)
BlockOpt = typer.Option(None, "--block", min=1, help="t x t matrix at this block.")
BlocksOpt = typer.Option(
    None, "--blocks", help="Blocks of a block x block matrix, e.g. '1-37' or '19,24,30' (default: all held)."
)
AgainstOpt = typer.Option(None, "--against", help="Another store: this store's blocks x its blocks on the same images.")
PoolOpt = typer.Option(
    None, "--pool", min=1, help="Stored pool size (default: analyze.pool, built-in 0 = the smallest held)."
)
SplitOpt = typer.Option(None, "--split", help="Split to read (analyze.split).")
BootstrapOpt = typer.Option(
    None,
    "--bootstrap",
    min=0,
    help="Bootstrap replicates (half-samples of the images) for 95% intervals (analyze.bootstrap).",
)
PermutationsOpt = typer.Option(
    None, "--permutations", min=0, help="Shuffled-pairing baseline replicates (analyze.permutations)."
)
SeedOpt = typer.Option(None, "--seed", min=0, help="Seed of bootstrap, permutations, minibatches (analyze.seed).")
StoreOpt = typer.Option(None, "--store", help="Store path (overrides store.path).")
ConfigOpt = typer.Option(
    None, "--config", help="pipeline.toml to use (default: ./pipeline.toml, else built-in defaults)."
)
OutOpt = typer.Option(
    None, "--out", help="Folder for the heatmap and CSVs (default: <analysis>-<store fingerprint>/ beside the store)."
)
NoPlotsOpt = typer.Option(False, "--no-plots", help="Write no heatmap or CSV; print the summary only.")
JsonOpt = typer.Option(False, "--json", help="Print one JSON object on stdout instead of tables.")


def _config(config, store, split, bootstrap, permutations, seed, **analyze) -> object:
    """The config with the flags shared by `analyze cka` and `analyze align` (and ``analyze``: more analyze.* keys)."""
    common = {"split": split, "bootstrap": bootstrap, "permutations": permutations, "seed": seed, **analyze}
    return load_config(
        config, {"store.path": str(store) if store else None, **{f"analyze.{k}": v for k, v in common.items()}}
    )


@analyze_app.command()
def cka(
    t: Optional[str] = TOpt,
    block: Optional[int] = BlockOpt,
    blocks: Optional[str] = BlocksOpt,
    against: Optional[Path] = AgainstOpt,
    pool: Optional[int] = PoolOpt,
    split: Optional[str] = SplitOpt,
    estimator: Optional[str] = typer.Option(
        None, "--estimator", help="linear, linear-unbiased, rbf, rbf-unbiased or minibatch (analyze.estimator)."
    ),
    bootstrap: Optional[int] = BootstrapOpt,
    permutations: Optional[int] = PermutationsOpt,
    seed: Optional[int] = SeedOpt,
    store: Optional[Path] = StoreOpt,
    config: Optional[Path] = ConfigOpt,
    out_dir: Optional[Path] = OutOpt,
    no_plots: bool = NoPlotsOpt,
    as_json: bool = JsonOpt,
):
    """CKA matrix between cached representations: heatmap PNG and CSV beside the store (or --out), summary printed.

    Each stored array is read once per matrix, in chunks; memory is bounded by analyze.memory_mb (never N x N for the linear estimators in feature space).
    """
    from diffprobe.analyze import cka as ck

    with user_errors():
        cfg = _config(config, store, split, bootstrap, permutations, seed, estimator=estimator)
        r = _matrix("cka", ck.run, cfg, t, block, blocks, against, pool, out_dir, not no_plots, as_json)
    _report(r, f"CKA ({r['estimator']})", f"{r['form']} form, each array read {r['reads']}x", as_json)


def _matrix(name: str, run, cfg, t, block, blocks, against, pool, out_dir, plots: bool, quiet: bool) -> dict:
    """``run`` (`analyze.cka.run`, `analyze.align.run`) on the parsed cell flags, under a progress
    bar; --blocks with --block refused."""
    from diffprobe.analyze.cka import CkaError

    ts = None if t is None else parse_int_list(t, "--t")
    bl = None if blocks is None else parse_int_list(blocks, "--blocks")
    if block is not None and bl is not None:
        raise CkaError("--blocks: not with --block (a t x t matrix is of one block)")
    return _with_bar(
        name,
        quiet,
        lambda bar: run(
            cfg, t=ts, block=block, blocks=bl, against=against, pool=pool, out_dir=out_dir, plots=plots, on_progress=bar
        ),
    )


def _with_bar(name: str, quiet: bool, work):
    """``work(on_progress)`` under a progress bar on stderr (none with ``quiet``), started at the first report."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from diffprobe.store.console import err, stopping

    bar = Progress(
        TextColumn(f"[bold]{name}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeRemainingColumn(),
        console=err,
        disable=quiet,
        transient=True,
    )
    task = bar.add_task(name, total=None)

    def on_progress(done, total):
        if not bar.live.is_started:
            bar.start()
        bar.update(task, completed=done, total=total)

    with stopping(bar):
        return work(on_progress)


def _report(r: dict, what_name: str, how: str, as_json: bool) -> None:
    """A matrix result (`analyze cka` or `analyze align`): warnings, then --json or a summary table."""
    from diffprobe.analyze import cka as ck
    from diffprobe.store.console import err

    for w in r["warnings"]:
        err.print(f"[yellow]warning:[/yellow] {escape(w)}", highlight=False)
    if as_json:
        print(json.dumps(r))
        return
    s = ck.summary(r)
    where = f"block {r['block']}" if r["mode"] == "timesteps" else f"t {r['t']}"
    what = {"blocks": "block x block", "timesteps": "t x t", "against": "block x block across stores"}[r["mode"]]
    table = Table(title=escape(f"{what_name}: {what} at {where}, {r['pool_read']}"), show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    pair = "pair" if r["mode"] != "against" else "cell"

    def cells(cs):
        return ", ".join(f"{a}/{b} {v:.3f}" for v, a, b in cs)

    rows = [
        ("store", r["store"] + ("" if r["against"] is None else f"  vs  {r['against']}")),
        ("images", f"{r['n_images']} of split {r['split']!r}"),
        ("matrix", f"{len(r['rows'])} x {len(r['cols'])} ({how})"),
        (f"mean off-diagonal {pair}" if r["mode"] != "against" else "mean cell", f"{s['mean']:.3f}"),
        ("most similar", cells(s["highest"])),
        ("least similar", cells(s["lowest"])),
    ]
    if "ci_low" in r:
        import numpy as np

        width = np.asarray(r["ci_high"]) - np.asarray(r["ci_low"])
        rows.append(("95% bootstrap CI", f"{r['bootstrap']} resamples; median width {float(np.median(width)):.3f}"))
    if "perm_mean" in r:
        import numpy as np

        rows.append(
            (
                "permutation baseline",
                f"{r['permutations']} shuffles; mean {float(np.mean(r['perm_mean'])):.3f}, "
                f"largest 95th percentile {float(np.max(r['perm_high'])):.3f}",
            )
        )
    rows.append(("time", f"{r['seconds']:.1f} s"))
    for name, value in rows:
        table.add_row(name, escape(value))
    out.print(table)
    if r["folder"] is not None:
        out.print(f"heatmap and CSV: {escape(str(r['folder']))}/", highlight=False)
    for f in r["files"]:
        out.print(f"  {escape(f)}", highlight=False)


@analyze_app.command()
def align(
    t: Optional[str] = TOpt,
    block: Optional[int] = BlockOpt,
    blocks: Optional[str] = BlocksOpt,
    against: Optional[Path] = AgainstOpt,
    pool: Optional[int] = PoolOpt,
    split: Optional[str] = SplitOpt,
    metric: Optional[str] = typer.Option(None, "--metric", help="mutual-knn or cknna (analyze.knn_metric)."),
    k: Optional[int] = typer.Option(None, "--k", help="Nearest neighbours k (analyze.knn_k)."),
    bootstrap: Optional[int] = BootstrapOpt,
    permutations: Optional[int] = PermutationsOpt,
    seed: Optional[int] = SeedOpt,
    store: Optional[Path] = StoreOpt,
    config: Optional[Path] = ConfigOpt,
    out_dir: Optional[Path] = OutOpt,
    no_plots: bool = NoPlotsOpt,
    as_json: bool = JsonOpt,
):
    """kNN alignment matrix (mutual-knn or cknna, Huh et al. 2024) between cached representations: heatmap
    PNG and CSV beside the store (or --out), summary printed.

    Exact kNN on L2-normalised features, in (query x database) blocks bounded by analyze.memory_mb.
    """
    from diffprobe.analyze import align as al

    with user_errors():
        cfg = _config(config, store, split, bootstrap, permutations, seed, knn_metric=metric, knn_k=k)
        r = _matrix("align", al.run, cfg, t, block, blocks, against, pool, out_dir, not no_plots, as_json)
    _report(r, f"{r['metric']} (k {r['k']})", f"exact kNN, each array read {r['reads']}x", as_json)


def analyze_main():
    analyze_app(prog_name="analyze")
