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
recipe             ``sgd`` or ``lbfgs`` (``knn`` for the kNN classifier: no training)
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
                   ``knn`` (`probe knn`: one row per k, ``hyperparameters`` holding k)
                   ``segment`` (the dense probe, probe/segment.py: its ``top1`` is the val mIoU,
                   ``top5`` the val pixel accuracy, ``heldout_top1`` the held-out mIoU,
                   ``per_class`` the IoU per mask class, ``recipe`` the optimiser,
                   ``n_classes`` the mask classes; ``hyperparameters`` name ``eval_size`` and
                   ``mask_size``, the resolutions scored and stored)
blocks, timesteps  every block and timestep the head read, comma-separated (``19,24,30``); a
                   fusion row leaves ``block`` and ``t`` empty
=================  ==========================================================================

Appends take an exclusive ``flock`` on the file, so concurrent probes never interleave rows,
and write each row whole or not at all (`append_row`); a reader skips a damaged line with a
warning naming the file and line (`read_rows`).
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
import os
from collections.abc import Callable
from pathlib import Path

from diffprobe.store.config import Config
from diffprobe.store.console import warn as console_warn
from diffprobe.store.errors import DiffprobeError
from diffprobe.store.files import nearest_existing, writable

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


def check_ledger(path: str | Path) -> list[dict]:
    """Before any training: refuse a foreign ledger (`read_rows`) and a folder this process
    cannot write, naming ``--ledger`` as the way out. Returns the ledger's rows."""
    path = Path(path)
    rows = read_rows(path)
    target = nearest_existing(path)
    if not writable(target):
        raise LedgerError(
            f"{path}: cannot write the results ledger ({target} is read-only); "
            f"pass --ledger PATH (or set probe.ledger) to a writable place"
        )
    return rows


def append_row(path: str | Path, result) -> dict:
    """Append the row of ``result`` to the ledger at ``path`` (created with a header if new).

    The row (with the header, for a new file) goes out in one ``write`` under an exclusive
    ``flock`` and is fsynced; a write that fails part-way (a full disk) is cut back to the
    file's previous length, so the ledger never ends in half a row. A last line without its
    newline (cut off by an older version) is ended first, so the new row starts a line of
    its own; readers still skip the cut-off one."""
    path = Path(path)
    row = to_row(result)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as e:
        raise LedgerError(f"{path}: cannot write the results ledger ({e.strerror or e})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        head = os.pread(fd, min(size, 4096), 0).decode("utf-8", errors="replace")
        header = head.split("\n", 1)[0].strip()
        columns = COLUMNS if not header else _header(path, header)
        if columns is COLUMNS_V2:
            if row["head"] != "linear":
                raise LedgerError(
                    f"{path}: a ledger written before the head columns takes linear-probe "
                    f"rows only; set probe.ledger to another file for {row['head']} rows"
                )
            row = {c: row[c] for c in COLUMNS_V2}
        text = io.StringIO()
        if not header:
            csv.writer(text).writerow(COLUMNS)
        elif os.pread(fd, 1, size - 1) != b"\n":
            text.write("\r\n")  # end a cut-off last line (readers skip it as damaged): the new row stays whole
        csv.DictWriter(text, columns).writerow(row)
        data = text.getvalue().encode("utf-8")
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(28, "No space left on device")
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, size)  # never leave part of a row
            raise
    except OSError as e:
        raise LedgerError(
            f"{path}: cannot write the results ledger ({e.strerror or e}); nothing was appended"
        ) from None
    finally:
        os.close(fd)
    return row


def _parse(header: list[str], line: str) -> dict:
    """One ledger line as a row, numbers and JSON parsed; ValueError (or csv.Error) if damaged."""
    values = next(csv.reader([line], strict=True))
    if len(values) != len(header):
        raise ValueError(f"{len(values)} fields, not {len(header)}")
    row: dict = dict(zip(header, values))
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
    # the last columns can be cut and still parse ("90" -> "9"): a row must agree with itself
    if not row["blocks"] or not row["timesteps"]:
        raise ValueError("no blocks or no timesteps")
    if (row["block"] is not None and row["block"] not in row["blocks"]) or (
        row["t"] is not None and row["t"] not in row["timesteps"]
    ):
        raise ValueError(f"blocks {row['blocks']} / timesteps {row['timesteps']} disagree with block/t")
    return row


def read_rows(path: str | Path, on_damaged: Callable[[str], None] | None = None) -> list[dict]:
    """Every row of the ledger at ``path``, numbers and JSON columns parsed ([] if there is none).

    A row is one line, ended by a newline; each line is parsed on its own, so a damaged one
    (cut off by a crash, edited by hand) cannot swallow the lines after it. It is skipped,
    and ``on_damaged`` (default: a warning on stderr) gets one line naming file and line."""
    path = Path(path)
    if not path.is_file():
        return []
    warn = on_damaged or console_warn
    try:
        lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")
    except OSError as e:
        raise LedgerError(f"{path}: cannot read the results ledger ({e.strerror or e})") from None
    header = next(csv.reader([lines[0].rstrip("\r")]), [])
    if header and header not in (list(COLUMNS), list(COLUMNS_V2)):
        raise LedgerError(
            f"{path}: not a diffprobe ledger of these columns (an older one?); set probe.ledger to another file"
        )
    rows = []
    last = len(lines) - 1  # the text after the last newline: empty unless a row was cut off
    for number, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r")
        if not line:
            continue
        try:
            if number - 1 == last:
                raise ValueError("no newline at its end: cut off")
            rows.append(_parse(header, line))
        except (ValueError, csv.Error) as e:
            warn(f"{path}:{number}: damaged ledger row skipped ({str(e)[:100]})")
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
