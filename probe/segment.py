"""Dense probes: semantic segmentation from cached block maps (`probe segment`).

    from diffprobe.store import open_store
    from diffprobe.probe.segment import segment_probe
    r = segment_probe(open_store("runs/digits-dense.zarr"), [(24, 150)])
    r["miou"], r["pixel_accuracy"], r["per_class_iou"], r["hyperparameters"]

`run(cfg, blocks, ts)` is `probe segment`: settings from pipeline.toml's ``[segment]`` and
``[probe]`` (seed, held-out fraction, device, ledger, memory), a ledger row and a picture.
`sweep_run(cfg, ...)` is `probe sweep --head segment`: one head per (block, t), block x t
heatmaps of mIoU.

The head is DINOv2's linear segmentation head (its ``BNHead``): the maps of the (block, t)
cells asked for, each bilinearly resized to the largest of them and concatenated along
channels (hypercolumns), go through BatchNorm and a 1x1 convolution to class logits; the
logits are bilinearly upsampled to the mask resolution before the cross-entropy (255 =
ignore) and before the argmax. Protocol:

1. Masks come from the store (``data.masks = true`` at extraction; uint8 (N, S, S)).
2. The held-out part of train is `probe.protocol.holdout_mask` with one label for every image
   (segmentation has no image label to stratify by): a seeded ``holdout_fraction`` of train by
   image id. It chooses the lr; val is scored once, with the chosen head.
3. The lr grid trains in one pass: every head sees the same batches and the same seeded
   initialisation (conv weights N(0, 0.01), bias 0, BatchNorm 1/0, mmseg's), and the heads
   share one BatchNorm normalisation (their inputs are the same, so each head's batch and
   running statistics would be equal anyway); only the affine parameters, the conv and the
   optimiser state are per head. A head trained in the grid equals the head trained alone.
4. Optimiser (``segment.optimizer``): AdamW by default, DINOv2's linear-segmentation recipe
   (weight decay 1e-4, lr decayed linearly to 0: mmseg's poly schedule with power 1).
   "sgd" (no momentum, the paper's classification recipe) is kept for comparison; on the
   embedded dense default it reached a lower held-out mIoU over the same lr grid (README).
5. Scores at ``eval_size`` (default the stored mask size S; recorded in the ledger): logits
   upsampled to it; masks resized to it with nearest-neighbour when it differs from S. mIoU
   is the mean IoU over the classes present in the ground truth or the prediction (a class
   absent from both has no IoU, as in mmseg), pixel accuracy over the non-ignored pixels.

Memory: the maps are read through the shared data layer (`probe.data.FeatureData`): held in
memory when they fit ``probe.memory_mb`` (in the stored bytes), else streamed from the store in
windows of whole store chunks, re-read every epoch, in the same seeded order either way. The
masks of the rows used are held in host memory (uint8, one byte per pixel: ADE20K's 20,210
train images at 256 px are 1.3 GB), not counted in the budget.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffprobe.probe.attention import check_held
from diffprobe.probe.data import FeatureData
from diffprobe.probe.digest import fingerprint_digest, settings_digest
from diffprobe.probe.protocol import holdout_mask
from diffprobe.probe.result import ProbeResult
from diffprobe.store.choices import Head, Optimizer, allowed
from diffprobe.store.config import Config, ProbeConfig, SegmentConfig
from diffprobe.store.device import resolve_device
from diffprobe.store.errors import ConfigError, StoreError
from diffprobe.store.feature_store import FeatureStore, open_store
from diffprobe.store.files import check_writable

IGNORE = 255
_EVAL_BYTES = 64 << 20  # float32 logits of every head while scoring: batches of at most this


# ------------------------------------------------------------------ metrics


def confusion(pred: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """(k, k) int64 counts [true, predicted] over the pixels whose target is not 255."""
    valid = target != IGNORE
    idx = target[valid].long() * k + pred[valid].long()
    return torch.bincount(idx, minlength=k * k).reshape(k, k).cpu()


def scores(conf: torch.Tensor | np.ndarray, class_names: list[str]) -> dict:
    """mIoU, per-class IoU (None for a class neither in the ground truth nor predicted) and pixel
    accuracy of a confusion matrix."""
    c = np.asarray(conf, dtype=np.float64)
    inter = np.diag(c)
    union = c.sum(0) + c.sum(1) - inter
    iou = [float(i / u) if u > 0 else None for i, u in zip(inter, union)]
    present = [v for v in iou if v is not None]
    total = c.sum()
    return {
        "miou": float(np.mean(present)) if present else 0.0,
        "pixel_accuracy": float(inter.sum() / total) if total else 0.0,
        "per_class_iou": dict(zip(class_names, iou)),
    }


# ------------------------------------------------------------------ reading


def hypercolumns(maps: list[torch.Tensor], size: int) -> torch.Tensor:
    """float32 (B, sum C, size, size): each (B, C, p, p) map bilinearly resized to ``size``, concatenated."""
    out = [
        m.float()
        if m.shape[-1] == size
        else F.interpolate(m.float(), size=(size, size), mode="bilinear", align_corners=False)
        for m in maps
    ]
    return torch.cat(out, dim=1)


# ------------------------------------------------------------------ the head grid


class HeadGrid(torch.nn.Module):
    """H linear segmentation heads (BatchNorm + 1x1 conv, DINOv2's BNHead) on the same input.

    One BatchNorm normalisation is shared (the heads' inputs are equal, so are their statistics);
    each head has its own BatchNorm affine (gamma, beta) and conv (W, b). Forward: (B, C, P, P)
    -> logits (B, H, K, P, P)."""

    def __init__(self, channels: int, classes: int, heads: int, gen: torch.Generator):
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(channels, affine=False)
        w = torch.randn(classes, channels, generator=gen) * 0.01  # mmseg's conv_seg: normal_init(std=0.01)
        self.gamma = torch.nn.ParameterList([torch.nn.Parameter(torch.ones(channels)) for _ in range(heads)])
        self.beta = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(channels)) for _ in range(heads)])
        self.weight = torch.nn.ParameterList([torch.nn.Parameter(w.clone()) for _ in range(heads)])
        self.bias = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(classes)) for _ in range(heads)])

    def head_parameters(self, h: int) -> list[torch.nn.Parameter]:
        return [self.gamma[h], self.beta[h], self.weight[h], self.bias[h]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xn = self.bn(x)
        w = torch.stack(list(self.weight))  # (H, K, C)
        gamma, beta = torch.stack(list(self.gamma)), torch.stack(list(self.beta))
        shift = torch.einsum("hkc,hc->hk", w, beta) + torch.stack(list(self.bias))
        return torch.einsum("bcij,hkc->bhkij", xn, w * gamma[:, None, :]) + shift[None, :, :, None, None]


def _resize_matrix(p: int, size: int, device) -> torch.Tensor:
    """(p, size): the 1-D bilinear resize (align_corners False) of p samples to ``size``, as a matrix."""
    eye = torch.eye(p, device=device)[None]  # p impulses
    return F.interpolate(eye, size=size, mode="linear", align_corners=False)[0]


def upsampled(logits: torch.Tensor, size: int) -> torch.Tensor:
    """(B, H, K, P, P) -> (B, H, K, size, size), bilinear (align_corners False, as mmseg's resize).

    As two matrix products (bilinear is separable): equal to F.interpolate up to float rounding
    (tested), and its backward is ~10x faster than upsample_bilinear2d's on CPU."""
    p = logits.shape[-1]
    if p == size:
        return logits
    r = _resize_matrix(p, size, logits.device)
    return torch.einsum("bhkij,ia,jc->bhkac", logits, r, r)


def _generators(seed: int) -> tuple[torch.Generator, torch.Generator]:
    order = int.from_bytes(hashlib.blake2b(f"{seed}\0segment-order".encode(), digest_size=8).digest(), "big") >> 1
    return torch.Generator().manual_seed(seed), torch.Generator().manual_seed(order)


def train_grid(
    data: FeatureData,
    masks: np.ndarray,
    size: int,
    classes: int,
    lrs: tuple[float, ...],
    s: SegmentConfig,
    seed: int,
    device,
) -> HeadGrid:
    """Train one head per lr of ``lrs`` on ``data`` (``masks``: one per row of it) in one pass: every
    head sees the same batches (`FeatureData.batches`: in memory or streamed, the same order)."""
    init, order = _generators(seed)
    channels = sum(shape[0] for shape in data.shapes)
    model = HeadGrid(channels, classes, len(lrs), init).to(device)
    groups = [{"params": model.head_parameters(h), "lr": lr} for h, lr in enumerate(lrs)]
    if s.optimizer == Optimizer.ADAMW:
        opt: torch.optim.Optimizer = torch.optim.AdamW(groups, weight_decay=s.weight_decay)
    elif s.optimizer == Optimizer.SGD:
        opt = torch.optim.SGD(groups, momentum=0.0, weight_decay=s.weight_decay)
    else:
        raise ConfigError(f"segment.optimizer: {s.optimizer!r} is not allowed; allowed: {allowed(Optimizer)}")
    steps = s.epochs * data.steps(s.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1.0 - step / steps))  # poly, power 1
    model.train()
    for _ in range(s.epochs):
        for maps, pos in data.batches(s.batch_size, order):
            target = torch.from_numpy(masks[pos.cpu().numpy()]).to(device)
            if not (target != IGNORE).any():
                sched.step()
                continue  # every pixel ignored (skipped images): no loss to take
            logits = upsampled(model(hypercolumns(maps, size)), target.shape[-1])  # (B, H, K, S, S)
            b, h, k = logits.shape[:3]
            valid = int((target != IGNORE).sum())  # per head
            # the sum of every head's mean loss (each head has the same valid pixels): each head gets
            # exactly its own gradient, in one call on a contiguous (B*H, K, S, S) (per-head calls, or
            # a transposed view, spent 2-3x longer in cross-entropy and its backward)
            loss = (
                F.cross_entropy(
                    logits.reshape(b * h, k, *logits.shape[3:]),
                    target.long().repeat_interleave(h, dim=0),
                    ignore_index=IGNORE,
                    reduction="sum",
                )
                / valid
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def evaluate(
    model: HeadGrid,
    data: FeatureData,
    masks: np.ndarray,
    size: int,
    eval_size: int,
    classes: int,
    keep: int = 0,
) -> tuple[list[torch.Tensor], np.ndarray | None]:
    """Confusion matrices of every head at ``eval_size`` over ``data`` (``masks``: one per row) and,
    with ``keep``, the first head's predictions (keep, E, E) uint8 of the first ``keep`` rows."""
    model.eval()
    heads = len(model.weight)
    rows = max(1, _EVAL_BYTES // (4 * heads * classes * eval_size * eval_size))
    conf = [torch.zeros(classes, classes, dtype=torch.int64) for _ in range(heads)]
    kept = np.zeros((keep, eval_size, eval_size), np.uint8) if keep else None
    for maps, pos in data.sequential(rows):
        at = pos.cpu().numpy()
        target = torch.from_numpy(masks[at]).to(data.device)
        if eval_size != target.shape[-1]:
            target = resize_masks(target, eval_size)
        pred = upsampled(model(hypercolumns(maps, size)), eval_size).argmax(2)  # (B, H, E, E)
        for h in range(heads):
            conf[h] += confusion(pred[:, h], target, classes)
        if kept is not None and at[0] < keep:
            n = min(keep - at[0], len(at))
            kept[at[0] : at[0] + n] = pred[:n, 0].cpu().numpy()
    return conf, kept


def resize_masks(masks: torch.Tensor, size: int) -> torch.Tensor:
    """(B, S, S) uint8 label maps -> (B, size, size), nearest-neighbour (labels stay labels)."""
    return F.interpolate(masks[:, None].float(), size=(size, size), mode="nearest")[:, 0].to(torch.uint8)


# ------------------------------------------------------------------ the probe


def default_pool(store: FeatureStore, cells: list[tuple[int, int]]) -> int:
    """The largest pool P at which train and val hold every cell (each block's P capped at its map)."""
    held = set(store.keys("train")) & set(store.keys("val"))
    pools = sorted({k.pool for k in held}, reverse=True)
    for p in pools:
        if all(store.stored_key(b, t, p) in held for b, t in cells):
            return p
    check_held(store, cells, pools[0] if pools else 1)  # names the first missing cell and the fix
    raise AssertionError("unreachable: check_held found every cell")


def settings_hash(s: SegmentConfig, p: ProbeConfig, eval_size: int) -> str:
    """12 hex digits over what changes what the dense head trains and how it is scored."""
    return settings_digest(
        {
            "head": Head.SEGMENT,
            "holdout_fraction": p.holdout_fraction,
            "optimizer": s.optimizer,
            "lr": list(s.lr),
            "weight_decay": s.weight_decay,
            "epochs": s.epochs,
            "batch_size": s.batch_size,
            "eval_size": eval_size,
        }
    )


def _selection(store: FeatureStore, p: ProbeConfig, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(fit rows, held-out rows, val rows) as store row indices, and the sha256 of the fitted ids."""
    for split in ("train", "val"):
        store.mask_array(split)  # no masks: the error names the dense config
    usable = np.flatnonzero(~store.skipped("train").astype(bool))
    val = np.flatnonzero(~store.skipped("val").astype(bool))
    if len(usable) < 2 or not len(val):
        raise StoreError(
            f"{store.path}: too few images that are not skipped ({len(usable)} train, {len(val)} val); "
            f"the dense probe needs 2 train and 1 val"
        )
    ids = store.ids("train")[usable]
    held = holdout_mask(ids, np.zeros(len(ids), np.int64), p.holdout_fraction, seed)
    fit_ids = ids[~held]
    sha = hashlib.sha256("\n".join(sorted(fit_ids.tolist())).encode()).hexdigest()
    return usable[~held], usable[held], val, sha


def segment_probe(store: FeatureStore, cells: list[tuple[int, int]], **kwargs) -> ProbeResult:
    """Train the dense linear head on ``store``'s train maps of ``cells`` ([(block, t)]) and score it
    on val (keywords: those of `segment_with_examples`, but ``examples``).

    Returns a `probe.result.ProbeResult` whose ledger columns hold ``top1`` = val mIoU, ``top5`` =
    val pixel accuracy, ``heldout_top1`` = held-out mIoU and ``per_class`` = per-class IoU, and
    whose --json adds the same under their own names: ``miou``, ``pixel_accuracy``,
    ``per_class_iou`` (None for a class neither in the ground truth nor predicted),
    ``heldout_miou``; and ``stored_pools``, ``map_size``, ``mask_size``, ``eval_size``. ``grid``
    holds every lr with its held-out mIoU and pixel accuracy."""
    return segment_with_examples(store, cells, **kwargs)[0]


def segment_with_examples(
    store: FeatureStore,
    cells: list[tuple[int, int]],
    pool: int | None = None,
    eval_size: int | None = None,
    seed: int = 0,
    segment: SegmentConfig | None = None,
    settings: ProbeConfig | None = None,
    device: str | torch.device = "cpu",
    examples: int = 0,
) -> tuple[ProbeResult, dict | None]:
    """`segment_probe`, and with ``examples`` the first val rows to draw (None without): ``images``
    (n, 3, S, S) uint8 (the store's previews), ``truth`` and ``prediction`` (n, E, E) uint8.

    ``pool`` None: the largest pool the store holds for every cell; ``eval_size`` None: the stored
    mask size; ``segment`` and ``settings``: pipeline.toml's [segment] and [probe] (defaults)."""
    started = time.perf_counter()
    s, p = segment or SegmentConfig(), settings or ProbeConfig()
    device = resolve_device(device, "probe.device") if isinstance(device, str) else device
    if not cells:
        raise ConfigError("--blocks/--t: no (block, t) cell asked for")
    classes = store.mask_classes
    fit, hold, val, sha = _selection(store, p, seed)
    pool = default_pool(store, cells) if pool is None else pool
    check_held(store, cells, pool)
    keys = [store.stored_key(b, t, pool) for b, t in cells]
    size = max(k.pool for k in keys)
    mask_size = int(store.mask_array("train").shape[-1])
    eval_size = eval_size or mask_size
    k = len(classes)

    cells3 = [(b, t, pool) for b, t in cells]
    usable = ~store.skipped("train").astype(bool)
    train_masks = store.masks("train")
    data, held = FeatureData.parts(
        store, "train", cells3, [(fit, None), (hold, None)], usable, memory_mb=p.memory_mb, device=device
    )
    streamed = not data.in_memory
    model = train_grid(data, train_masks[fit], size, k, s.lr, s, seed, device)
    del data
    conf_held, _ = evaluate(model, held, train_masks[hold], size, eval_size, k)
    del held, train_masks
    grid = []
    for lr, c in zip(s.lr, conf_held):
        sc = scores(c, classes)
        grid.append({"lr": lr, "heldout_miou": sc["miou"], "heldout_pixel_accuracy": sc["pixel_accuracy"]})
    best = max(range(len(grid)), key=lambda i: (grid[i]["heldout_miou"], grid[i]["heldout_pixel_accuracy"]))
    chosen = HeadGrid(int(model.bn.num_features), k, 1, torch.Generator()).to(device)
    with torch.no_grad():  # the chosen head alone: its own affine and conv, the shared statistics
        chosen.bn.load_state_dict(model.bn.state_dict())
        for mine, theirs in zip(chosen.head_parameters(0), model.head_parameters(best)):
            mine.copy_(theirs)
    n_show = min(examples, len(val))
    val_masks = store.masks("val")
    vdata = FeatureData(
        store, "val", cells3, val, None, ~store.skipped("val").astype(bool), memory_mb=p.memory_mb, device=device
    )
    (conf_val,), pred = evaluate(chosen, vdata, val_masks[val], size, eval_size, k, keep=n_show)
    streamed |= not vdata.in_memory
    del vdata
    val_scores = scores(conf_val, classes)
    result = ProbeResult(
        head=Head.SEGMENT,
        store=str(store.path),
        fingerprint=fingerprint_digest(store.fingerprints),
        n_train=len(fit),
        n_heldout=len(hold),
        n_val=len(val),
        n_classes=k,
        block=cells[0][0] if len(cells) == 1 else None,
        t=cells[0][1] if len(cells) == 1 else None,
        pool=pool,
        stored_pool=max(key.pool for key in keys),
        dim=int(model.bn.num_features),
        blocks=[b for b, _ in cells],
        timesteps=[t for _, t in cells],
        recipe=s.optimizer,
        hyperparameters={
            "lr": s.lr[best],
            "weight_decay": s.weight_decay,
            "epochs": s.epochs,
            "batch_size": s.batch_size,
            "eval_size": eval_size,
            "mask_size": mask_size,
        },
        seed=seed,
        subset="all",
        subset_sha=sha,
        settings=settings_hash(s, p, eval_size),
        grid=grid,
        heldout_top1=grid[best]["heldout_miou"],  # the ledger's columns: mIoU, pixel accuracy, IoU
        top1=val_scores["miou"],
        top5=val_scores["pixel_accuracy"],
        per_class=val_scores["per_class_iou"],
        device=str(device),
        streamed=streamed,
        extra={
            **val_scores,
            "heldout_miou": grid[best]["heldout_miou"],
            "stored_pools": [key.pool for key in keys],
            "map_size": size,
            "mask_size": mask_size,
            "eval_size": eval_size,
        },
    )
    shown = None
    if n_show:
        truth = val_masks[val[:n_show]]
        if eval_size != mask_size:
            truth = resize_masks(torch.from_numpy(truth), eval_size).numpy()
        previews = store.previews("val")
        have = [i for i in range(n_show) if val[i] < len(previews)]
        shown = {"images": previews[val[have]], "truth": truth[have], "prediction": pred[have]}  # type: ignore[index]
    result.seconds = round(time.perf_counter() - started, 3)
    return result, shown


def _config_cells(blocks, ts) -> list[tuple[int, int]]:
    if not blocks or not ts:
        raise ConfigError("--blocks and --t: give at least one block and one timestep, e.g. --blocks 24 --t 150")
    return [(b, t) for b in blocks for t in ts]


def run(
    cfg: Config,
    blocks,
    ts,
    pool: int | None = None,
    eval_size: int | None = None,
    ledger: bool = True,
    picture: bool = True,
    out_dir: str | Path | None = None,
) -> ProbeResult:
    """`probe segment`: `segment_probe` with ``cfg``'s settings, one ledger row and a picture
    (its path in ``--json``'s ``picture``; None without examples or with ``picture=False``)
    in ``out_dir`` (default: beside the ledger), checked writable before anything trains."""
    from diffprobe.probe.command import check_not_written, prepare
    from diffprobe.probe.ledger import record
    from diffprobe.store.feature_store import check_block

    p, s = cfg.probe, cfg.segment
    cmd = prepare(cfg, ledger=ledger, store=False)  # threads, and a foreign ledger refused before training
    store = open_store(cfg.store.path)
    check_not_written(store)
    for b in blocks or ():
        check_block(store, b, "--blocks")
    folder = (
        Path(out_dir) if out_dir is not None else cmd.ledger.parent if cmd.ledger is not None else store.path.parent
    )
    picture = picture and s.examples > 0
    if picture:
        check_writable(folder, "--out DIR (or --no-plots)")
    r, shown = segment_with_examples(
        store,
        _config_cells(blocks, ts),
        pool=pool or s.pool or None,
        eval_size=eval_size or s.eval_size or None,
        seed=p.seed,
        segment=s,
        settings=p,
        device=p.device,
        examples=s.examples if picture else 0,
    )
    r.extra["picture"] = None
    if shown is not None and len(shown["images"]):
        from diffprobe.probe.plots import segmentation_picture

        cells = "_".join(f"b{b}" for b in r.blocks) + "-" + "_".join(f"t{t}" for t in sorted(set(r.timesteps)))
        name = f"segment-{r.fingerprint}-{cells}-p{r.pool}-{r.settings[:8]}.png"
        title = (
            f"{store.path.name} · blocks {','.join(map(str, r.blocks))} · t {','.join(map(str, sorted(set(r.timesteps))))} · "
            f"pool {r.pool} · val mIoU {100 * r.top1:.1f}% at {r['eval_size']}px"
        )
        r.extra["picture"] = str(segmentation_picture(shown, store.mask_classes, folder / name, title))
    return record(cfg, r, ledger)


# ------------------------------------------------------------------ the dense sweep


def sweep_run(
    cfg: Config,
    blocks=None,
    ts=None,
    pool: int | None = None,
    eval_size: int | None = None,
    plots: bool = True,
    on_plan: Callable[[int, int], None] | None = None,
    on_cell: Callable[[tuple[int, int], bool], None] | None = None,
    out_dir: str | Path | None = None,
) -> dict:
    """`probe sweep --head segment`: one dense head per (block, t) held, resumable from the ledger,
    and block x t heatmaps of val mIoU (probe/plots.py) in ``out_dir`` (default: beside the
    ledger; checked writable, as the ledger is, before anything trains). ``pool`` None: each
    cell at the largest pool it is held at (``segment.pool`` caps it)."""
    from diffprobe.probe.command import check_not_written, prepare
    from diffprobe.probe.ledger import append_row, read_rows
    from diffprobe.probe.plots import sweep_plots
    from diffprobe.probe.sweep import held_keys

    started = time.perf_counter()
    p, s = cfg.probe, cfg.segment
    path = prepare(cfg, store=False).ledger  # threads, and a foreign or read-only ledger refused
    assert path is not None
    store = open_store(cfg.store.path)
    check_not_written(store)
    held = held_keys(store)
    cap = pool or s.pool or 1 << 30
    size_eval = eval_size or s.eval_size or int(store.mask_array("train").shape[-1])
    blocks = sorted(blocks) if blocks is not None else sorted({k.block for k in held})
    ts = sorted(ts) if ts is not None else sorted({k.t for k in held})
    cells: list[tuple[int, int, int]] = []
    for b in blocks:
        for t in ts:
            pools = [k.pool for k in held if k.block == b and k.t == t and k.pool <= cap]
            if pools:
                cells.append((b, t, max(pools)))
    if not cells:
        raise StoreError(
            f"{store.path}: no complete maps for blocks {blocks} at t {ts} "
            f"(pool <= {cap}); it holds {store.describe_holdings('train')}"
        )
    fingerprint, settings = fingerprint_digest(store.fingerprints), settings_hash(s, p, size_eval)
    folder = Path(out_dir) if out_dir is not None else path.parent / f"sweep-{fingerprint}-segment-{settings[:8]}"
    if plots:
        check_writable(folder, "--out DIR (or --no-plots)")
    done = {
        (r["block"], r["t"], r["stored_pool"]): r
        for r in read_rows(path)
        if r["head"] == Head.SEGMENT
        and r["fingerprint"] == fingerprint
        and r["settings"] == settings
        and r["seed"] == p.seed
        and r["block"] is not None
    }
    found = {c: done[c] for c in cells if c in done}
    if on_plan:
        on_plan(len(cells), len(found))
    for b, t, q in cells:
        if (b, t, q) in found:
            if on_cell:
                on_cell((b, t), False)
            continue
        r = segment_probe(
            store, [(b, t)], pool=q, eval_size=size_eval, seed=p.seed, segment=s, settings=p, device=p.device
        )
        append_row(path, r)
        found[(b, t, q)] = r.to_json()
        if on_cell:
            on_cell((b, t), True)
    summary = [
        {
            "block": b,
            "t": t,
            "pool": q,
            "miou": found[(b, t, q)]["top1"],
            "pixel_accuracy": found[(b, t, q)]["top5"],
            "lr": found[(b, t, q)]["hyperparameters"]["lr"],
            "seconds": found[(b, t, q)]["seconds"],
        }
        for b, t, q in cells
    ]
    files: list[str] = []
    if plots:
        shown = pool or s.pool or max(c["pool"] for c in summary)  # each block at its largest pool up to this
        points = [{"block": c["block"], "t": c["t"], "pool": shown, "top1": c["miou"]} for c in summary]
        files = [
            str(f) for f in sweep_plots(points, folder, f"{store.path.name} · segment", metric="val mIoU", stem="miou")
        ]
    return {
        "store": str(store.path),
        "head": Head.SEGMENT,
        "cells": summary,
        "trained": len(cells) - len(done.keys() & set(cells)),
        "skipped": len(done.keys() & set(cells)),
        "best": max(summary, key=lambda c: c["miou"]),
        "eval_size": size_eval,
        "fingerprint": fingerprint,
        "settings": settings,
        "ledger": str(path),
        "plots": {"folder": str(folder) if plots else None, "files": files},
        "seconds": round(time.perf_counter() - started, 3),
    }
