"""`probe` and `analyze`: heads and analyses on features cached by `extract run`.

    probe linear --block 24 --t 90                  # the paper's linear probe, pool 2, recipe sgd
    probe linear --block 19 --t 150 --recipe lbfgs --json
    analyze --help                                  # CKA: a later issue

A thin typer layer over probe.linear; errors a user can fix print one line and exit with
code 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from extract.cli import user_errors  # the one way CLIs report a user's mistake
from store.config import load_config

probe_app = typer.Typer(
    help="Train heads on features cached by `extract run` (linear now; attention, DifFormer, DifFeed later).",
    add_completion=False,
)
analyze_app = typer.Typer(
    help="Analyse cached features (CKA across blocks, timesteps and models). "
         "No commands yet: `analyze cka` is a later issue.",
    add_completion=False,
)
out = Console()


@probe_app.callback(invoke_without_command=True)
def _probe(ctx: typer.Context):
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())


@analyze_app.callback(invoke_without_command=True)
def _analyze(ctx: typer.Context):
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


@probe_app.command()
def linear(
    block: int = typer.Option(..., "--block", min=1, help="Block number (1-based, as in `extract blocks`)."),
    t: int = typer.Option(..., "--t", min=0, help="Timestep t."),
    pool: int = typer.Option(2, "--pool", min=1, help="Pool size p (capped at the block's map, as stored)."),
    store: Optional[Path] = typer.Option(None, "--store", help="Store path (overrides store.path)."),
    config: Optional[Path] = typer.Option(
        None, "--config", help="pipeline.toml to use (default: ./pipeline.toml, else built-in defaults)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="sgd or lbfgs (probe.recipe)."),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help="Seed of held-out part, init, batches (probe.seed)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N, mps (probe.device)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout instead of tables."),
):
    """Train a linear classifier on train's cached (block, t, pool) features; top-1/top-5 on val.

    Hyperparameters are chosen on a seeded held-out part of train, never on val. One row is appended to the results ledger beside the store (probe.ledger).
    """
    from probe import linear as lin

    with user_errors():
        cfg = load_config(config, {"store.path": str(store) if store else None, "probe.recipe": recipe,
                                   "probe.seed": seed, "probe.device": device})
        r = lin.run(cfg, block, t, pool)
    if as_json:
        print(json.dumps(r))
        return
    title = f"linear probe ({r['recipe']}): block {r['block']}, t {r['t']}, pool {r['pool']}"
    table = Table(title=escape(title), show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    pool_note = "" if r["stored_pool"] == r["pool"] else f" (stored at pool {r['stored_pool']})"
    hp = ", ".join(f"{k} {v:g}" for k, v in r["hyperparameters"].items())
    for name, value in [
        ("val top-1", _pct(r["top1"])), ("val top-5", _pct(r["top5"])),
        ("held-out top-1", f"{_pct(r['heldout_top1'])} (chose {hp} from {len(r['grid'])})"),
        ("features", f"{r['dim']} per image{pool_note}"),
        ("images", f"{r['n_train']} fitted, {r['n_heldout']} held out, {r['n_val']} val, {r['n_classes']} classes"),
        ("seed", str(r["seed"])), ("time", f"{r['seconds']:.1f} s on {r['device']}"),
        ("store", f"{r['store']} ({r['fingerprint']})"), ("ledger", str(r["ledger"])),
    ]:
        table.add_row(name, escape(value))
    out.print(table)
    per_class = r["per_class"]
    if len(per_class) <= 20:
        out.print("val top-1 per class: " + ", ".join(f"{escape(k)} {_pct(v)}" for k, v in per_class.items()),
                  highlight=False)
    else:  # the full list is in --json and the ledger
        ranked = sorted((v, k) for k, v in per_class.items() if v is not None)
        out.print("worst classes: " + ", ".join(f"{escape(k)} {_pct(v)}" for v, k in ranked[:5]), highlight=False)


def probe_main():
    probe_app(prog_name="probe")


def analyze_main():
    analyze_app(prog_name="analyze")
