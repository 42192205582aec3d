"""The results ledger: one CSV row per probe, in a file beside the store.

    from probe.ledger import append_row, read_rows
    append_row(path, result)       # result: the dict `probe.linear.linear_probe` returns
    rows = read_rows(path)         # list of dicts, numbers parsed

The file is ``probe.ledger`` (default ``probe-results.csv``) resolved against the store's
parent folder, so ``runs/digits-tiny.zarr`` writes ``runs/probe-results.csv``; several stores
in one folder share a ledger and are told apart by ``fingerprint``. Columns (in this order):

=================  ==========================================================================
timestamp          UTC time the probe finished, ISO 8601
store              the store's path as given
fingerprint        first 16 hex digits of sha256 over the store's fingerprints (model,
                   preprocessing, noise, compute, dataset) as canonical JSON
n_train            train images the head was fitted on (train minus held-out minus skipped;
                   with a label subset, the subset)
n_heldout          train images held out to choose hyperparameters
n_val              val images scored
n_classes          classes in the store
block, t, pool     the feature set asked for
stored_pool        the pool it is stored at (capped at the block's map size)
dim                features per image (C * p * p)
recipe             ``sgd`` or ``lbfgs``
hyperparameters    the chosen ones, JSON (``{"lr": .., "weight_decay": ..}`` or ``{"l2": ..}``)
seed               seed of the held-out selection, label subset, initialisation and batch order
subset             the images fitted on: ``all``, ``fraction:F``, ``shots:K`` or ``file:PATH``
                   (probe/subsets.py)
subset_sha         sha256 of the fitted image ids, sorted, joined by newlines; unless
                   ``subset`` is ``all``, the ids are in ``subsets/<subset_sha>.txt`` beside
                   the ledger, so the row can be reproduced from them
settings           12 hex digits over the settings that change what the recipe trains
                   (holdout_fraction and the recipe's own keys; `probe.linear.settings_hash`):
                   `probe sweep` resumes only cells of equal settings
heldout_top1       top-1 of the chosen head on the held-out part (what chose it)
top1, top5         on val, fractions in [0, 1]
seconds            wall time of the probe (reading, standardising, training, scoring)
device             torch device it trained on
per_class          top-1 per class on val, JSON ``{class name: fraction}``
=================  ==========================================================================

Appends take an exclusive ``flock`` on the file, so concurrent probes never interleave rows.
A file whose header differs from these columns is refused rather than extended. Version 2
of the columns added ``subset``, ``subset_sha`` and ``settings`` (after ``seed``): a ledger
written before them is refused too; point ``probe.ledger`` at a new file.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
from pathlib import Path

from store.errors import DiffprobeError

COLUMNS = ("timestamp", "store", "fingerprint", "n_train", "n_heldout", "n_val", "n_classes", "block", "t",
           "pool", "stored_pool", "dim", "recipe", "hyperparameters", "seed", "subset", "subset_sha", "settings",
           "heldout_top1", "top1", "top5", "seconds", "device", "per_class")
_INTS = {"n_train", "n_heldout", "n_val", "n_classes", "block", "t", "pool", "stored_pool", "dim", "seed"}
_FLOATS = {"heldout_top1", "top1", "top5", "seconds"}
_JSON = {"hyperparameters", "per_class"}


class LedgerError(DiffprobeError):
    """A results ledger that cannot be read or extended."""


def ledger_path(store_path: str | Path, name: str) -> Path:
    """Where the ledger of the store at ``store_path`` lives: ``name`` beside the store."""
    p = Path(name)
    return p if p.is_absolute() else Path(store_path).parent / p


def to_row(result: dict) -> dict:
    """The ledger row of one probe result."""
    row = {c: result[c] for c in COLUMNS}
    for c in _JSON:
        row[c] = json.dumps(row[c], sort_keys=True)
    return row


def append_row(path: str | Path, result: dict) -> dict:
    """Append the row of ``result`` to the ledger at ``path`` (created with a header if new)."""
    path = Path(path)
    row = to_row(result)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+", newline="", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            header = f.readline().strip()
            if not header:
                csv.writer(f).writerow(COLUMNS)
            elif next(csv.reader(io.StringIO(header))) != list(COLUMNS):
                raise LedgerError(f"{path}: not a diffprobe ledger of these columns (header {header[:80]!r}); "
                                  f"set probe.ledger to another file")
            csv.DictWriter(f, COLUMNS).writerow(row)
    except OSError as e:
        raise LedgerError(f"{path}: cannot write the results ledger ({e.strerror or e})") from None
    return row


def read_rows(path: str | Path) -> list[dict]:
    """Every row of the ledger at ``path``, numbers and JSON columns parsed ([] if there is none)."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames and list(reader.fieldnames) != list(COLUMNS):
            raise LedgerError(f"{path}: not a diffprobe ledger of these columns (an older one?); "
                              f"set probe.ledger to another file")
        rows = list(reader)
    for row in rows:
        for c in _INTS:
            row[c] = int(row[c])
        for c in _FLOATS:
            row[c] = float(row[c])
        for c in _JSON:
            row[c] = json.loads(row[c])
    return rows
