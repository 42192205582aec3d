"""Deterministic noise: the noise for an image at a timestep depends only on
(noise seed, image id, t), never on the batch, the worker, the device or a resume.
"""

from __future__ import annotations

import hashlib

import torch

DERIVATION = "blake2b-64(seed, image id, t) seeds a CPU torch.Generator; randn float32"


def image_noise(
    seed: int, image_id: str, t: int, shape: tuple[int, ...], out: torch.Tensor | None = None
) -> torch.Tensor:
    """Standard normal noise of ``shape`` (float32, CPU) for one (image, t); written into ``out``
    (a contiguous float32 tensor of ``shape``) when given, the same values either way."""
    digest = hashlib.blake2b(f"{seed}\x00{image_id}\x00{t}".encode(), digest_size=8).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    if out is not None:
        return torch.randn(shape, generator=g, out=out)
    return torch.randn(shape, generator=g)


def batch_noise(seed: int, image_ids, t: int, shape: tuple[int, ...]) -> torch.Tensor:
    """(N, *shape) noise, row i for image_ids[i]."""
    return rows_noise(seed, [(i, t) for i in image_ids], shape)


def rows_noise(seed: int, rows, shape: tuple[int, ...]) -> torch.Tensor:
    """(R, *shape) noise, row r for the (image id, t) pair rows[r], generated in place (a stack
    of separate tensors took as long as generating them, in page faults and copies)."""
    rows = list(rows)
    out = torch.empty((len(rows), *shape))
    for r, (image_id, t) in enumerate(rows):
        image_noise(seed, image_id, t, shape, out=out[r])
    return out
