"""Image pre-checks of `extract run` on an ImageFolder: a bad image stops the run before the
store exists (on_corrupt = "error"), a file changed under its name is refused by name, a
removed file is named in the dataset refusal, an empty class folder is warned about."""

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from diffprobe.extract.cli import app
from diffprobe.extract.run import run as extract_run
from diffprobe.store.errors import FingerprintMismatch, ImageError

from .conftest import small_config

runner = CliRunner()


def _folder(root, classes=("cat", "dog"), n=3, empty=()):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in (*classes, *empty):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(0 if c in empty else n):
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def _cfg(tmp_path, root, **over):
    base = {"data.source": "imagefolder", "data.root": str(root), "data.max_per_class": 0, "extract.blocks": "3"}
    return small_config(tmp_path, **(base | over))


def test_a_bad_image_stops_the_run_before_the_store_is_made(tmp_path):
    root = _folder(tmp_path / "data")
    bad = root / "val" / "dog" / "2.png"  # in the last split: nothing of train may be written either
    bad.write_bytes(bad.read_bytes()[:60])
    cfg = _cfg(tmp_path, root)
    with pytest.raises(ImageError, match=rf"^{bad}: cannot read image .*nothing was written"):
        extract_run(cfg)
    assert not (tmp_path / "store.zarr").exists()


def test_a_file_changed_under_its_name_is_refused_by_name(tmp_path):
    root = _folder(tmp_path / "data")
    cfg = _cfg(tmp_path, root)
    extract_run(cfg)
    again = _cfg(tmp_path, root, **{"extract.blocks": "3,8"})  # a resume that adds arrays
    img = root / "train" / "cat" / "1.png"
    Image.fromarray(np.zeros((40, 48, 3), dtype=np.uint8)).save(img)  # other pixels, same name
    with pytest.raises(FingerprintMismatch, match=r"image 'cat/1.png' of split 'train' changed \(size"):
        extract_run(again)


def test_the_dataset_refusal_names_the_images_removed(tmp_path):
    root = _folder(tmp_path / "data")
    extract_run(_cfg(tmp_path, root))
    (root / "train" / "dog" / "1.png").unlink()
    with pytest.raises(FingerprintMismatch, match=r"split 'train': 1 image removed \(dog/1.png\)$"):
        extract_run(_cfg(tmp_path, root))


def test_an_empty_class_folder_is_warned_about(tmp_path):
    root = _folder(tmp_path / "data", empty=("bird",))
    toml = tmp_path / "p.toml"
    toml.write_text(
        f'[data]\nsource = "imagefolder"\nroot = "{root}"\n[extract]\nblocks = "3"\ntimesteps = [90]\n'
        f'pools = [1]\nforward_batch = 8\ndevice = "cpu"\n[store]\npath = "{tmp_path / "s.zarr"}"\n'
    )
    r = runner.invoke(app, ["run", "--config", str(toml)])
    assert r.exit_code == 0, r.output
    assert "warning: class 'bird' has no images in split 'train'" in r.stderr
    assert "warning: class 'bird' has no images in split 'val'" in r.stderr
