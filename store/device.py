"""Device resolution: one rule for every stage that runs torch ("auto" -> cuda, mps, cpu)."""

from __future__ import annotations

import torch

from .errors import ConfigError


def resolve_device(name: str, key: str = "extract.device") -> torch.device:
    """ "auto" -> cuda, then mps, then cpu; an explicit device must exist (``key`` names the setting)."""
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}: {name!r} requested but this torch sees no CUDA device; use 'auto' or 'cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"{key}: {name!r} does not exist; this machine has cuda:0-{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not mps:
        raise ConfigError(f"{key}: 'mps' requested but MPS is not available; use 'auto' or 'cpu'")
    return device
