"""The Zarr feature store: the only module that knows its layout.

Layout (Zarr v3, one group per run)::

    run.zarr/                      attrs: schema, fingerprints, provenance, blocks, classes
      <split>/                     attrs: n_images, chunk_images, dataset fingerprint
        labels      (N,)  int64
        ids         (N,)  string   image ids (index for digits, relative path for folders)
        skipped     (N,)  bool     images that could not be read (their features are NaN)
        features/t{t}_b{block}_p{pool}   (N, C, p, p) float16, chunks of chunk_images images
        features/t{t}_b{block}_p{pool}_v{v}  augmented view v >= 1 (`extract.views`), same shape
        features/t{t}_b{block}_p{pool}_n{m}  the center crop under noise draw m >= 1 (`extract.noise_draws`)
        done        (n_chunks, K) uint8  completion records: [c, j] = 1 once image chunk c of
                                         feature array j is written (columns named in the
                                         split's attrs "done_columns"; one row per chunk)

A chunk's completion records are written after its data, so a run killed at any moment
leaves records only for chunks that are whole; a resumed run redoes the others. Readers
refuse arrays that are not complete. Pool sizes larger than a block's map are stored at
the map size (p = spatial) and looked up that way.

Views and noise draws are arrays of their own beside view 0 (the center crop under today's
noise, the unsuffixed name), so a store without them is unchanged, adding views computes only
the new arrays (through the same completion records), and every array keeps its image chunks.

    s = open_store("runs/digits-tiny.zarr")
    x = s.features("train", block=24, t=90, pool=2)   # numpy (N, C, 2, 2)
    x3 = s.features("train", block=24, t=90, pool=2, view=3)   # augmented view 3
    y = s.labels("train")
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import zarr
import zarr.codecs

from .errors import FingerprintMismatch, StoreError, StoreLocked
from .ranges import format_int_list

SCHEMA_VERSION = 1
_NAME = re.compile(r"^t(\d+)_b(\d+)_p(\d+)(?:_v([1-9]\d*)|_n([1-9]\d*))?$")
FINGERPRINT_SECTIONS = ("model", "preprocessing", "noise", "compute", "dataset")


@dataclass(frozen=True, order=True)
class FeatureKey:
    """One feature array: timestep, block, stored pool size (already capped at the map), and
    which input it saw: ``view`` v >= 1 is an augmented view, ``draw`` m >= 1 the center crop
    under another noise draw; both 0 (view 0, draw 0) is the center crop under the base noise."""

    t: int
    block: int
    pool: int
    view: int = 0
    draw: int = 0

    def __post_init__(self):
        if self.view and self.draw:
            raise StoreError(
                f"a feature array is a view or a noise draw, not both (view {self.view}, draw {self.draw})"
            )

    @property
    def name(self) -> str:
        suffix = f"_v{self.view}" if self.view else f"_n{self.draw}" if self.draw else ""
        return f"t{self.t}_b{self.block}_p{self.pool}{suffix}"

    @property
    def base(self) -> FeatureKey:
        """The view-0, draw-0 array of the same (t, block, pool)."""
        return FeatureKey(self.t, self.block, self.pool)

    @classmethod
    def parse(cls, name: str) -> FeatureKey:
        m = _NAME.match(name)
        if not m:
            raise StoreError(f"not a feature array name: {name!r}")
        t, block, pool, view, draw = m.groups()
        return cls(int(t), int(block), int(pool), int(view or 0), int(draw or 0))


def fingerprint_digest(fingerprints: dict) -> str:
    """16 hex digits naming a store's fingerprints (sorted keys, compact JSON): the name probes'
    ledgers and analyses' output folders give a store. Part of every existing ledger: keep it."""
    text = json.dumps(fingerprints, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _columns(group) -> list[str]:
    """The completion records' column names of a split group (one per feature array)."""
    return list(cast(list, group.attrs.get("done_columns", [])))


def _codecs(codec: str) -> dict:
    if codec == "none":
        return {"compressors": None}
    if codec == "zstd":
        return {"compressors": zarr.codecs.ZstdCodec(level=1)}
    if codec == "blosc-lz4":
        return {"compressors": zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=2)}
    raise StoreError(f"store.codec: unknown codec {codec!r}; allowed: 'none', 'zstd', 'blosc-lz4'")


def _n_chunks(n: int, chunk: int) -> int:
    return -(-n // chunk)


class FeatureStore:
    """Read access to a store. Use `open_store`; writers use `StoreWriter`."""

    def __init__(self, path: str | Path, mode: Literal["r", "r+"] = "r"):
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise StoreError(f"{self.path}: no diffprobe store here (run `extract run --store {self.path}`)")
        self._root = zarr.open_group(str(self.path), mode=mode)
        attrs: dict[str, Any] = dict(self._root.attrs.asdict())
        if attrs.get("schema") == "diffprobe-features" and not attrs.get("initialized"):
            raise StoreError(
                f"{self.path}: the store's creation was cut off; run `extract run --store {self.path}` again"
            )
        if attrs.get("schema") != "diffprobe-features" or attrs.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: not a diffprobe feature store of schema version {SCHEMA_VERSION} "
                f"(found {attrs.get('schema')!r} version {attrs.get('schema_version')!r})"
            )
        self.attrs = attrs
        self._spatial = {b["number"]: b["spatial"] for b in attrs["blocks"]}

    # -- what it holds -------------------------------------------------------------

    @property
    def splits(self) -> list[str]:
        return list(self.attrs["splits"])

    @property
    def class_names(self) -> list[str]:
        return list(self.attrs["class_names"])

    @property
    def fingerprints(self) -> dict:
        return self.attrs["fingerprints"]

    def _split(self, split: str):
        if split not in self.attrs["splits"]:
            raise StoreError(f"{self.path}: no split {split!r}; the store holds {', '.join(self.splits)}")
        return self._root[split]

    def keys(self, split: str, complete_only: bool = True, variants: bool = False) -> list[FeatureKey]:
        """The feature arrays of ``split`` (by default only those with every chunk done), view 0
        under the base noise only unless ``variants`` (then views and noise draws too)."""
        masks = self.done_masks(split)
        return sorted(
            k
            for k, m in masks.items()
            if (m.all() or not complete_only) and (variants or (k.view == 0 and k.draw == 0))
        )

    def views(self, split: str, block: int, t: int, pool: int) -> int:
        """Complete views (0, 1, ... without a gap) of (block, t, pool) in ``split``: 0 if view 0 is missing."""
        return self._count(split, block, t, pool, "view")

    def noise_draws(self, split: str, block: int, t: int, pool: int) -> int:
        """Complete noise draws (0, 1, ... without a gap) of (block, t, pool) in ``split``."""
        return self._count(split, block, t, pool, "draw")

    def _count(self, split: str, block: int, t: int, pool: int, what: str) -> int:
        base = self.stored_key(block, t, pool)
        held = {getattr(k, what) for k in self.keys(split, variants=True) if k.base == base}
        n = 0
        while n in held:
            n += 1
        return n

    def n_images(self, split: str) -> int:
        return int(self._split(split).attrs["n_images"])

    def n_chunks(self, split: str) -> int:
        g = self._split(split)
        return _n_chunks(g.attrs["n_images"], g.attrs["chunk_images"])

    def chunk_images(self, split: str) -> int:
        return int(self._split(split).attrs["chunk_images"])

    def done_masks(self, split: str) -> dict[FeatureKey, np.ndarray]:
        """Every feature array of ``split`` -> which of its image chunks are complete (bool)."""
        g = self._split(split)
        columns = _columns(g)
        records = g["done"][:].astype(bool) if columns else np.zeros((0, 0), dtype=bool)
        masks = {}
        for name in g["features"].array_keys():
            if name in columns:  # an array without a column yet has no complete chunk
                masks[FeatureKey.parse(name)] = records[:, columns.index(name)]
            else:
                masks[FeatureKey.parse(name)] = np.zeros(self.n_chunks(split), dtype=bool)
        return masks

    def chunks_done(self, split: str, key: FeatureKey) -> int:
        """Complete image chunks of one feature array. Reads only that array's column: listing
        every array (`done_masks`) on each read made a 408-cell sweep spend ~70% of its time here."""
        g = self._split(split)
        columns = _columns(g)
        if key.name not in columns:  # an array without a column yet has no complete chunk
            return 0
        return int(g["done"][:, columns.index(key.name)].astype(bool).sum())

    def stored_key(self, block: int, t: int, pool: int, view: int = 0, draw: int = 0) -> FeatureKey:
        """The array holding (block, t, pool): pools beyond a block's map are stored capped."""
        if block not in self._spatial:
            raise StoreError(f"block {block} does not exist: this model has blocks 1-{len(self._spatial)}")
        for what, v in (("view", view), ("draw", draw)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise StoreError(f"{what}: {v!r} is not allowed; allowed: an integer >= 0")
        return FeatureKey(t, block, min(pool, self._spatial[block]), view, draw)

    # -- reading -------------------------------------------------------------------

    def _array(self, split: str, block: int, t: int, pool: int, view: int = 0, draw: int = 0):
        key = self.stored_key(block, t, pool, view, draw)
        g = self._split(split)
        if key.view or key.draw:
            self._array(split, block, t, pool)  # view 0 first: its error names what the store holds
            what, count = ("view", self.views) if key.view else ("noise draw", self.noise_draws)
            n = count(split, block, t, pool)
            if (key.view or key.draw) >= n:
                raise StoreError(
                    f"{self.path}: {what} {key.view or key.draw} of block {block}, t {t}, pool {pool} is not "
                    f"in split {split!r}; it holds {f'{what}s 0-{n - 1}' if n > 1 else f'{what} 0 only'} "
                    f"(extract.{'views' if key.view else 'noise_draws'})"
                )
        if "features" not in g or key.name not in g["features"]:
            raise StoreError(
                f"{self.path}: no features for block {block}, t {t}, pool {pool} in split "
                f"{split!r}; it holds {self.describe_holdings(split)}"
            )
        done = self.chunks_done(split, key)
        if done != self.n_chunks(split):
            raise StoreError(
                f"{self.path}: block {block}, t {t}, pool {pool} in split {split!r} is incomplete "
                f"({done}/{self.n_chunks(split)} chunks); run `extract run --store {self.path}` to finish it"
            )
        return g["features"][key.name]

    def feature_array(self, split: str, block: int, t: int, pool: int, view: int = 0, draw: int = 0):
        """The complete (N, C, p, p) Zarr array of (block, t, pool) at ``view`` (or noise
        ``draw``), unread: slicing it reads only the chunks of those rows (measured ~1.8x faster
        than the same slices through dask)."""
        return self._array(split, block, t, pool, view, draw)

    def features(self, split: str, block: int, t: int, pool: int, dask: bool = False, view: int = 0, draw: int = 0):
        """Features of every image of ``split``: (N, C, p, p), numpy (or dask with ``dask=True``).

        ``view`` v >= 1: the augmented view v (`extract.views`); ``draw`` m >= 1: the center crop
        under noise draw m (`extract.noise_draws`). Both 0: today's features."""
        arr = self._array(split, block, t, pool, view, draw)
        if dask:
            import dask.array as da

            return da.from_zarr(arr)
        return arr[:]

    def labels(self, split: str) -> np.ndarray:
        return self._split(split)["labels"][:]

    def ids(self, split: str) -> np.ndarray:
        return np.asarray(self._split(split)["ids"][:].tolist(), dtype=str)

    def skipped(self, split: str) -> np.ndarray:
        return self._split(split)["skipped"][:]

    def describe_holdings(self, split: str) -> str:
        keys = self.keys(split)
        if not keys:
            return "no complete feature arrays"
        return (
            f"blocks {format_int_list(k.block for k in keys)} at t {format_int_list(k.t for k in keys)}, "
            f"pools {format_int_list(k.pool for k in keys)}"
        )

    def status(self) -> dict:
        """Per split: images, chunks and each array's completed chunks."""
        out: dict[str, Any] = {"path": str(self.path), "fingerprints": self.fingerprints, "splits": {}}
        for split in self.splits:
            n = self.n_chunks(split)
            arrays = {
                k.name: {
                    "t": k.t,
                    "block": k.block,
                    "pool": k.pool,
                    **({"view": k.view} if k.view else {}),
                    **({"draw": k.draw} if k.draw else {}),
                    "chunks_done": int(m.sum()),
                    "chunks": n,
                }
                for k, m in sorted(self.done_masks(split).items())
            }
            out["splits"][split] = {
                "images": self.n_images(split),
                "skipped": int(self.skipped(split).sum()),
                "chunks": n,
                "arrays": arrays,
                "complete_arrays": sum(a["chunks_done"] == n for a in arrays.values()),
            }
        return out


def open_store(path: str | Path) -> FeatureStore:
    """Open a store read-only: list what it holds and read features, labels and ids."""
    return FeatureStore(path, mode="r")


# ------------------------------------------------------------------------ writing


def _short(value, limit: int = 120) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _diff(a, b, prefix="") -> str | None:
    """The first dotted key at which two JSON-like values differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
            if d:
                return d
        return None
    if a != b:
        return f"{prefix}: store has {_short(a)}, this run has {_short(b)}"
    return None


class StoreWriter(FeatureStore):
    """Write access for one `extract run`: holds the store's lock until `close`.

    ``create`` makes a new store or opens an existing one whose fingerprints equal the
    run's (else `FingerprintMismatch` naming what differs). ``attach`` gives the workers of
    a distributed run chunk-writing access under the lock their run holds.
    """

    owner: str | None = None  # the lock's text ("pid P on HOST, run R"): names the run that holds it
    _attached = False

    def __init__(self, path: Path):
        super().__init__(path, mode="r+")

    @classmethod
    def attach(cls, path: str | Path, owner: str) -> StoreWriter:
        """Chunk writing (``write_chunk``, ``write_skipped``) for a worker of the run whose lock
        text is ``owner``, without taking the lock (the run's client holds it).

        Each write first checks that this run still holds the store (`StoreLocked` if not), so
        a task outliving its run (its client or scheduler lost) never writes into a store that
        another run now owns. Chunks are the unit of work, so two workers never write one file.
        """
        path = Path(path)
        writer = cls(path)
        writer.owner = owner
        writer._attached = True
        writer.check_owner()
        return writer

    def check_owner(self) -> None:
        """Raise `StoreLocked` unless the run named ``owner`` still holds the store's lock."""
        try:
            holder = (self.path / ".lock").read_text(errors="replace").strip()
        except OSError as e:
            raise StoreError(f"{self.path}: cannot read the store's lock ({e.strerror or e})") from None
        if holder != self.owner:
            raise StoreLocked(
                f"{self.path}: the run that sent this task ({self.owner}) no longer holds the store "
                f"(now: {holder or 'nobody'}); not writing"
            )

    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        fingerprints: dict,
        provenance: dict,
        blocks: list[dict],
        class_names: list[str],
        splits: dict[str, tuple[list[str], np.ndarray]],
        chunk_images: int,
    ) -> StoreWriter:
        path = Path(path)
        for split, (ids, _) in splits.items():
            if len(ids) == 0:
                raise StoreError(f"split {split!r} has no images; nothing to extract")
        if path.exists() and not path.is_dir():
            raise StoreError(f"--store: {path} exists and is not a directory")
        ours = _read_root_attrs(path)
        if ours is None and path.is_dir() and any(c.name != ".lock" for c in path.iterdir()):
            raise StoreError(f"--store: {path} exists and is not a diffprobe store; pick a new or empty path")
        try:
            path.mkdir(parents=True, exist_ok=True)
            lock = _acquire_lock(path)
        except OSError as e:
            raise StoreError(f"--store: cannot write {path} ({e.strerror or e})") from None
        try:
            ours = _read_root_attrs(path)  # again, under the lock
            if ours and ours.get("initialized"):
                writer = cls(path)
                writer._check_fingerprints(fingerprints)  # an existing store keeps its own chunking
            else:
                _initialise(path, fingerprints, provenance, blocks, class_names, splits, chunk_images)
                writer = cls(path)
        except BaseException:
            _release_lock(lock)
            raise
        writer._lock = lock
        writer.owner = os.pread(lock, 256, 0).decode(errors="replace").strip()
        return writer

    def close(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None:
            _release_lock(lock)
            self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_fingerprints(self, fingerprints: dict) -> None:
        stored = self.fingerprints
        for section in FINGERPRINT_SECTIONS:
            d = _diff(stored.get(section), fingerprints.get(section), section)
            if d:
                raise FingerprintMismatch(
                    f"{self.path}: refusing to extend a store made with a different {section}: {d}"
                )

    def add_fingerprint(self, section: str, key: str, value) -> None:
        """Record ``section.key`` in a store that lacks it (augmentation settings, when a store
        made without views gets its first): the arrays it holds do not depend on it."""
        fingerprints = json.loads(json.dumps(self.fingerprints))
        held = fingerprints.get(section, {}).get(key)
        if held is not None and held != value:
            raise FingerprintMismatch(
                f"{self.path}: refusing to extend a store made with a different {section}: "
                f"{section}.{key}: store has {_short(held)}, this run has {_short(value)}"
            )
        fingerprints.setdefault(section, {})[key] = value
        self._root.attrs["fingerprints"] = fingerprints
        self.attrs["fingerprints"] = fingerprints

    def record_run(self, provenance: dict) -> None:
        """Append one run's provenance to the store's history (``attrs["runs"]``)."""
        self._root.attrs["runs"] = [*cast(list, self._root.attrs.get("runs", [])), provenance]

    def ensure_arrays(self, split: str, shapes: dict[FeatureKey, int], dtype: str, codec: str) -> None:
        """Create the feature arrays (key -> channels) not yet in ``split``, then their record columns."""
        g = self._split(split)
        features = g["features"]
        have = set(features.array_keys())
        n, chunk = self.n_images(split), self.chunk_images(split)
        missing = [(k, c) for k, c in shapes.items() if k.name not in have]
        _parallel(
            lambda kc: features.create_array(
                kc[0].name,
                shape=(n, kc[1], kc[0].pool, kc[0].pool),
                chunks=(chunk, kc[1], kc[0].pool, kc[0].pool),
                dtype=dtype,
                fill_value=float("nan"),
                **_codecs(codec),
            ),
            missing,
        )
        columns = _columns(g)
        new = [k.name for k in shapes if k.name not in columns]
        if new:  # widen the record array first, then name the columns: a new column reads as 0
            g["done"].resize((_n_chunks(n, chunk), len(columns) + len(new)))
            g.attrs["done_columns"] = columns + new
        self.__dict__.pop("_columns", None)

    def write_chunk(self, split: str, chunk: int, data: dict[FeatureKey, np.ndarray]) -> None:
        """Write one image chunk of several arrays, then (after all of them) their completion records."""
        if self._attached:
            self.check_owner()
        lo = chunk * self.chunk_images(split)
        arrays = {k: self._open(split, k) for k in data}
        _parallel(lambda kx: arrays[kx[0]].__setitem__(slice(lo, lo + len(kx[1])), kx[1]), data.items())
        columns = self.__dict__.setdefault("_columns", {})
        if split not in columns:
            columns[split] = {name: j for j, name in enumerate(self._split(split).attrs["done_columns"])}
        cols = sorted(columns[split][k.name] for k in data)
        self._split(split)["done"].set_orthogonal_selection((chunk, cols), np.ones(len(cols), dtype=np.uint8))

    def _open(self, split: str, key: FeatureKey):
        """The Zarr feature array of one key, opened once per writer (each open reads metadata)."""
        cache = self.__dict__.setdefault("_arrays", {})
        if (split, key) not in cache:
            cache[(split, key)] = self._split(split)["features"][key.name]
        return cache[(split, key)]

    def write_skipped(self, split: str, indices: np.ndarray) -> None:
        if len(indices):
            if self._attached:
                self.check_owner()
            arr = self._split(split)["skipped"]
            arr[np.asarray(indices)] = True


def _read_root_attrs(path: Path) -> dict | None:
    """The root attributes if ``path`` holds a diffprobe store (finished or not), else None."""
    try:
        attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):
        return None
    if attrs.get("schema") != "diffprobe-features":
        return None
    if attrs.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(
            f"{path}: a diffprobe store of schema version {attrs.get('schema_version')!r}; "
            f"this diffprobe writes version {SCHEMA_VERSION}"
        )
    return attrs


def _initialise(path, fingerprints, provenance, blocks, class_names, splits, chunk_images) -> None:
    """Create a new store, or redo one whose creation was cut off (it holds no features yet)."""
    for child in path.iterdir():  # only Zarr nodes: the root metadata and node folders
        if child.name == "zarr.json":
            child.unlink()
        elif child.is_dir() and (child / "zarr.json").is_file():
            shutil.rmtree(child)
    # overwrite=False: mode "w" would also delete the .lock this process holds
    root = zarr.create_group(
        str(path),
        overwrite=False,
        attributes={"schema": "diffprobe-features", "schema_version": SCHEMA_VERSION, "initialized": False},
    )
    for split, (ids, labels) in splits.items():
        n = len(ids)
        g = root.create_group(split, attributes={"n_images": n, "chunk_images": chunk_images})
        chunks = (min(chunk_images, n),)
        g.create_array("labels", shape=(n,), chunks=chunks, dtype="int64")[:] = np.asarray(labels, dtype=np.int64)
        g.create_array("ids", shape=(n,), chunks=chunks, dtype=str)[:] = np.asarray(ids, dtype=str)
        g.create_array("skipped", shape=(n,), chunks=chunks, dtype="bool", fill_value=False)
        g.create_group("features")
        # one row of records per image chunk, so writers of different chunks touch different files
        g.create_array(
            "done",
            shape=(_n_chunks(n, chunk_images), 0),
            chunks=(1, 1024),
            dtype="uint8",
            fill_value=0,
            compressors=None,
        )
    root.attrs.update(
        {
            "fingerprints": fingerprints,
            "provenance": provenance,
            "blocks": blocks,
            "class_names": list(class_names),
            "splits": list(splits),
        }
    )
    root.attrs["initialized"] = True  # last: a store cut off before this is redone from scratch


def _parallel(fn, items) -> list:
    """``[fn(item) for item in items]`` on a few threads: Zarr's per-call latency, not bandwidth,
    dominates many small chunk reads and writes (measured: ~1.4x faster than a loop for 400 writes)."""
    items = list(items)
    if len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(fn, items))  # re-raises the first error


def _acquire_lock(path: Path):
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise StoreLocked(
            f"{path}: another `extract run` is writing this store ({holder}); wait for it to finish or stop it"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}, run {secrets.token_hex(4)}".encode(), 0)
    return fd


def _release_lock(fd) -> None:
    os.ftruncate(fd, 0)  # no run owns the store now: workers attached to the last one stop writing
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
