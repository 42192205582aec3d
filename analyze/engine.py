"""The CKA engine: centered kernel alignment between representations, out of core.

It knows no store: a representation is a `Source` (a row reader); the store adapter is
`diffprobe.analyze.cka`.

    from diffprobe.analyze.engine import cka, cka_matrix, array_source, CkaOptions
    cka(x, y, "linear-unbiased")                      # two in-memory (N, D) arrays -> float
    r = cka_matrix(rows, cols, n, CkaOptions())       # Sources (store arrays or arrays) -> matrix

Estimators (``CkaOptions.estimator``):

- ``linear`` / ``linear-unbiased``: linear-kernel CKA with the biased HSIC (Kornblith et al.
  2019) or the unbiased HSIC of Song et al. (2012) ("debiased"). Two exact forms: the
  feature-space form accumulates D x D cross products chunk by chunk (memory (sum of D)^2,
  any N), the Gram form holds one N x N matrix per representation (memory k N^2); the one
  needing less memory is used (so feature space whenever D is not small against N).
- ``rbf`` / ``rbf-unbiased``: Gaussian kernel, bandwidth sigma = ``rbf_fraction`` x the median
  distance between distinct images; needs the Gram form (N x N per representation).
- ``minibatch``: Nguyen et al. (2021): unbiased linear HSIC averaged over minibatches of
  ``minibatch_size`` images (shuffled with ``seed`` within each read window), CKA from the
  averages. Memory k x batch^2; with one batch of all N images it is ``linear-unbiased``.

Sums are float64. In the feature-space form the per-chunk products run in ``precision``
(float32: 1.8x faster at N = 50,000 x D = 4,096, CKA within 1e-8 of float64 in the tests and
benchmarks; float64 for bit-careful work) and are added into float64 accumulators; features
are shifted by the first chunk's mean before any product so that uncentered sums do not
cancel (the biased HSIC is then centred exactly from the sums; the unbiased one is invariant
to shifting the features, since its U-statistic kernel depends on differences only). Every representation (one stored array) is
read once per matrix when its accumulators fit in ``memory_mb``; otherwise representations
are processed in groups and the result says how many times each was read.

A representation with (numerically) zero variance gets CKA 0 against everything, itself
included, and a warning naming it; an unbiased self-HSIC <= 0 (tiny N) is treated the same.
Nothing returns NaN. Unbiased estimates are not clipped to [0, 1].

Uncertainty: ``bootstrap`` B replicates over images (Gram form). Resampling with replacement
would put copies of one image in a replicate, and a copy looks exactly like itself in both
representations, which inflates CKA (measured here: the whole percentile interval of biased
linear CKA above the estimate). Each replicate therefore draws half of the images without
replacement, whose estimates spread like full-sample ones do (McCarthy's half-sampling), and
the interval is the estimate plus the 2.5/97.5 percentiles of the replicates' deviations from
their mean. The minibatch estimator resamples its minibatches with replacement (a batch's
HSIC is an estimate of its own, so copies inflate nothing), same interval form;
``permutations`` P shuffles the image pairing of the column representation and reports the
mean and 95th percentile of CKA under no alignment.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from diffprobe.store.choices import Estimator, Precision
from diffprobe.store.config import AnalyzeConfig
from diffprobe.store.errors import DiffprobeError

ESTIMATORS = tuple(Estimator)  # the one definition: diffprobe.store.choices
PRECISIONS = tuple(Precision)
CI_LEVEL = 0.95
_TILE = 1024  # feature-space products: row panels of this many columns (upper triangle only)
_PANEL = 8192  # ... times at most this many columns per product call
_GROUP_ROWS = 4096  # rows per product call (a multiple of the read chunk)
# A representation is constant when its total variance is below this fraction of its mean
# square: float64 sums of float16 features leave ~1e-16 relative noise, far below any real signal.
_CONST_RTOL = 1e-10
READ_THREADS = 8  # sources read in parallel (Zarr reads release the GIL)


class CkaError(DiffprobeError):
    """A CKA request that cannot be computed as asked (memory, images, estimator settings)."""


def derive_options(name: str, keys: Callable[[str], bool]) -> type:
    """A frozen dataclass of the `AnalyzeConfig` keys that ``keys`` admits, with the config's
    defaults, each value checked by its own parser (the error names ``analyze.<key>``)."""
    fields = [f for f in dataclasses.fields(AnalyzeConfig) if keys(f.name)]

    def check(self) -> None:
        for f in fields:
            object.__setattr__(self, f.name, f.metadata["parse"](getattr(self, f.name), f"analyze.{f.name}"))

    return dataclasses.make_dataclass(
        name,
        [(f.name, f.type, dataclasses.field(default=f.default)) for f in fields],
        frozen=True,
        namespace={"__post_init__": check},
    )


# The engine's options are AnalyzeConfig's keys (all but `split` and the kNN alignment's
# `knn_*`), with the same defaults and parsers: derived from the config tree, never declared a
# second time.
_CkaOptionsBase = derive_options("_CkaOptionsBase", lambda key: key != "split" and not key.startswith("knn_"))


class CkaOptions(_CkaOptionsBase):  # type: ignore[misc,valid-type]
    """Options of a CKA computation: estimator, rbf_fraction, minibatch_size, bootstrap,
    permutations, seed, precision, memory_mb (see `AnalyzeConfig`)."""

    @property
    def unbiased(self) -> bool:
        return self.estimator in ("linear-unbiased", "rbf-unbiased", "minibatch")

    @property
    def kernel(self) -> str:
        return "rbf" if self.estimator.startswith("rbf") else "linear"


@dataclass(frozen=True)
class Source:
    """One representation: ``read(lo, hi)`` returns rows lo..hi of the common image order, (hi-lo, dim)."""

    label: int | str
    name: str
    dim: int
    read: Callable[[int, int], np.ndarray]
    chunk: int = 512  # rows per read that match the storage chunks


def array_source(x: np.ndarray, label: int | str = 0, name: str | None = None, chunk: int = 512) -> Source:
    """An in-memory (N, ...) array as a Source (flattened to (N, D))."""
    x = np.asarray(x)
    x2 = x.reshape(len(x), -1)
    return Source(label, name or f"array {label}", x2.shape[1], lambda lo, hi: x2[lo:hi], chunk)


# ------------------------------------------------------------------ HSIC from parts


def _cka_from_hsic(h: np.ndarray, diag_r: np.ndarray, diag_c: np.ndarray, bad_r, bad_c) -> np.ndarray:
    """CKA[i, j] = h[i, j] / sqrt(diag_r[i] diag_c[j]); 0 where either side is degenerate."""
    ok = np.outer(~bad_r, ~bad_c)
    denom = np.sqrt(np.where(bad_r, 1.0, diag_r))[:, None] * np.sqrt(np.where(bad_c, 1.0, diag_c))[None, :]
    return np.where(ok, h / denom, 0.0)


def _gram_parts(k: np.ndarray, unbiased: bool):
    """(flat kernel part, row sums, total) of one N x N Gram matrix for the HSIC of `_pair_hsic`."""
    k = np.asarray(k, dtype=np.float64)
    if unbiased:
        kt = k.copy()
        np.fill_diagonal(kt, 0.0)
        r = kt.sum(axis=1)
        return kt.ravel(), r, float(r.sum())
    m = k.mean(axis=0)
    kc = k - m[None, :] - m[:, None] + m.mean()
    return kc.ravel(), None, None


def _pair_hsic(parts_a, parts_b, n: int, unbiased: bool) -> np.ndarray:
    """All-pairs HSIC between two lists of `_gram_parts` (common factors kept: the unbiased
    estimator of Song et al. 2012, or <HKH, HLH>/(n-1)^2)."""
    fa = np.stack([p[0] for p in parts_a])
    fb = fa if parts_b is parts_a else np.stack([p[0] for p in parts_b])
    h = fa @ fb.T
    if not unbiased:
        return h / (n - 1) ** 2
    ra = np.stack([p[1] for p in parts_a])
    rb = ra if parts_b is parts_a else np.stack([p[1] for p in parts_b])
    ta = np.array([p[2] for p in parts_a])
    tb = np.array([p[2] for p in parts_b])
    h = h + np.outer(ta, tb) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (ra @ rb.T)
    return h / (n * (n - 3))


def _kernel(x: np.ndarray, kernel: str, rbf_fraction: float) -> np.ndarray:
    """The N x N kernel matrix of centred float64 features."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(axis=0)
    k = x @ x.T
    if kernel == "linear":
        return k
    sq = np.diag(k)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * k, 0.0)
    iu = np.triu_indices(len(x), 1)
    dist = np.sqrt(d2[iu])
    med = float(np.median(dist)) if dist.size else 0.0
    if med <= 0.0:  # more than half of the pairs coincide: fall back to the mean distance
        med = float(dist.mean()) if dist.size else 0.0
    if med <= 0.0:  # all images identical: constant (flagged by the caller)
        return np.ones_like(k)
    sigma = rbf_fraction * med
    return np.exp(-d2 / (2.0 * sigma * sigma))


# ------------------------------------------------------------------ the engine


def _gather(sources: list[Source], lo: int, hi: int, pool: ThreadPoolExecutor | None) -> list[np.ndarray]:
    if pool is None or len(sources) == 1:
        return [s.read(lo, hi) for s in sources]
    return list(pool.map(lambda s: s.read(lo, hi), sources))


def _windows(n: int, chunk: int, target: int) -> list[tuple[int, int]]:
    """Row windows of about ``target`` rows made of whole read chunks."""
    step = max(chunk, (max(target, 1) // chunk) * chunk)
    return [(lo, min(n, lo + step)) for lo in range(0, n, step)]


def _read_all(src: Source, n: int) -> np.ndarray:
    return (
        np.concatenate([src.read(lo, hi) for lo, hi in _windows(n, src.chunk, _GROUP_ROWS)])
        if n
        else np.zeros((0, src.dim))
    )


def _constant(total_var: float, mean_square: float) -> bool:
    return not total_var > _CONST_RTOL * max(mean_square, 1e-300)


class _Progress:
    def __init__(self, total: int, cb):
        self.total, self.done, self.cb = total, 0, cb

    def __call__(self, k: int):
        self.done += k
        if self.cb:
            self.cb(self.done, self.total)


def _gram_mode(union: list[Source], n: int, opts: CkaOptions, progress: _Progress, pool):
    """Read every source once, keep its kernel matrix; HSIC for all pairs (+ bootstrap, permutations)."""
    grams, const = [], []
    # sources read at once (threads: Zarr's per-call latency, not bandwidth, dominates small reads),
    # as many as fit beside the kernel matrices
    spare = opts.memory_mb * 2**20 - 8.0 * len(union) * n * n
    step = int(min(8, max(1, spare // (24.0 * n * max(s.dim for s in union)))))
    for lo in range(0, len(union), step):
        group = union[lo : lo + step]
        xs = list(pool.map(lambda s: _read_all(s, n), group)) if len(group) > 1 else [_read_all(group[0], n)]
        for x in xs:
            x = x.astype(np.float64)
            xc = x - x.mean(axis=0)
            tv, ms = float((xc * xc).sum()) / max(n, 1), float((x * x).sum()) / max(n, 1)
            const.append(_constant(tv, ms))
            grams.append(_kernel(x, opts.kernel, opts.rbf_fraction))
            progress(n)
    parts = [_gram_parts(k, opts.unbiased) for k in grams]
    h = _pair_hsic(parts, parts, n, opts.unbiased)
    rng = np.random.default_rng(opts.seed)
    boots = []
    half = n // 2
    if opts.bootstrap and half < (4 if opts.unbiased else 2):
        raise CkaError(f"--bootstrap: {n} images are too few (each replicate draws half of them)")
    for _ in range(opts.bootstrap):
        # half of the images without replacement (see the module docstring: duplicates inflate CKA)
        idx = np.sort(rng.choice(n, half, replace=False))
        p = [_gram_parts(k[np.ix_(idx, idx)], opts.unbiased) for k in grams]
        boots.append(_pair_hsic(p, p, half, opts.unbiased))
    perms = []
    for _ in range(opts.permutations):
        pi = rng.permutation(n)
        p = [_gram_parts(k[np.ix_(pi, pi)], opts.unbiased) for k in grams]
        perms.append(_pair_hsic(parts, p, n, opts.unbiased))
    return h, np.array(const), boots, perms


def _feature_pass(group: list[Source], n: int, opts: CkaOptions, progress: _Progress, pool):
    """One read of ``group``: float64 accumulators of shifted features; returns the group's all-pairs HSIC."""
    import torch

    dims = [s.dim for s in group]
    off = np.concatenate([[0], np.cumsum(dims)])
    du, k = int(off[-1]), len(group)
    tdtype = torch.float32 if opts.precision == "float32" else torch.float64
    tiles = [(a, min(du, a + _TILE)) for a in range(0, du, _TILE)]
    g = np.zeros((du, du))
    s = np.zeros(du)
    shift: list[np.ndarray] = []
    rmat = np.zeros((du, k) if opts.unbiased else (0, k))  # used by the unbiased estimators only
    q = np.zeros((k, k))
    asum = np.zeros(k)
    chunk = max(src.chunk for src in group)
    budget_rows = int(max(chunk, opts.memory_mb * 2**20 / 8 / max(du * 12, 1)))
    for lo, hi in _windows(n, chunk, min(_GROUP_ROWS, budget_rows)):
        xs = _gather(group, lo, hi, pool)
        if not shift:
            shift = [x.astype(np.float64).mean(axis=0) for x in xs]
        z = np.empty((hi - lo, du), dtype=np.float32 if tdtype == torch.float32 else np.float64)
        a = np.empty((hi - lo, k))
        for j, x in enumerate(xs):
            # shifted in the products' precision, straight into z (float32: 4x less time than via
            # float64, ~10% of a 50,000 x 4,096 pair); row norms and sums accumulate in float64
            b = z[:, off[j] : off[j + 1]]
            np.subtract(x, shift[j].astype(z.dtype), out=b)
            a[:, j] = np.einsum("ij,ij->i", b, b, dtype=np.float64)
            s[off[j] : off[j + 1]] += b.sum(axis=0, dtype=np.float64)
        zt = torch.from_numpy(z)
        for p0, p1 in tiles:  # row panels of the upper triangle: few large GEMMs (measured 1.3x over square tiles)
            for q0 in range(p0, du, _PANEL):
                q1 = min(du, q0 + _PANEL)
                g[p0:p1, q0:q1] += (zt[:, p0:p1].T @ zt[:, q0:q1]).numpy()
        if opts.unbiased:
            rmat += (zt.T.double() @ torch.from_numpy(a)).numpy()
        q += a.T @ a
        asum += a.sum(axis=0)
        progress((hi - lo) * k)
    for p0, p1 in tiles:  # mirror the panels (diagonal blocks were computed whole)
        g[p1:, p0:p1] = g[p0:p1, p1:].T
    h = np.zeros((k, k))
    for i in range(k):
        si = s[off[i] : off[i + 1]]
        for j in range(i, k):
            sj = s[off[j] : off[j + 1]]
            m = g[off[i] : off[i + 1], off[j] : off[j + 1]]
            ss = float(np.einsum("ij,ij->", m, m))
            smx = float(si @ m @ sj)
            if opts.unbiased:
                tr = ss - q[i, j]
                ki, kj = float(si @ si) - asum[i], float(sj @ sj) - asum[j]
                dot = (
                    smx - float(si @ rmat[off[i] : off[i + 1], j]) - float(sj @ rmat[off[j] : off[j + 1], i]) + q[i, j]
                )
                v = (tr + ki * kj / ((n - 1) * (n - 2)) - 2.0 * dot / (n - 2)) / (n * (n - 3))
            else:
                v = (ss - 2.0 * smx / n + float(si @ si) * float(sj @ sj) / n**2) / (n - 1) ** 2
            h[i, j] = h[j, i] = v
    const = []
    for j in range(k):
        sj = s[off[j] : off[j + 1]]
        c = shift[j]
        tv = (asum[j] - float(sj @ sj) / n) / n  # trace of the covariance
        raw = (asum[j] + 2.0 * float(c @ sj) + n * float(c @ c)) / n  # mean squared norm of the features
        const.append(_constant(tv, raw))
    return h, np.array(const)


def _minibatch_mode(union: list[Source], n: int, opts: CkaOptions, progress: _Progress, pool):
    """Unbiased linear HSIC per minibatch for all pairs; returns the mean and the per-batch values."""
    m = opts.minibatch_size
    rng = np.random.default_rng(opts.seed)
    perm_rngs = np.random.default_rng(opts.seed + 1)
    chunk = max(s.chunk for s in union)
    per_batch, perm_batches, tv, ms = [], [], np.zeros(len(union)), np.zeros(len(union))
    carry: list[np.ndarray] | None = None

    def batch_hsic(xs):
        nb = len(xs[0])
        parts = []
        for x in xs:
            b = x - x.mean(axis=0)
            parts.append(_gram_parts(b @ b.T, True))
        per_batch.append(_pair_hsic(parts, parts, nb, True))
        if opts.permutations:
            row = []
            for _ in range(opts.permutations):
                pi = perm_rngs.permutation(nb)
                pp = [_gram_parts(np.asarray(p[0]).reshape(nb, nb)[np.ix_(pi, pi)], True) for p in parts]
                row.append(_pair_hsic(parts, pp, nb, True))
            perm_batches.append(row)

    # a read window holds every source's rows in float64 (plus a shuffled copy): bounded by memory_mb
    fit = int(opts.memory_mb * 2**20 / (24.0 * sum(s.dim for s in union)))
    windows = _windows(n, chunk, max(m, min(max(_GROUP_ROWS, 4 * m), fit)))
    for w, (lo, hi) in enumerate(windows):
        xs = [x.astype(np.float64) for x in _gather(union, lo, hi, pool)]
        for j, x in enumerate(xs):
            tv[j] += float(((x - x.mean(axis=0)) ** 2).sum())  # within-window variance: enough to flag constants
            ms[j] += float((x * x).sum())
        if carry is not None:
            xs = [np.concatenate([c, x]) for c, x in zip(carry, xs)]
        order = rng.permutation(len(xs[0]))
        xs = [x[order] for x in xs]
        last = w == len(windows) - 1
        nfull = len(xs[0]) // m
        for b in range(nfull):
            batch_hsic([x[b * m : (b + 1) * m] for x in xs])
        rest = [x[nfull * m :] for x in xs]
        carry = None
        if len(rest[0]):
            if not last:
                carry = rest
            elif len(rest[0]) >= 4:
                batch_hsic(rest)
            elif not per_batch:
                raise CkaError(f"minibatch CKA needs at least 4 images; there are {n}")
        progress((hi - lo) * len(union))
    hb = np.stack(per_batch)
    const = np.array([_constant(tv[j] / n, ms[j] / n) for j in range(len(union))])
    return hb, const, perm_batches


def _group_sources(union: list[Source], n: int, opts: CkaOptions) -> list[list[int]]:
    """Indices of ``union`` in groups whose pairwise feature-space accumulators fit ``memory_mb``."""
    budget = opts.memory_mb * 2**20
    rows = min(n, _GROUP_ROWS)

    def need(d):  # accumulators, one row group (float32 + float64 copies), one product tile
        return 8.0 * d * d + 12.0 * rows * d + 4.0 * min(_TILE, d) * min(_PANEL, d) + 8.0 * d * len(union)

    total = sum(s.dim for s in union)
    if need(total) <= budget:
        return [list(range(len(union)))]
    groups: list[list[int]] = []
    cur: list[int] = []
    cur_d = 0
    for i, s in enumerate(union):
        if need(2 * s.dim) > budget:
            raise CkaError(
                f"{s.name}: {s.dim} features need {need(2 * s.dim) / 2**20:.0f} MB for a pair in "
                f"feature space; analyze.memory_mb is {opts.memory_mb:g}: raise it or use a smaller --pool"
            )
        if cur and need(2 * (cur_d + s.dim)) > budget:
            groups.append(cur)
            cur, cur_d = [], 0
        cur.append(i)
        cur_d += s.dim
    groups.append(cur)
    return groups


def cka_matrix(
    rows: list[Source],
    cols: list[Source] | None,
    n: int,
    opts: CkaOptions | None = None,
    form: str = "auto",
    on_progress: Callable[[int, int], None] | None = None,
) -> dict:
    """CKA of every row source against every column source over ``n`` images (the same order in all).

    ``cols`` None: the square matrix of ``rows``. ``form``: "auto", "feature" or "gram" (linear
    estimators; the others have one form). Returns ``matrix`` (list of lists), ``rows``,
    ``cols`` (labels), ``estimator``, ``form``, ``n_images``, ``reads`` (times each source was
    read), ``warnings``, and with bootstrap ``ci_low``/``ci_high``, with permutations
    ``perm_mean``/``perm_high``.
    """
    opts = opts or CkaOptions()
    if form not in ("auto", "feature", "gram"):
        raise ValueError(f"form: {form!r}")
    square = cols is None
    col_sources: list[Source] = list(rows) if cols is None else list(cols)
    union: list[Source] = list(rows) + ([] if square else col_sources)
    ri = list(range(len(rows)))
    ci = ri if square else list(range(len(rows), len(union)))
    need_n = 4 if opts.unbiased else 2
    if n < need_n:
        raise CkaError(f"{opts.estimator} CKA needs at least {need_n} images; there are {n}")
    k = len(union)
    gram_bytes = 8.0 * k * n * n + 8.0 * n * max(s.dim for s in union)
    feat_bytes = 8.0 * sum(s.dim for s in union) ** 2
    budget = opts.memory_mb * 2**20
    if opts.estimator == "minibatch":
        form = "minibatch"
    elif opts.kernel == "rbf":
        form = "gram"
    elif form == "auto":
        form = (
            "gram"
            if (opts.bootstrap or opts.permutations or gram_bytes < feat_bytes) and gram_bytes <= budget
            else "feature"
        )
    if form == "gram" and gram_bytes > budget:
        why = (
            "--bootstrap/--permutations need"
            if (opts.bootstrap or opts.permutations) and opts.kernel == "linear"
            else f"{opts.estimator} CKA needs"
        )
        raise CkaError(
            f"{why} {k} N x N matrices for N = {n} ({gram_bytes / 2**20:.0f} MB) but analyze.memory_mb "
            f"is {opts.memory_mb:g}; use --estimator minibatch or raise analyze.memory_mb"
        )
    if form == "feature" and (opts.bootstrap or opts.permutations):
        raise CkaError(
            "--bootstrap/--permutations need the Gram form, which does not fit analyze.memory_mb "
            f"({gram_bytes / 2**20:.0f} MB for N = {n}); use --estimator minibatch"
        )

    started = time.perf_counter()
    warnings: list[str] = []
    reads = 1
    out: dict = {}
    with ThreadPoolExecutor(min(READ_THREADS, k)) as pool:
        if form == "gram":
            progress = _Progress(n * k, on_progress)
            h, const, boots, perms = _gram_mode(union, n, opts, progress, pool)
        elif form == "minibatch":
            progress = _Progress(n * k, on_progress)
            hb, const, perm_batches = _minibatch_mode(union, n, opts, progress, pool)
            h = hb.mean(axis=0)
            rng = np.random.default_rng(opts.seed + 2)
            boots = [hb[rng.integers(0, len(hb), len(hb))].mean(axis=0) for _ in range(opts.bootstrap)]
            perms = [np.mean([pb[p] for pb in perm_batches], axis=0) for p in range(opts.permutations)]
            out["n_batches"] = len(hb)
        else:
            groups = _group_sources(union, n, opts)
            passes = (
                [(0, 0)]
                if len(groups) == 1
                else [(a, b) for a in range(len(groups)) for b in range(a + 1, len(groups))]
            )
            reads = 1 if len(groups) == 1 else len(groups) - 1
            progress = _Progress(
                sum(n * (len(groups[a]) + (len(groups[b]) if a != b else 0)) for a, b in passes), on_progress
            )
            h = np.zeros((k, k))
            const = np.zeros(k, dtype=bool)
            for a, b in passes:
                idx = groups[a] + (groups[b] if a != b else [])
                hp, cp = _feature_pass([union[i] for i in idx], n, opts, progress, pool)
                h[np.ix_(idx, idx)] = hp
                const[idx] = cp
            boots, perms = [], []
    diag = np.diag(h)
    bad = const | ~(diag > 0)
    for i in np.flatnonzero(bad):
        why = "has zero variance" if const[i] else "has an unbiased self-HSIC <= 0 (too few images?)"
        warnings.append(f"{union[i].name} {why}: its CKA is reported as 0")

    def to_cka(hh, own_diag=False):
        # a bootstrap replicate is normalised by its own self-HSIC; a permutation by the unpermuted one
        d = np.diag(hh) if own_diag else diag
        b = bad | ~(d > 0)
        return _cka_from_hsic(hh[np.ix_(ri, ci)], d[ri], d[ci], b[ri], b[ci])

    mat = to_cka(h)
    if square:  # the diagonal is exactly CKA(X, X) = 1 (0 where degenerate), not 1 +- rounding
        mat[np.diag_indices(len(ri))] = np.where(bad[ri], 0.0, 1.0)
    out.update(
        {
            "rows": [s.label for s in rows],
            "cols": [s.label for s in col_sources],
            "matrix": mat.tolist(),
            "estimator": opts.estimator,
            "form": form,
            "n_images": n,
            "reads": reads,
            "warnings": warnings,
        }
    )
    if boots:
        bm = np.stack([to_cka(b, own_diag=True) for b in boots])
        dev = bm - bm.mean(axis=0)  # replicates' spread around their mean, placed at the estimate
        alpha = (1 - CI_LEVEL) / 2
        out["ci_low"] = (mat + np.quantile(dev, alpha, axis=0)).tolist()
        out["ci_high"] = (mat + np.quantile(dev, 1 - alpha, axis=0)).tolist()
        out["bootstrap"] = len(boots)
    if perms:
        pm = np.stack([to_cka(p) for p in perms])
        out["perm_mean"] = pm.mean(axis=0).tolist()
        out["perm_high"] = np.quantile(pm, 0.95, axis=0).tolist()
        out["permutations"] = len(perms)
    out["seconds"] = round(time.perf_counter() - started, 3)
    return out


def cka(x: np.ndarray, y: np.ndarray, estimator: str = "linear", form: str = "auto", **options) -> float:
    """CKA of two in-memory representations (N, ...) of the same N images (options: `CkaOptions` fields)."""
    x, y = np.asarray(x), np.asarray(y)
    if len(x) != len(y):
        raise CkaError(f"x has {len(x)} images and y has {len(y)}; CKA needs the same images on both sides")
    r = cka_matrix(
        [array_source(x, "x")], [array_source(y, "y")], len(x), CkaOptions(estimator=estimator, **options), form=form
    )
    return r["matrix"][0][0]


# ------------------------------------------------------------------ stores -> matrices
