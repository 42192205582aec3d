"""Masks: the digits' stroke masks, the segfolder source, their preprocessing, the store's masks
and the one-line errors of bad pairs."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from diffprobe.extract import job as jobs
from diffprobe.extract.images import preprocess
from diffprobe.extract.masks import (
    IGNORE,
    STROKE_PIXEL,
    DigitsMaskSource,
    SegFolderSource,
    load_masked,
    preprocess_mask,
)
from diffprobe.extract.run import run as extract_run
from diffprobe.store.errors import ConfigError, FingerprintMismatch, ImageError, StoreError
from diffprobe.store.feature_store import open_store

from .conftest import small_config


def test_a_marked_square_lands_on_the_same_pixels_as_its_image(tmp_path):
    # 160x128 -> halved twice (box for the image, nearest for the mask) to 40x32 -> no resize ->
    # center crop 4 columns each side. A square at x 40..80, y 32..64 lands at x 6..16, y 8..16.
    img = np.zeros((128, 160, 3), np.uint8)
    img[32:64, 40:80] = 255
    mask = np.zeros((128, 160), np.uint8)
    mask[32:64, 40:80] = 3
    root = _segfolder(tmp_path, {"train": {"sq": (img, mask)}}, classes=4)
    ((x, m),) = SegFolderSource(root, 32, splits=("train",)).load_pairs("train", ["sq.png"])
    expect = np.zeros((32, 32), bool)
    expect[8:16, 6:16] = True
    assert ((m == 3) == expect).all() and set(np.unique(m)) == {0, 3}
    assert ((x[0] > 0.99) == expect).all() and ((x[0] < -0.99) == ~expect).all()


@pytest.mark.parametrize("shape", [(97, 131), (300, 220), (64, 64), (50, 33)])
def test_mask_geometry_follows_the_image_for_any_shape(shape):
    # a bright rectangle in an image and the same rectangle in a label map: after preprocessing
    # the image's bright half and the mask agree on all but edge pixels (bicubic blurs edges)
    h, w = shape
    img = np.zeros((h, w), np.uint8)
    img[h // 4 : 3 * h // 4, w // 3 : 2 * w // 3] = 255
    x = preprocess(Image.fromarray(img), 32)[0] > 0
    m = preprocess_mask((img > 0).astype(np.uint8) * 5, 32) == 5
    assert m.shape == (32, 32)
    edge = np.zeros_like(m)
    for axis in (0, 1):
        edge |= np.diff(m, axis=axis, prepend=m.take([0], axis=axis)) != 0
        edge |= np.diff(m, axis=axis, append=m.take([-1], axis=axis)) != 0
    assert (x == m)[~edge].all()


def test_palette_masks_are_read_by_index_not_colour():
    pal = Image.new("P", (40, 40))
    pal.putpalette([0, 0, 0, 200, 10, 10, 10, 200, 10] + [0] * (256 * 3 - 9))
    arr = np.zeros((40, 40), np.uint8)
    arr[10:30, 10:30] = 2
    pal.putdata(arr.flatten().tolist())
    assert set(np.unique(preprocess_mask(pal, 20))) == {0, 2}


def test_digit_masks_are_strokes_labelled_class_plus_one():
    src = DigitsMaskSource(32, max_per_class=1)
    ids = list(src.split("train").ids)
    pairs = src.load_pairs("train", ids)
    for image_id, y, (x, m) in zip(ids, src.split("train").labels, pairs):
        pixels = src._pixels[int(image_id.split("/")[1])]
        strokes = np.kron(pixels >= STROKE_PIXEL, np.ones((4, 4), bool))  # 8x8 -> 32x32, nearest
        assert (m == np.where(strokes, y + 1, 0)).all()
        assert np.array_equal(x, src.load("train", [image_id])[0])
    assert src.mask_classes == ("background", *[str(c) for c in range(10)])


def _segfolder(tmp_path, splits: dict, classes: int = 3):
    root = tmp_path / "seg"
    for split, items in splits.items():
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for name, (img, mask) in items.items():
            Image.fromarray(img).save(root / split / "images" / f"{name}.png")
            if mask is not None:
                Image.fromarray(mask).save(root / split / "masks" / f"{name}.png")
    (root / "classes.txt").write_text("\n".join(f"class{i}" for i in range(classes)) + "\n")
    return root


def _pairs(n: int, rng, size=(40, 48)):
    out = {}
    for i in range(n):
        img = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
        mask = rng.integers(0, 3, size, dtype=np.uint8)
        mask[:4] = IGNORE
        out[f"im{i}"] = (img, mask)
    return out


def _seg_config(tmp_path, root, **over):
    return small_config(
        tmp_path,
        **{
            "data.source": "segfolder",
            "data.root": str(root),
            "data.masks": True,
            "data.max_per_class": 0,
            "extract.blocks": "24",
            "extract.pools": [2],
            **over,
        },
    )


def test_segfolder_extracts_masks_chunked_like_features(tmp_path):
    rng = np.random.default_rng(0)
    root = _segfolder(tmp_path, {"train": _pairs(10, rng), "val": _pairs(3, rng)})
    cfg = _seg_config(tmp_path, root)
    extract_run(cfg)
    s = open_store(cfg.store.path)
    masks = s.mask_array("train")
    assert masks.shape == (10, 32, 32) and masks.dtype == np.uint8
    assert masks.chunks == (8, 32, 32) == (s.chunk_images("train"), 32, 32)
    import zarr

    previews = zarr.open_group(str(cfg.store.path), mode="r")["train/previews"]
    assert previews.chunks == (8, 3, 32, 32)  # chunked like the images: one writer per chunk file (dask)
    assert s.mask_classes == ["class0", "class1", "class2"] and s.class_names == []
    src = SegFolderSource(root, 32)
    for split in ("train", "val"):
        ids = list(s.ids(split))
        expect = np.stack([p[1] for p in src.load_pairs(split, ids)])
        assert np.array_equal(s.masks(split), expect)
        assert np.array_equal(
            s.previews(split)[:2],
            np.clip(np.rint((np.stack([p[0] for p in src.load_pairs(split, ids[:2])]) + 1) * 127.5), 0, 255).astype(
                np.uint8
            ),
        )
    assert s.fingerprints["preprocessing"]["masks"]["classes"] == ["class0", "class1", "class2"]
    # the plan counts the masks' bytes: what the store holds, uncompressed
    plan = jobs.prepare(cfg).plan
    assert plan.mask_bytes("train") == s.masks("train").nbytes == 10 * 32 * 32
    assert plan.mask_bytes() == sum(s.masks(sp).nbytes for sp in s.splits)
    assert plan.nbytes == sum(a.nbytes for a in plan.arrays) + plan.mask_bytes()
    assert plan.to_dict()["mask_bytes"] == 13 * 32 * 32
    # the image-level probes refuse a store without image labels
    from diffprobe.probe.protocol import labelled

    with pytest.raises(StoreError, match="has no labels"):
        labelled(s, "train")


@pytest.mark.parametrize(
    "break_it,pattern",
    [
        ("missing", r"masks/im1\.png: missing; image im1\.png needs a mask"),
        ("size", r"masks/im1\.png: mask is 20x20 but its image im1\.png is 48x40; they must match"),
        ("label", r"masks/im1\.png: label 7 is not a class \(classes.txt names 3: 0-2\) nor 255 \(ignore\)"),
        ("mode", r"masks/im1\.png: mask of mode 'RGB'; allowed: a palette"),
    ],
)
def test_bad_masks_are_named_in_one_line_or_skipped(tmp_path, break_it, pattern):
    rng = np.random.default_rng(1)
    pairs = _pairs(4, rng)
    root = _segfolder(tmp_path, {"train": pairs, "val": _pairs(2, rng)})
    bad = root / "train" / "masks" / "im1.png"
    if break_it == "missing":
        bad.unlink()
    elif break_it == "size":
        Image.fromarray(np.zeros((20, 20), np.uint8)).save(bad)
    elif break_it == "label":
        m = pairs["im1"][1].copy()
        m[10, 10] = 7
        Image.fromarray(m).save(bad)
    else:
        Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(bad)
    src = SegFolderSource(root, 32)
    images, masks = load_masked(src, "train", list(src.split("train").ids))
    assert [i for i, x in enumerate(images) if isinstance(x, Exception)] == [1]
    assert isinstance(images[1], ImageError) and re.search(pattern, str(images[1])) and "\n" not in str(images[1])
    assert (masks[1] == IGNORE).all() and (masks[0] != IGNORE).any()


def test_a_bad_mask_stops_extraction_or_is_recorded_as_skipped(tmp_path):
    rng = np.random.default_rng(1)
    root = _segfolder(tmp_path, {"train": _pairs(4, rng), "val": _pairs(2, rng)})
    bad = root / "train" / "masks" / "im1.png"
    bad.unlink()
    with pytest.raises(ImageError, match=f"{bad}: missing; image im1.png needs a mask") as e:
        extract_run(_seg_config(tmp_path, root))
    assert "\n" not in str(e.value) and 'data.on_corrupt = "skip"' in str(e.value)
    cfg = _seg_config(tmp_path, root, **{"data.on_corrupt": "skip", "store.path": str(tmp_path / "skip.zarr")})
    assert extract_run(cfg)["images_skipped"] == 1
    s = open_store(cfg.store.path)
    i = list(s.ids("train")).index("im1.png")
    assert s.skipped("train").tolist() == [j == i for j in range(4)]
    assert (s.masks("train")[i] == IGNORE).all() and (s.masks("train")[i - 1] != IGNORE).any()


def test_segfolder_layout_errors_are_one_line(tmp_path):
    rng = np.random.default_rng(2)
    root = _segfolder(tmp_path, {"train": _pairs(2, rng)})
    (root / "classes.txt").unlink()
    with pytest.raises(ImageError, match=r"classes\.txt: missing"):
        SegFolderSource(root, 32, splits=("train",))
    (root / "classes.txt").write_text("a\nb\na\n")
    with pytest.raises(ImageError, match="class 'a' is listed twice"):
        SegFolderSource(root, 32, splits=("train",))
    (root / "classes.txt").write_text("a\nb\n")
    with pytest.raises(ImageError, match=r"no val/images folder"):
        SegFolderSource(root, 32)
    with pytest.raises(ConfigError, match="data.masks: the segfolder source stores masks"):
        jobs.prepare(small_config(tmp_path, **{"data.source": "segfolder", "data.root": str(root)}))
    with pytest.raises(ConfigError, match="data.masks: true needs data.source 'digits' or 'segfolder'"):
        jobs.prepare(
            small_config(tmp_path, **{"data.source": "imagefolder", "data.root": str(root), "data.masks": True})
        )


def test_masks_change_the_fingerprint_and_resume_rewrites_the_same_bytes(tmp_path):
    over = {"data.max_per_class": 2, "extract.blocks": "24", "extract.pools": [2]}  # 20 images: 3 chunks
    cfg = small_config(tmp_path, **over, **{"data.masks": True})
    extract_run(cfg)
    s = open_store(cfg.store.path)
    first = s.masks("train").copy()
    import zarr

    group = zarr.open_group(f"{cfg.store.path}/train", mode="r+")
    cols = group.attrs["done_columns"]
    group["done"][1, :] = 0  # as if killed before chunk 1's records
    group["masks"][8:16] = 0
    with pytest.raises(StoreError, match=r"masks of split 'train' are incomplete \(2/3 chunks\)"):
        open_store(cfg.store.path).masks("train")
    assert "masks" in cols and extract_run(cfg)["chunks_written"] == 1
    assert np.array_equal(open_store(cfg.store.path).masks("train"), first)
    with pytest.raises(FingerprintMismatch, match="preprocessing.masks"):
        extract_run(small_config(tmp_path, **over))
    from diffprobe.store.feature_store import FeatureKey
    from diffprobe.store.synthetic import write_synthetic_store

    x = {
        "train": {FeatureKey(90, 24, 2): np.zeros((4, 2, 2, 2))},
        "val": {FeatureKey(90, 24, 2): np.zeros((4, 2, 2, 2))},
    }
    plain = write_synthetic_store(tmp_path / "plain.zarr", x, {"train": np.arange(4) % 2, "val": np.arange(4) % 2})
    with pytest.raises(StoreError, match=r"no masks in split 'train'; extract a dense store \(data.masks = true"):
        open_store(plain).masks("train")


@pytest.mark.slow
def test_a_dense_store_from_two_dask_workers_equals_one_process(tmp_path):
    pytest.importorskip("distributed")
    over = {
        "data.masks": True,
        "data.max_per_class": 2,
        "store.chunk_images": 4,
        "extract.blocks": "8",
        "extract.threads": 1,
        "extract.threads_per_worker": 1,
    }
    one = small_config(tmp_path, "one.zarr", **over)
    two = small_config(tmp_path, "two.zarr", **over, **{"extract.workers": 2})
    extract_run(one)
    assert extract_run(two)["workers"] == 2
    a, b = open_store(one.store.path), open_store(two.store.path)
    assert "train/masks" in a.contents() and a.contents() == b.contents()  # masks and previews included
    assert (a.masks("train") != IGNORE).any()
