"""Deterministic noise: the noise for an image at a timestep depends only on
(noise seed, image id, t) (and its view or noise draw), never on the batch, the worker, the
device or a resume. View 0 under draw 0 keeps the original derivation, so stores made before
views existed stay valid.
"""

from __future__ import annotations

import torch

from diffprobe.store.seeds import derive_seed

DERIVATION = "blake2b-64(seed, image id, t) seeds a CPU torch.Generator; randn float32"


def image_noise(seed: int, image_id: str, t: int, shape: tuple[int, ...], view: int = 0, draw: int = 0) -> torch.Tensor:
    """Standard normal noise of ``shape`` (float32, CPU) for one (image, t) at ``view`` (or
    noise ``draw``): view v >= 1 is keyed by (seed, id, t, "view", v), draw m >= 1 by
    (seed, id, t, "draw", m), both 0 by (seed, id, t) as before views existed."""
    extra = ("view", view) if view else ("draw", draw) if draw else ()
    g = torch.Generator().manual_seed(derive_seed(seed, image_id, t, *extra))
    return torch.randn(shape, generator=g)


def batch_noise(seed: int, image_ids, t: int, shape: tuple[int, ...]) -> torch.Tensor:
    """(N, *shape) noise, row i for image_ids[i]."""
    return torch.stack([image_noise(seed, i, t, shape) for i in image_ids])
