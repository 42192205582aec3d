"""The linear probe: a linear classifier on one cached feature set (block, t, pool).

    from diffprobe.store import open_store
    from diffprobe.probe.linear import linear_probe
    r = linear_probe(open_store("runs/digits-tiny.zarr"), block=24, t=90, pool=2, recipe="sgd")
    r.top1, r.top5, r.per_class, r.hyperparameters     # a probe.result.ProbeResult

`run(cfg, block, t, pool)` is `probe linear`: the same, with settings from pipeline.toml's
``[probe]`` section, and one row appended to the results ledger (probe/ledger.py).

Protocol (deterministic given the seed, on one device and thread count):

1. Read the train split's features (N, C, p, p) and drop skipped images.
2. Hold out a seeded, stratified ``holdout_fraction`` of train (`holdout_mask`: which images
   depends only on (seed, image id, label), not on store order). Val is never looked at
   until the chosen head is scored. The rest is the fitted part; a label subset
   (``--label-fraction``, ``--shots``, ``--subset``: probe/subsets.py) keeps only part of it.
   `probe.protocol.select` does steps 1-2 once per store, seed and subset; a sweep shares it across cells.
3. Standardise with the mean and std of the fitted part (float64 sums over row chunks;
   constant features get std 1). Features stay float16 in memory; batches are
   standardised to float32 on the device as they are used.

   Memory: the features are read through the data layer (`probe.data.FeatureData`): the
   fitted and held-out rows are held in memory iff together they fit ``probe.memory_mb``
   (counted in the bytes of the stored dtype), else each part is streamed from the store
   (ImageNet: 1.28M x 4096 fp16 ~ 10 GB) in two windows of half memory_mb, with prefetch;
   val likewise. The statistics, held-out and val scoring take one pass; ``sgd`` batches
   follow the data layer's seeded order (one permutation when everything fits; else a
   shuffle of store chunks and a permutation inside windows of them), the same whether the
   rows live in memory or not; ``lbfgs`` sums the same loss and gradients chunk by chunk
   when streamed (the same optimum, up to float summation order), re-reading train at every
   evaluation. The result's ``streamed`` says whether any part was streamed.
4. Train every point of the recipe's grid on the fitted part and keep the head with the best
   held-out top-1 (ties: the lower held-out loss). The chosen head is not refitted on the
   held-out part: one training per grid point, as in DINOv2's linear evaluation.
5. Score it on val: top-1, top-5 (top-min(5, classes)), top-1 per class.

Recipes:

- ``sgd``, the paper's: SGD without momentum, StepLR every 7 epochs x 0.1, 28 epochs,
  batch 128, cross-entropy; lr chosen from a grid holding the paper's 1e-2 (default
  0.01, 0.1, 1.0: on digits, 1e-2 alone gets 91.7% where the grid gets 97.5%, because 1295
  images make 11 steps per epoch, not ImageNet's 10k); weight decay (on the weights, not
  the bias) optional. The
  whole lr x weight-decay grid trains in one pass: the heads are stacked into one
  (H, D, K) tensor, each head sees the same batches and the same initialisation
  (PyTorch's nn.Linear uniform init from the seed), so a head trained in a grid equals the
  head trained alone.
- ``lbfgs``: multinomial logistic regression, loss = mean cross-entropy + l2/2 * |W|^2
  (bias unpenalised), full-batch L-BFGS with a strong-Wolfe line search, for each ``l2``
  of the grid from the strongest to the weakest, each warm-started from the previous.

Why torch L-BFGS and not scikit-learn's LogisticRegression(solver="lbfgs") (the same objective
with C = 1 / (l2 * n)): both are GEMM-bound and reach the same loss and accuracy, torch as fast
or faster on CPU (BENCHMARKS.md, "L-BFGS: torch vs scikit-learn"), and torch also runs on the
GPU, keeps the float16 features there, and shares standardisation and scoring with ``sgd``.
scikit-learn is CPU-only. That decides it at ImageNet scale.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time

import numpy as np
import torch
import torch.nn.functional as F

from diffprobe.probe.command import prepare
from diffprobe.probe.data import FeatureData, Views, train_parts, val_logits
from diffprobe.probe.digest import fingerprint_digest, settings_digest
from diffprobe.probe.ledger import record
from diffprobe.probe.metrics import per_class_accuracy, topk_accuracy
from diffprobe.probe.protocol import Selection, select
from diffprobe.probe.result import ProbeResult
from diffprobe.store.choices import Head, Recipe, allowed
from diffprobe.store.config import Config, ProbeConfig
from diffprobe.store.device import resolve_device
from diffprobe.store.errors import ConfigError, StoreError
from diffprobe.store.feature_store import FeatureKey, FeatureStore, check_block

_TEMP_BYTES = 32 << 20  # float32/float64 temporaries of statistics and scoring: chunks of at most this


# A feature whose std is below this fraction of the largest std is taken as constant: for a
# constant column, float64 E[x^2] - E[x]^2 leaves only a rounding residue (its sqrt ~1e-8 of
# the value), far below the spread of any real feature.
CONSTANT_STD = 1e-6


def _chunk_rows(dim: int, bytes_per_value: int = 8) -> int:
    """Rows per chunk whose ``dim`` values at ``bytes_per_value`` fit ``_TEMP_BYTES`` (at least 1)."""
    return max(1, _TEMP_BYTES // (bytes_per_value * dim))


# ------------------------------------------------------------------ data


def store_fingerprint(store: FeatureStore) -> str:
    """16 hex digits naming what made the store (model, preprocessing, noise, compute, dataset)."""
    return fingerprint_digest(store.fingerprints)


def feature_stats(data: FeatureData) -> tuple[np.ndarray, np.ndarray]:
    """(F, D) per-feature mean and std (float32) of each of ``data``'s F cells over its rows,
    summed in float64 over chunks of rows (the same chunks in memory or streamed)."""
    f, d = len(data.cells), data.dims[0]
    s = np.zeros((f, d), np.float64)
    ss = np.zeros((f, d), np.float64)
    for xs, _ in data.sequential(_chunk_rows(d)):
        for i, x in enumerate(xs):
            chunk = x.cpu().numpy().reshape(len(x), -1).astype(np.float64)
            s[i] += chunk.sum(0)
            ss[i] += np.square(chunk).sum(0)
    stats = [_finish_stats(s[i], ss[i], len(data)) for i in range(f)]
    return np.stack([m for m, _ in stats]), np.stack([sd for _, sd in stats])


def _finish_stats(s: np.ndarray, ss: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean**2, 0.0))
    # Constant features get std 1, so they standardise to 0 instead of dividing by ~0.
    std[std < CONSTANT_STD * max(float(std.max()), 1e-12)] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


class Standardise:
    """float16 batches of F same-width cells -> standardised float32 (F, n, D), with ``mean`` and
    ``std`` (F, D) of the fitted part. Features stay float16 wherever they are held."""

    def __init__(self, mean: np.ndarray, std: np.ndarray, device: torch.device):
        self.mean = torch.from_numpy(mean).to(device)[:, None, :]
        self.inv_std = torch.from_numpy(1.0 / std).to(device)[:, None, :]

    def __call__(self, xs: list[torch.Tensor]) -> torch.Tensor:
        x = torch.stack([x.reshape(len(x), -1) for x in xs])
        return (x.float() - self.mean) * self.inv_std

    def chunks(self, data: FeatureData):
        """(standardised (F, rows, D), labels) of ``data`` in order, float32 temporaries bounded."""
        step = _chunk_rows(data.dims[0] * len(data.cells), 4)
        for xs, y in data.sequential(step):
            yield self(xs), y


def budget_rows(p: ProbeConfig, dim: int, itemsize: int) -> int:
    """Rows of ``dim`` features of ``itemsize`` bytes each that ``p.memory_mb`` holds (at least 1).

    Rows are held in the store's dtype (float16 by default) whether read whole or streamed;
    only batches are standardised to float32, so the budget counts the stored bytes."""
    return max(1, int(p.memory_mb * 2**20 // (itemsize * dim)))


# ------------------------------------------------------------------ heads


def _init(dim: int, k: int, gen: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.Linear's default init, U(-1/sqrt(dim), 1/sqrt(dim)), drawn from ``gen``."""
    bound = 1.0 / dim**0.5
    w = (torch.rand(dim, k, generator=gen) * 2 - 1) * bound
    b = (torch.rand(k, generator=gen) * 2 - 1) * bound
    return w.to(device), b.to(device)


def _generators(seed: int) -> tuple[torch.Generator, torch.Generator]:
    """(initialisation, batch order) generators of ``seed``: the order does not depend on the
    width of the features, so every feature set of a pass sees the same batches."""
    order = int.from_bytes(hashlib.blake2b(f"{seed}\0order".encode(), digest_size=8).digest(), "big") >> 1
    return torch.Generator().manual_seed(seed), torch.Generator().manual_seed(order)


def fit_sgd(
    data: FeatureData, std: Standardise, k: int, grid: list[dict], p: ProbeConfig, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train the linear heads of ``grid`` ([{"lr", "weight_decay"}]) on each of ``data``'s F
    cells in one pass: W (F, H, D, K), b (F, H, K).

    Every head starts from nn.Linear's initialisation drawn from ``seed`` and sees the same
    batches (`_generators`, `FeatureData.batches`), so a head trained in a grid, or beside other
    feature sets, equals the head trained alone."""
    device = data.device
    f, h = len(data.cells), len(grid)
    init, order = _generators(seed)
    w0, b0 = _init(data.dims[0], k, init, device)
    w = w0.expand(f, h, -1, -1).clone().requires_grad_(True)
    b = b0.expand(f, h, -1).clone().requires_grad_(True)
    lr0 = torch.tensor([g["lr"] for g in grid], device=device)
    wd = torch.tensor([g["weight_decay"] for g in grid], device=device)
    for epoch in range(p.sgd_epochs):
        lr = lr0 * p.sgd_gamma ** (epoch // p.sgd_step_size)  # StepLR
        for xs, yb in data.batches(p.sgd_batch_size, order, epoch):
            logits = torch.einsum("fnd,fhdk->fhnk", std(xs), w) + b[:, :, None, :]
            # the sum of every head's mean loss: each head gets exactly its own gradient
            loss = F.cross_entropy(logits.reshape(-1, k), yb.repeat(f * h), reduction="sum") / len(yb)
            gw, gb = torch.autograd.grad(loss, (w, b))
            with torch.no_grad():
                w -= lr[:, None, None] * (gw + wd[:, None, None] * w)
                b -= lr[:, None] * gb
    return w.detach(), b.detach()


def fit_lbfgs(
    data: FeatureData, std: Standardise, k: int, grid: list[dict], p: ProbeConfig, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit one linear head per ``grid`` point ([{"l2"}]), strongest l2 first, warm-started, on
    ``data``'s one cell (full-batch: cells gain nothing from sharing a pass): W (1, H, D, K),
    b (1, H, K). Streamed data sums the same loss chunk by chunk, re-reading it at every
    evaluation. Deterministic: it starts from zero; ``seed`` is unused."""
    if len(data.cells) != 1:
        raise ValueError(f"fit_lbfgs fits one feature set at a time, got {len(data.cells)}")
    device, streamed, n = data.device, not data.in_memory, len(data)
    if not streamed:  # full batch, float32
        parts = list(std.chunks(data))
        x, y = torch.cat([c[0] for c in parts], dim=1)[0], torch.cat([c[1] for c in parts])
        del parts
    w = torch.zeros(data.dims[0], k, device=device, requires_grad=True)
    b = torch.zeros(k, device=device, requires_grad=True)
    out = [None] * len(grid)
    for i in sorted(range(len(grid)), key=lambda i: -grid[i]["l2"]):
        l2 = grid[i]["l2"]
        opt = torch.optim.LBFGS(
            [w, b],
            lr=1,
            max_iter=p.lbfgs_max_iter,
            history_size=20,
            line_search_fn="strong_wolfe",
            tolerance_grad=1e-6,
            tolerance_change=1e-10,
        )

        def closure():
            opt.zero_grad()
            if not streamed:
                loss = F.cross_entropy(x @ w + b, y) + 0.5 * l2 * (w * w).sum()
                loss.backward()
                return loss
            # the same loss, summed chunk by chunk: each chunk's graph is freed by its backward
            total = torch.zeros((), device=device)
            for xb, yb in std.chunks(data):
                part = F.cross_entropy(xb[0] @ w + b, yb, reduction="sum") / n
                part.backward()
                total += part.detach()
            reg = 0.5 * l2 * (w * w).sum()
            reg.backward()
            return total + reg.detach()

        opt.step(closure)
        out[i] = (w.detach().clone(), b.detach().clone())
    return torch.stack([o[0] for o in out])[None], torch.stack([o[1] for o in out])[None]


FITTERS = {Recipe.SGD: fit_sgd, Recipe.LBFGS: fit_lbfgs}


def recipe_grid(recipe: str, p: ProbeConfig) -> list[dict]:
    """The hyperparameter points of ``recipe``, in the order the config lists them."""
    if recipe == Recipe.SGD:
        return [{"lr": lr, "weight_decay": wd} for lr in p.sgd_lr for wd in p.sgd_weight_decay]
    if recipe == Recipe.LBFGS:
        return [{"l2": l2} for l2 in p.lbfgs_l2]
    raise ConfigError(f"probe.recipe: {recipe!r} is not allowed; allowed: {allowed(Recipe)}")


# ------------------------------------------------------------------ scoring


@torch.no_grad()
def _logits(data: FeatureData, std: Standardise, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(F, H, N, K) float32 logits of every head (W (F, H, D, K)) on its feature set."""
    return torch.cat([torch.einsum("fnd,fhdk->fhnk", x, w) + b[:, :, None, :] for x, _ in std.chunks(data)], dim=2)


# ------------------------------------------------------------------ the probe


def settings_hash(recipe: str, p: ProbeConfig, views: Views = Views()) -> str:
    """12 hex digits naming the settings that change what ``recipe`` trains (not device or
    threads), views and noise draws included unless both are 1."""
    names = ["holdout_fraction"] + [f.name for f in dataclasses.fields(p) if f.name.startswith(f"{recipe}_")]
    return settings_digest({"recipe": recipe, **{n: getattr(p, n) for n in names}, **views.record})


def linear_probe(
    store: FeatureStore,
    block: int,
    t: int,
    pool: int = 2,
    recipe: str = "sgd",
    seed: int = 0,
    settings: ProbeConfig | None = None,
    device: str | torch.device = "cpu",
    subset: str = "all",
    selection: Selection | None = None,
    views: Views = Views(),
) -> ProbeResult:
    """Train a linear head on ``store``'s train split at (block, t, pool), score it on val.

    Hyperparameters come from ``settings`` (default: pipeline.toml's defaults); ``recipe`` and
    ``seed`` override its ``recipe`` and ``seed``; ``device`` defaults to the CPU (`run` takes
    ``probe.device``, "auto" by default). ``subset`` fits on a label subset (probe/subsets.py);
    ``selection`` (from `select` with the same seed, settings and subset) saves redoing it for
    every feature set of a sweep. Returns a dict with ``top1``, ``top5``
    (fractions of val), ``per_class`` ({class name: top-1}), ``hyperparameters`` (the chosen
    point), ``grid`` (every point with its held-out top-1 and loss), ``heldout_top1``, the
    split sizes, the feature set and its stored pool, ``fingerprint``, ``subset``,
    ``subset_sha``, ``settings`` (`settings_hash`), ``seconds``.

    ``views`` (`probe.data.Views`): train on K stored views (each epoch every image at one view,
    `FeatureData.view_schedule`; sgd only), score val with the logits averaged over M noise
    draws; recorded in ``hyperparameters``, ``settings`` and --json unless both are 1.
    """
    return linear_probes(store, [(block, t, pool)], recipe, seed, settings, device, subset, selection, views=views)[0]


def linear_probes(
    store: FeatureStore,
    cells,
    recipe: str = "sgd",
    seed: int = 0,
    settings: ProbeConfig | None = None,
    device: str | torch.device = "cpu",
    subset: str = "all",
    selection: Selection | None = None,
    on_result=None,
    views: Views = Views(),
) -> list[ProbeResult]:
    """`linear_probe` for each (block, t, pool) of ``cells``, with ``sgd`` training several
    feature sets in one pass: those of the same width whose train splits fit ``probe.memory_mb``
    together (`passes`). A head trained beside other feature sets equals the head trained alone
    (same initialisation, same batches). ``on_result(result)`` is called as each cell is done;
    a cell's ``seconds`` is its share of its pass. Returns the results in ``cells`` order."""
    p = settings or ProbeConfig()
    grid = recipe_grid(recipe, p)
    device = resolve_device(device, "probe.device") if isinstance(device, str) else device
    keys = [store.stored_key(*c) for c in cells]  # unknown cells fail before anything is trained
    views = views.resolve(store, [(k.block, k.t, k.pool) for k in keys])
    if recipe != "sgd" and views.views != 1:
        raise StoreError(
            f"--views {views.views}: views are read per epoch, by recipe 'sgd' only; allowed with {recipe!r}: 1"
        )
    sel = selection if selection is not None else select(store, seed, p, subset)
    out: list[ProbeResult | None] = [None] * len(cells)
    for group in passes(store, keys, recipe, p, len(sel.fit) + len(sel.hold)):
        started = time.perf_counter()
        results = _probe_pass(
            store, [keys[i] for i in group], [cells[i] for i in group], recipe, grid, seed, p, device, sel, views
        )
        share = round((time.perf_counter() - started) / len(group), 3)
        for i, r in zip(group, results):
            r.seconds = share
            out[i] = r
            if on_result:
                on_result(r)
    return out


def passes(store: FeatureStore, keys: list[FeatureKey], recipe: str, p: ProbeConfig, rows: int) -> list[list[int]]:
    """Indices of ``keys`` trained together: for ``sgd``, feature sets of the same width, in the
    order given, as many as fit ``p.memory_mb`` at once (``rows`` images each, the fitted and
    held-out parts, in the stored dtype); a set that does not fit alone is streamed alone;
    ``lbfgs`` (full-batch) trains one set at a time."""
    groups: list[list[int]] = []
    open_: dict[int, tuple[list[int], int]] = {}  # width -> (the group being filled, its rows)
    for i, key in enumerate(keys):
        arr = store.feature_array("train", key.block, key.t, key.pool)
        dim = int(np.prod(arr.shape[1:]))
        cap = budget_rows(p, dim, arr.dtype.itemsize)
        if recipe != "sgd" or rows > cap:
            groups.append([i])
            continue
        group, used = open_.get(dim, (None, 0))
        if group is None or used + rows > cap:
            group, used = [], 0
            groups.append(group)
        group.append(i)
        open_[dim] = (group, used + rows)
    return groups


def _probe_pass(
    store: FeatureStore,
    keys: list[FeatureKey],
    cells: list,
    recipe: str,
    grid: list[dict],
    seed: int,
    p: ProbeConfig,
    device: torch.device,
    sel: Selection,
    views: Views = Views(),
) -> list[ProbeResult]:
    """Train and score one head per key in one pass (several keys: in memory, the same width)."""
    classes = store.class_names
    arrays = [(k.block, k.t, k.pool) for k in keys]
    data, data_held = train_parts(store, arrays, sel, memory_mb=p.memory_mb, device=device, views=views, seed=seed)
    std = Standardise(*feature_stats(data), device)
    w, b = FITTERS[recipe](data, std, len(classes), grid, p, seed)
    streamed = not data.in_memory
    del data

    logits = _logits(data_held, std, w, b)  # (F, H, N, K)
    y_held = torch.from_numpy(sel.y[sel.hold]).to(device)
    scored, best = [], []
    for f in range(len(keys)):
        s = [
            {
                **point,
                "heldout_top1": topk_accuracy(logits[f, i], y_held, 1),
                "heldout_loss": float(F.cross_entropy(logits[f, i], y_held)),
            }
            for i, point in enumerate(grid)
        ]
        scored.append(s)
        best.append(max(range(len(grid)), key=lambda i: (s[i]["heldout_top1"], -s[i]["heldout_loss"])))
    del data_held, logits
    idx = torch.tensor(best, device=w.device)
    w_best, b_best = w[torch.arange(len(keys)), idx][:, None], b[torch.arange(len(keys)), idx][:, None]

    y_val = sel.y_val
    logits_val, val_streamed = val_logits(
        store, arrays, sel, views, lambda val: _logits(val, std, w_best, b_best), memory_mb=p.memory_mb, device=device
    )
    streamed = streamed or val_streamed
    y_val_t = torch.from_numpy(y_val).to(device)

    results = []
    for f, (key, (block, t, pool)) in enumerate(zip(keys, cells)):
        vl = logits_val[f, 0]
        results.append(
            ProbeResult.of(
                store,
                sel,
                head=Head.LINEAR,
                block=block,
                t=t,
                pool=pool,
                stored_pool=key.pool,
                dim=int(w.shape[2]),
                blocks=[block],
                timesteps=[t],
                recipe=recipe,
                hyperparameters={**grid[best[f]], **views.record},
                seed=seed,
                settings=settings_hash(recipe, p, views),
                grid=scored[f],
                heldout_top1=scored[f][best[f]]["heldout_top1"],
                top1=topk_accuracy(vl, y_val_t, 1),
                top5=topk_accuracy(vl, y_val_t, 5),
                per_class=per_class_accuracy(vl.argmax(-1).cpu().numpy(), y_val, classes),
                device=str(device),
                streamed=streamed,
                extra={"views": views.views, "noise_draws": views.noise_draws},
            )
        )
    return results


def run(
    cfg: Config, block: int, t: int, pool: int = 2, ledger: bool = True, subset: str = "all", views: Views = Views()
) -> ProbeResult:
    """`probe linear`: probe ``cfg.store.path`` with ``cfg.probe`` and append the ledger row.

    ``subset`` is a label-subset spec (probe/subsets.py). The result of `linear_probe`, with
    ``ledger`` (its path, or None with ``ledger=False``) and ``subset_file`` (the chosen ids,
    written beside the ledger unless ``subset`` is "all" or ``ledger=False``; else None).
    """
    cmd = prepare(cfg, subset, ledger)
    check_block(cmd.store, block)
    p = cfg.probe
    result = linear_probe(
        cmd.store,
        block,
        t,
        pool,
        recipe=p.recipe,
        seed=p.seed,
        settings=p,
        device=p.device,
        selection=cmd.sel,
        views=views,
    )
    return record(cfg, result, ledger)
