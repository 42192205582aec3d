import numpy as np
import pytest
from PIL import Image

from diffprobe.extract.images import DigitsSource, ImageFolderSource, preprocess
from diffprobe.store.errors import ImageError


def test_digits_split_is_stratified_seeded_and_disjoint():
    a, b = DigitsSource(32), DigitsSource(32)
    assert a.split("train").ids == b.split("train").ids
    train, val = a.split("train"), a.split("val")
    assert not set(train.ids) & set(val.ids)
    assert len(train) + len(val) == 1797 and len(val) == 360
    counts = np.bincount(val.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # 20% of each class
    other = DigitsSource(32, split_seed=1)
    assert other.split("val").ids != val.ids


def test_digits_images_are_rgb_at_model_size_in_range():
    s = DigitsSource(32, max_per_class=1)
    ids = list(s.split("train").ids)
    assert len(ids) == 10 and sorted(s.split("train").labels.tolist()) == list(range(10))
    x = np.stack(s.load("train", ids))
    assert x.shape == (10, 3, 32, 32) and x.dtype == np.float32
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.9 and x.max() > 0.9
    assert np.array_equal(x[:, 0], x[:, 1])  # grey replicated


def test_preprocess_resizes_the_shorter_side_and_center_crops():
    # a 300x100 (w x h) image: left third black, middle white, right third black
    arr = np.zeros((100, 300, 3), np.uint8)
    arr[:, 100:200] = 255
    out = preprocess(Image.fromarray(arr), 32)
    assert out.shape == (3, 32, 32)
    assert np.allclose(out[:, :, 4:28], 1.0, atol=0.02)  # the crop is the white middle
    big = preprocess(Image.fromarray(np.full((1024, 1024, 3), 128, np.uint8)), 32)  # box-halving path
    assert np.allclose(big, 128 / 127.5 - 1, atol=1e-6)


def _folder(tmp_path, layout):
    for rel, size in layout.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(len(rel))
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(p)
    return tmp_path


def test_imagefolder_classes_follow_sorted_folder_names(tmp_path):
    root = _folder(
        tmp_path,
        {
            "train/n02/a.JPEG": (40, 30),
            "train/n01/b.png": (50, 50),
            "train/n01/c.jpg": (30, 60),
            "val/n02/d.JPEG": (32, 32),
            "val/n01/e.png": (64, 48),
        },
    )
    (root / "train/n01/notes.txt").write_text("not an image")
    s = ImageFolderSource(root, 32)
    assert s.class_names == ("n01", "n02")
    assert s.split("train").ids == ("n01/b.png", "n01/c.jpg", "n02/a.JPEG")
    assert s.split("train").labels.tolist() == [0, 0, 1]
    assert s.split("val").labels.tolist() == [0, 1]
    x = s.load("train", list(s.split("train").ids))
    assert all(a.shape == (3, 32, 32) for a in x)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(ImageError, match="is not a directory"):
        ImageFolderSource(tmp_path / "nope", 32)
    _folder(tmp_path, {"train/a/x.png": (8, 8)})
    with pytest.raises(ImageError, match="no 'val' folder"):
        ImageFolderSource(tmp_path, 32)
    _folder(tmp_path, {"val/zzz/y.png": (8, 8)})
    with pytest.raises(ImageError, match="class folder 'zzz' is not among the 'train' classes"):
        ImageFolderSource(tmp_path, 32)


def test_corrupt_file_comes_back_as_an_exception_not_an_image(tmp_path):
    root = _folder(tmp_path, {"train/a/ok.png": (40, 40)})
    (root / "train/a/bad.JPEG").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    s = ImageFolderSource(root, 32, splits=("train",))
    out = s.load("train", list(s.split("train").ids))
    assert isinstance(out[0], Exception) and isinstance(out[1], np.ndarray)
