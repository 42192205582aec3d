"""Deterministic noise: the noise for an image at a timestep depends only on
(noise seed, image id, t) (and its view or noise draw), never on the batch, the worker, the
device or a resume. View 0 under draw 0 keeps the original derivation, so stores made before
views existed stay valid.
"""

from __future__ import annotations

import torch

from diffprobe.store.seeds import derive_seed

DERIVATION = "blake2b-64(seed, image id, t) seeds a CPU torch.Generator; randn float32"


def image_noise(
    seed: int,
    image_id: str,
    t: int,
    shape: tuple[int, ...],
    view: int = 0,
    draw: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Standard normal noise of ``shape`` (float32, CPU) for one (image, t) at ``view`` (or
    noise ``draw``): view v >= 1 is keyed by (seed, id, t, "view", v), draw m >= 1 by
    (seed, id, t, "draw", m), both 0 by (seed, id, t) as before views existed. Written into
    ``out`` (a contiguous float32 tensor of ``shape``) when given, the same values either way."""
    extra = ("view", view) if view else ("draw", draw) if draw else ()
    g = torch.Generator().manual_seed(derive_seed(seed, image_id, t, *extra))
    if out is not None:
        return torch.randn(shape, generator=g, out=out)
    return torch.randn(shape, generator=g)


def batch_noise(seed: int, image_ids, t: int, shape: tuple[int, ...]) -> torch.Tensor:
    """(N, *shape) noise, row i for image_ids[i]."""
    return rows_noise(seed, [(i, t) for i in image_ids], shape)


def rows_noise(seed: int, rows, shape: tuple[int, ...]) -> torch.Tensor:
    """(R, *shape) noise, row r for rows[r]: (image id, t) or (image id, t, view, draw);
    generated in place (a stack of separate tensors took as long as generating them, in page
    faults and copies)."""
    rows = list(rows)
    out = torch.empty((len(rows), *shape))
    for r, (image_id, t, *view_draw) in enumerate(rows):
        image_noise(seed, image_id, t, shape, *view_draw, out=out[r])
    return out
