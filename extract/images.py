"""Image sources and their deterministic preprocessing.

Two sources, one interface (`ImageSource`):

- ``digits``: scikit-learn's bundled 8x8 digits (no download), upsampled to the model's
  image size, grey replicated to 3 channels, split train/val by a seeded stratified split.
- ``imagefolder``: ``root/<split>/<class>/<image>.{JPEG,jpg,png}`` (the ImageNet layout);
  class ids follow the sorted class folder names of the first split.

Preprocessing is guided-diffusion's own (``center_crop_arr``): halve with a box filter while
the shorter side is at least twice the target, resize the shorter side to the target with
bicubic, center crop, then scale to [-1, 1].
"""

from __future__ import annotations

import hashlib
import json
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from diffprobe.store.errors import ImageError

EXTENSIONS = (".jpeg", ".jpg", ".png")
PREPROCESSING = "adm-center-crop-v1"  # name recorded in the store; bump if the steps change


def preprocess(image: Image.Image, size: int) -> np.ndarray:
    """PIL image -> float32 array (3, size, size) in [-1, 1] (guided-diffusion's center crop)."""
    arr = center_crop(image.convert("RGB"), size, Image.BOX, Image.BICUBIC)
    return (arr.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1).copy()


def center_crop(image: Image.Image, size: int, halve, resize) -> np.ndarray:
    """guided-diffusion's ``center_crop_arr`` geometry: halve with ``halve`` while the shorter side
    is at least twice ``size``, resize the shorter side to ``size`` with ``resize``, center crop.
    One function for images (box, bicubic) and their masks (nearest, nearest: extract/masks.py)."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=halve)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=resize)
    arr = np.asarray(image)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


@dataclass(frozen=True)
class SplitIndex:
    """The images of one split: ids (stable strings) and integer labels, in store order;
    for files, each one's (size in bytes, mtime in ns) when listed (None for built-in data)."""

    ids: tuple[str, ...]
    labels: np.ndarray  # (N,) int64
    files: np.ndarray | None = None  # (N, 2) int64: size, mtime_ns

    def __len__(self) -> int:
        return len(self.ids)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps(list(self.ids)).encode())
        h.update(np.asarray(self.labels, dtype=np.int64).tobytes())
        return h.hexdigest()


def _limit_per_class(index: SplitIndex, max_per_class: int) -> SplitIndex:
    if max_per_class <= 0:
        return index
    seen: dict[int, int] = {}
    keep = []
    for i, y in enumerate(index.labels):
        seen[int(y)] = seen.get(int(y), 0) + 1
        if seen[int(y)] <= max_per_class:
            keep.append(i)
    files = None if index.files is None else index.files[keep]
    return SplitIndex(tuple(index.ids[i] for i in keep), index.labels[keep], files)


class ImageSource:
    """Interface: named splits of (id, label) and a loader of preprocessed images."""

    name: str
    class_names: tuple[str, ...]

    def split(self, name: str) -> SplitIndex:
        raise NotImplementedError

    def load(self, split: str, ids: list[str]) -> list[np.ndarray | Exception]:
        """Preprocessed (3, S, S) arrays, or the exception that stopped an image from loading."""
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError

    def unreadable(self, split: str) -> list[tuple[str, Exception]]:
        """Images of ``split`` that cannot be decoded (id, error); built-in data has none."""
        return []

    def empty_classes(self) -> list[tuple[str, str]]:
        """(class, split) pairs with no image: a class no probe can learn there."""
        out = []
        for s in self._split_names():
            counts = np.bincount(self.split(s).labels, minlength=len(self.class_names))
            out += [(self.class_names[c], s) for c in np.flatnonzero(counts == 0)]
        return out

    def _split_names(self) -> list[str]:
        return list(getattr(self, "_splits", {}))


class DigitsSource(ImageSource):
    """scikit-learn's 1797 bundled 8x8 digits, as RGB images of ``image_size`` pixels."""

    name = "digits"

    def __init__(
        self,
        image_size: int,
        splits=("train", "val"),
        val_fraction: float = 0.2,
        split_seed: int = 0,
        max_per_class: int = 0,
    ):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        self.image_size = image_size
        self.class_names = tuple(str(c) for c in digits.target_names)
        # 0..16 grey levels -> 0..255 uint8, exactly.
        self._pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
        idx = np.arange(len(digits.target))
        train, val = train_test_split(idx, test_size=val_fraction, random_state=split_seed, stratify=digits.target)
        parts = {"train": np.sort(train), "val": np.sort(val)}
        self._splits = {}
        for s in splits:
            if s not in parts:
                raise ImageError(f"data.splits: the digits source has splits 'train' and 'val', not {s!r}")
            ids = tuple(f"digits/{i:04d}" for i in parts[s])
            self._splits[s] = _limit_per_class(SplitIndex(ids, digits.target[parts[s]].astype(np.int64)), max_per_class)
        self._params = dict(val_fraction=val_fraction, split_seed=split_seed, max_per_class=max_per_class)

    def split(self, name: str) -> SplitIndex:
        return self._splits[name]

    def load(self, split, ids):
        return [preprocess(Image.fromarray(self._pixels[int(i.split("/")[1])], mode="L"), self.image_size) for i in ids]

    def describe(self) -> dict:
        return {"source": "digits", **self._params}


def check_readable(source: ImageSource, splits) -> None:
    """Raise `ImageError` naming the first image of ``splits`` that does not decode (and how
    many do not): run before a store is created when ``data.on_corrupt = "error"``, so a bad
    file stops the run before anything is written."""
    for split in splits:
        bad = source.unreadable(split)
        if bad:
            image_id, e = bad[0]
            where = source.path(split, image_id) if isinstance(source, ImageFolderSource) else image_id
            more = f" ({len(bad)} images of split {split!r} cannot be read)" if len(bad) > 1 else ""
            raise ImageError(
                f"{where}: cannot read image ({type(e).__name__}: {e}){more}; nothing was written; "
                f'remove or fix it, or set data.on_corrupt = "skip" to record it as skipped'
            )


def _files(folder: Path) -> list[tuple[str, tuple[int, int]]]:
    """The image files of one class folder, sorted: (name, (size, mtime_ns)) from one stat each."""
    out = []
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in EXTENSIONS:
            st = p.stat()
            if stat.S_ISREG(st.st_mode):
                out.append((p.name, (st.st_size, st.st_mtime_ns)))
    return out


class ImageFolderSource(ImageSource):
    """``root/<split>/<class>/<file>`` with files ending in .JPEG, .jpg or .png."""

    name = "imagefolder"

    def __init__(
        self,
        root: str | Path,
        image_size: int,
        splits=("train", "val"),
        max_per_class: int = 0,
        decode_threads: int = 4,
    ):
        self.root = Path(root)
        self.image_size = image_size
        self.decode_threads = decode_threads
        if not self.root.is_dir():
            raise ImageError(f"data.root: {str(self.root)!r} is not a directory")
        self._splits = {}
        class_names = None
        for s in splits:
            sdir = self.root / s
            if not sdir.is_dir():
                raise ImageError(
                    f"data.root: no {s!r} folder in {str(self.root)!r} (expected {self.root}/{s}/<class>/<image>)"
                )
            try:
                classes = sorted(d.name for d in sdir.iterdir() if d.is_dir())
                listing = {c: _files(sdir / c) for c in classes}
            except OSError as e:
                raise ImageError(f"{e.filename or sdir}: cannot list ({e.strerror or e})") from None
            if not classes:
                raise ImageError(f"{sdir}: no class folders (expected {sdir}/<class>/<image>)")
            if class_names is None:
                class_names = tuple(classes)
            unknown = sorted(set(classes) - set(class_names))
            if unknown:
                raise ImageError(f"{sdir}: class folder {unknown[0]!r} is not among the {splits[0]!r} classes")
            ids, labels, stats = [], [], []
            for c in classes:
                files = listing[c]
                ids += [f"{c}/{name}" for name, _ in files]
                stats += [st for _, st in files]
                labels += [class_names.index(c)] * len(files)
            if not ids:
                raise ImageError(f"{sdir}: no images ending in .JPEG, .jpg or .png")
            self._splits[s] = _limit_per_class(
                SplitIndex(tuple(ids), np.asarray(labels, dtype=np.int64), np.asarray(stats, dtype=np.int64)),
                max_per_class,
            )
        self.class_names = class_names
        self._params = dict(root=str(self.root.resolve()), max_per_class=max_per_class)

    def split(self, name: str) -> SplitIndex:
        return self._splits[name]

    def _load_one(self, path: Path):
        try:
            with Image.open(path) as im:
                im.load()
                return preprocess(im, self.image_size)
        except Exception as e:  # PIL raises OSError, UnidentifiedImageError, SyntaxError, ...
            return e

    def load(self, split, ids):
        paths = [self.root / split / i for i in ids]
        with ThreadPoolExecutor(self.decode_threads) as pool:  # PIL decodes without the GIL
            return list(pool.map(self._load_one, paths))

    def unreadable(self, split: str) -> list[tuple[str, Exception]]:
        """Decode every image of ``split`` (no resizing): the ones that fail, with their error."""

        def decode(image_id: str):
            try:
                with Image.open(self.root / split / image_id) as im:
                    im.load()
                return None
            except Exception as e:  # PIL raises OSError, UnidentifiedImageError, SyntaxError, ...
                return image_id, e

        with ThreadPoolExecutor(self.decode_threads) as pool:
            return [r for r in pool.map(decode, self.split(split).ids) if r is not None]

    def path(self, split: str, image_id: str) -> Path:
        return self.root / split / image_id

    def describe(self) -> dict:
        return {"source": "imagefolder", **self._params}
