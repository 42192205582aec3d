"""The probe protocol, shared by every head: which images of a store are usable (labelled, not
skipped), the seeded held-out part of train that chooses hyperparameters (never val), the
label subset that is fitted (probe/subsets.py), and `Selection`, which holds all of it once
per store, seed and subset so a sweep or a grid of heads shares it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from diffprobe.store.config import ProbeConfig
from diffprobe.store.errors import StoreError
from diffprobe.store.feature_store import FeatureStore


def labelled(store: FeatureStore, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, ids, usable) of ``split``: ``usable`` drops skipped images; errors name the problem."""
    if split not in store.splits:
        raise StoreError(
            f"{store.path}: no split {split!r}; the linear probe needs 'train' and 'val' "
            f"and the store holds {', '.join(store.splits)}"
        )
    n_classes = len(store.class_names)
    try:
        labels = store.labels(split)
    except KeyError:
        labels = None
    if labels is None or n_classes == 0 or (len(labels) and labels.min() < 0):
        raise StoreError(f"{store.path}: split {split!r} has no labels; a linear probe needs labelled images")
    if len(labels) and labels.max() >= n_classes:
        raise StoreError(
            f"{store.path}: split {split!r} has label {int(labels.max())} but the store names {n_classes} classes"
        )
    usable = ~store.skipped(split).astype(bool)
    if not usable.any():
        raise StoreError(
            f"{store.path}: split {split!r} is empty ({len(labels)} images, all skipped); nothing to probe"
        )
    return labels, store.ids(split), usable


def holdout_mask(ids, labels, fraction: float, seed: int) -> np.ndarray:
    """True for the train images held out to choose hyperparameters.

    Per class, the ``round(fraction * n)`` images (at least 1, at most n - 1; none for a class
    of one image) whose blake2b(seed, id) is smallest: stratified, and a function of
    (seed, id, label) alone, so reordering or extending the split does not reshuffle it.
    """
    ids, labels = np.asarray(ids), np.asarray(labels)
    keys = np.array(
        [int.from_bytes(hashlib.blake2b(f"{seed}\0{i}".encode(), digest_size=8).digest(), "big") for i in ids],
        dtype=np.uint64,
    )
    mask = np.zeros(len(ids), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n = len(members)
        k = 0 if n < 2 else min(max(int(round(fraction * n)), 1), n - 1)
        mask[members[np.argsort(keys[members], kind="stable")[:k]]] = True
    return mask


@dataclass(frozen=True)
class Selection:
    """Which images a probe uses, the same for every feature set of a store (see `select`).

    Row indices ``fit`` and ``hold`` index train's usable (not skipped) images.
    """

    usable: np.ndarray  # train: not skipped
    y: np.ndarray  # labels of the usable train images
    fit: np.ndarray  # usable rows the head is fitted on (the subset, if any)
    hold: np.ndarray  # usable rows held out to choose hyperparameters
    usable_val: np.ndarray
    y_val: np.ndarray
    subset: str  # the spec: "all", "fraction:F", "shots:K", "file:PATH"
    subset_sha: str  # sha256 of the sorted fitted ids
    fit_ids: np.ndarray


def select(store: FeatureStore, seed: int = 0, settings: ProbeConfig | None = None, subset: str = "all") -> Selection:
    """The held-out part, the fitted part (``subset`` of what is left: probe/subsets.py) and val."""
    from diffprobe.probe.subsets import choose_subset, subset_sha

    p = settings or ProbeConfig()
    y_all, ids, usable = labelled(store, "train")
    y_val_all, _, usable_val = labelled(store, "val")
    y_tr, ids = y_all[usable], ids[usable]
    held = holdout_mask(ids, y_tr, p.holdout_fraction, seed)
    if not held.any():
        raise StoreError(
            f"{store.path}: train has too few images per class to hold {p.holdout_fraction:g} out "
            f"for choosing hyperparameters ({len(y_tr)} images, {len(store.class_names)} classes)"
        )
    chosen = choose_subset(subset, ids, y_tr, ~held, seed, store.class_names, source=str(store.path))
    fit = np.flatnonzero(chosen)
    return Selection(
        usable=usable,
        y=y_tr,
        fit=fit,
        hold=np.flatnonzero(held),
        usable_val=usable_val,
        y_val=y_val_all[usable_val],
        subset=subset,
        subset_sha=subset_sha(ids[fit]),
        fit_ids=ids[fit],
    )
