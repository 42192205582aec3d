"""CKA on a store: the adapter between `diffprobe.analyze.engine` and a `FeatureStore`.

    from diffprobe.analyze.cka import run, plan, store_source
    r = run(cfg, t=90)        # `analyze cka --t 90`: block x block + PNG/CSV

It chooses cells (block x block at one t, t x t at one block, or a store against another),
pools and the common image order (ids aligned across stores, skipped images left out), and
reads each cell through `FeatureStore.feature_array` with the fast finite check. The
numbers come from the engine, which is re-exported here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from diffprobe.analyze.engine import (  # noqa: F401  (the engine's public names, re-exported)
    CI_LEVEL,
    ESTIMATORS,
    PRECISIONS,
    READ_THREADS,
    CkaError,
    CkaOptions,
    Source,
    array_source,
    cka,
    cka_matrix,
)
from diffprobe.store.errors import BlockError, DiffprobeError, StoreError  # noqa: F401
from diffprobe.store.feature_store import check_block, fingerprint_digest
from diffprobe.store.files import check_writable, write_atomically
from diffprobe.store.finite import all_finite


def store_source(store, split: str, block: int, t: int, pool: int, rows: np.ndarray, label, name: str) -> Source:
    """A stored feature array read in whole chunks straight from Zarr; ``rows`` maps the common order to store rows."""
    arr = store.feature_array(split, block, t, pool)
    dim = int(np.prod(arr.shape[1:]))
    rows = np.asarray(rows, dtype=np.int64)
    where = f"{store.path}: {name} in split {split!r}"

    def read(lo: int, hi: int) -> np.ndarray:
        idx = rows[lo:hi]
        if len(idx) and np.all(np.diff(idx) == 1):  # the usual case: a contiguous run of the store
            x = arr[int(idx[0]) : int(idx[-1]) + 1]
        else:
            order = np.argsort(idx, kind="stable")
            x = np.empty((len(idx), *arr.shape[1:]), dtype=arr.dtype)
            x[order] = arr.get_orthogonal_selection((idx[order],))
        x = x.reshape(len(idx), dim)
        if not all_finite(x):
            raise StoreError(f"{where} holds non-finite values in images that are not marked skipped")
        return x

    return Source(label, name, dim, read, int(arr.chunks[0]))


def options_from_config(a, cls=CkaOptions, **overrides):
    """Options of type ``cls`` (`CkaOptions`, `AlignOptions`) from an `AnalyzeConfig` (None overrides ignored)."""
    kw = {f.name: getattr(a, f.name) for f in dataclasses.fields(cls)}
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**kw)


def _usable(store, split: str) -> np.ndarray:
    if split not in store.splits:
        raise StoreError(f"{store.path}: no split {split!r}; the store holds {', '.join(store.splits)} (--split)")
    return ~store.skipped(split).astype(bool)


def _held(store, split):
    return set(store.keys(split))


def _fmt(values) -> str:
    from diffprobe.store.ranges import format_int_list

    return format_int_list(values) if values else "none"


def choose_pool(stores, split: str, pool: int | None) -> int:
    """``pool`` if every store holds it, else an error naming the pools held; None: the smallest held by all."""
    pools = None
    for s in stores:
        held = {k.pool for k in _held(s, split)}
        if not held:
            raise StoreError(f"{s.path}: split {split!r} holds no complete feature array")
        pools = held if pools is None else pools & held
    if pool is None:
        if not pools:
            raise StoreError(f"--against: the stores hold no pool size in common in split {split!r}")
        return min(pools)
    for s in stores:
        held = {k.pool for k in _held(s, split)}
        # a pool larger than some maps is stored capped: accept it if any array holds it
        if pool not in held:
            raise BlockError(f"--pool {pool}: {s.path} holds pools {_fmt(held)} in split {split!r}")
    return pool


def _blocks_at(store, split, t, pool, blocks, flag="--blocks") -> list[int]:
    held = _held(store, split)
    ts = {k.t for k in held}
    if t not in ts:
        raise BlockError(f"--t {t}: {store.path} holds t {_fmt(ts)} in split {split!r}")
    have = sorted({k.block for k in held if k.t == t and k == store.stored_key(k.block, t, pool)})
    if blocks is None:
        if not have:
            raise BlockError(
                f"--pool {pool}: {store.path} holds no block at t {t}, pool {pool} in split {split!r}; "
                f"it holds {store.describe_holdings(split)}"
            )
        return have
    for b in blocks:
        check_block(store, b, flag)  # a block the model lacks: names the model's blocks
        if b not in have:
            raise BlockError(
                f"{flag}: block {b} at t {t}, pool {pool} is not in {store.path} split {split!r}; "
                f"it holds blocks {_fmt(have)} there"
            )
    return list(blocks)


def _ts_at(store, split, block, pool, ts) -> list[int]:
    held = _held(store, split)
    store.stored_key(block, 0, pool)
    blocks = {k.block for k in held}
    if block not in blocks:
        raise BlockError(f"--block {block}: {store.path} holds blocks {_fmt(blocks)} in split {split!r}")
    have = sorted({k.t for k in held if k.block == block and k == store.stored_key(block, k.t, pool)})
    if ts is None:
        if not have:
            raise BlockError(
                f"--pool {pool}: {store.path} holds no t for block {block} at pool {pool} in split "
                f"{split!r}; it holds {store.describe_holdings(split)}"
            )
        return have
    for t in ts:
        if t not in have:
            raise BlockError(
                f"--t {t}: {store.path} holds t {_fmt(have)} for block {block}, pool {pool} in split {split!r}"
            )
    return list(ts)


def align(store, other, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``store`` and ``other`` holding the same images in one order (``store``'s); refuses other ids."""
    ia, ib = store.ids(split), other.ids(split)
    sa, sb = set(ia.tolist()), set(ib.tolist())
    if len(sa) != len(ia) or len(sb) != len(ib):
        raise StoreError(f"split {split!r}: image ids repeat within a store; cannot match images across stores")
    only_a, only_b = len(sa - sb), len(sb - sa)
    if only_a or only_b:
        raise StoreError(
            f"--against: the image ids of split {split!r} differ: {only_a} of {len(ia)} ids in "
            f"{store.path} are not in {other.path} and {only_b} of {len(ib)} there are not here; "
            f"comparing stores needs the same images"
        )
    ua, ub = _usable(store, split), _usable(other, split)
    pos_b = {v: j for j, v in enumerate(ib.tolist())}
    rows_b = np.array([pos_b[v] for v in ia.tolist()], dtype=np.int64)
    keep = ua & ub[rows_b]
    return np.flatnonzero(keep), rows_b[keep]


def fingerprint(store) -> str:
    return fingerprint_digest(store.fingerprints)


def _sources(store, split, specs, rows) -> list[Source]:
    """`store_source` for each (block, t, pool, label, name) in ``specs``, opened on threads (each open checks
    the array's completion records: ~0.1 s of Zarr metadata reads)."""
    with ThreadPoolExecutor(READ_THREADS) as ex:
        return list(ex.map(lambda sp: store_source(store, split, sp[0], sp[1], sp[2], rows, sp[3], sp[4]), specs))


def plan(store, split: str, *, t=None, block=None, blocks=None, ts=None, against=None, pool=None) -> dict:
    """What one `analyze cka` call compares: mode, labels and the Sources (validates everything first)."""
    if block is not None and against is not None:
        raise CkaError("--block and --against: pick one (--against compares blocks at one --t)")
    if block is None and (t is None or len(t) != 1):
        raise CkaError(
            "--t: give one timestep for a block x block matrix (e.g. --t 90), or --block B for a t x t matrix"
        )
    _usable(store, split)
    stores = [store] if against is None else [store, against]
    for s in stores[1:]:
        _usable(s, split)
    pool = choose_pool(stores, split, pool)
    if block is not None:
        ts = _ts_at(store, split, block, pool, t)
        rows = np.flatnonzero(_usable(store, split))
        srcs = _sources(store, split, [(block, tt, pool, tt, f"block {block}, t {tt}") for tt in ts], rows)
        return {
            "mode": "timesteps",
            "pool": pool,
            "block": block,
            "t": None,
            "rows": srcs,
            "cols": None,
            "n": len(rows),
            "row_name": "timestep t",
            "col_name": "timestep t",
        }
    t = t[0]
    if against is None:
        bl = _blocks_at(store, split, t, pool, blocks)
        rows = np.flatnonzero(_usable(store, split))
        srcs = _sources(store, split, [(b, t, pool, b, f"block {b} (t {t})") for b in bl], rows)
        return {
            "mode": "blocks",
            "pool": pool,
            "block": None,
            "t": t,
            "rows": srcs,
            "cols": None,
            "n": len(rows),
            "row_name": "block",
            "col_name": "block",
        }
    ra, rb = align(store, against, split)
    bl_a = _blocks_at(store, split, t, pool, blocks)
    bl_b = _blocks_at(against, split, t, pool, blocks)
    rs = _sources(store, split, [(b, t, pool, b, f"block {b} (t {t}) of {store.path.name}") for b in bl_a], ra)
    cs = _sources(against, split, [(b, t, pool, b, f"block {b} (t {t}) of {against.path.name}") for b in bl_b], rb)
    return {
        "mode": "against",
        "pool": pool,
        "block": None,
        "t": t,
        "rows": rs,
        "cols": cs,
        "n": len(ra),
        "row_name": f"block ({store.path.name})",
        "col_name": f"block ({against.path.name})",
    }


def _stem(p: dict, split: str, tag: str, other_fp: str | None) -> str:
    where = f"b{p['block']}" if p["mode"] == "timesteps" else f"t{p['t']}"
    mode = f"against-{other_fp}" if p["mode"] == "against" else p["mode"]
    return f"{mode}-{where}-p{p['pool']}-{split}-{tag}"


def write_csv(path: Path, rows, cols, matrix, corner: str) -> Path:
    """One matrix as CSV, written under a temporary name and renamed: whole or absent."""
    import csv

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow([corner, *cols])
            for label, values in zip(rows, matrix):
                w.writerow([label, *(repr(float(v)) for v in values)])

    return write_atomically(path, write)


def pool_read(store, p: dict) -> str:
    """The pool of a plan as read: "pool 16", or "pool 16 (block 19 read at 8)" where a block's
    map is smaller than the pool asked for, and its array is stored capped."""
    if p["mode"] == "timesteps":
        blocks = [p["block"]]
    else:
        blocks = sorted({int(src.label) for src in p["rows"]})
    capped: dict[int, list[int]] = {}
    for b in blocks:
        stored = store.stored_key(b, p["t"] or 0, p["pool"]).pool
        if stored != p["pool"]:
            capped.setdefault(stored, []).append(b)
    if not capped:
        return f"pool {p['pool']}"
    from diffprobe.store.ranges import format_int_list

    read = ", ".join(
        f"block{'s' if len(bs) > 1 else ''} {format_int_list(bs)} read at {q}" for q, bs in sorted(capped.items())
    )
    return f"pool {p['pool']} ({read})"


def run(cfg, **kw) -> dict:
    """`analyze cka`: plan, compute, write the heatmap PNG and CSVs beside the store.

    Keywords: ``t`` (a timestep or a tuple of them: one for blocks/against; several or None with
    ``block``), ``block``, ``blocks``, ``against``, ``pool``, ``out_dir``, ``plots``,
    ``on_progress`` (`run_matrix`), and `CkaOptions` fields overriding ``cfg.analyze`` (None
    ignored). Files go to ``cka-<store fingerprint>/`` beside the store (or ``out_dir``).
    Returns the `cka_matrix` result plus mode, store, split, t, block, pool, files, folder.
    """
    return run_matrix(
        cfg,
        CkaOptions,
        lambda p, opts, progress: cka_matrix(p["rows"], p["cols"], p["n"], opts, on_progress=progress),
        lambda opts: ("cka", opts.estimator, f"CKA ({opts.estimator})", "CKA"),
        **kw,
    )


def run_matrix(
    cfg,
    options_type,
    compute: Callable,
    names: Callable,
    *,
    t=None,
    block=None,
    blocks=None,
    against=None,
    pool=None,
    out_dir=None,
    plots: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
    **option_overrides,
) -> dict:
    """One matrix command (`analyze cka`, `analyze align`): ``options_type`` from ``cfg.analyze``
    and ``option_overrides``; open the store(s); `plan`; ``compute(plan, options, on_progress)``
    (a `cka_matrix`-shaped result); write its CSVs (and those of ci_low/ci_high/perm_mean/
    perm_high) and heatmap to ``<prefix>-<store fingerprint>/`` beside the store (or ``out_dir``),
    each under a temporary name and renamed; with ``plots=False`` none are written. The folder
    is checked writable before any work. ``names(options)`` gives (prefix, the file names' tag,
    the heatmap's title, its colour bar). Returns the result plus mode, store, split, t, block,
    pool, pool_read, files, folder."""
    from diffprobe.store.feature_store import open_store

    opts = options_from_config(cfg.analyze, options_type, **option_overrides)
    folder_prefix, tag, name, value = names(opts)
    a = cfg.analyze
    t = (t,) if isinstance(t, int) else t
    store = open_store(cfg.store.path)
    other = open_store(against) if against is not None else None
    pool = pool if pool is not None else (a.pool or None)  # analyze.pool; 0: the smallest held
    p = plan(store, a.split, t=t, block=block, blocks=blocks, against=other, pool=pool)
    fp = fingerprint(store)
    folder = Path(out_dir) if out_dir is not None else store.path.parent / f"{folder_prefix}-{fp}"
    if plots:
        check_writable(folder, "--out DIR (or --no-plots)")
    r = compute(p, opts, on_progress)
    stem = _stem(p, a.split, tag, fingerprint(other) if other is not None else None)
    read = pool_read(store, p)
    files = []
    if plots:
        from diffprobe.probe.plots import cka_heatmap

        corner = f"{p['row_name']} \\ {p['col_name']}"
        files.append(write_csv(folder / f"{stem}.csv", r["rows"], r["cols"], r["matrix"], corner))
        for key in ("ci_low", "ci_high", "perm_mean", "perm_high"):
            if key in r:
                files.append(
                    write_csv(folder / f"{stem}-{key.replace('_', '-')}.csv", r["rows"], r["cols"], r[key], corner)
                )
        where = f"block {p['block']}" if p["mode"] == "timesteps" else f"t {p['t']}"
        vs = f" vs {other.path.name}" if other is not None else ""
        title = f"{name}: {store.path.name}{vs} · split {a.split} · {where} · {read} · N {p['n']}"
        files.append(
            cka_heatmap(
                np.asarray(r["matrix"]),
                r["rows"],
                r["cols"],
                p["row_name"],
                p["col_name"],
                title,
                folder / f"{stem}.png",
                label=value,
            )
        )
    r.update(
        {
            "mode": p["mode"],
            "store": str(store.path),
            "against": str(other.path) if other else None,
            "split": a.split,
            "t": p["t"],
            "block": p["block"],
            "pool": p["pool"],
            "pool_read": read,
            "folder": str(folder) if plots else None,
            "files": [str(f) for f in files],
        }
    )
    return r


def summary(r: dict, top: int = 5) -> dict:
    """Printed-summary numbers of a result: mean off-diagonal CKA and the most/least similar pairs."""
    m = np.asarray(r["matrix"])
    square = r["rows"] == r["cols"] and r.get("mode") != "against"
    cells = [
        (float(m[i, j]), r["rows"][i], r["cols"][j])
        for i in range(m.shape[0])
        for j in range(m.shape[1])
        if not square or i < j
    ]
    cells.sort(key=lambda c: c[0])
    mean = float(np.mean([c[0] for c in cells])) if cells else math.nan
    return {"mean": mean, "highest": cells[::-1][:top], "lowest": cells[:top]}
