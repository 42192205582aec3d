"""What an extraction will produce, computed before any work: arrays, shapes and bytes.

A pool size larger than a block's map is capped at the map size (a 1x1 block has no
2x2 pooling); the plan says where that happens. Views (``extract.views`` K) and noise draws
(``extract.noise_draws`` M) multiply a split's arrays, bytes and forwards by K + M - 1: view 0
(draw 0) is one array, views 1..K-1 and draws 1..M-1 one more each. A dense store
(``data.masks``) adds each split's masks: (N, S, S) uint8 at the model's image size S.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from diffprobe.extract.unet import BlockTable
from diffprobe.store.errors import BlockError
from diffprobe.store.feature_store import FeatureKey


@dataclass(frozen=True)
class PlannedArray:
    split: str
    key: FeatureKey
    requested_pool: tuple[int, ...]  # the requested pool sizes this array serves
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class Plan:
    blocks: tuple[int, ...]
    timesteps: tuple[int, ...]
    pools: tuple[int, ...]
    split_sizes: dict[str, int]
    arrays: tuple[PlannedArray, ...]
    views: dict[str, int] = field(default_factory=dict)  # split -> K (absent: 1)
    noise_draws: dict[str, int] = field(default_factory=dict)  # split -> M (absent: 1)
    mask_size: int = 0  # S of the (N, S, S) uint8 masks of a dense store; 0: no masks

    def variants(self, split: str) -> int:
        """Inputs per image of ``split``: view 0, views 1..K-1, draws 1..M-1."""
        return self.views.get(split, 1) + self.noise_draws.get(split, 1) - 1

    @property
    def has_views(self) -> bool:
        return any(k > 1 for k in self.views.values())

    @property
    def forwards(self) -> int:
        """U-Net forward passes (image x view or draw x timestep), each truncated after the deepest block."""
        return sum(n * self.variants(s) for s, n in self.split_sizes.items()) * len(self.timesteps)

    def mask_bytes(self, split: str | None = None) -> int:
        """Bytes of the masks (uncompressed) of ``split`` (None: every split); 0 without masks."""
        n = sum(self.split_sizes.values()) if split is None else self.split_sizes[split]
        return n * self.mask_size**2

    @property
    def nbytes(self) -> int:
        """Every array's bytes, uncompressed: features and masks."""
        return sum(a.nbytes for a in self.arrays) + self.mask_bytes()

    @property
    def capped(self) -> list[tuple[int, int, int]]:
        """(block, requested pool, stored pool) wherever a pool was capped at the map size."""
        seen = {(a.key.block, p, a.key.pool) for a in self.arrays for p in a.requested_pool if p != a.key.pool}
        return sorted(seen)

    def to_dict(self) -> dict:
        return {
            "blocks": list(self.blocks),
            "timesteps": list(self.timesteps),
            "pools": list(self.pools),
            "splits": self.split_sizes,
            "views": {s: self.views.get(s, 1) for s in self.split_sizes},
            "noise_draws": {s: self.noise_draws.get(s, 1) for s in self.split_sizes},
            "forwards": self.forwards,
            "bytes": self.nbytes,
            "mask_bytes": self.mask_bytes(),
            "capped_pools": [{"block": b, "requested": r, "stored": s} for b, r, s in self.capped],
            "arrays": [
                {
                    "split": a.split,
                    "name": a.key.name,
                    "t": a.key.t,
                    "block": a.key.block,
                    "pool": a.key.pool,
                    "view": a.key.view,
                    "draw": a.key.draw,
                    "shape": list(a.shape),
                    "dtype": a.dtype,
                    "bytes": a.nbytes,
                }
                for a in self.arrays
            ],
        }


def make_plan(
    table: BlockTable,
    split_sizes: dict[str, int],
    blocks,
    timesteps,
    pools,
    dtype: str,
    diffusion_steps: int,
    views: dict[str, int] | None = None,
    noise_draws: dict[str, int] | None = None,
    mask_size: int = 0,
) -> Plan:
    """Check blocks and timesteps against the model and list every array to write; ``views`` and
    ``noise_draws`` (split -> count, absent: 1) add arrays per view v >= 1 and draw m >= 1;
    ``mask_size`` S > 0 adds each split's (N, S, S) uint8 masks."""
    views, noise_draws = dict(views or {}), dict(noise_draws or {})
    table.check(blocks)
    for t in timesteps:
        if not 0 <= t < diffusion_steps:
            raise BlockError(f"extract.timesteps: t {t} is out of range; this diffusion has t 0-{diffusion_steps - 1}")
    arrays = []
    for split, n in split_sizes.items():
        for t in timesteps:
            for b in blocks:
                info = table[b]
                stored: dict[int, list[int]] = {}
                for p in pools:
                    stored.setdefault(min(p, info.spatial), []).append(p)
                variants = [(0, 0)]
                variants += [(v, 0) for v in range(1, views.get(split, 1))]
                variants += [(0, m) for m in range(1, noise_draws.get(split, 1))]
                for p, requested in stored.items():
                    for v, m in variants:
                        arrays.append(
                            PlannedArray(
                                split, FeatureKey(t, b, p, v, m), tuple(requested), (n, info.channels, p, p), dtype
                            )
                        )
    return Plan(
        tuple(blocks), tuple(timesteps), tuple(pools), dict(split_sizes), tuple(arrays), views, noise_draws, mask_size
    )
