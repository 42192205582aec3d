"""DifFeed: decoder features fed back into the encoder of a second U-Net pass, online.

    from diffprobe.probe.feedback import skip_pairs, DifFeed
    skip_pairs(preset("adm-256-uncond"))      # {20: 18, 21: 17, 22: 16, 23: 15, 24: 14, ...}
    model = DifFeed(unet, table, pairs, feedback_blocks=[21, 24, 27, 30, 33, 36], target=24,
                    pool=16, n_classes=1000, heads=HeadsConfig())
    logits = model(x_t, t)                    # x_t: (N, 3, S, S), t: (N,) -> (N, n_classes)

`run(cfg)` is `probe feedback`: it loads the U-Net and the images of the config (the same
ones `extract run` would read), trains, scores on val and appends a ledger row.

How a step works (DifFeed, the paper's section on feedback):

1. A no-grad first pass at t captures the decoder blocks ``feedback_blocks`` (paper: 21, 24,
   27, 30, 33, 36) with `extract.unet.capture`, the one capture mechanism.
2. Each goes through its `probe.heads.FeedbackLayer` (Conv1x1 -> BatchNorm -> ReLU) to the
   channels of its mirrored encoder block: the input block whose output that decoder block
   receives as its skip connection. The pairing is read off the model by `skip_pairs` (a
   traced forward on the meta device), never computed as ``38 - b``.
3. A second pass with the same x_t, t: forward hooks on those encoder blocks add the feedback
   (resized to the encoder map if needed: area pooling down, nearest up) to their outputs, so
   it reaches both the next encoder block and the skip; `capture` stops it after ``target``.
4. The target map (paper: block 24), pooled to ``pool``, goes to the attention head
   (`probe.heads.AttentionHead`). Only the feedback layers and the head train; the U-Net is
   frozen (no parameter of it requires grad; gradients flow through its activations).

Noise is the store's (`extract.noise`: a function of noise seed, image id and t), so the
first pass at the target block sees exactly what `extract run` would store. Autocast
(``heads.feedback_autocast``): bf16 on CUDA by default, fp16 with a gradient scaler, none on CPU.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from diffprobe.extract.extraction import pool_features
from diffprobe.extract.noise import batch_noise
from diffprobe.extract.unet import BlockTable, ModelSpec, block_modules, build_model, capture
from diffprobe.probe.digest import fingerprint_digest
from diffprobe.probe.heads import AttentionHead, FeedbackLayer, auto_dim
from diffprobe.probe.ledger import record
from diffprobe.probe.metrics import choose, val_scores
from diffprobe.probe.protocol import holdout_mask
from diffprobe.probe.result import ProbeResult
from diffprobe.probe.train import count_parameters, head_settings_hash, seeded, train_heads
from diffprobe.store.choices import Head
from diffprobe.store.config import Config, HeadsConfig, ProbeConfig
from diffprobe.store.device import resolve_device
from diffprobe.store.errors import BlockError, ConfigError, ImageError, StoreError

# ------------------------------------------------------------------ the skip connections


class _CatRecorder(TorchFunctionMode):
    """Records every torch.cat of a forward: (its input tensors, its output)."""

    def __init__(self):
        super().__init__()
        self.cats: list[tuple[list, torch.Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.cat:
            tensors = args[0] if args else (kwargs or {})["tensors"]
            self.cats.append((list(tensors), out))
        return out


def skip_pairs(spec: ModelSpec) -> dict[int, int]:
    """{decoder block: the encoder block whose output is its skip input}, from a traced forward.

    guided-diffusion's UNetModel pushes every input block's output on a stack and each output
    block pops one and concatenates it to its input. This runs ``spec``'s U-Net on the meta
    device, records each block's output tensor and each output block's input, and finds the
    torch.cat that made that input: the operand that is an input block's output (the same
    tensor object) names the pair. Nothing about the numbering is assumed.
    """
    model = build_model(spec, device="meta")
    modules = block_modules(model)
    outputs: dict[int, torch.Tensor] = {}
    inputs: dict[int, torch.Tensor] = {}
    hooks = []
    for n, (_, m) in enumerate(modules, start=1):
        hooks.append(m.register_forward_hook(lambda _m, _i, out, n=n: outputs.__setitem__(n, out)))
        hooks.append(m.register_forward_pre_hook(lambda _m, args, n=n: inputs.__setitem__(n, args[0])))
    recorder = _CatRecorder()
    try:
        with torch.no_grad(), recorder:
            x = torch.empty(1, 3, spec.image_size, spec.image_size, device="meta")
            model(x, torch.zeros(1, dtype=torch.long, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    by_output = {id(out): n for n, out in outputs.items()}
    made_by = {id(out): operands for operands, out in recorder.cats}
    pairs = {}
    for n, x in inputs.items():
        for operand in made_by.get(id(x), []):
            source = by_output.get(id(operand))
            if source is not None and source < n and modules[source - 1][0].startswith("input_blocks"):
                pairs[n] = source
    return pairs


def check_blocks(pairs: dict[int, int], table: BlockTable, feedback_blocks, target: int) -> None:
    """Errors naming a feedback block without a skip input, or a target the feedback cannot reach."""
    table.check(list(feedback_blocks) + [target])
    if not feedback_blocks:
        raise BlockError("heads.feedback_blocks: give at least one decoder block")
    for b in feedback_blocks:
        if b not in pairs:
            raise BlockError(
                f"heads.feedback_blocks: block {b} ({table[b].module}) takes no skip connection; "
                f"the blocks that do are {min(pairs)}-{max(pairs)}"
            )
        if pairs[b] >= target:
            raise BlockError(
                f"heads.feedback_target: block {target} is not after encoder block {pairs[b]}, "
                f"where block {b} is fed back, so the feedback would not reach it"
            )


# ------------------------------------------------------------------ the model


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.shape[-1] >= size[-1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="nearest")


class DifFeed(nn.Module):
    """Feedback layers + attention head around a frozen U-Net (not a submodule: not trained or saved).

    forward(x_t (N, 3, S, S), t (N,)) -> (N, n_classes) logits. `first_pass` and `second_pass`
    are the two U-Net passes, exposed for tests and benchmarks.
    """

    def __init__(
        self,
        unet: nn.Module,
        table: BlockTable,
        pairs: dict[int, int],
        feedback_blocks,
        target: int,
        pool: int,
        n_classes: int,
        heads: HeadsConfig | None = None,
    ):
        super().__init__()
        h = heads or HeadsConfig()
        feedback_blocks = sorted(feedback_blocks)
        check_blocks(pairs, table, feedback_blocks, target)
        self._unet = [unet]  # a list hides it from parameters(), state_dict() and .to()
        self.feedback_blocks, self.target = feedback_blocks, target
        self.pairs = {b: pairs[b] for b in feedback_blocks}
        self.feedback = nn.ModuleDict(
            {str(b): FeedbackLayer(table[b].channels, table[pairs[b]].channels) for b in feedback_blocks}
        )
        self.pool = min(pool, table[target].spatial)
        c = table[target].channels
        self.dim = h.dim or auto_dim([c], h.num_heads)
        self.head = AttentionHead(c, self.pool, n_classes, self.dim, h.depth, h.num_heads, h.mlp_ratio)

    @property
    def unet(self) -> nn.Module:
        return self._unet[0]

    @torch.no_grad()
    def first_pass(self, x_t: torch.Tensor, t: torch.Tensor) -> dict[int, torch.Tensor]:
        """The decoder blocks fed back, {block: (N, C, H, W)}, without gradients."""
        return capture(self.unet, x_t, t, self.feedback_blocks)

    def second_pass(self, x_t: torch.Tensor, t: torch.Tensor, first: dict[int, torch.Tensor]) -> torch.Tensor:
        """The target block's output, (N, C, H, W), with each feedback added to its encoder block."""
        add = {self.pairs[b]: self.feedback[str(b)](first[b]) for b in self.feedback_blocks}
        modules = block_modules(self.unet)

        def hook(e):
            def fn(_module, _inputs, output):
                return output + _resize(add[e], output.shape[-2:]).to(output.dtype)

            return fn

        handles = [modules[e - 1][1].register_forward_hook(hook(e)) for e in add]
        try:
            return capture(self.unet, x_t, t, [self.target])[self.target]
        finally:
            for handle in handles:
                handle.remove()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        target = self.second_pass(x_t, t, self.first_pass(x_t, t))
        return self.head(pool_features(target.float(), self.pool))


# ------------------------------------------------------------------ training


def _autocast(device: torch.device, mode: str):
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" else "none"
    if mode == "none":
        return contextlib.nullcontext(), None
    if device.type == "cpu" and mode == "fp16":
        raise ConfigError("heads.feedback_autocast: 'fp16' needs a GPU; use 'none' or 'bf16' on the CPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]
    scaler = torch.amp.GradScaler(device.type) if mode == "fp16" else None
    return torch.autocast(device.type, dtype=dtype), scaler


class Images:
    """x_t batches of one split: images from an `extract.images.ImageSource`, the store's noise."""

    def __init__(self, source, diffusion, split: str, rows: np.ndarray, t: int, noise_seed: int, device: torch.device):
        index = source.split(split)
        self.source, self.diffusion, self.split, self.t = source, diffusion, split, t
        self.ids = [index.ids[i] for i in rows]
        self.y = torch.from_numpy(np.asarray(index.labels)[rows]).to(device)
        self.noise_seed, self.device = noise_seed, device

    def __len__(self):
        return len(self.ids)

    def x_t(self, idx) -> torch.Tensor:
        """(len(idx), 3, S, S) float32 noised images of positions ``idx`` on the device."""
        ids = [self.ids[i] for i in idx]
        loaded = self.source.load(self.split, ids)
        for i, x in zip(ids, loaded):
            if isinstance(x, Exception):
                raise ImageError(f"{i} in split {self.split!r}: cannot read image ({type(x).__name__}: {x})")
        x0 = torch.from_numpy(np.stack(loaded))
        noise = batch_noise(self.noise_seed, ids, self.t, tuple(x0.shape[1:]))
        x_t = self.diffusion.q_sample(x0, torch.full((len(x0),), self.t, dtype=torch.long), noise)
        return x_t.to(self.device)

    def batches(self, batch: int, gen: torch.Generator | None = None):
        order = torch.randperm(len(self), generator=gen) if gen is not None else torch.arange(len(self))
        for lo in range(0, len(self), batch):
            idx = order[lo : lo + batch].tolist()
            yield idx, self.x_t(idx)


@torch.no_grad()
def predict(model: DifFeed, data: Images, batch: int, autocast) -> torch.Tensor:
    model.eval()
    out = []
    for _, x in data.batches(batch):
        with autocast:
            out.append(model(x, torch.full((len(x),), data.t, dtype=torch.long, device=x.device)).float())
    return torch.cat(out)


def feedback_probe(
    unet: nn.Module,
    table: BlockTable,
    pairs: dict[int, int],
    diffusion,
    source,
    *,
    feedback_blocks=None,
    target: int | None = None,
    t: int | None = None,
    pool: int | None = None,
    seed: int = 0,
    heads: HeadsConfig | None = None,
    settings: ProbeConfig | None = None,
    device: str | torch.device = "cpu",
    subset: str = "all",
    noise_seed: int = 0,
    fingerprint: str = "",
    where: str = "",
    on_step=None,
) -> ProbeResult:
    """Train DifFeed's feedback layers and head on ``source``'s train split, score on val.

    ``unet`` is moved to ``device`` and frozen. Defaults come from ``heads`` (feedback_blocks,
    feedback_target, feedback_t, pool). The held-out part and label subsets are the linear
    probe's (`probe.protocol.holdout_mask`, probe/subsets.py), over the source's train ids.
    Returns the keys of `probe.attention.attention_probe`, with ``head`` "feedback", ``blocks``
    the decoder blocks fed back, ``pairs`` {decoder: encoder} and ``target``.
    """
    from diffprobe.probe.subsets import choose_subset, subset_sha

    started = time.perf_counter()
    h, p = heads or HeadsConfig(), settings or ProbeConfig()
    device = resolve_device(device, "probe.device") if isinstance(device, str) else device
    blocks = sorted(feedback_blocks or h.feedback_blocks)
    target = h.feedback_target if target is None else target
    t = h.feedback_t if t is None else t
    pool = h.pool if pool is None else pool
    classes = list(source.class_names)
    if t >= diffusion.num_timesteps:
        raise ConfigError(f"--t: {t} is out of range; allowed: 0..{diffusion.num_timesteps - 1}")

    train = source.split("train")
    ids, labels = np.asarray(train.ids), np.asarray(train.labels)
    held = holdout_mask(ids, labels, p.holdout_fraction, seed)
    if not held.any():
        raise StoreError(
            f"{where or 'train'}: too few images per class to hold {p.holdout_fraction:g} out "
            f"for choosing hyperparameters ({len(ids)} images, {len(classes)} classes)"
        )
    fit = np.flatnonzero(choose_subset(subset, ids, labels, ~held, seed, classes, source=where or "the images"))
    hold = np.flatnonzero(held)

    unet = unet.to(device).eval().requires_grad_(False)
    autocast, scaler = _autocast(device, h.feedback_autocast)
    data = Images(source, diffusion, "train", fit, t, noise_seed, device)
    data_held = Images(source, diffusion, "train", hold, t, noise_seed, device)
    build = lambda: DifFeed(unet, table, pairs, blocks, target, pool, len(classes), h)
    step = [0]
    models = [seeded(build, seed).to(device) for _ in h.feedback_lr]
    gen = torch.Generator().manual_seed(seed)
    tt = lambda n: torch.full((n,), t, dtype=torch.long, device=device)

    def batches(_epoch):
        for idx, x in data.batches(h.feedback_batch_size, gen):
            yield x, data.y[torch.tensor(idx, device=device)]

    def loss_of(m, x, y):
        with autocast:
            loss = F.cross_entropy(m(x, tt(len(x))).float(), y)
        step[0] += 1
        if on_step:
            on_step(step[0])
        return loss

    train_heads(
        models,
        h.feedback_lr,
        h,
        batches,
        loss_of,
        make_scaler=(lambda: torch.amp.GradScaler(device.type)) if scaler else None,
    )  # every lr from the same batches
    held_logits = [predict(m, data_held, h.feedback_batch_size, autocast) for m in models]
    best, scored = choose(held_logits, data_held.y)
    for s, lr in zip(scored, h.feedback_lr):
        s["lr"] = lr
    model = models[best]
    val = source.split("val")
    data_val = Images(source, diffusion, "val", np.arange(len(val)), t, noise_seed, device)
    logits = predict(model, data_val, h.feedback_batch_size, autocast)
    c = table[target].channels
    arch = {
        "dim": model.dim,
        "depth": h.depth,
        "num_heads": h.num_heads,
        "mlp_ratio": h.mlp_ratio,
        "tokens": model.pool**2,
        "parameters": count_parameters(model),
        "feedback_parameters": count_parameters(model.feedback),
    }
    extra = {"blocks": blocks, "target": target, "t": t, "pool": pool}
    pairs_json = {str(k): v for k, v in model.pairs.items()}
    return ProbeResult(
        head=Head.FEEDBACK,
        store=where,
        fingerprint=fingerprint,
        n_train=len(fit),
        n_heldout=len(hold),
        n_val=len(val),
        n_classes=len(classes),
        block=target,
        t=t,
        pool=pool,
        stored_pool=model.pool,
        dim=c * model.pool**2,
        blocks=blocks,
        timesteps=[t],
        recipe="sgd",
        hyperparameters={"lr": h.feedback_lr[best], "weight_decay": h.weight_decay, **arch, "pairs": pairs_json},
        architecture=arch,
        grid=scored,
        seed=seed,
        subset=subset,
        subset_sha=subset_sha(ids[fit]),
        fit_ids=ids[fit],
        settings=head_settings_hash(Head.FEEDBACK, h, p, {**extra, "noise_seed": noise_seed}),
        heldout_top1=scored[best]["heldout_top1"],
        **val_scores(logits, np.asarray(val.labels), classes),
        seconds=round(time.perf_counter() - started, 3),
        device=str(device),
        extra={"target": target, "pairs": pairs_json, "autocast": h.feedback_autocast, "steps": step[0]},
    )


def run(
    cfg: Config,
    feedback_blocks=None,
    target: int | None = None,
    t: int | None = None,
    pool: int | None = None,
    ledger: bool = True,
    subset: str = "all",
    on_step=None,
) -> ProbeResult:
    """`probe feedback`: the U-Net and images of ``cfg`` (as `extract run` would use them), trained
    with ``cfg.heads``/``cfg.probe``; one ledger row beside ``cfg.store.path``.

    The row's fingerprint is the one a store extracted with ``cfg`` on this kind of device carries
    (`probe.linear.store_fingerprint`), so feedback rows sit beside that store's linear rows.
    """
    from diffprobe.extract import job as jobs
    from diffprobe.extract.unet import load_checkpoint
    from diffprobe.probe.command import prepare

    prepare(cfg, subset, ledger, store=False)  # threads, the ledger checked; the images are the config's
    p = cfg.probe
    job = jobs.prepare(cfg)
    if target is not None and not 1 <= target <= len(job.table):  # before the checkpoint is loaded
        raise BlockError(f"--block: {target} is not a block of this model; it has blocks 1-{len(job.table)}")
    device = resolve_device(p.device, "probe.device")
    unet = build_model(job.spec)
    sha = load_checkpoint(unet, job.checkpoint)
    fp = jobs.fingerprints(job, sha, device, torch.get_num_threads())  # the U-Net runs here at this count
    fingerprint = fingerprint_digest(fp)
    result = feedback_probe(
        unet,
        job.table,
        skip_pairs(job.spec),
        job.diffusion,
        job.source,
        feedback_blocks=feedback_blocks,
        target=target,
        t=t,
        pool=pool,
        seed=p.seed,
        heads=cfg.heads,
        settings=p,
        device=device,
        subset=subset,
        noise_seed=cfg.extract.noise_seed,
        fingerprint=fingerprint,
        where=f"online:{cfg.model.preset}",
        on_step=on_step,
    )
    return record(cfg, result, ledger)
