"""Attention head and DifFormer fusion trained on cached spatial features.

    from diffprobe.store import open_store
    from diffprobe.probe.attention import attention_probe, fusion_probe
    r = attention_probe(open_store("runs/digits-tiny.zarr"), block=24, t=150, pool=2)
    r = fusion_probe(open_store("runs/digits-tiny.zarr"), blocks=[19, 24, 30], timesteps=[90, 150, 300])
    r["top1"], r["top5"], r["architecture"]["tokens"], r["architecture"]["parameters"]

`run_attention(cfg, ...)` and `run_fusion(cfg, ...)` are `probe attention` and `probe fusion`:
settings from pipeline.toml's ``[heads]`` (architecture, recipe) and ``[probe]`` (seed,
held-out fraction, device, ledger), one row appended to the results ledger.

Protocol, shared with the linear probe (probe/linear.py): the same held-out part of train
(`probe.protocol.select`: seeded, stratified, by image id; never val), the same label subsets,
top-1/top-5/per-class on val, the same ledger. Differences:

- No standardisation: each head's first layer is a LayerNorm over the whole C x P x P map.
- The paper's recipe, one head per point of the lr grid (``heads.attention_lr`` /
  ``heads.fusion_lr``): SGD without momentum, StepLR(step_size, gamma), ``heads.epochs``
  epochs of ``heads.batch_size``; every grid point starts from the same seeded initialisation
  and sees the same batches; the head with the best held-out top-1 (ties: lower held-out
  loss) is scored on val.
- The features are held in memory (float16, on the device); a split larger than
  ``probe.memory_mb`` (counting the bytes of the dtype held) is refused naming the size: the full-resolution
  maps these heads read (ADM block 24 at pool 16: 262144 values per image) do not fit an
  ImageNet-sized split in memory, and streaming them is not implemented.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from diffprobe.probe.command import prepare
from diffprobe.probe.data import FeatureData, Views, train_parts, val_logits
from diffprobe.probe.heads import AttentionHead, FusionHead, auto_dim
from diffprobe.probe.ledger import record
from diffprobe.probe.metrics import choose, val_scores
from diffprobe.probe.protocol import Selection, select
from diffprobe.probe.result import ProbeResult
from diffprobe.probe.train import count_parameters, head_settings_hash, seeded, train_heads
from diffprobe.store.choices import Head
from diffprobe.store.config import Config, HeadsConfig, ProbeConfig
from diffprobe.store.device import resolve_device
from diffprobe.store.errors import StoreError
from diffprobe.store.feature_store import FeatureStore, check_block

_ROWS = 512  # images per forward when scoring


# ------------------------------------------------------------------ cached maps


def missing_message(store: FeatureStore, missing: list[tuple[int, int, int]], pool: int) -> str:
    """One line naming the first missing (block, t, pool) and the `extract run` that adds them all."""
    b, t, p = missing[0]
    blocks = ",".join(str(x) for x in sorted({m[0] for m in missing}))
    ts = ",".join(str(x) for x in sorted({m[1] for m in missing}))
    return (
        f"{store.path}: no complete features for block {b}, t {t}, pool {p}"
        f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; add them with "
        f"`extract run --store {store.path} --blocks {blocks} --t {ts} --pool {pool}` "
        f"(with the config the store was made with)"
    )


def check_held(store: FeatureStore, cells: list[tuple[int, int]], pool: int) -> None:
    """Raise StoreError naming the first (block, t, pool) that train or val lacks, and the fix."""
    held = set(store.keys("train")) & set(store.keys("val"))
    missing = []
    for b, t in cells:
        key = store.stored_key(b, t, pool)
        if key not in held:
            missing.append((b, t, key.pool))
    if missing:
        raise StoreError(missing_message(store, missing, pool))


def default_pool(store: FeatureStore, cells: list[tuple[int, int]], h: HeadsConfig) -> int:
    """The largest pool P, up to ``heads.pool``, at which the store holds every one of ``cells``
    (each block's P capped at its map, as stored: tiny block 19 is 1x1 while 24 and 30 take P).
    If there is none, the missing cells at the largest pool held are named with the fix."""
    held = set(store.keys("train")) & set(store.keys("val"))
    pools = sorted({k.pool for k in held if k.pool <= h.pool}, reverse=True)
    for p in pools:
        if all(store.stored_key(b, t, p) in held for b, t in cells):
            return p
    check_held(store, cells, pools[0] if pools else h.pool)
    raise AssertionError("unreachable: check_held found every cell")


def _grid_train(build, fit: FeatureData, held: FeatureData, lrs, h: HeadsConfig, seed: int, device, inputs, on_step):
    """Train one head per lr from the same init and the same batches, in one pass over ``fit``
    (`train.train_heads`); score them all in one pass over ``held``. Returns the heads, the
    index of the best on held-out (top-1, ties: lower loss) and every head's scores.

    ``inputs(xs)``: the float16 tensors of a batch (one per cell) -> the model's inputs."""
    models = [seeded(build, seed).to(device) for _ in lrs]
    gen = torch.Generator().manual_seed(seed)
    train_heads(
        models,
        lrs,
        h,
        lambda epoch: fit.batches(h.batch_size, gen, epoch),
        lambda m, xs, y: F.cross_entropy(m(inputs(xs)), y),
        steps=fit.steps(h.batch_size),
        on_step=on_step,
    )
    held_logits, y_held = _predict(models, held, inputs)
    best, scored = choose(held_logits, y_held)
    for s, lr in zip(scored, lrs):
        s["lr"] = lr
    return models, best, scored


@torch.no_grad()
def _predict(models, data: FeatureData, inputs) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every model's float32 logits on ``data`` (read once, ``_ROWS`` rows at a time), and the labels."""
    for m in models:
        m.eval()
    out: list[list[torch.Tensor]] = [[] for _ in models]
    ys = []
    for xs, y in data.sequential(_ROWS):
        x = inputs(xs)
        for o, m in zip(out, models):
            o.append(m(x).float())
        ys.append(y)
    return [torch.cat(o) for o in out], torch.cat(ys)


def _architecture(model, h: HeadsConfig, dim: int, tokens: int) -> dict:
    return {
        "dim": dim,
        "depth": h.depth,
        "num_heads": h.num_heads,
        "mlp_ratio": h.mlp_ratio,
        "tokens": tokens,
        "parameters": count_parameters(model),
    }


# ------------------------------------------------------------------ attention


def attention_probe(
    store: FeatureStore,
    block: int,
    t: int,
    pool: int | None = None,
    seed: int = 0,
    heads: HeadsConfig | None = None,
    settings: ProbeConfig | None = None,
    device: str | torch.device = "cpu",
    subset: str = "all",
    selection: Selection | None = None,
    stream: bool | None = None,
    on_step=None,
    views: Views = Views(),
) -> ProbeResult:
    """Train the attention head on ``store``'s train split at (block, t, pool), score it on val.

    ``pool`` None: the largest the store holds up to ``heads.pool``. Returns the keys of
    `probe.linear.linear_probe` (top1, top5, per_class, hyperparameters, grid, heldout_top1, ...)
    plus ``head`` ("attention"), ``architecture`` (dim, depth, num_heads, mlp_ratio, tokens,
    parameters), ``blocks`` and ``timesteps`` ([block], [t]).
    """
    started = time.perf_counter()
    h, p = heads or HeadsConfig(), settings or ProbeConfig()
    device = resolve_device(device, "probe.device") if isinstance(device, str) else device
    classes = store.class_names
    pool = default_pool(store, [(block, t)], h) if pool is None else pool
    check_held(store, [(block, t)], pool)
    key = store.stored_key(block, t, pool)
    sel = selection if selection is not None else select(store, seed, p, subset)
    cells = [(block, t, pool)]
    views = views.resolve(store, cells)
    fit, held = train_parts(
        store, cells, sel, memory_mb=p.memory_mb, device=device, stream=stream, views=views, seed=seed
    )
    c, sp = fit.shapes[0][0], fit.shapes[0][-1]
    dim = h.dim or auto_dim([c], h.num_heads)
    build = lambda: AttentionHead(c, sp, len(classes), dim, h.depth, h.num_heads, h.mlp_ratio)
    inputs = lambda xs: xs[0].float()
    models, best, scored = _grid_train(build, fit, held, h.attention_lr, h, seed, device, inputs, on_step)
    model = models[best]
    streamed = not fit.in_memory
    del fit, held, models
    logits, val_streamed = val_logits(
        store,
        cells,
        sel,
        views,
        lambda val: _predict([model], val, inputs)[0][0],
        memory_mb=p.memory_mb,
        device=device,
        stream=stream,
    )
    streamed = streamed or val_streamed
    point = {"lr": h.attention_lr[best], "weight_decay": h.weight_decay, **views.record}
    arch = _architecture(model, h, dim, sp * sp)
    return ProbeResult.of(
        store,
        sel,
        head=Head.ATTENTION,
        block=block,
        t=t,
        pool=pool,
        stored_pool=key.pool,
        dim=c * sp * sp,
        blocks=[block],
        timesteps=[t],
        recipe="sgd",
        hyperparameters={**point, **arch},
        architecture=arch,
        seed=seed,
        settings=head_settings_hash(Head.ATTENTION, h, p, views.record),
        grid=scored,
        heldout_top1=scored[best]["heldout_top1"],
        **val_scores(logits, sel.y_val, classes),
        device=str(device),
        seconds=round(time.perf_counter() - started, 3),
        streamed=streamed,
        extra={"views": views.views, "noise_draws": views.noise_draws},
    )


# ------------------------------------------------------------------ DifFormer


def fusion_probe(
    store: FeatureStore,
    blocks,
    timesteps,
    pool: int | None = None,
    seed: int = 0,
    heads: HeadsConfig | None = None,
    settings: ProbeConfig | None = None,
    device: str | torch.device = "cpu",
    subset: str = "all",
    selection: Selection | None = None,
    stream: bool | None = None,
    on_step=None,
    views: Views = Views(),
) -> ProbeResult:
    """Train DifFormer on ``store``'s (blocks x timesteps) maps at ``pool``, score it on val.

    Every (block, t) must be held at ``pool`` (each block capped at its map size); the first
    missing one is named with the `extract run` that adds it. ``pool`` None: the largest the
    store holds for (blocks[0], timesteps[0]) up to ``heads.pool``. Returns the keys of
    `attention_probe`, with ``block`` and ``t`` None, ``blocks`` and ``timesteps`` the lists,
    ``stored_pools`` per block and ``architecture['tokens']`` the tokens per timestep.
    """
    started = time.perf_counter()
    h, p = heads or HeadsConfig(), settings or ProbeConfig()
    device = resolve_device(device, "probe.device") if isinstance(device, str) else device
    blocks, timesteps = list(blocks), list(timesteps)
    if len(set(blocks)) != len(blocks) or len(set(timesteps)) != len(timesteps) or not blocks or not timesteps:
        raise StoreError(f"fusion: blocks {blocks} and timesteps {timesteps} must be non-empty lists without repeats")
    classes = store.class_names
    cells = [(b, t) for t in timesteps for b in blocks]
    pool = default_pool(store, cells, h) if pool is None else pool
    check_held(store, cells, pool)
    sel = selection if selection is not None else select(store, seed, p, subset)

    arrays = [(b, t, pool) for b, t in cells]  # t-major: cell i * len(blocks) + j is (blocks[j], timesteps[i])
    views = views.resolve(store, arrays)
    fit, held = train_parts(
        store, arrays, sel, memory_mb=p.memory_mb, device=device, stream=stream, views=views, seed=seed
    )
    inputs = [(s[0], s[-1]) for s in fit.shapes[: len(blocks)]]
    dim = h.dim or auto_dim([c for c, _ in inputs], h.num_heads)
    nb = len(blocks)
    to_inputs = lambda xs: [[x.float() for x in xs[i * nb : (i + 1) * nb]] for i in range(len(timesteps))]
    build = lambda: FusionHead(inputs, len(timesteps), len(classes), dim, h.depth, h.num_heads, h.mlp_ratio)
    models, best, scored = _grid_train(build, fit, held, h.fusion_lr, h, seed, device, to_inputs, on_step)
    model = models[best]
    streamed = not fit.in_memory
    del fit, held, models
    logits, val_streamed = val_logits(
        store,
        arrays,
        sel,
        views,
        lambda val: _predict([model], val, to_inputs)[0][0],
        memory_mb=p.memory_mb,
        device=device,
        stream=stream,
    )
    streamed = streamed or val_streamed
    tokens = sum(sp * sp for _, sp in inputs)
    point = {"lr": h.fusion_lr[best], "weight_decay": h.weight_decay, **views.record}
    extra = {"blocks": blocks, "timesteps": timesteps}
    arch = _architecture(model, h, dim, tokens)
    return ProbeResult.of(
        store,
        sel,
        head=Head.FUSION,
        block=None,
        t=None,
        pool=pool,
        stored_pool=max(sp for _, sp in inputs),
        dim=sum(c * sp * sp for c, sp in inputs),
        **extra,
        recipe="sgd",
        hyperparameters={**point, **arch},
        architecture=arch,
        seed=seed,
        settings=head_settings_hash(Head.FUSION, h, p, {**extra, **views.record}),
        grid=scored,
        heldout_top1=scored[best]["heldout_top1"],
        **val_scores(logits, sel.y_val, classes),
        device=str(device),
        seconds=round(time.perf_counter() - started, 3),
        streamed=streamed,
        extra={"stored_pools": [sp for _, sp in inputs], "views": views.views, "noise_draws": views.noise_draws},
    )


# ------------------------------------------------------------------ the commands


def run_attention(
    cfg: Config,
    block: int,
    t: int,
    pool: int | None = None,
    ledger: bool = True,
    subset: str = "all",
    on_step=None,
    views: Views = Views(),
) -> ProbeResult:
    """`probe attention`: `attention_probe` with ``cfg``'s settings, and the ledger row.
    ``on_step(train.Step)`` after every training step (a progress bar)."""
    cmd = prepare(cfg, subset, ledger)
    check_block(cmd.store, block)
    p = cfg.probe
    r = attention_probe(
        cmd.store, block, t, pool, p.seed, cfg.heads, p, p.device, selection=cmd.sel, on_step=on_step, views=views
    )
    return record(cfg, r, ledger)


def run_fusion(
    cfg: Config,
    blocks=None,
    timesteps=None,
    pool: int | None = None,
    ledger: bool = True,
    subset: str = "all",
    on_step=None,
    views: Views = Views(),
) -> ProbeResult:
    """`probe fusion`: `fusion_probe` with ``cfg``'s settings (blocks, timesteps default to [heads])."""
    cmd = prepare(cfg, subset, ledger)
    p = cfg.probe
    r = fusion_probe(
        cmd.store,
        blocks or cfg.heads.fusion_blocks,
        timesteps or cfg.heads.fusion_timesteps,
        pool,
        p.seed,
        cfg.heads,
        p,
        p.device,
        selection=cmd.sel,
        on_step=on_step,
        views=views,
    )
    return record(cfg, r, ledger)
