"""The preamble every probe command shares (`probe linear|sweep|attention|fusion|feedback`):
torch's thread count, the results ledger checked before anything trains, the store opened
(and refused while an `extract run` is still writing it), and the held-out/label-subset
selection made once.

    cmd = prepare(cfg, subset="shots:5")       # cmd.store, cmd.sel, cmd.ledger
    r = linear_probe(cmd.store, 24, 90, 2, ..., selection=cmd.sel)
    record(cfg, r, ledger=True)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from diffprobe.probe.ledger import check_ledger, ledger_path
from diffprobe.probe.protocol import Selection, select
from diffprobe.store.config import Config
from diffprobe.store.errors import StoreError
from diffprobe.store.feature_store import FeatureStore, lock_holder, open_store


@dataclass(frozen=True)
class Command:
    cfg: Config
    store: FeatureStore | None  # None for a command that reads no store (DifFeed)
    sel: Selection | None
    ledger: Path | None  # None: nothing is recorded


def check_not_written(store: FeatureStore) -> None:
    """Refuse a store whose writer lock (`extract run`'s, see store/feature_store.py) is held:
    its arrays may still change under a probe."""
    holder = lock_holder(store.path)
    if holder is not None:
        raise StoreError(
            f"{store.path}: an `extract run` is still writing this store ({holder}); probe it when that run has finished"
        )


def prepare(cfg: Config, subset: str = "all", ledger: bool = True, store: bool = True) -> Command:
    """Threads, ledger check, store and selection for a probe command (module docstring)."""
    p = cfg.probe
    if p.threads:
        torch.set_num_threads(p.threads)
    path = ledger_path(cfg.store.path, p.ledger) if ledger else None
    if path is not None:
        check_ledger(path)  # foreign or read-only: refused before training
    if not store:
        return Command(cfg, None, None, path)
    opened = open_store(cfg.store.path)
    check_not_written(opened)
    return Command(cfg, opened, select(opened, p.seed, p, subset), path)
