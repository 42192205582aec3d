"""The kNN alignment engine: mutual-kNN and CKNNA between representations; it knows no store.

    from diffprobe.analyze.knn import AlignOptions, align_matrix, mutual_knn, cknna
    mutual_knn(x, y, k=10)                            # two in-memory (N, D) arrays -> float
    r = align_matrix(rows, cols, n, AlignOptions(knn_metric="cknna"))   # Sources -> matrix

A representation is a `diffprobe.analyze.engine.Source`, as for CKA; the store adapter is
`diffprobe.analyze.align`. Both metrics follow platonic-rep's ``metrics.py`` (Huh et al. 2024,
"The Platonic Representation Hypothesis"), which REPA reports:

- features are L2-normalised; the kernel is the cosine similarity K = X X^T;
- kNN(i): the k images j != i of largest K[i, j] (ties: the smaller index, `probe.neighbours`);
- ``mutual-knn``: the mean over images i of |kNN_A(i) & kNN_B(i)| / k;
- ``cknna``: M[i, j] = 1 where j is in both kNN_A(i) and kNN_B(i);
  CKNNA = HSIC(M*K, M*L) / sqrt(HSIC(M_A*K, M_A*K) HSIC(M_B*L, M_B*L)), HSIC the unbiased
  estimator of Song et al. (2012) exactly as written there (its tr(K~ L~^T) term on these
  non-symmetric masked matrices included). platonic-rep adds 1e-6 to the denominator; here a
  representation whose own term is <= 0 gets 0 and a warning, as CKA does, and nothing else
  is changed.

How it scales: each representation's neighbours are exact, N^2 D multiply-adds in (query
block x database block) products whose memory is bounded by ``memory_mb`` (a representation
that fits is held whole, else it is re-read once per query block); only its neighbour lists
(N k indices and similarities) are kept. A pair then costs O(N k log(N k)) on those lists. So
a 37 x 37 matrix is 37 kNN computations plus 703 cheap pairs.

Uncertainty, as for CKA: ``permutations`` P shuffles the image pairing of the column
representation (the neighbour lists are relabelled, not recomputed) and reports the mean and
95th percentile, the value of "no alignment" at this N and k (mutual-kNN: about k / (N - 1)).
``bootstrap`` B draws half of the images without replacement per replicate (copies of an
image would be each other's nearest neighbours), recomputes every representation's
neighbours within it, and reports the estimate plus the 2.5/97.5 percentiles of the
replicates' deviations from their mean. Bootstrap needs each representation in memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from diffprobe.analyze.engine import (
    CI_LEVEL,
    Source,
    _Progress,
    _windows,
    array_source,
    derive_options,
)
from diffprobe.probe.neighbours import RunningTopK, normalise, similarities
from diffprobe.store.choices import AlignMetric
from diffprobe.store.errors import DiffprobeError

_ALIGN_KEYS = ("knn_metric", "knn_k", "bootstrap", "permutations", "seed", "precision", "memory_mb")
_AlignOptionsBase = derive_options("_AlignOptionsBase", lambda key: key in _ALIGN_KEYS)


class AlignError(DiffprobeError):
    """A kNN alignment request that cannot be computed as asked (k, images, memory)."""


class AlignOptions(_AlignOptionsBase):  # type: ignore[misc,valid-type]
    """Options of a kNN alignment: knn_metric, knn_k, bootstrap, permutations, seed, precision,
    memory_mb (the `AnalyzeConfig` keys, same defaults and checks)."""


_BROADCAST = 50_000_000  # pairs matched by one (n, k, k) comparison up to this many booleans, else by sorted keys


@dataclass(frozen=True)
class Lists:
    """One representation's kNN graph: row i holds its k neighbours ``index[i]`` and their
    similarities ``sims[i]`` (any order within the row)."""

    index: np.ndarray  # (n, k) int64
    sims: np.ndarray  # (n, k) float64

    @property
    def n(self) -> int:
        return len(self.index)


def _lists(index: torch.Tensor, values: torch.Tensor) -> Lists:
    return Lists(index.cpu().numpy().astype(np.int64), values.cpu().numpy().astype(np.float64))


def _permuted(a: Lists, perm: np.ndarray) -> Lists:
    """The lists of the representation whose image i is ``a``'s image perm[i]."""
    inv = np.empty_like(perm)
    inv[perm] = np.arange(len(perm))
    return Lists(inv[a.index[perm]], a.sims[perm])


def _matches(a: Lists, b: Lists) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(rows i, columns j, K[i, j], L[i, j]) of every j in both kNN_A(i) and kNN_B(i), by (i, j)."""
    n, k = a.index.shape
    if n * k * k <= _BROADCAST:  # small k: compare each row's lists directly
        r, p, q = np.nonzero(a.index[:, :, None] == b.index[:, None, :])
        c, kv, lv = a.index[r, p], a.sims[r, p], b.sims[r, q]
        order = np.lexsort((c, r))
        return r[order], c[order], kv[order], lv[order]
    rows = np.repeat(np.arange(n, dtype=np.int64), k)
    ka, kb = rows * n + a.index.ravel(), rows * n + b.index.ravel()
    common, ia, ib = np.intersect1d(ka, kb, assume_unique=True, return_indices=True)
    r, c = np.divmod(common, n)
    return r, c, a.sims.ravel()[ia], b.sims.ravel()[ib]


def pair_stats(a: Lists, b: Lists, k: int) -> tuple[float, float]:
    """(mutual-kNN, HSIC(M*K, M*L)) of two representations' lists (M: j in both kNN(i))."""
    n = a.n
    r, c, kv, lv = _matches(a, b)
    mutual = len(r) / (n * k)
    t1 = 0.0
    if len(r):
        common = r * n + c  # ascending
        rev = c * n + r  # (j, i) of each (i, j): tr(K~ L~^T) pairs K~[i, j] with L~[j, i]
        pos = np.minimum(np.searchsorted(common, rev), len(common) - 1)
        hit = common[pos] == rev
        t1 = float(kv[hit] @ lv[pos[hit]])
    t3 = float(np.bincount(c, kv, minlength=n) @ np.bincount(r, lv, minlength=n))  # 1^T K~ L~ 1
    h = (t1 + float(kv.sum()) * float(lv.sum()) / ((n - 1) * (n - 2)) - 2.0 * t3 / (n - 2)) / (n * (n - 3))
    return mutual, h


# ------------------------------------------------------------------ neighbours of one representation


def _dtype(opts) -> torch.dtype:
    return torch.float64 if opts.precision == "float64" else torch.float32


def _knn_in_memory(x: torch.Tensor, k: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-excluding kNN of the normalised rows of ``x``: (values, index), each (n, k)."""
    n = len(x)
    values, index = [], []
    for q0 in range(0, n, block):
        q = x[q0 : q0 + block]
        top = RunningTopK(len(q), k, x.device, x.dtype)
        for d0 in range(0, n, block):
            s = similarities(q, x[d0 : d0 + block], "cosine")
            _mask_self(s, q0, d0)
            top.add(s, d0)
        values.append(top.values)
        index.append(top.index)
    return torch.cat(values), torch.cat(index)


def _mask_self(s: torch.Tensor, q0: int, d0: int) -> None:
    lo, hi = max(q0, d0), min(q0 + s.shape[0], d0 + s.shape[1])
    if lo < hi:
        i = torch.arange(lo, hi, device=s.device)
        s[i - q0, i - d0] = -torch.inf


def _read(src: Source, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
    return normalise(torch.from_numpy(np.asarray(src.read(lo, hi))).to(dtype), "cosine")


def neighbours(
    src: Source, n: int, opts, subsets: Sequence[np.ndarray] = (), progress: Callable[[int], None] | None = None
) -> tuple[Lists, list[Lists], int]:
    """``src``'s kNN lists over its ``n`` images, the lists within each of ``subsets`` (sorted
    image indices), and how many times it was read. Memory: ``opts.memory_mb``."""
    k, dtype = opts.knn_k, _dtype(opts)
    item = torch.finfo(dtype).bits // 8
    budget = opts.memory_mb * 2**20
    # a (query block x database block) similarity matrix and its top-k scratch take a quarter of the budget
    block = max(1, int((budget / 4 / (3 * item)) ** 0.5))
    whole = n * src.dim * item <= budget / 2
    if subsets and not whole:
        raise AlignError(
            f"--bootstrap: {src.name} needs {n * src.dim * item / 2**20:.0f} MB in memory for its "
            f"replicates but analyze.memory_mb is {opts.memory_mb:g}; raise it or use a smaller --pool"
        )
    if whole:
        x = torch.cat([_read(src, lo, hi, dtype) for lo, hi in _windows(n, src.chunk, 4096)])
        values, index = _knn_in_memory(x, k, block)
        full = _lists(index, values)
        if progress:
            progress(n)
        subs = []
        for idx in subsets:
            v, i = _knn_in_memory(x[torch.from_numpy(idx)], k, block)
            subs.append(_lists(i, v))
        return full, subs, 1
    # streamed: query windows held while every database window is read
    rows = max(1, min(block, int(budget / 4 / (src.dim * item))))
    windows = _windows(n, src.chunk, rows)
    vals: list[torch.Tensor] = []
    idxs: list[torch.Tensor] = []
    for q0, q1 in windows:
        q = _read(src, q0, q1, dtype)
        top = RunningTopK(len(q), k, "cpu", dtype)
        for d0, d1 in windows:
            db = q if d0 == q0 else _read(src, d0, d1, dtype)
            s = similarities(q, db, "cosine")
            _mask_self(s, q0, d0)
            top.add(s, d0)
        vals.append(top.values)
        idxs.append(top.index)
        if progress:
            progress(q1 - q0)
    return _lists(torch.cat(idxs), torch.cat(vals)), [], len(windows)


# ------------------------------------------------------------------ matrices


def align_matrix(
    rows: list[Source],
    cols: list[Source] | None,
    n: int,
    opts: AlignOptions | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict:
    """``opts.knn_metric`` of every row source against every column source over ``n`` images
    (the same order in all). ``cols`` None: the square matrix of ``rows``.

    Returns the keys of `diffprobe.analyze.engine.cka_matrix`'s result: ``matrix``, ``rows``,
    ``cols``, ``n_images``, ``reads``, ``warnings``, ``seconds``, with bootstrap
    ``ci_low``/``ci_high``/``bootstrap``, with permutations ``perm_mean``/``perm_high``/
    ``permutations``; plus ``metric`` and ``k``.
    """
    opts = opts or AlignOptions()
    k, metric = opts.knn_k, opts.knn_metric
    if metric == AlignMetric.CKNNA and k < 2:
        raise AlignError(f"--k {k}: cknna needs k >= 2 (a single neighbour leaves nothing to centre)")
    need = 4 if metric == AlignMetric.CKNNA else 2
    if n < need:
        raise AlignError(f"{metric} needs at least {need} images; there are {n}")
    if k >= n:
        raise AlignError(f"--k {k}: must be below the number of images ({n}): each image has {n - 1} neighbours")
    half = n // 2
    if opts.bootstrap and k >= half:
        raise AlignError(f"--k {k}: --bootstrap replicates hold {half} images each; k must be below that")
    if opts.bootstrap and half < need:
        raise AlignError(f"--bootstrap: {n} images are too few (each replicate draws half of them)")
    square = cols is None
    col_sources = list(rows) if cols is None else list(cols)
    union = list(rows) + ([] if square else col_sources)
    ri = list(range(len(rows)))
    ci = ri if square else list(range(len(rows), len(union)))
    lists_bytes = 16.0 * len(union) * n * k * (1 + opts.bootstrap / 2 + (1 if opts.permutations else 0))
    if lists_bytes > opts.memory_mb * 2**20:
        raise AlignError(
            f"the neighbour lists of {len(union)} representations at N = {n}, k = {k}"
            f"{f' with {opts.bootstrap} bootstrap replicates' if opts.bootstrap else ''} need "
            f"{lists_bytes / 2**20:.0f} MB but analyze.memory_mb is {opts.memory_mb:g}; raise it"
        )
    started = time.perf_counter()
    rng = np.random.default_rng(opts.seed)
    subsets = [np.sort(rng.choice(n, half, replace=False)) for _ in range(opts.bootstrap)]
    perms = [rng.permutation(n) for _ in range(opts.permutations)]
    progress = _Progress(n * len(union), on_progress)
    full, boots, reads = [], [], 1
    for src in union:
        lists, subs, r = neighbours(src, n, opts, subsets, progress)
        full.append(lists)
        boots.append(subs)
        reads = max(reads, r)

    def matrix(la: list[Lists], lb: list[Lists], kk: int) -> tuple[np.ndarray, np.ndarray]:
        """(metric values, own terms): rows la x cols lb, and each list's self-HSIC."""
        both = la if lb is la else la + lb
        own = (
            np.zeros(len(both))
            if metric == AlignMetric.MUTUAL_KNN
            else np.array([pair_stats(x, x, kk)[1] for x in both])
        )
        m = np.zeros((len(la), len(lb)))
        for i, a in enumerate(la):
            for j, b in enumerate(lb):
                if lb is la and j < i:
                    m[i, j] = m[j, i]
                    continue
                mu, h = pair_stats(a, b, kk)
                m[i, j] = mu if metric == AlignMetric.MUTUAL_KNN else h
        return m, own

    def finish(m: np.ndarray, own: np.ndarray, n_rows: int, same: bool) -> tuple[np.ndarray, np.ndarray]:
        if metric == AlignMetric.MUTUAL_KNN:
            return m, np.zeros(len(own), dtype=bool)
        orow, ocol = own[:n_rows], (own[:n_rows] if same else own[n_rows:])
        bad_r, bad_c = ~(orow > 0), ~(ocol > 0)
        denom = np.sqrt(np.where(bad_r, 1.0, orow))[:, None] * np.sqrt(np.where(bad_c, 1.0, ocol))[None, :]
        return np.where(np.outer(~bad_r, ~bad_c), m / denom, 0.0), np.concatenate([bad_r, bad_c])

    la, lb = [full[i] for i in ri], [full[i] for i in ci]
    raw, own = matrix(la, la if square else lb, k)
    mat, bad = finish(raw, own, len(ri), square)
    warnings = []
    for i in np.flatnonzero(bad[: len(ri)] if square else bad):
        warnings.append(f"{union[i].name} has no neighbour structure (its own CKNNA term is <= 0): its CKNNA is 0")
    if square:  # the diagonal is exactly 1 (0 where degenerate), not 1 +- rounding
        mat[np.diag_indices(len(ri))] = np.where(bad[: len(ri)], 0.0, 1.0)
    out: dict = {
        "rows": [s.label for s in rows],
        "cols": [s.label for s in col_sources],
        "matrix": mat.tolist(),
        "metric": metric,
        "k": k,
        "n_images": n,
        "reads": reads,
        "warnings": warnings,
    }
    if subsets:
        reps = []
        for b in range(len(subsets)):
            ba, bb = [boots[i][b] for i in ri], [boots[i][b] for i in ci]
            m, o = matrix(ba, ba if square else bb, k)
            reps.append(finish(m, o, len(ri), square)[0])
        dev = np.stack(reps) - np.mean(reps, axis=0)  # replicates' spread around their mean, at the estimate
        alpha = (1 - CI_LEVEL) / 2
        out["ci_low"] = (mat + np.quantile(dev, alpha, axis=0)).tolist()
        out["ci_high"] = (mat + np.quantile(dev, 1 - alpha, axis=0)).tolist()
        out["bootstrap"] = len(subsets)
    if perms:
        reps = []
        for pi in perms:
            pb = [_permuted(full[i], pi) for i in ci]
            m = np.array([[pair_stats(a, b, k)[0 if metric == AlignMetric.MUTUAL_KNN else 1] for b in pb] for a in la])
            if metric == AlignMetric.CKNNA:  # normalised by the unpermuted own terms (they do not change)
                ocol = own if square else own[len(ri) :]
                m = finish(m, np.concatenate([own[: len(ri)], ocol]), len(ri), False)[0]
            reps.append(m)
        pm = np.stack(reps)
        out["perm_mean"] = pm.mean(axis=0).tolist()
        out["perm_high"] = np.quantile(pm, 0.95, axis=0).tolist()
        out["permutations"] = len(perms)
    out["seconds"] = round(time.perf_counter() - started, 3)
    return out


def _one(x: np.ndarray, y: np.ndarray, metric: str, k: int, **options) -> float:
    x, y = np.asarray(x), np.asarray(y)
    if len(x) != len(y):
        raise AlignError(f"x has {len(x)} images and y has {len(y)}; alignment needs the same images on both sides")
    opts = AlignOptions(knn_metric=metric, knn_k=k, **options)
    return align_matrix([array_source(x, "x")], [array_source(y, "y")], len(x), opts)["matrix"][0][0]


def mutual_knn(x: np.ndarray, y: np.ndarray, k: int = 10, **options) -> float:
    """Mutual-kNN alignment of two in-memory (N, ...) representations of the same images."""
    return _one(x, y, AlignMetric.MUTUAL_KNN, k, **options)


def cknna(x: np.ndarray, y: np.ndarray, k: int = 10, **options) -> float:
    """CKNNA of two in-memory (N, ...) representations of the same images."""
    return _one(x, y, AlignMetric.CKNNA, k, **options)
