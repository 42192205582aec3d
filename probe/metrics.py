"""Scores of trained heads: top-k accuracy, top-1 per class, choosing the best head of a grid
on the held-out part, and the val scores every result carries."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def topk_accuracy(logits: torch.Tensor, y: torch.Tensor, k: int) -> float:
    """Fraction of rows whose label is among the ``k`` largest logits (k capped at the classes)."""
    k = min(k, logits.shape[-1])
    hits = int((logits.topk(k, dim=-1).indices == y[:, None]).any(-1).sum())
    return hits / len(y)


def per_class_accuracy(pred: np.ndarray, y: np.ndarray, class_names: list[str]) -> dict:
    """Top-1 per class name (None for a class with no images)."""
    return {name: (float((pred[y == c] == c).mean()) if (y == c).any() else None) for c, name in enumerate(class_names)}


def choose(models_logits: list[torch.Tensor], y_held: torch.Tensor) -> tuple[int, list[dict]]:
    """Index of the best head on the held-out part (top-1, ties: lower loss) and every head's scores."""
    scored = [
        {"heldout_top1": topk_accuracy(lg, y_held, 1), "heldout_loss": float(F.cross_entropy(lg, y_held))}
        for lg in models_logits
    ]
    best = max(range(len(scored)), key=lambda i: (scored[i]["heldout_top1"], -scored[i]["heldout_loss"]))
    return best, scored


def val_scores(logits: torch.Tensor, y_val: np.ndarray, class_names: list[str]) -> dict:
    y = torch.from_numpy(y_val).to(logits.device)
    pred = logits.argmax(-1).cpu().numpy()
    return {
        "top1": topk_accuracy(logits, y, 1),
        "top5": topk_accuracy(logits, y, 5),
        "per_class": per_class_accuracy(pred, y_val, class_names),
    }
