"""The finite check every reader of stored features uses (probes and analyses alike)."""

from __future__ import annotations

import numpy as np

ROWS = 2048  # rows per exponent-bit check: keeps the uint16 temporaries small
EXPONENT = 0x7C00  # float16 exponent bits; all ones is inf or nan


def all_finite(x: np.ndarray) -> bool:
    """Whether every value of ``x`` is finite. float16 is checked by its exponent bits, ``ROWS``
    rows at a time: measured 3.6 GB/s vs 0.6 GB/s for np.isfinite, which converts float16 to float32
    and was the slowest step of reading a feature set."""
    if x.dtype != np.float16:
        return bool(np.isfinite(x).all())
    bits = x.view(np.uint16)
    return not any(((bits[lo : lo + ROWS] & EXPONENT) == EXPONENT).any() for lo in range(0, len(bits), ROWS))
