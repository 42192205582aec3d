"""Label fractions: which train images a probe may fit on (`--label-fraction`, `--shots`, `--subset`).

    from diffprobe.probe.subsets import subset_spec, choose_subset
    spec = subset_spec(label_fraction=0.01)                  # "fraction:0.01"
    chosen = choose_subset(spec, ids, labels, eligible, seed=0, class_names=names, source="store")

A spec is one string, the same one the ledger's ``subset`` column holds:

=====================  ===========================================================================
``all``                every fitted image (train minus the held-out part minus skipped images)
``fraction:F``         per class, ``round(F * n)`` of its n fitted images, at least 1
``shots:K``            per class, K of its fitted images
``file:PATH``          the image ids listed in PATH (one per line; blank lines and ``#`` comments
                       ignored), the standard 1%/10% ImageNet lists for instance
=====================  ===========================================================================

Subsets are drawn from the fitted part only, so they never touch the held-out part that
`probe.protocol.holdout_mask` selects for choosing hyperparameters. ``fraction`` and ``shots``
take, per class, the images whose blake2b(seed, "subset", id) is smallest: class-balanced,
seeded, and a function of (seed, image id, label) alone (reordering or extending the split
does not reshuffle it), with a salt of its own so it is not correlated with the held-out
draw. A file entry matches a store id exactly, or else the last path component of exactly one
id (ImageNet lists name ``n01440764_10026.JPEG``; an ImageFolder store's id is
``n01440764/n01440764_10026.JPEG``); listed images that are held out or skipped are left out.

``subset_sha`` is the sha256 of the chosen ids, sorted and joined by newlines: the ledger
keeps it, and the ids are written beside the ledger in ``subsets/<subset_sha>.txt``.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np

from diffprobe.store.errors import ConfigError, DiffprobeError


class SubsetError(DiffprobeError):
    """A label fraction, shot count or id list that cannot be drawn from the train split."""


def subset_spec(label_fraction: float | None = None, shots: int | None = None, subset: str | Path | None = None) -> str:
    """The spec string of at most one of the three options (``"all"`` for none)."""
    given = [
        name
        for name, v in (("--label-fraction", label_fraction), ("--shots", shots), ("--subset", subset))
        if v is not None
    ]
    if len(given) > 1:
        raise ConfigError(f"{given[0]} and {given[1]}: give at most one way of choosing a label subset")
    if label_fraction is not None:
        if (
            isinstance(label_fraction, bool)
            or not isinstance(label_fraction, (int, float))
            or not math.isfinite(label_fraction)
            or not 0 < label_fraction <= 1
        ):
            raise ConfigError(f"--label-fraction: {label_fraction!r} is out of range; allowed: 0 < F <= 1")
        return f"fraction:{float(label_fraction):g}"
    if shots is not None:
        if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
            raise ConfigError(f"--shots: {shots!r} is out of range; allowed: >= 1")
        return f"shots:{shots}"
    if subset is not None:
        path = Path(subset)
        if not path.is_file():
            raise ConfigError(f"--subset: no such file {str(path)!r}")
        return f"file:{path}"
    return "all"


def _keys(ids, seed: int) -> np.ndarray:
    return np.array(
        [int.from_bytes(hashlib.blake2b(f"{seed}\0subset\0{i}".encode(), digest_size=8).digest(), "big") for i in ids],
        dtype=np.uint64,
    )


def read_id_file(path: str | Path) -> list[str]:
    """The ids listed in ``path``: one per line, surrounding blanks stripped, blank and ``#`` lines skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SubsetError(f"--subset: cannot read {str(path)!r} ({getattr(e, 'strerror', None) or e})") from None
    out = [line.strip() for line in text.splitlines()]
    out = [s for s in out if s and not s.startswith("#")]
    if not out:
        raise SubsetError(f"--subset: {path} lists no image ids")
    return out


def _match_file(path: str, ids: np.ndarray, source: str) -> np.ndarray:
    """Bool over ``ids``: listed in ``path`` (exact id, else a unique last path component)."""
    listed = read_id_file(path)
    index = {str(i): n for n, i in enumerate(ids)}
    by_name: dict[str, int] = {}
    for n, i in enumerate(ids):
        name = str(i).rsplit("/", 1)[-1]
        by_name[name] = -1 if name in by_name else n  # -1: ambiguous
    mask = np.zeros(len(ids), dtype=bool)
    for entry in listed:
        n = index.get(entry, by_name.get(entry))
        if n is None or n < 0:
            why = "matches several" if n is not None else "is not one of"
            raise SubsetError(f"--subset: id {entry!r} in {path} {why} the {len(ids)} train image ids of {source}")
        mask[n] = True
    return mask


def choose_subset(
    spec: str, ids, labels, eligible, seed: int, class_names: list[str], source: str = "the store"
) -> np.ndarray:
    """Bool over ``ids``: the images of ``spec`` among ``eligible`` (the fitted part).

    ``labels`` index ``class_names``. Errors (one line) name the class a fraction leaves empty
    or that has fewer images than ``shots``, and the first unknown id of a file.
    """
    ids, labels, eligible = np.asarray(ids), np.asarray(labels), np.asarray(eligible, dtype=bool)
    kind, _, arg = spec.partition(":")
    if kind == "all":
        return eligible.copy()
    if kind == "file":
        chosen = _match_file(arg, ids, source) & eligible
        if not chosen.any():
            raise SubsetError(
                f"--subset: none of the ids in {arg} is in the fitted part of train (they are all held out or skipped)"
            )
        return chosen
    if kind not in ("fraction", "shots"):
        raise ConfigError(f"subset: unknown spec {spec!r}; allowed: all, fraction:F, shots:K, file:PATH")
    keys = _keys(ids, seed)
    chosen = np.zeros(len(ids), dtype=bool)
    for c, name in enumerate(class_names):
        members = np.flatnonzero(eligible & (labels == c))
        n = len(members)
        if kind == "fraction":
            k = max(int(round(float(arg) * n)), 1) if n else 0
            if k == 0:
                raise SubsetError(
                    f"--label-fraction {arg}: class {name!r} has no train images left to fit on "
                    f"(after holding out and skipping), so it would get none"
                )
        else:
            k = int(arg)
            if k > n:
                raise SubsetError(
                    f"--shots {k}: class {name!r} has only {n} train images to fit on (after holding out and skipping)"
                )
        chosen[members[np.argsort(keys[members], kind="stable")[:k]]] = True
    return chosen


def subset_sha(chosen_ids) -> str:
    """sha256 (hex) of the chosen ids, sorted and joined by newlines."""
    return hashlib.sha256("\n".join(sorted(map(str, chosen_ids))).encode()).hexdigest()


def write_subset(folder: str | Path, chosen_ids, sha: str) -> Path:
    """Write the chosen ids (sorted, one per line) to ``folder/subsets/<sha>.txt``, once."""
    path = Path(folder) / "subsets" / f"{sha}.txt"
    if not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{id(path)}")
            tmp.write_text("".join(f"{i}\n" for i in sorted(map(str, chosen_ids))), encoding="utf-8")
            tmp.replace(path)  # visible only when whole
        except OSError as e:
            raise SubsetError(f"{path}: cannot write the subset's ids ({e.strerror or e})") from None
    return path
