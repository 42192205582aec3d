"""diffprobe's ground floor: config (pipeline.toml), errors, and the Zarr feature store.

from diffprobe.store import open_store
s = open_store("runs/digits-tiny.zarr")
s.features("train", block=24, t=90, pool=2)
"""

from .errors import DiffprobeError
from .feature_store import FeatureKey, FeatureStore, open_store

__all__ = ["DiffprobeError", "FeatureKey", "FeatureStore", "open_store"]
