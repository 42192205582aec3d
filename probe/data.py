"""Reading cached features for a probe. `read_features` holds a split's (block, t, pool) array
in memory, flattened and finite-checked; the streamed reader of larger splits is
`probe.linear._Streamed` (not yet behind one interface with this one: see issue 16).
"""

from __future__ import annotations

import numpy as np

from diffprobe.store.errors import StoreError
from diffprobe.store.feature_store import FeatureStore
from diffprobe.store.finite import all_finite


def read_features(store: FeatureStore, split: str, block: int, t: int, pool: int, usable: np.ndarray) -> np.ndarray:
    """(n_usable, C * p * p) float16 features of ``split``."""
    x = store.features(split, block, t, pool)
    x = x.reshape(len(x), -1)
    x = x if usable.all() else x[usable]
    if not all_finite(x):
        raise StoreError(
            f"{store.path}: block {block}, t {t}, pool {pool} in split {split!r} holds "
            f"non-finite values in images that are not marked skipped"
        )
    return x
