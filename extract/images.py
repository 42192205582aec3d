"""Image sources and their deterministic preprocessing.

Two sources, one interface (`ImageSource`):

- ``digits``: scikit-learn's bundled 8x8 digits (no download), upsampled to the model's
  image size, grey replicated to 3 channels, split train/val by a seeded stratified split.
- ``imagefolder``: ``root/<split>/<class>/<image>.{JPEG,jpg,png}`` (the ImageNet layout);
  class ids follow the sorted class folder names of the first split.

Preprocessing is guided-diffusion's own (``center_crop_arr``): halve with a box filter while
the shorter side is at least twice the target, resize the shorter side to the target with
bicubic, center crop, then scale to [-1, 1]. That is view 0.

Augmented views v >= 1 (`ImageSource.load_views`) are guided-diffusion's ``random_crop_arr``
(the shorter side resized to a random size in [S / max, S / min] of ``data.crop_scale``, a
random S x S crop) and a horizontal flip with p 0.5 (``data.flip``), every draw from a
generator keyed by (seed, image id, v) alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from diffprobe.store.errors import ImageError
from diffprobe.store.seeds import derive_seed

EXTENSIONS = (".jpeg", ".jpg", ".png")
PREPROCESSING = "adm-center-crop-v1"  # name recorded in the store; bump if the steps change
VIEWS = "adm-random-crop-flip-v1"  # the views' steps, recorded with their settings; bump if they change


def _resize_shorter(image: Image.Image, shorter: int, halve=Image.BOX, resize=Image.BICUBIC) -> np.ndarray:
    """Halve (``halve``: box) while the shorter side is >= 2 x ``shorter``, then resize
    (``resize``: bicubic) so that it is ``shorter``; a uint8 array (H, W[, 3])."""
    while min(image.size) >= 2 * shorter:
        image = image.resize(tuple(x // 2 for x in image.size), resample=halve)
    scale = shorter / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=resize)
    return np.asarray(image)


def _to_model(arr: np.ndarray) -> np.ndarray:
    """uint8 (S, S, 3) -> float32 (3, S, S) in [-1, 1]."""
    return (arr.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1).copy()


def preprocess(image: Image.Image, size: int) -> np.ndarray:
    """PIL image -> float32 array (3, size, size) in [-1, 1] (guided-diffusion's center crop)."""
    return _to_model(center_crop(image.convert("RGB"), size, Image.BOX, Image.BICUBIC))


def center_crop(image: Image.Image, size: int, halve, resize) -> np.ndarray:
    """guided-diffusion's ``center_crop_arr`` geometry: `_resize_shorter` to ``size``, center crop.
    One function for images (box, bicubic) and their masks (nearest, nearest: extract/masks.py)."""
    arr = _resize_shorter(image, size, halve, resize)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


@dataclass(frozen=True)
class Augmentation:
    """How views v >= 1 are made: crop fractions [min, max], flip, and the seed of their draws."""

    crop_scale: tuple[float, float] = (0.8, 1.0)
    flip: bool = False
    seed: int = 0

    def draws(self, image_id: str, view: int, size: int) -> tuple[int, float, float, bool]:
        """(shorter side, crop y fraction, crop x fraction, flipped) of one view: the same draws
        in the same order whatever the flip setting, so flip on/off changes only the flip."""
        rng = np.random.Generator(np.random.PCG64(derive_seed(self.seed, image_id, "crop", view)))
        lo, hi = math.ceil(size / self.crop_scale[1]), math.ceil(size / self.crop_scale[0])
        shorter = int(rng.integers(lo, hi + 1))
        fy, fx = rng.random(2)
        return shorter, float(fy), float(fx), bool(self.flip and rng.random() < 0.5)

    def view(self, image: Image.Image, image_id: str, view: int, size: int) -> np.ndarray:
        """View ``view`` >= 1 of ``image``: float32 (3, size, size) in [-1, 1]."""
        shorter, fy, fx, flipped = self.draws(image_id, view, size)
        arr = _resize_shorter(image.convert("RGB"), shorter)
        top = int(fy * (arr.shape[0] - size + 1))  # random.randrange(h - size + 1), from a fraction
        left = int(fx * (arr.shape[1] - size + 1))
        arr = arr[top : top + size, left : left + size]
        return _to_model(arr[:, ::-1] if flipped else arr)

    def fingerprint(self) -> dict:
        return {
            "name": VIEWS,
            "crop_scale": list(self.crop_scale),
            "flip": self.flip,
            "derivation": "crop: numpy PCG64 seeded by blake2b-64(seed, image id, 'crop', v); "
            "noise: blake2b-64(seed, image id, t, 'view', v)",
        }


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
    image_size: int
    augmentation: Augmentation = Augmentation()

    def split(self, name: str) -> SplitIndex:
        raise NotImplementedError

    def load(self, split: str, ids: list[str]) -> list[np.ndarray | Exception]:
        """Preprocessed (3, S, S) arrays, or the exception that stopped an image from loading."""
        raise NotImplementedError

    def open(self, split: str, image_id: str) -> Image.Image:
        """The decoded image of ``image_id`` (raises what stopped it)."""
        raise NotImplementedError

    def load_views(self, split: str, ids: list[str], views: tuple[int, ...]) -> list[np.ndarray | Exception]:
        """(len(views), 3, S, S) arrays (view 0 = `load`'s center crop, v >= 1 = `Augmentation.view`),
        or the exception that stopped an image from loading."""
        if tuple(views) == (0,):
            return [x if isinstance(x, Exception) else x[None] for x in self.load(split, ids)]

        def one(image_id: str) -> np.ndarray | Exception:
            try:
                image = self.open(split, image_id)
            except Exception as e:  # PIL raises OSError, UnidentifiedImageError, SyntaxError, ...
                return e
            size = self.image_size
            return np.stack(
                [preprocess(image, size) if v == 0 else self.augmentation.view(image, image_id, v, size) for v in views]
            )

        with ThreadPoolExecutor(getattr(self, "decode_threads", 1)) as pool:  # PIL works without the GIL
            return list(pool.map(one, ids))

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
        augmentation: Augmentation | None = None,
    ):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        self.image_size = image_size
        self.augmentation = augmentation or Augmentation()
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

    def open(self, split, image_id):
        return Image.fromarray(self._pixels[int(image_id.split("/")[1])], mode="L")

    def load(self, split, ids):
        return [preprocess(self.open(split, i), self.image_size) for i in ids]

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
        augmentation: Augmentation | None = None,
    ):
        self.root = Path(root)
        self.image_size = image_size
        self.augmentation = augmentation or Augmentation(flip=True)
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

    def open(self, split, image_id):
        with Image.open(self.path(split, image_id)) as im:
            im.load()
            return im.copy()

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
