"""Segmentation masks: sources of (image, mask) pairs and the mask's preprocessing.

Two sources, one interface (`MaskedSource`, an `ImageSource` that also yields masks):

- ``digits`` with ``data.masks = true`` (`DigitsMaskSource`, the embedded dense default,
  pipeline-dense.toml): each 8x8 digit's stroke pixels, grey level >= 8 of 16 (uint8 >= 128,
  `STROKE_PIXEL`), are labelled with the digit's class + 1, the rest 0 (background): 11 mask
  classes, ``background, 0, ..., 9``.
- ``segfolder`` (`SegFolderSource`, VOC/ADE20K style): ``root/<split>/images/<name>.{jpg,png}``
  with ``root/<split>/masks/<name>.png``, a palette or grey PNG of the same size whose values
  are class indices into ``root/classes.txt`` (one name a line) or 255 (ignore). Images carry
  no class label (the store's labels are -1): the image-level probes refuse such a store.

A mask goes through the image's own geometry (guided-diffusion's ``center_crop_arr``: halve
while the shorter side is at least twice the target, resize the shorter side to the target,
center crop), with nearest-neighbour resampling at every step so labels stay labels
(`preprocess_mask`; a test checks that it lands on the same pixels as `images.preprocess`).
A bad pair (missing mask, mask of another size than its image, a label that is neither a
class nor 255) is an error naming the mask file; with ``data.on_corrupt = "skip"`` the image
is recorded as skipped and its mask is all 255.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from diffprobe.extract.images import (
    EXTENSIONS,
    DigitsSource,
    ImageSource,
    SplitIndex,
    _limit_per_class,
    center_crop,
    preprocess,
)
from diffprobe.store.errors import ImageError

MASK_PREPROCESSING = "adm-center-crop-nearest-v1"  # recorded in the store; bump if the steps change
IGNORE = 255
STROKE_PIXEL = 128  # digits: grey level 8 of 16 (0..16 scaled to 0..255): a stroke pixel at or above it
PREVIEW_IMAGES = 16  # the first images of each split kept as uint8 RGB, for pictures of predictions


def preprocess_mask(mask: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """A label map (palette or grey PIL image, or a 2-D uint8 array) -> uint8 (size, size).

    The geometry of `images.preprocess` (guided-diffusion's center crop), every resize
    nearest-neighbour. A palette image's indices are its labels (never its colours)."""
    image = Image.fromarray(np.asarray(mask, dtype=np.uint8))  # mode "L" of the raw indices
    return center_crop(image, size, Image.NEAREST, Image.NEAREST).copy()


def to_uint8(x0: np.ndarray) -> np.ndarray:
    """Preprocessed images in [-1, 1] (..., 3, S, S) -> uint8 (the previews)."""
    return np.clip(np.rint((x0 + 1.0) * 127.5), 0, 255).astype(np.uint8)


class MaskError(ImageError):
    """A mask that is missing, of the wrong size or holds a label that is not a class nor 255."""


class MaskedSource(ImageSource):
    """An image source whose images come with label maps (``mask_classes`` names the labels)."""

    mask_classes: tuple[str, ...]
    image_size: int

    def load_pairs(self, split: str, ids: list[str]) -> list[tuple[np.ndarray, np.ndarray] | Exception]:
        """(image (3, S, S) float32 in [-1, 1], mask (S, S) uint8) per id, or the error that stopped it."""
        raise NotImplementedError

    def mask_settings(self) -> dict:
        """What made the masks: goes into the store's preprocessing fingerprint."""
        return {
            "name": MASK_PREPROCESSING,
            "resample": "nearest",
            "size": self.image_size,
            "ignore": IGNORE,
            "classes": list(self.mask_classes),
        }


class DigitsMaskSource(MaskedSource, DigitsSource):
    """scikit-learn's digits with stroke masks: the embedded dense default."""

    def __init__(self, *args, **kwargs):
        DigitsSource.__init__(self, *args, **kwargs)
        self.mask_classes = ("background", *self.class_names)
        self._labels = {i: int(y) for s in self._splits.values() for i, y in zip(s.ids, s.labels)}

    def load_pairs(self, split, ids):
        out: list[tuple[np.ndarray, np.ndarray] | Exception] = []
        for i in ids:
            pixels = self._pixels[int(i.split("/")[1])]
            mask = np.where(pixels >= STROKE_PIXEL, self._labels[i] + 1, 0).astype(np.uint8)
            out.append(
                (preprocess(Image.fromarray(pixels, mode="L"), self.image_size), preprocess_mask(mask, self.image_size))
            )
        return out

    def mask_settings(self) -> dict:
        return {**super().mask_settings(), "stroke_pixel": STROKE_PIXEL}


def read_classes(root: Path) -> tuple[str, ...]:
    """``root/classes.txt``: one class name a line (blank lines and surrounding spaces dropped)."""
    path = root / "classes.txt"
    try:
        names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    except FileNotFoundError:
        raise ImageError(f"{path}: missing; a segfolder root lists its class names there, one a line") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ImageError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    if not names:
        raise ImageError(f"{path}: no class names (one a line)")
    if len(names) > IGNORE:
        raise ImageError(f"{path}: {len(names)} classes; masks are uint8 with 255 = ignore, so at most 255")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ImageError(f"{path}: class {dup!r} is listed twice")
    return names


class SegFolderSource(MaskedSource):
    """``root/<split>/images/<name>.{jpg,jpeg,png}`` + ``root/<split>/masks/<name>.png`` + ``root/classes.txt``."""

    name = "segfolder"

    def __init__(self, root: str | Path, image_size: int, splits=("train", "val"), max_per_class=0, decode_threads=4):
        self.root, self.image_size, self.decode_threads = Path(root), image_size, decode_threads
        if not self.root.is_dir():
            raise ImageError(f"data.root: {str(self.root)!r} is not a directory")
        self.mask_classes = read_classes(self.root)
        self.class_names = ()  # images carry no class label
        self._splits: dict[str, SplitIndex] = {}
        for s in splits:
            folder = self.root / s / "images"
            if not folder.is_dir():
                raise ImageError(
                    f"data.root: no {s}/images folder in {str(self.root)!r} (expected {folder}/<name>.jpg|png)"
                )
            try:
                files = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in EXTENSIONS and p.is_file())
            except OSError as e:
                raise ImageError(f"{folder}: cannot list ({e.strerror or e})") from None
            if not files:
                raise ImageError(f"{folder}: no images ending in .jpg, .jpeg or .png")
            stems = [Path(f).stem for f in files]
            if len(set(stems)) != len(stems):
                dup = next(f for f in files if stems.count(Path(f).stem) > 1)
                raise ImageError(f"{folder}: two images named {Path(dup).stem!r}; each needs its own masks/<name>.png")
            labels = np.full(len(files), -1, dtype=np.int64)
            self._splits[s] = _limit_per_class(SplitIndex(tuple(files), labels), max_per_class)
        self._params = dict(root=str(self.root.resolve()), max_per_class=max_per_class)

    def split(self, name: str) -> SplitIndex:
        return self._splits[name]

    def path(self, split: str, image_id: str) -> Path:
        return self.root / split / "images" / image_id

    def mask_path(self, split: str, image_id: str) -> Path:
        return self.root / split / "masks" / f"{Path(image_id).stem}.png"

    def _load_pair(self, split: str, image_id: str):
        image_path, mask_path = self.path(split, image_id), self.mask_path(split, image_id)
        try:
            with Image.open(image_path) as im:
                im.load()
                size = im.size
                x = preprocess(im, self.image_size)
        except Exception as e:  # PIL raises OSError, UnidentifiedImageError, SyntaxError, ...
            return ImageError(f"{image_path}: cannot read image ({type(e).__name__}: {e})")
        if not mask_path.is_file():
            return MaskError(f"{mask_path}: missing; image {image_id} needs a mask of the same name (.png)")
        try:
            with Image.open(mask_path) as m:
                m.load()
                mode, msize = m.mode, m.size
                labels = np.asarray(m) if mode in ("P", "L") else None
        except Exception as e:
            return MaskError(f"{mask_path}: cannot read mask ({type(e).__name__}: {e})")
        if labels is None:
            return MaskError(
                f"{mask_path}: mask of mode {mode!r}; allowed: a palette ('P') or grey ('L') PNG of class indices"
            )
        if msize != size:
            return MaskError(
                f"{mask_path}: mask is {msize[0]}x{msize[1]} but its image {image_id} is {size[0]}x{size[1]}; they must match"
            )
        k = len(self.mask_classes)
        wrong = np.unique(labels[(labels >= k) & (labels != IGNORE)])
        if len(wrong):
            return MaskError(
                f"{mask_path}: label {int(wrong[0])} is not a class (classes.txt names {k}: 0-{k - 1}) nor {IGNORE} (ignore)"
            )
        return x, preprocess_mask(labels, self.image_size)

    def load_pairs(self, split, ids):
        with ThreadPoolExecutor(self.decode_threads) as pool:  # PIL decodes without the GIL
            return list(pool.map(lambda i: self._load_pair(split, i), ids))

    def load(self, split, ids):
        return [p if isinstance(p, Exception) else p[0] for p in self.load_pairs(split, ids)]

    def describe(self) -> dict:
        return {"source": "segfolder", **self._params}


def load_masked(source: MaskedSource, split: str, ids) -> tuple[list, np.ndarray]:
    """Preprocessed images (3, S, S) float32, or the error that stopped each (a `MaskError` for
    its mask), and the masks (N, S, S) uint8, every pixel 255 where a pair could not be read."""
    pairs = source.load_pairs(split, list(ids))
    s = source.image_size
    masks = np.full((len(pairs), s, s), IGNORE, np.uint8)
    for i, p in enumerate(pairs):
        if not isinstance(p, Exception):
            masks[i] = p[1]
    return [p if isinstance(p, Exception) else p[0] for p in pairs], masks


class ChunkMasks:
    """The masks (and preview images) of one chunk of a `MaskedSource`, gathered batch by batch
    during `extraction.extract_chunks` and written before the chunk's features are recorded."""

    def __init__(self, source: MaskedSource, split: str, lo: int, hi: int):
        self.source, self.split, self.lo = source, split, lo
        s = source.image_size
        self.masks = np.full((hi - lo, s, s), IGNORE, np.uint8)
        self.previews = np.zeros((max(0, min(hi, PREVIEW_IMAGES) - lo), 3, s, s), np.uint8)

    @classmethod
    def for_source(cls, source: ImageSource, split: str, lo: int, hi: int) -> ChunkMasks | None:
        return cls(source, split, lo, hi) if isinstance(source, MaskedSource) else None

    def add(self, b0: int, x0: np.ndarray, masks: np.ndarray) -> None:
        """The masks (and, among the first images, the previews) of the batch at split row ``b0``."""
        self.masks[b0 - self.lo : b0 - self.lo + len(masks)] = masks
        n = max(0, min(len(x0), len(self.previews) - (b0 - self.lo)))
        if n:
            self.previews[b0 - self.lo : b0 - self.lo + n] = to_uint8(x0[:n])

    def ignore(self, b0: int, positions) -> None:
        """Skipped images (now or by an earlier run): every pixel 255."""
        for i in positions:
            self.masks[b0 - self.lo + i] = IGNORE

    def write(self, writer, chunk: int) -> None:
        writer.write_masks(self.split, chunk, self.masks, self.previews)


def mask_source(cfg, image_size: int) -> MaskedSource:
    """The `MaskedSource` of a config with ``data.masks = true`` (digits or segfolder)."""
    from diffprobe.store.errors import ConfigError

    d = cfg.data
    if d.source == "segfolder":
        if not d.masks:
            raise ConfigError("data.masks: the segfolder source stores masks; set data.masks = true")
        if not d.root:
            raise ConfigError("data.root: required when data.source = 'segfolder'")
        return SegFolderSource(d.root, image_size, d.splits, d.max_per_class, d.decode_threads)
    if d.source == "digits":
        return DigitsMaskSource(image_size, d.splits, d.val_fraction, d.split_seed, d.max_per_class)
    raise ConfigError(f"data.masks: true needs data.source 'digits' or 'segfolder', not {d.source!r}")
