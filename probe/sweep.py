"""`probe sweep`: one linear probe (or, ``--head knn``, kNN classifier: `probe.knn.sweep_run`) per
(block, t, pool) the store holds, resumable, with heatmaps.

    from diffprobe.probe.sweep import plan, sweep, run
    cells = plan(store, blocks=(19, 24), ts=None, pools=(2,))      # None: everything held
    out = sweep(store, cells, recipe="sgd", ledger=path)          # trains what the ledger lacks
    out = run(cfg, blocks=None, ts=None, pools=None)               # `probe sweep`: + ledger, plots

A cell is a stored feature array (`FeatureKey`): asking for pool 2 of a block whose map is
1x1 is the pool-1 array, trained once. With ``sgd``, cells of the same width that fit
``probe.memory_mb`` together train in one pass (`probe.linear.linear_probes`; the same heads
as one at a time). Every cell trained appends its row to the ledger (probe/ledger.py) as
soon as its pass is done, so a sweep that is stopped loses at most one pass;
the next one skips the cells whose row is already there for the same store fingerprint,
recipe, seed, label subset (``subset`` and ``subset_sha``) and training settings
(``settings``: `probe.linear.settings_hash`). The held-out and label-subset selection is made
once per sweep (`probe.protocol.select`) and each feature set is read once per split.

Plots (probe/plots.py) go to ``--out DIR``, else to ``sweep-<fingerprint>-<recipe>-<run>/`` beside
the ledger, ``<run>`` being 8 hex digits over (seed, subset_sha, settings), so sweeps with
other settings do not overwrite each other; they show the cells of this sweep, trained or
found. The folder is checked writable before anything trains.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Callable
from pathlib import Path

import torch

from diffprobe.probe import linear as lin
from diffprobe.probe.command import prepare
from diffprobe.probe.data import Views
from diffprobe.probe.ledger import append_row, read_rows
from diffprobe.probe.protocol import Selection, select
from diffprobe.store.choices import Head
from diffprobe.store.config import Config, ProbeConfig
from diffprobe.store.errors import ConfigError, StoreError
from diffprobe.store.feature_store import FeatureKey, FeatureStore, check_block
from diffprobe.store.files import check_writable
from diffprobe.store.hooks import sigkill_hook


def held_keys(store: FeatureStore) -> set[FeatureKey]:
    """Feature arrays complete in both train and val."""
    for split in ("train", "val"):
        if split not in store.splits:
            raise StoreError(
                f"{store.path}: no split {split!r}; a sweep needs 'train' and 'val' and the store "
                f"holds {', '.join(store.splits)}"
            )
    held = set(store.keys("train")) & set(store.keys("val"))
    if not held:
        raise StoreError(
            f"{store.path}: no feature array is complete in both train and val "
            f"(train holds {store.describe_holdings('train')})"
        )
    return held


def plan(store: FeatureStore, blocks=None, ts=None, pools=None) -> tuple[list[FeatureKey], list[dict]]:
    """The cells to probe and the requested grid.

    ``blocks``, ``ts``, ``pools``: what to sweep (None: every value the store holds complete in
    train and val). Returns (cells, grid): the distinct stored arrays, and one entry
    ``{"block", "t", "pool", "key"}`` per requested (block, t, pool), for the plots.
    Combinations a ragged store lacks are left out where a dimension was left to its default;
    a cell asked for in all three, or a value asked for that gives no cell at all, that the
    store does not hold is an error naming what it holds.
    """
    for b in blocks or ():
        check_block(store, b, "--blocks")  # a block the model lacks: names the model's blocks
    held = held_keys(store)
    asked = {"block": blocks, "t": ts, "pool": pools}
    every = all(v is not None for v in asked.values())
    blocks = sorted(blocks) if blocks is not None else sorted({k.block for k in held})
    ts = sorted(ts) if ts is not None else sorted({k.t for k in held})
    pools = sorted(pools) if pools is not None else sorted({k.pool for k in held})
    grid, cells = [], {}
    for b, t, p in itertools.product(blocks, ts, pools):
        key = store.stored_key(b, t, p)
        if key not in held:
            if every:  # exactly this cell was asked for
                _missing(store, key, f"block {b}, t {t}, pool {p}")
            continue  # a value left to default: only the combinations held
        grid.append({"block": b, "t": t, "pool": p, "key": key})
        cells[key] = None
    for dim, values in asked.items():  # a value asked for must give at least one cell
        for v in values or ():
            if not any(g[dim] == v for g in grid):
                _missing(store, None, f"{dim} {v}")
    return sorted(cells), grid


def _missing(store: FeatureStore, key: FeatureKey | None, what: str):
    where = "train and val" if key is None or key not in set(store.keys("train")) else "val"
    raise StoreError(
        f"{store.path}: no complete features for {what} in {where}; it holds {store.describe_holdings('train')}"
    )


def _cell_of(row: dict) -> FeatureKey:
    return FeatureKey(row["t"], row["block"], row["stored_pool"])


def done_cells(
    ledger: Path | None, fingerprint: str, recipe: str, seed: int, sel: Selection, settings: str
) -> dict[FeatureKey, dict]:
    """Ledger rows of the same store, recipe, seed, subset and settings, by cell (the last one wins)."""
    if ledger is None:
        return {}
    same = {
        "fingerprint": fingerprint,
        "recipe": recipe,
        "seed": seed,
        "subset": sel.subset,
        "subset_sha": sel.subset_sha,
        "settings": settings,
    }
    return {
        _cell_of(r): r
        for r in read_rows(ledger)
        if r.get("head", "linear") == "linear" and all(r[k] == v for k, v in same.items())
    }


def _summary(r: dict, trained: bool) -> dict:
    return {
        "block": r["block"],
        "t": r["t"],
        "pool": r["stored_pool"],
        "top1": r["top1"],
        "top5": r["top5"],
        "heldout_top1": r["heldout_top1"],
        "hyperparameters": r["hyperparameters"],
        "seconds": r["seconds"],
        "trained": trained,
    }


def sweep(
    store: FeatureStore,
    cells: list[FeatureKey],
    recipe: str = "sgd",
    seed: int = 0,
    settings: ProbeConfig | None = None,
    device: str | torch.device = "cpu",
    subset: str = "all",
    ledger: str | Path | None = None,
    on_cell: Callable[[FeatureKey, bool], None] | None = None,
    selection: Selection | None = None,
    workers: int = 0,
    scheduler: str | None = None,
    views: Views = Views(),
) -> dict:
    """Probe every cell not already in ``ledger`` (None: train them all, record nothing).

    ``views`` (`probe.data.Views`, "all" = the fewest views any cell holds): every cell trained
    on those views and scored over those noise draws; part of ``settings``, so a sweep resumes
    only cells of the same views and noise draws.

    ``workers`` > 0 or ``scheduler``: the passes run on a dask cluster (probe/distributed.py),
    with the same results; rows are still written here, by this process, as results come back.

    ``on_cell(cell, trained)`` is called after each cell. Returns ``cells`` (one summary per
    cell, in ``cells`` order: block, t, pool (stored), top1, top5, heldout_top1,
    hyperparameters, seconds, trained), ``trained`` and ``skipped`` (counts), the
    `probe.protocol.Selection` as ``selection``, ``fingerprint`` and ``settings``.
    """
    p = settings or ProbeConfig()
    lin.recipe_grid(recipe, p)  # an unknown recipe fails before anything is read
    spec = device if isinstance(device, str) else str(device)  # workers resolve it themselves
    device = lin.resolve_device(device, "probe.device") if isinstance(device, str) else device
    sel = selection if selection is not None else select(store, seed, p, subset)
    views = views.resolve(store, [(k.block, k.t, k.pool) for k in cells])
    fingerprint, settings_id = lin.store_fingerprint(store), lin.settings_hash(recipe, p, views)
    ledger = Path(ledger) if ledger is not None else None
    done = done_cells(ledger, fingerprint, recipe, seed, sel, settings_id)
    for key in cells:
        if key in done and on_cell:
            on_cell(key, False)
    todo = [key for key in cells if key not in done]

    def record(r):  # each cell's row is written as soon as its pass is done
        if ledger is not None:
            append_row(ledger, r)
            sigkill_hook(f"ledger/{r['block']}/{r['t']}/{r['stored_pool']}")  # testing: a killed client
        if on_cell:
            on_cell(FeatureKey(r["t"], r["block"], r["stored_pool"]), True)

    if (workers or scheduler) and todo:
        from diffprobe.probe.distributed import linear_probes_distributed

        results = linear_probes_distributed(
            store, todo, recipe, seed, p, spec, sel, workers, scheduler, on_result=record, views=views
        )
    else:
        results = lin.linear_probes(
            store,
            [(k.block, k.t, k.pool) for k in todo],
            recipe=recipe,
            seed=seed,
            settings=p,
            device=device,
            selection=sel,
            on_result=record,
            views=views,
        )
    found = {
        **{k: _summary(r, trained=False) for k, r in done.items()},
        **{k: _summary(r, trained=True) for k, r in zip(todo, results)},
    }
    return {
        "cells": [found[k] for k in cells],
        "trained": len(todo),
        "skipped": len(cells) - len(todo),
        "selection": sel,
        "fingerprint": fingerprint,
        "settings": settings_id,
    }


def plot_folder(ledger: Path, fingerprint: str, recipe: str, seed: int, subset_sha: str, settings: str) -> Path:
    run_id = hashlib.sha256(f"{seed}\0{subset_sha}\0{settings}".encode()).hexdigest()[:8]
    return ledger.parent / f"sweep-{fingerprint}-{recipe}-{run_id}"


def check_plots(out_dir, plots: bool, ledger: Path, *name) -> Path | None:
    """The sweep's plot folder (``out_dir``, else `plot_folder` of ``ledger`` and ``name``),
    checked writable before anything trains; None with ``plots=False``."""
    if not plots:
        return None
    folder = Path(out_dir) if out_dir is not None else plot_folder(ledger, *name)
    check_writable(folder, "--out DIR (or --no-plots)")
    return folder


def run(
    cfg: Config,
    blocks=None,
    ts=None,
    pools=None,
    subset: str = "all",
    plots: bool = True,
    on_plan: Callable[[int, int], None] | None = None,
    on_cell: Callable[[FeatureKey, bool], None] | None = None,
    workers: int = 0,
    scheduler: str | None = None,
    head: str = "linear",
    views: Views = Views(),
    out_dir: str | Path | None = None,
) -> dict:
    """`probe sweep`: plan, sweep into ``cfg.probe.ledger``, write the subset's ids and the plots.

    ``head`` "knn": the kNN classifier in every cell instead (`probe.knn.sweep_run`).
    Plots go to ``out_dir`` (default: `plot_folder`, beside the ledger), checked writable before
    anything trains (`check_plots`); ``plots=False`` writes none.

    ``on_plan(cells, already_done)`` is called once the plan is made (a progress bar's total).
    Returns the `sweep` result (``selection`` dropped) plus ``store``, ``recipe``, ``seed``,
    ``subset``, ``subset_sha``, ``ledger``, ``subset_file``, ``plots`` ({"folder", "files"}),
    ``best`` (the cell of the highest val top-1) and ``seconds``.
    """
    if head == Head.KNN:
        from diffprobe.probe.knn import sweep_run

        if workers or scheduler:
            raise ConfigError("--head knn: --workers/--scheduler spread linear cells only; a kNN sweep runs here")
        if views != Views():
            raise ConfigError("--head knn: --views/--noise-draws are for trained heads; a kNN sweep reads view 0")
        return sweep_run(cfg, blocks, ts, pools, subset, plots, on_plan, on_cell, out_dir)
    if head != Head.LINEAR:
        raise ConfigError(f"--head: {head!r} is not allowed; allowed: 'linear', 'knn', 'segment'")
    started = time.perf_counter()
    p = cfg.probe
    if scheduler:  # an address nothing listens on fails before the plan is shown
        from diffprobe.probe.distributed import check_scheduler

        check_scheduler(scheduler)
    cmd = prepare(cfg, subset)  # the selection is made once: counted here, reused by the sweep
    store, sel, ledger = cmd.store, cmd.sel, cmd.ledger
    cells, grid = plan(store, blocks, ts, pools)
    fingerprint = lin.store_fingerprint(store)
    settings_id = lin.settings_hash(p.recipe, p, views.resolve(store, [(k.block, k.t, k.pool) for k in cells]))
    folder = check_plots(out_dir, plots, ledger, fingerprint, p.recipe, p.seed, sel.subset_sha, settings_id)
    if on_plan:
        done = done_cells(ledger, fingerprint, p.recipe, p.seed, sel, settings_id)
        on_plan(len(cells), sum(c in done for c in cells))
    result = sweep(
        store,
        cells,
        recipe=p.recipe,
        seed=p.seed,
        settings=p,
        device=p.device,
        subset=subset,
        ledger=ledger,
        on_cell=on_cell,
        selection=sel,
        workers=workers,
        scheduler=scheduler,
        views=views,
    )
    sel = result.pop("selection")
    label = f"{store.path.name} · {p.recipe}" + ("" if subset == "all" else f" · {subset}")
    files = cell_plots(result["cells"], grid, folder, label) if folder is not None else []
    return finish(store, result, p.recipe, cfg, sel, subset, ledger, folder, files, started)


def cell_plots(cells: list[dict], grid: list[dict], folder: Path, label: str) -> list[str]:
    """`probe.plots.sweep_plots` of the summaries ``cells`` (block, t, stored pool, top1) over the requested ``grid``."""
    from diffprobe.probe.plots import sweep_plots

    top1 = {FeatureKey(c["t"], c["block"], c["pool"]): c["top1"] for c in cells}
    points = [{"block": g["block"], "t": g["t"], "pool": g["pool"], "top1": top1[g["key"]]} for g in grid]
    return [str(f) for f in sweep_plots(points, folder, label)]


def finish(
    store, result: dict, recipe: str, cfg: Config, sel: Selection, subset: str, ledger: Path, folder, files, started
) -> dict:
    """A sweep's result (`run`; `probe.knn.sweep_run`): ``result`` plus where everything went, the
    best cell by val top-1 and the wall time; writes the label subset's ids beside the ledger."""
    from diffprobe.probe.subsets import write_subset

    subset_file = str(write_subset(ledger.parent, sel.fit_ids, sel.subset_sha)) if subset != "all" else None
    return {
        "store": str(store.path),
        **result,
        "recipe": recipe,
        "seed": cfg.probe.seed,
        "subset": subset,
        "subset_sha": sel.subset_sha,
        "n_train": len(sel.fit),
        "ledger": str(ledger),
        "subset_file": subset_file,
        "plots": {"folder": None if folder is None else str(folder), "files": files},
        "best": max(result["cells"], key=lambda c: c["top1"]),
        "seconds": round(time.perf_counter() - started, 3),
    }
