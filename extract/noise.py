"""Deterministic noise: the noise for an image at a timestep depends only on
(noise seed, image id, t), never on the batch, the worker, the device or a resume.
"""

from __future__ import annotations

import hashlib

import torch

DERIVATION = "blake2b-64(seed, image id, t) seeds a CPU torch.Generator; randn float32"


def image_noise(seed: int, image_id: str, t: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal noise of ``shape`` (float32, CPU) for one (image, t)."""
    digest = hashlib.blake2b(f"{seed}\x00{image_id}\x00{t}".encode(), digest_size=8).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return torch.randn(shape, generator=g)


def batch_noise(seed: int, image_ids, t: int, shape: tuple[int, ...]) -> torch.Tensor:
    """(N, *shape) noise, row i for image_ids[i]."""
    return torch.stack([image_noise(seed, i, t, shape) for i in image_ids])
