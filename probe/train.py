"""Training helpers shared by every head (attention, DifFormer, DifFeed): the settings digest
that names a head's recipe in the ledger, seeded initialisation, the paper's SGD recipe and
parameter counts. Scoring and choosing the best head are in probe/metrics.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

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


def train_sgd(
    model: torch.nn.Module,
    params,
    lr: float,
    h: HeadsConfig,
    batches: Callable[[int], Iterable],
    loss_of: Callable,
    on_epoch: Callable[[int], None] | None = None,
    scaler=None,
):
    """The paper's recipe: SGD (no momentum), StepLR(h.step_size, h.gamma), h.epochs epochs.

    ``batches(epoch)`` yields (inputs, y); ``loss_of(inputs, y)`` returns the mean loss (it runs
    the model, so a caller can wrap it in autocast or a U-Net pass); ``scaler``: a
    torch.amp.GradScaler for fp16 autocast.
    """
    opt = torch.optim.SGD(params, lr=lr, momentum=0.0, weight_decay=h.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=h.step_size, gamma=h.gamma)
    for epoch in range(h.epochs):
        model.train()
        for inputs, y in batches(epoch):
            loss = loss_of(inputs, y)
            opt.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
        sched.step()
        if on_epoch:
            on_epoch(epoch)
    model.eval()
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
