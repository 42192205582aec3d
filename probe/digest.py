"""Short sha256 digests of JSON settings: how the probe names what made a store (its
fingerprint) and what a head was trained with (its settings) in the ledger.

The JSON spellings here are part of every existing ledger: a sweep resumes by matching these
digests, so changing a separator or a length orphans the rows already written.
"""

from __future__ import annotations

import hashlib
import json

from diffprobe.store.feature_store import fingerprint_digest  # noqa: F401  (the store's one digest)


def settings_digest(settings: dict) -> str:
    """12 hex digits over ``settings`` (sorted keys, json's default spacing)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
