"""Places that refuse writes, for tests: a read-only folder and a tiny file system.

The tests run as root here, and root ignores permission bits (chmod 555 still lets it write,
and `os.access` says yes). So as root the folder is bind-mounted onto itself read-only
(writes fail with EROFS, as on a read-only mount); as any other user it is chmod'ed. Where
neither is possible the test is skipped, saying why.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest


@contextlib.contextmanager
def read_only_folder(path: str | Path):
    """Create ``path`` if missing, make it (and everything under it) read-only, yield it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in (path, *path.rglob("*"))}
        for p in modes:
            p.chmod(modes[p] & ~0o222)
        try:
            yield path
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    mount = shutil.which("mount")
    bound = (
        mount is not None
        and subprocess.run([mount, "--bind", str(path), str(path)], capture_output=True).returncode == 0
    )
    if not bound:
        pytest.skip("running as root (which ignores chmod) without the right to make a read-only bind mount")
    try:
        ro = subprocess.run([mount, "-o", "remount,ro,bind", str(path)], capture_output=True)
        if ro.returncode != 0:
            pytest.skip(f"running as root (which ignores chmod); remount read-only failed: {ro.stderr.decode()[:80]}")
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@contextlib.contextmanager
def tiny_filesystem(path: str | Path, megabytes: int):
    """A tmpfs of ``megabytes`` mounted at ``path``: writes beyond it fail with ENOSPC, as on
    a full disk. Needs the right to mount (root here); skipped, saying why, without it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    mount = shutil.which("mount")
    done = mount and subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)], capture_output=True
    )
    if not done or done.returncode != 0:
        pytest.skip("a full disk needs a tmpfs mount, which this user may not make")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)
