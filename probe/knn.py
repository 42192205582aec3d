"""The kNN probe: DINOv2's k-nearest-neighbour classifier on one cached feature set; no training.

    from diffprobe.store import open_store
    from diffprobe.probe.knn import knn_probe
    rows = knn_probe(open_store("runs/digits-tiny.zarr"), block=24, t=90, pool=2, ks=(10, 20))
    rows[0]["top1"], rows[0]["hyperparameters"]      # one result per k, in ascending k

`run(cfg, block, t, pool)` is `probe knn`: settings from ``[probe]``'s ``knn_*`` keys, one
ledger row per k (head ``knn``).

Protocol (DINOv2's ``eval/knn.py``, on the probe protocol of `probe.protocol`):

1. The database is train's fitted part (`probe.protocol.select`: train minus the seeded
   held-out part, and only the label subset with ``--label-fraction``/``--shots``/``--subset``);
   the queries are the held-out part (its top-1 is ``heldout_top1``) and val (top-1, top-5).
2. Features are L2-normalised (``cosine``; ``l2`` keeps them and uses minus half the squared
   distance, `probe.neighbours`); the similarity of every query to every database image is
   computed in (query block x database block) products, with a running top-max(k) per query,
   so memory does not grow with the database (`budget`). Ties go to the earlier database
   image (store order), whatever the blocks.
3. Votes, from that one top-max(k): for each k, class scores are the sums over the first k
   neighbours of exp((similarity - the nearest's) / T) (``exp``: DINOv2's softmax(sim / T)
   without the per-query normaliser, which changes no ranking and makes a k's scores
   independent of the other ks asked for), or of 1 (``uniform``: a majority vote, as
   scikit-learn's ``KNeighborsClassifier``). Classes are ranked by score, ties to the smaller
   class index; top-1 and top-5 follow.

Reading goes through the shared data layer (`diffprobe.probe.data.FeatureData`): in memory
when the split fits its share of ``probe.memory_mb``, else streamed chunk by chunk. On a GPU
the products run there (``probe.device``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import torch

from diffprobe.probe.data import FeatureData
from diffprobe.probe.digest import fingerprint_digest, settings_digest
from diffprobe.probe.metrics import per_class_accuracy
from diffprobe.probe.neighbours import RunningTopK, normalise, similarities
from diffprobe.probe.protocol import Selection, select
from diffprobe.probe.result import ProbeResult
from diffprobe.store.choices import Head, KnnMetric, KnnWeighting, allowed
from diffprobe.store.config import Config, ProbeConfig
from diffprobe.store.device import resolve_device
from diffprobe.store.errors import ConfigError, DiffprobeError
from diffprobe.store.feature_store import FeatureStore

TOP5 = 5


class KnnError(DiffprobeError):
    """A kNN request that cannot be answered as asked (k against the images)."""


def settings_hash(p: ProbeConfig) -> str:
    """12 hex digits naming what changes a kNN row besides its k: the held-out fraction, T, votes, similarity."""
    return settings_digest(
        {
            "head": Head.KNN,
            "holdout_fraction": p.holdout_fraction,
            "temperature": p.knn_temperature,
            "weighting": p.knn_weighting,
            "metric": p.knn_metric,
        }
    )


def check_ks(ks, n_fit: int) -> tuple[int, ...]:
    """The ks, sorted and distinct; each must be in 1 .. n_fit - 1."""
    ks = tuple(sorted({int(k) for k in ks}))
    if not ks:
        raise KnnError("--k: give at least one k")
    if ks[0] < 1:
        raise KnnError(f"--k {ks[0]}: k must be >= 1")
    if ks[-1] >= n_fit:
        raise KnnError(f"--k {ks[-1]}: k must be below the train images fitted on ({n_fit}); allowed: 1..{n_fit - 1}")
    return ks


def budget(memory_mb: float, dim: int, kmax: int, n_queries: int, n_db: int) -> tuple[int, int]:
    """How ``memory_mb`` is shared: (query rows per block, database rows per product). An
    eighth holds train's stored rows (`FeatureData`: whole, or, streamed, the windows for the
    database and one for the held-out queries), an eighth val's; a quarter a query block in
    float32 with its top-k; a quarter one product's float32 similarities and the top-k's
    scratch (about twice their size). Whatever the database size."""
    total = memory_mb * 2**20
    q_rows = max(1, min(n_queries, int(total / 4 // (4 * dim + 12 * kmax))))
    d_rows = max(kmax, int(total / 4 // (8 * q_rows)))
    return q_rows, min(d_rows, max(n_db, 1))


SHARE = 8  # train's and val's FeatureData each hold memory_mb / SHARE (see `budget`)


def rows_of(data: FeatureData, keep: np.ndarray | None, step: int) -> Iterator[torch.Tensor]:
    """``data``'s rows (flattened), in order, in blocks of ``step`` (the last fewer): all of
    them, or those whose ``keep`` (a mask over ``data``'s rows) is set."""
    at, held, n_held = 0, [], 0
    for (x,), _ in data.sequential(step):
        x = x.reshape(len(x), -1)
        if keep is not None:
            m = keep[at : at + len(x)]
            at += len(x)
            x = x if m.all() else x[torch.from_numpy(np.flatnonzero(m)).to(x.device)]
        held.append(x)
        n_held += len(x)
        while n_held >= step:
            block = torch.cat(held) if len(held) > 1 else held[0]
            yield block[:step]
            held, n_held = [block[step:]], n_held - step
    if n_held:
        yield torch.cat(held)


def top_neighbours(
    queries: FeatureData,
    database: FeatureData,
    kmax: int,
    metric: str,
    q_rows: int,
    d_rows: int,
    keep_queries: np.ndarray | None = None,
    keep_database: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities, database positions), each (n_queries, kmax) best first, of every query of
    ``queries`` against ``database`` (read once per query block); ``keep_*`` restrict either to
    some of its rows (masks; positions then count the kept rows only)."""
    values, index = [], []
    for xq in rows_of(queries, keep_queries, q_rows):
        q = normalise(xq.float(), metric)
        top = RunningTopK(len(q), kmax, q.device)
        at = 0
        for xd in rows_of(database, keep_database, d_rows):
            db = normalise(xd.float(), metric)
            top.add(similarities(q, db, metric), at)
            at += len(db)
        values.append(top.values)
        index.append(top.index)
    return torch.cat(values), torch.cat(index)


def class_ranks(
    sims: torch.Tensor, labels: torch.Tensor, n_classes: int, ks, temperature: float, weighting: str
) -> dict[int, torch.Tensor]:
    """For each k, the top-min(5, classes) classes of each query, best first: (n, top) long.

    ``sims``, ``labels``: the (n, max k) neighbour similarities (best first) and their labels."""
    if weighting == KnnWeighting.EXP:
        # DINOv2's softmax(sim / T) without its per-query normaliser: the same ranking, and a k's
        # scores do not depend on the largest k asked for
        w = torch.exp((sims.double() - sims[:, :1].double()) / temperature)
    elif weighting == KnnWeighting.UNIFORM:
        w = torch.ones_like(sims, dtype=torch.float64)
    else:
        raise ConfigError(f"probe.knn_weighting: {weighting!r} is not allowed; allowed: {allowed(KnnWeighting)}")
    top = min(TOP5, n_classes)
    out = {}
    for k in ks:
        scores = torch.zeros(len(sims), n_classes, dtype=torch.float64, device=sims.device)
        scores.scatter_add_(1, labels[:, :k], w[:, :k])
        out[k] = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :top]
    return out


def knn_probe(
    store: FeatureStore,
    block: int,
    t: int,
    pool: int = 2,
    ks=None,
    seed: int = 0,
    settings: ProbeConfig | None = None,
    device: str | torch.device = "cpu",
    subset: str = "all",
    selection: Selection | None = None,
) -> list[dict]:
    """The kNN classifier on ``store``'s (block, t, pool): one result per k (ascending), each with
    the keys of `probe.linear.linear_probe` (top1, top5, per_class, heldout_top1, hyperparameters
    {k, temperature, weighting, metric}, grid (every k's held-out top-1), split sizes, ...) plus
    ``head`` ("knn"), ``blocks``, ``timesteps``.

    ``ks`` None: ``settings.knn_k``; temperature, weighting and metric come from ``settings``."""
    started = time.perf_counter()
    p = settings or ProbeConfig()
    if p.knn_metric not in tuple(KnnMetric):
        raise ConfigError(f"probe.knn_metric: {p.knn_metric!r} is not allowed; allowed: {allowed(KnnMetric)}")
    device = resolve_device(device, "probe.device") if isinstance(device, str) else device
    key = store.stored_key(block, t, pool)
    sel = selection if selection is not None else select(store, seed, p, subset)
    ks = check_ks(p.knn_k if ks is None else ks, len(sel.fit))
    kmax = ks[-1]
    classes = store.class_names
    cell = [(block, t, pool)]
    # train's usable rows hold the database (the fitted part) and the held-out queries: one
    # reader, read once when it fits its share; val's cell is checked before anything is read
    usable_rows = np.flatnonzero(sel.usable)
    share = p.memory_mb / SHARE
    train = FeatureData(store, "train", cell, usable_rows, None, sel.usable, memory_mb=share, device=device)
    val_rows = np.flatnonzero(sel.usable_val)
    val = FeatureData(store, "val", cell, val_rows, None, sel.usable_val, memory_mb=share, device=device)
    dim = train.dims[0]
    q_rows, d_rows = budget(p.memory_mb, dim, kmax, max(len(sel.hold), len(sel.y_val)), len(sel.fit))
    is_fit, is_held = np.zeros(len(usable_rows), bool), np.zeros(len(usable_rows), bool)
    is_fit[sel.fit], is_held[sel.hold] = True, True
    y_db = torch.from_numpy(sel.y[sel.fit]).to(device)
    scored = {}
    for name, queries, keep in (("held", train, is_held), ("val", val, None)):
        sims, idx = top_neighbours(queries, train, kmax, p.knn_metric, q_rows, d_rows, keep, is_fit)
        scored[name] = class_ranks(sims, y_db[idx], len(classes), ks, p.knn_temperature, p.knn_weighting)
    y_held = torch.from_numpy(sel.y[sel.hold]).to(device)
    y_val = torch.from_numpy(sel.y_val).to(device)

    def hits(ranks: torch.Tensor, y: torch.Tensor, top: int) -> float:
        return int((ranks[:, :top] == y[:, None]).any(1).sum()) / len(y) if len(y) else 0.0

    point = {"temperature": p.knn_temperature, "weighting": p.knn_weighting, "metric": p.knn_metric}
    grid = [{"k": k, **point, "heldout_top1": hits(scored["held"][k], y_held, 1)} for k in ks]
    seconds = round(time.perf_counter() - started, 3)
    common = dict(
        head=Head.KNN,
        block=block,
        t=t,
        pool=pool,
        stored_pool=key.pool,
        dim=dim,
        blocks=[block],
        timesteps=[t],
        recipe=Head.KNN,
        seed=seed,
        settings=settings_hash(p),
        grid=grid,
        device=str(device),
        seconds=seconds,
        streamed=not train.in_memory,
    )
    out = []
    for g in grid:
        ranks = scored["val"][g["k"]]
        out.append(
            ProbeResult.of(
                store,
                sel,
                **common,
                hyperparameters={"k": g["k"], **point},
                heldout_top1=g["heldout_top1"],
                top1=hits(ranks, y_val, 1),
                top5=hits(ranks, y_val, TOP5),
                per_class=per_class_accuracy(ranks[:, 0].cpu().numpy(), sel.y_val, classes),
            )
        )
    return out


def best(results: list[ProbeResult]) -> ProbeResult:
    """The result of the k with the best held-out top-1 (ties: the smaller k): chosen without val."""
    return max(results, key=lambda r: (r["heldout_top1"], -r["hyperparameters"]["k"]))


def run(cfg: Config, block: int, t: int, pool: int = 2, ledger: bool = True, subset: str = "all") -> dict:
    """`probe knn`: `knn_probe` with ``cfg.probe`` after the probe commands' preamble
    (`probe.command.prepare`), one ledger row per k.

    Returns the ``--json`` form of the k chosen on the held-out part (`best`: the keys of `probe
    linear`'s, with ``ledger`` and ``subset_file``) plus ``per_k``: every k's."""
    from diffprobe.probe.command import prepare
    from diffprobe.probe.ledger import record
    from diffprobe.store.feature_store import check_block

    p = cfg.probe
    cmd = prepare(cfg, subset, ledger)
    check_block(cmd.store, block)
    results = knn_probe(cmd.store, block, t, pool, seed=p.seed, settings=p, device=p.device, selection=cmd.sel)
    for r in results:
        record(cfg, r, ledger)
    return {**best(results).to_json(), "per_k": [r.to_json() for r in results]}


# ------------------------------------------------------------------ probe sweep --head knn


def _done(ledger, fingerprint: str, seed: int, sel: Selection, settings: str) -> dict:
    """kNN ledger rows of the same store, seed, subset and settings, by (stored cell, k) (the last one wins)."""
    from diffprobe.probe.ledger import read_rows
    from diffprobe.store.feature_store import FeatureKey

    same = {"fingerprint": fingerprint, "seed": seed, "subset": sel.subset, "subset_sha": sel.subset_sha}
    return {
        (FeatureKey(r["t"], r["block"], r["stored_pool"]), r["hyperparameters"]["k"]): r
        for r in read_rows(ledger)
        if r["head"] == Head.KNN and r["settings"] == settings and all(r[k] == v for k, v in same.items())
    }


def sweep_run(
    cfg: Config, blocks=None, ts=None, pools=None, subset="all", plots=True, on_plan=None, on_cell=None, out_dir=None
) -> dict:
    """`probe sweep --head knn`: `knn_probe` on every (block, t, pool) of `probe.sweep.plan`, each k's
    row appended as its cell is done; cells whose rows (same store, seed, subset, settings, k)
    are in the ledger are skipped, so a stopped sweep resumes. Plots per k in ``k<k>/`` of the
    sweep folder (``out_dir``, else beside the ledger; checked writable before any cell runs).
    Returns the keys of `probe.sweep.run`; ``cells`` holds one summary per (cell, k)."""
    from diffprobe.probe import sweep as sw
    from diffprobe.probe.command import prepare
    from diffprobe.probe.ledger import append_row

    started = time.perf_counter()
    p = cfg.probe
    cmd = prepare(cfg, subset)
    store, sel, ledger = cmd.store, cmd.sel, cmd.ledger
    cells, grid = sw.plan(store, blocks, ts, pools)
    ks = check_ks(p.knn_k, len(sel.fit))
    fingerprint, settings = fingerprint_digest(store.fingerprints), settings_hash(p)
    folder = sw.check_plots(out_dir, plots, ledger, fingerprint, Head.KNN, p.seed, sel.subset_sha, settings)
    done = _done(ledger, fingerprint, p.seed, sel, settings)
    if on_plan:
        on_plan(len(cells), sum(all((c, k) in done for k in ks) for c in cells))
    found: dict = {}
    trained = 0
    for key in cells:
        missing = [k for k in ks if (key, k) not in done]
        for k in ks:
            if k not in missing:
                found[key, k] = (done[key, k], False)
        if missing:
            for r in knn_probe(store, key.block, key.t, key.pool, missing, p.seed, p, p.device, subset, sel):
                append_row(ledger, r)
                found[key, r["hyperparameters"]["k"]] = (r, True)
            trained += 1
        if on_cell:
            on_cell(key, bool(missing))
    summaries = [
        {
            "block": key.block,
            "t": key.t,
            "pool": key.pool,
            "k": k,
            "top1": found[key, k][0]["top1"],
            "top5": found[key, k][0]["top5"],
            "heldout_top1": found[key, k][0]["heldout_top1"],
            "hyperparameters": found[key, k][0]["hyperparameters"],
            "seconds": found[key, k][0]["seconds"],
            "trained": found[key, k][1],
        }
        for key in cells
        for k in ks
    ]
    files: list[str] = []
    for k in ks if folder is not None else ():
        label = f"{store.path.name} · kNN k {k}" + ("" if subset == "all" else f" · {subset}")
        files += sw.cell_plots([c for c in summaries if c["k"] == k], grid, folder / f"k{k}", label)
    result = {"head": Head.KNN, "cells": summaries, "trained": trained, "skipped": len(cells) - trained}
    result.update(fingerprint=fingerprint, settings=settings)
    return sw.finish(store, result, Head.KNN, cfg, sel, subset, ledger, folder, files, started)
