"""Seeds derived from keys: one derivation for every seeded draw of the project (the noise of
an (image, t, view), the crop of a view, a probe's view schedule), so that a draw depends only
on its key, never on a batch, a worker or an order."""

from __future__ import annotations

import hashlib


def derive_seed(*parts) -> int:
    """A 63-bit seed from ``parts`` joined by NUL (blake2b-64)."""
    digest = hashlib.blake2b("\x00".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
