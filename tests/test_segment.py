"""`probe segment`: the dense linear head on cached block maps, its metrics, protocol, CLI and sweep."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from diffprobe.extract.run import run as extract_run
from diffprobe.probe.cli import probe_app
from diffprobe.probe.ledger import read_rows
from diffprobe.probe.segment import confusion, scores, segment_probe, sweep_run, upsampled
from diffprobe.store.config import ProbeConfig, SegmentConfig, load_config
from diffprobe.store.feature_store import FeatureKey, open_store
from diffprobe.store.synthetic import write_synthetic_store

from .conftest import REPO, small_config

runner = CliRunner()
FAST = SegmentConfig(epochs=8, batch_size=16)


@pytest.fixture(scope="module")
def dense(tmp_path_factory, one_torch_thread):
    """The embedded dense default, small: 8 digits per class per split, blocks 24 and 33 at t 150, pool 8."""
    tmp = tmp_path_factory.mktemp("dense")
    cfg = small_config(
        tmp,
        **{
            "data.masks": True,
            "data.max_per_class": 8,
            "extract.blocks": "24,33",
            "extract.timesteps": [150],
            "extract.pools": [8],
            "store.chunk_images": 32,
        },
    )
    extract_run(cfg)
    return cfg


def _independent_miou(pred: np.ndarray, target: np.ndarray, k: int):
    """mIoU, IoU per class and pixel accuracy by counting, class by class (255 ignored)."""
    keep = target != 255
    p, t = pred[keep], target[keep]
    ious = []
    for c in range(k):
        inter = np.sum((p == c) & (t == c))
        union = np.sum((p == c) | (t == c))
        ious.append(inter / union if union else None)
    present = [v for v in ious if v is not None]
    return float(np.mean(present)), ious, float(np.mean(p == t))


def test_miou_equals_an_independent_count_with_ignored_pixels():
    rng = np.random.default_rng(0)
    k = 5
    target = rng.integers(0, k - 1, (6, 16, 16)).astype(np.uint8)  # class 4 never in the ground truth
    target[rng.random(target.shape) < 0.2] = 255
    pred = np.where(rng.random(target.shape) < 0.6, target, rng.integers(0, k, target.shape)).astype(np.uint8)
    pred[target == 255] = 3  # predictions on ignored pixels must not count
    pred[0, 0, 0], target[0, 0, 0] = 4, 0  # class 4 predicted once: IoU 0, and it counts
    conf = confusion(torch.from_numpy(pred), torch.from_numpy(target), k)
    got = scores(conf, [str(c) for c in range(k)])
    miou, ious, acc = _independent_miou(pred, target, k)
    assert got["miou"] == pytest.approx(miou, abs=1e-12) and got["pixel_accuracy"] == pytest.approx(acc, abs=1e-12)
    assert [got["per_class_iou"][str(c)] for c in range(k)] == pytest.approx(ious)
    assert got["per_class_iou"]["4"] == 0.0
    # a class neither in the ground truth nor predicted has no IoU and does not count
    got = scores(confusion(torch.zeros(4, 4, dtype=torch.uint8), torch.zeros(4, 4, dtype=torch.uint8), 3), list("abc"))
    assert got == {"miou": 1.0, "pixel_accuracy": 1.0, "per_class_iou": {"a": 1.0, "b": None, "c": None}}


@pytest.mark.parametrize("p,size", [(1, 32), (2, 32), (8, 32), (4, 13)])
def test_separable_upsampling_equals_bilinear_interpolate(p, size):
    x = torch.randn(3, 2, 5, p, p)
    ref = F.interpolate(x.reshape(3, 10, p, p), size=(size, size), mode="bilinear", align_corners=False)
    assert torch.allclose(upsampled(x, size), ref.reshape(3, 2, 5, size, size), atol=1e-5)


def _baseline(store) -> tuple[float, float]:
    """mIoU and pixel accuracy on val of predicting train's most frequent class everywhere."""
    train, val = store.masks("train"), store.masks("val")
    majority = np.bincount(train[train != 255]).argmax()
    miou, _, acc = _independent_miou(np.full_like(val, majority), val, len(store.mask_classes))
    return miou, acc


def test_the_head_beats_the_majority_class_clearly(dense):
    store = open_store(dense.store.path)
    r = segment_probe(store, [(24, 150), (33, 150)], segment=FAST)
    base_miou, base_acc = _baseline(store)
    assert base_miou < 0.1 and r.top1 > base_miou + 0.3 and r.top5 > base_acc + 0.05
    assert r["miou"] == r.top1 and r["pixel_accuracy"] == r.top5 and r["per_class_iou"] == r.per_class
    assert r.dim == 128 + 32 and r["map_size"] == 8 and r["stored_pools"] == [2, 8] and r.pool == 8
    assert r["eval_size"] == r["mask_size"] == 32 and r.n_classes == 11 and r.head == "segment"
    assert r.n_train + r.n_heldout == 80 and r.n_heldout == 8 and r.n_val == 80


def test_one_pass_grid_equals_each_head_alone_and_runs_repeat_bit_for_bit(dense):
    store = open_store(dense.store.path)
    grid = segment_probe(store, [(33, 150)], segment=SegmentConfig(epochs=2, lr=(0.001, 0.01, 0.1)))
    alone = segment_probe(store, [(33, 150)], segment=SegmentConfig(epochs=2, lr=(0.01,)))
    assert alone.grid[0]["heldout_miou"] == pytest.approx(grid.grid[1]["heldout_miou"], abs=1e-3)
    again = segment_probe(store, [(33, 150)], segment=SegmentConfig(epochs=2, lr=(0.001, 0.01, 0.1)))
    a, b = grid.to_json(), again.to_json()
    for key in ("timestamp", "seconds"):
        a.pop(key), b.pop(key)
    assert a == b


def test_streamed_maps_train_the_same_head_on_a_tight_budget(dense):
    store = open_store(dense.store.path)
    whole = segment_probe(store, [(33, 150)], segment=FAST)
    # 80 train rows of 32 x 8 x 8 fp16 = 4 KB each: 0.2 MB holds 51 rows, so fit (72) streams
    tight = segment_probe(store, [(33, 150)], segment=FAST, settings=ProbeConfig(memory_mb=0.2))
    assert tight.streamed and not whole.streamed
    assert abs(tight.top1 - whole.top1) < 0.08  # the same protocol, other batches (a window shuffle)


def test_eval_size_is_recorded_and_scored_there(dense):
    store = open_store(dense.store.path)
    r = segment_probe(store, [(33, 150)], segment=FAST, eval_size=16)
    assert r["eval_size"] == 16 and r.hyperparameters["eval_size"] == 16 and r.hyperparameters["mask_size"] == 32
    assert r.settings != segment_probe(store, [(33, 150)], segment=FAST).settings


def _dense_toml(tmp_path, cfg, extra=""):
    p = tmp_path / "dense.toml"
    p.write_text(
        f'[store]\npath = "{cfg.store.path}"\n[probe]\nledger = "{tmp_path / "ledger.csv"}"\n'
        f"[segment]\nepochs = 2\nexamples = 3\n" + extra
    )
    return str(p)


def test_cli_json_ledger_row_and_picture(dense, tmp_path):
    toml = _dense_toml(tmp_path, dense)
    r = runner.invoke(probe_app, ["segment", "--config", toml, "--block", "24", "--t", "150", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["head"] == "segment" and out["blocks"] == [24] and 0 < out["miou"] <= 1
    (row,) = read_rows(tmp_path / "ledger.csv")
    assert row["head"] == "segment" and row["top1"] == pytest.approx(out["miou"]) and row["block"] == 24
    assert row["top5"] == pytest.approx(out["pixel_accuracy"]) and row["hyperparameters"]["eval_size"] == 32
    from PIL import Image

    with Image.open(out["picture"]) as im:
        assert im.size[0] > 300 and im.size[1] > 3 * 150
    r = runner.invoke(probe_app, ["segment", "--config", toml, "--blocks", "24,33", "--t", "150"])
    assert r.exit_code == 0 and "val mIoU" in r.stdout and "held-out mIoU" in r.stdout


def test_cli_errors_are_one_line(dense, tmp_path):
    toml = _dense_toml(tmp_path, dense)
    r = runner.invoke(probe_app, ["segment", "--config", toml, "--blocks", "30", "--t", "150"])
    assert r.exit_code == 2 and "no complete features for block 30, t 150" in r.output
    assert "extract run" in r.output and len(r.output.strip().splitlines()) == 1
    x = {
        "train": {FeatureKey(150, 24, 2): np.zeros((4, 2, 2, 2))},
        "val": {FeatureKey(150, 24, 2): np.zeros((4, 2, 2, 2))},
    }
    plain = write_synthetic_store(tmp_path / "plain.zarr", x, {"train": np.arange(4) % 2, "val": np.arange(4) % 2})
    r = runner.invoke(probe_app, ["segment", "--store", str(plain), "--blocks", "24", "--t", "150"])
    assert r.exit_code == 2 and "no masks in split 'train'" in r.output and len(r.output.strip().splitlines()) == 1
    r = runner.invoke(probe_app, ["segment", "--config", toml, "--blocks", "33", "--t", "150", "--pool", "3"])
    assert r.exit_code == 2 and "no complete features for block 33, t 150, pool 3" in r.output
    r = runner.invoke(probe_app, ["sweep", "--config", toml, "--head", "dense"])
    assert r.exit_code == 2 and "--head: 'dense' is not allowed; allowed: 'linear', 'knn', 'segment'" in r.output
    r = runner.invoke(probe_app, ["sweep", "--config", toml, "--head", "segment", "--shots", "5"])
    assert r.exit_code == 2 and "--shots: not used by the dense sweep" in r.output
    bad = _dense_toml(tmp_path, dense, 'optimizer = "adam"\n')
    r = runner.invoke(probe_app, ["segment", "--config", bad, "--blocks", "24", "--t", "150"])
    assert r.exit_code == 2 and "segment.optimizer: 'adam' is not allowed" in r.output


def test_dense_sweep_resumes_from_the_ledger(dense, tmp_path):
    cfg = load_config(_dense_toml(tmp_path, dense))
    plans, cells = [], []
    first = sweep_run(cfg, on_plan=lambda *a: plans.append(a), on_cell=lambda *a: cells.append(a))
    assert plans == [(2, 0)] and cells == [((24, 150), True), ((33, 150), True)]  # the progress bar's calls
    assert first["trained"] == 2 and first["skipped"] == 0
    assert [(c["block"], c["t"], c["pool"]) for c in first["cells"]] == [(24, 150, 2), (33, 150, 8)]
    assert len(first["plots"]["files"]) == 3 and all(f.endswith(".png") for f in first["plots"]["files"])
    again = sweep_run(cfg)
    assert again["trained"] == 0 and again["skipped"] == 2 and again["cells"] == first["cells"]
    rows = read_rows(tmp_path / "ledger.csv")
    assert len(rows) == 2 and {r["head"] for r in rows} == {"segment"}
    r = runner.invoke(probe_app, ["sweep", "--config", str(tmp_path / "dense.toml"), "--head", "segment", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["skipped"] == 2
    r = runner.invoke(probe_app, ["sweep", "--config", str(tmp_path / "dense.toml"), "--head", "segment"])
    assert r.exit_code == 0 and "dense sweep: 2 cells (0 trained, 2 already in the ledger)" in r.stdout


def test_dense_sweep_refuses_a_store_still_being_written(dense, tmp_path):
    import fcntl
    import os

    from diffprobe.store.errors import StoreError
    from diffprobe.store.feature_store import lock_path

    cfg = load_config(_dense_toml(tmp_path, dense))
    fd = os.open(lock_path(cfg.store.path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as `extract run` holds it while writing
        os.pwrite(fd, b"pid 1 on host, run abcd", 0)
        with pytest.raises(StoreError, match=r"an `extract run` is still writing this store \(pid 1 on host"):
            sweep_run(cfg)
    finally:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    assert not (tmp_path / "ledger.csv").exists()


def test_pipeline_dense_toml_is_the_embedded_dense_default():
    cfg = load_config(REPO / "pipeline-dense.toml")
    assert cfg.data.masks and cfg.data.source == "digits" and cfg.store.path == "runs/digits-dense.zarr"
    assert 24 in cfg.extract.blocks and 150 in cfg.extract.timesteps
