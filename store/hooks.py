"""Testing hooks: a kill or a pause at a moment a test controls, in whichever process (this one,
a loader, a dask worker) gets there first.

Each variable holds the path of a file naming one target (an extraction chunk "train/3", a
probe cell "24/90/2"); the code at that target calls `sigkill_hook` / `pause_hook`. Unset, each
costs one environment lookup.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

# SIGKILL_FILE: the process at the named target deletes the file and SIGKILLs itself (one kill:
# the first process to get there; a rerun of the same target goes on).
SIGKILL_FILE = "DIFFPROBE_SIGKILL_FILE"
# PAUSE_FILE: the process at the named target creates ``<file>.reached``, then waits until the
# test removes the file (at most PAUSE_LIMIT_S, then goes on); the test acts at that moment.
PAUSE_FILE = "DIFFPROBE_PAUSE_FILE"
PAUSE_LIMIT_S = 120.0


def hook_file(variable: str, target: str) -> Path | None:
    """The file the testing hook ``variable`` names, if it names ``target``."""
    path = os.environ.get(variable)
    if not path:
        return None
    try:
        named = Path(path).read_text().strip()
    except OSError:
        return None
    return Path(path) if named == target else None


def sigkill_hook(target: str) -> None:
    """SIGKILL_FILE (see there) at ``target``."""
    if (kill := hook_file(SIGKILL_FILE, target)) is not None:
        try:
            kill.unlink()  # one kill: the first process to get here
        except FileNotFoundError:
            return
        os.kill(os.getpid(), signal.SIGKILL)


def pause_hook(target: str) -> None:
    """PAUSE_FILE (see there) at ``target``."""
    if (pause := hook_file(PAUSE_FILE, target)) is not None:
        Path(f"{pause}.reached").touch()
        deadline = time.monotonic() + PAUSE_LIMIT_S
        while pause.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
