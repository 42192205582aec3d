"""The results ledger: one CSV row per probe, in a file beside the store.

    from diffprobe.probe.ledger import append_row, read_rows
    append_row(path, result)       # result: the `probe.result.ProbeResult` a probe returns
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
hyperparameters    the chosen ones, JSON (``{"lr": .., "weight_decay": ..}`` or ``{"l2": ..}``);
                   other heads add their architecture (dim, depth, num_heads, mlp_ratio,
                   tokens, parameters; DifFeed its decoder -> encoder ``pairs``)
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
head               ``linear``, ``attention``, ``fusion`` (DifFormer), ``feedback`` (DifFeed) or
                   ``segment`` (the dense probe, probe/segment.py: its ``top1`` is the val mIoU,
                   ``top5`` the val pixel accuracy, ``heldout_top1`` the held-out mIoU,
                   ``per_class`` the IoU per mask class, ``recipe`` the optimiser,
                   ``n_classes`` the mask classes; ``hyperparameters`` name ``eval_size`` and
                   ``mask_size``, the resolutions scored and stored)
blocks, timesteps  every block and timestep the head read, comma-separated (``19,24,30``); a
                   fusion row leaves ``block`` and ``t`` empty
=================  ==========================================================================

Appends take an exclusive ``flock`` on the file, so concurrent probes never interleave rows.
A file whose header differs from these columns is refused rather than extended. Version 2
of the columns added ``subset``, ``subset_sha`` and ``settings`` (after ``seed``): a ledger
written before them is refused too; point ``probe.ledger`` at a new file. Version 3 added
``head``, ``blocks`` and ``timesteps`` (at the end): a version-2 ledger is still read (its rows
are linear probes) and linear rows are still appended to it in its own columns; rows of other
heads need a version-3 file.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
from pathlib import Path

from diffprobe.store.config import Config
from diffprobe.store.errors import DiffprobeError

COLUMNS = (
    "timestamp",
    "store",
    "fingerprint",
    "n_train",
    "n_heldout",
    "n_val",
    "n_classes",
    "block",
    "t",
    "pool",
    "stored_pool",
    "dim",
    "recipe",
    "hyperparameters",
    "seed",
    "subset",
    "subset_sha",
    "settings",
    "heldout_top1",
    "top1",
    "top5",
    "seconds",
    "device",
    "per_class",
    "head",
    "blocks",
    "timesteps",
)
COLUMNS_V2 = COLUMNS[:-3]  # before the head columns: read, and extended with linear rows only
_INTS = {"n_train", "n_heldout", "n_val", "n_classes", "block", "t", "pool", "stored_pool", "dim", "seed"}
_FLOATS = {"heldout_top1", "top1", "top5", "seconds"}
_JSON = {"hyperparameters", "per_class"}
_LISTS = {"blocks", "timesteps"}
_OPTIONAL = {"block", "t"}  # empty in a fusion row


class LedgerError(DiffprobeError):
    """A results ledger that cannot be read or extended."""


def ledger_path(store_path: str | Path, name: str) -> Path:
    """Where the ledger of the store at ``store_path`` lives: ``name`` beside the store."""
    p = Path(name)
    return p if p.is_absolute() else Path(store_path).parent / p


def to_row(result) -> dict:
    """The ledger row of one probe result: a `probe.result.ProbeResult` (`ProbeResult.row` is
    this) or its ``--json`` mapping (a mapping without ``head`` is a linear probe's)."""
    if hasattr(result, "to_json"):
        result = result.to_json()
    defaults = {"head": "linear", "blocks": [result.get("block")], "timesteps": [result.get("t")]}
    row = {c: result[c] if c in result or c not in defaults else defaults[c] for c in COLUMNS}
    for c in _JSON:
        row[c] = json.dumps(row[c], sort_keys=True)
    for c in _LISTS:
        row[c] = ",".join(str(v) for v in row[c]) if isinstance(row[c], (list, tuple)) else row[c]
    for c in _OPTIONAL:
        row[c] = "" if row[c] is None else row[c]
    return row


def _header(path: Path, header: str) -> tuple[str, ...]:
    names = next(csv.reader(io.StringIO(header)))
    for columns in (COLUMNS, COLUMNS_V2):
        if names == list(columns):
            return columns
    raise LedgerError(
        f"{path}: not a diffprobe ledger of these columns (header {header[:80]!r}); set probe.ledger to another file"
    )


def append_row(path: str | Path, result) -> dict:
    """Append the row of ``result`` to the ledger at ``path`` (created with a header if new)."""
    path = Path(path)
    row = to_row(result)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+", newline="", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            header = f.readline().strip()
            columns = COLUMNS if not header else _header(path, header)
            if not header:
                csv.writer(f).writerow(COLUMNS)
            if columns is COLUMNS_V2:
                if row["head"] != "linear":
                    raise LedgerError(
                        f"{path}: a ledger written before the head columns takes linear-probe "
                        f"rows only; set probe.ledger to another file for {row['head']} rows"
                    )
                row = {c: row[c] for c in COLUMNS_V2}
            csv.DictWriter(f, columns).writerow(row)
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
        if reader.fieldnames and list(reader.fieldnames) not in (list(COLUMNS), list(COLUMNS_V2)):
            raise LedgerError(
                f"{path}: not a diffprobe ledger of these columns (an older one?); set probe.ledger to another file"
            )
        rows = list(reader)
    for row in rows:
        if "head" not in row:  # a version-2 ledger: linear probes only
            row.update(head="linear", blocks=row["block"], timesteps=row["t"])
        for c in _INTS:
            row[c] = None if c in _OPTIONAL and row[c] == "" else int(row[c])
        for c in _LISTS:
            row[c] = [int(v) for v in row[c].split(",") if v]
        for c in _FLOATS:
            row[c] = float(row[c])
        for c in _JSON:
            row[c] = json.loads(row[c])
    return rows


def record(cfg: Config, result, ledger: bool):
    """Append ``result`` (a `probe.result.ProbeResult`) to the ledger beside the store and, for a
    label subset, its fitted ids (``result.fit_ids``) to ``subsets/<subset_sha>.txt``; set its
    ``ledger`` and ``subset_file`` to both paths (None when ``ledger`` is False)."""
    from diffprobe.probe.subsets import write_subset

    result.ledger = result.subset_file = None
    if ledger:
        path = ledger_path(cfg.store.path, cfg.probe.ledger)
        if result.subset != "all":
            result.subset_file = str(write_subset(path.parent, result.fit_ids, result.subset_sha))
        append_row(path, result)
        result.ledger = str(path)
    return result
