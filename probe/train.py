"""Training helpers shared by every head (attention, DifFormer, DifFeed): the settings digest
that names a head's recipe in the ledger, seeded initialisation, the paper's SGD recipe for a
grid of heads in one pass (`train_heads`; the linear probe's own trainers are
`probe.linear.fit_sgd` and `fit_lbfgs`) and parameter counts. Scoring and choosing the best head are in probe/metrics.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from diffprobe.probe.digest import settings_digest
from diffprobe.store.choices import Head
from diffprobe.store.config import HeadsConfig, ProbeConfig


def head_settings_hash(head: str, h: HeadsConfig, p: ProbeConfig, extra: dict | None = None) -> str:
    """12 hex digits over what changes what ``head`` trains (not device, threads or ledger)."""
    keys = [
        "depth",
        "dim",
        "num_heads",
        "mlp_ratio",
        "epochs",
        "step_size",
        "gamma",
        "weight_decay",
        f"{head}_lr",
        "batch_size" if head != Head.FEEDBACK else "feedback_batch_size",
    ]
    return settings_digest(
        {"head": head, "holdout_fraction": p.holdout_fraction, **{k: getattr(h, k) for k in keys}, **(extra or {})}
    )


def seeded(build: Callable[[], torch.nn.Module], seed: int) -> torch.nn.Module:
    """``build()`` with torch's global RNG seeded (module initialisation), the global state kept."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


@dataclass(frozen=True)
class Step:
    """What `train_heads` reports after each step: a progress bar's fields."""

    epoch: int  # 0-based
    epochs: int
    step: int  # 1-based, within the epoch
    steps: int | None  # steps per epoch, if known
    loss: float  # the mean of every head's loss on this batch
    images: int  # images in this batch


def train_heads(
    models: list[torch.nn.Module],
    lrs,
    h: HeadsConfig,
    batches: Callable[[int], Iterable],
    loss_of: Callable,
    *,
    steps: int | None = None,
    on_step: Callable[[Step], None] | None = None,
    make_scaler: Callable | None = None,
) -> list[torch.nn.Module]:
    """The paper's recipe for heads, one per lr of ``lrs`` (``models[i]`` trains at ``lrs[i]``):
    SGD (no momentum), StepLR(h.step_size, h.gamma), h.epochs epochs, every head from the same
    batches in one pass (one read of the data feeds the whole grid).

    ``batches(epoch)`` yields (inputs, y); ``loss_of(model, inputs, y)`` returns the mean loss (it
    runs the model, so a caller can wrap it in autocast or a U-Net pass); ``make_scaler()``:
    a new torch.amp.GradScaler for fp16 autocast (one per head); ``on_step(Step)`` after every step. A head trained
    in a grid equals the head trained alone: each sees the same batches and its own optimiser.
    """
    opts = [
        torch.optim.SGD(m.parameters(), lr=lr, momentum=0.0, weight_decay=h.weight_decay)
        for m, lr in zip(models, lrs, strict=True)
    ]
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=h.step_size, gamma=h.gamma) for o in opts]
    scalers = [make_scaler() if make_scaler else None for _ in models]
    for epoch in range(h.epochs):
        for m in models:
            m.train()
        for i, (inputs, y) in enumerate(batches(epoch), start=1):
            losses = []
            for m, opt, scaler in zip(models, opts, scalers):
                loss = loss_of(m, inputs, y)
                opt.zero_grad(set_to_none=True)
                if scaler is None:
                    loss.backward()
                    opt.step()
                else:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                losses.append(loss.detach())
            if on_step:
                on_step(Step(epoch, h.epochs, i, steps, float(torch.stack(losses).float().mean()), len(y)))
        for s in scheds:
            s.step()
    for m in models:
        m.eval()
    return models


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
