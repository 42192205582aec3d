"""Shared fixtures: small configs on the embedded default (a few dozen digits, the tiny U-Net)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from diffprobe.store.config import load_config

REPO = Path(__file__).resolve().parents[1]


def small_config(tmp_path: Path, name: str = "store.zarr", **overrides):
    """A config for quick runs: 3 images per class per split, chunks of 8, two blocks, one t."""
    base = {
        "data.max_per_class": 3,
        "extract.blocks": "3,8,16,24",
        "extract.timesteps": [90],
        "extract.pools": [1, 2],
        "extract.forward_batch": 8,
        "extract.batch_size": 8,
        "extract.device": "cpu",
        "store.chunk_images": 8,
        "store.path": str(tmp_path / name),
    }
    base.update(overrides)
    return load_config(REPO / "pipeline.toml", base)


def writer_kwargs(path, chunk_images: int) -> dict:
    """`StoreWriter.create`'s keyword arguments that reopen the store at ``path`` as it is."""
    from diffprobe.store.feature_store import open_store

    s = open_store(path)
    return dict(
        fingerprints=s.fingerprints,
        provenance={},
        blocks=s.attrs["blocks"],
        class_names=s.class_names,
        splits={sp: (list(s.ids(sp)), s.labels(sp)) for sp in s.splits},
        chunk_images=chunk_images,
    )


def killed_run(tmp_path: Path, toml: str, at: str) -> None:
    """`extract run` of the config ``toml`` in a subprocess that SIGKILLs itself right after the
    completion record of chunk ``at`` ("train/2"; the hook extract.extraction.SIGKILL_FILE)."""
    from diffprobe.extract.extraction import SIGKILL_FILE

    config = tmp_path / "kill.toml"
    config.write_text(toml)
    trigger = tmp_path / "kill-at"
    trigger.write_text(at)
    proc = subprocess.run(
        [sys.executable, "-m", "diffprobe.extract.cli", "run", "--config", str(config), "--json"],
        cwd=tmp_path,
        env={**os.environ, SIGKILL_FILE: str(trigger)},
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]


@pytest.fixture(autouse=True)
def _quiet_guided_diffusion():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


@pytest.fixture(autouse=True, scope="session")
def _two_threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Probe heads this small gain nothing from intra-op threads, and on a shared 2-core machine
    spinning OpenMP threads made the probe tests ~5x slower (132 s at 2 threads vs 25 s at 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
