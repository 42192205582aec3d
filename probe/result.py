"""One probe result, for every head (linear, attention, DifFormer, DifFeed): the dataclass each
probe returns, which owns its ledger row (`ProbeResult.row`, the columns of probe/ledger.py)
and its ``--json`` form (`ProbeResult.to_json`).

    r = linear_probe(store, 24, 90, 2)
    r.top1, r.hyperparameters, r.grid       # attributes
    r["top1"]                               # the same, by its --json key
    r.row()                                 # the ledger row (strings and numbers, JSON columns encoded)
    json.dumps(r.to_json())                 # what `probe ... --json` prints

`ProbeResult.of(store, sel, ...)` fills what every cached-feature head shares: the store, its
fingerprint, the split sizes and the label subset of a `probe.protocol.Selection`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from diffprobe.probe.protocol import Selection
from diffprobe.store.feature_store import FeatureStore, fingerprint_digest

_NOT_JSON = ("extra", "fit_ids")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class ProbeResult:
    """What a probe found, and everything that names how it was found (the ledger's columns)."""

    head: str  # linear, attention, fusion, feedback
    store: str
    fingerprint: str
    n_train: int
    n_heldout: int
    n_val: int
    n_classes: int
    block: int | None  # None for DifFormer (it reads ``blocks``)
    t: int | None
    pool: int
    stored_pool: int
    dim: int  # features per image the head reads
    blocks: list[int]
    timesteps: list[int]
    recipe: str
    hyperparameters: dict  # the chosen point (heads add their architecture)
    seed: int
    subset: str
    subset_sha: str
    settings: str  # the settings digest
    grid: list[dict]  # every point with its held-out scores
    heldout_top1: float
    top1: float
    top5: float
    per_class: dict
    device: str
    seconds: float = 0.0
    streamed: bool = False  # whether any split was streamed from the store
    architecture: dict | None = None  # heads: dim, depth, num_heads, mlp_ratio, tokens, parameters
    extra: dict = field(default_factory=dict)  # head-specific keys of --json (stored_pools, pairs, ...)
    timestamp: str = field(default_factory=_now)
    ledger: str | None = None  # where the row went (None: not recorded)
    subset_file: str | None = None  # the fitted ids, for a label subset
    fit_ids: Any = field(default=None, repr=False, compare=False)  # the fitted image ids (not in --json)

    @staticmethod
    def of(store: FeatureStore, sel: Selection, **fields) -> ProbeResult:
        """A result of a head on ``store``'s cached features with the selection ``sel``."""
        return ProbeResult(
            store=str(store.path),
            fingerprint=fingerprint_digest(store.fingerprints),
            n_train=len(sel.fit),
            n_heldout=len(sel.hold),
            n_val=len(sel.y_val),
            n_classes=len(store.class_names),
            subset=sel.subset,
            subset_sha=sel.subset_sha,
            fit_ids=sel.fit_ids,
            **fields,
        )

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` form: every field (``extra`` flattened in; ``architecture`` if any)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _NOT_JSON}
        if out["architecture"] is None:
            del out["architecture"]
        return {**out, **self.extra}

    def row(self) -> dict:
        """The ledger row (probe/ledger.py's columns)."""
        from diffprobe.probe.ledger import to_row

        return to_row(self.to_json())

    def __getitem__(self, key: str):
        """The value of ``key`` in `to_json` (so code reading --json output reads results alike)."""
        if key in self.extra:
            return self.extra[key]
        if key in _NOT_JSON or key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: str) -> bool:
        return key in self.extra or (key not in _NOT_JSON and key in self.__dataclass_fields__)
