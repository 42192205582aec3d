"""Writing files the user reads (CSVs, pictures, ledgers) so that they are whole or absent.

    from diffprobe.store.files import check_writable, write_atomically
    check_writable(folder, "--out")                  # before any work: one line if it cannot be
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png"))

`write_atomically` writes beside the target under a temporary name and renames it into place,
so a full disk or a kill never leaves a short file under the result's name.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import OutputError


def human_bytes(n: float) -> str:
    """Bytes in decimal units: ``512 B``, ``1.5 KB`` ... ``3.8 TB``."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def writable(path: str | Path) -> bool:
    """Whether this process can create files in folder ``path`` (or append to file ``path``).

    ``os.access`` answers yes to root even on a read-only mount, so this tries instead: a
    folder gets a temporary file created and removed, a file is opened for appending (which
    writes nothing)."""
    path = Path(path)
    try:
        if path.is_dir():
            fd, name = tempfile.mkstemp(prefix=".diffprobe-write-check-", dir=path)
            os.close(fd)
            os.unlink(name)
        else:
            with open(path, "ab"):
                pass
    except OSError:
        return False
    return True


def nearest_existing(path: str | Path) -> Path:
    """``path`` or its closest existing parent folder: where a write to ``path`` would start."""
    path = Path(path).absolute()
    return next((p for p in (path, *path.parents) if p.exists()), Path("/"))


def check_writable(folder: str | Path, way_out: str) -> None:
    """Raise `OutputError` (one line, naming ``way_out``, e.g. ``--out DIR``) unless files can be
    written in ``folder`` (created later if missing: its nearest existing parent is tried)."""
    folder = Path(folder)
    where = nearest_existing(folder)
    if where.exists() and not where.is_dir():
        raise OutputError(f"{folder}: {where} is a file, not a folder; pass {way_out} to write elsewhere")
    if not writable(where):
        raise OutputError(f"{folder}: cannot write there ({where} is read-only); pass {way_out} to write elsewhere")


def write_atomically(path: str | Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it to ``path``.

    Any OSError (a full disk, a read-only folder) becomes one `OutputError` line naming
    ``path``; the temporary file is removed and ``path`` keeps what it held before."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write ({e.strerror or e}); nothing was written under this name") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
