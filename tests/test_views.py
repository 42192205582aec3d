"""Augmented views and noise draws in the store (extract.views, extract.noise_draws)."""

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffprobe.extract import job as jobs
from diffprobe.extract.images import Augmentation, preprocess
from diffprobe.extract.noise import image_noise
from diffprobe.extract.report import Recorder
from diffprobe.extract.run import run as extract_run
from diffprobe.extract.unet import build_diffusion, build_model, load_checkpoint
from diffprobe.store.errors import ConfigError, FingerprintMismatch, StoreError
from diffprobe.store.feature_store import FeatureKey, open_store

from .conftest import killed_run, small_config

# 10 train + 10 val images in chunks of 4, block 8 only (the forward stops there), one pool.
TINY = {
    "data.max_per_class": 1,
    "extract.blocks": "8",
    "extract.pools": [1],
    "extract.batch_size": 4,
    "store.chunk_images": 4,
    "extract.threads": 1,
}
VIEWS = {"extract.views": {"train": 3}, "extract.noise_draws": {"val": 2}}


def _cfg(tmp_path, name, **over):
    return small_config(tmp_path, name, **{**TINY, **over})


def _all(path) -> dict:
    """Every complete array (views and draws too) of every split, as bytes."""
    s = open_store(path)
    return {
        (split, k.name): s.features(split, k.block, k.t, k.pool, view=k.view, draw=k.draw).tobytes()
        for split in s.splits
        for k in s.keys(split, variants=True)
    }


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A store of view 0 alone (today's layout), and one with 3 train views and 2 val draws."""
    tmp = tmp_path_factory.mktemp("views")
    plain, views = _cfg(tmp, "plain.zarr"), _cfg(tmp, "views.zarr", **VIEWS)
    extract_run(plain)
    report = Recorder()
    extract_run(views, report)
    return plain, views, report


def test_view_0_is_todays_features_bit_for_bit(stores):
    plain, views, _ = stores
    a, b = _all(plain.store.path), _all(views.store.path)
    assert set(a) == {("train", "t90_b8_p1"), ("val", "t90_b8_p1")}
    assert set(b) == set(a) | {("train", "t90_b8_p1_v1"), ("train", "t90_b8_p1_v2"), ("val", "t90_b8_p1_n1")}
    for k in a:
        assert a[k] == b[k], k
    # a store without views records no augmentation: its fingerprints are those of before views
    assert "augmentation" not in open_store(plain.store.path).fingerprints["preprocessing"]
    aug = open_store(views.store.path).fingerprints["preprocessing"]["augmentation"]
    assert aug["crop_scale"] == [0.8, 1.0] and aug["flip"] is False  # digits: flip off by default


def test_views_and_draws_equal_an_independent_forward(stores):
    """View 1 = the random crop of `Augmentation.view` under noise keyed by view 1; draw 1 = the
    center crop under noise keyed by draw 1; through a plain, uncaptured U-Net forward."""
    _, cfg, report = stores
    s = open_store(cfg.store.path)
    job = jobs.prepare(cfg)
    model = build_model(job.spec).eval()
    load_checkpoint(model, job.checkpoint)
    diffusion = build_diffusion(job.spec)
    aug = job.source.augmentation
    for split, view, draw in (("train", 1, 0), ("train", 2, 0), ("val", 0, 1)):
        ids = list(s.ids(split)[:3])
        x0 = torch.from_numpy(
            np.stack(
                [
                    preprocess(job.source.open(split, i), 32)
                    if view == 0
                    else aug.view(job.source.open(split, i), i, view, 32)
                    for i in ids
                ]
            )
        )
        noise = torch.stack([image_noise(0, i, 90, (3, 32, 32), view, draw) for i in ids])
        out = {}
        hook = model.input_blocks[7].register_forward_hook(lambda _m, _i, o: out.__setitem__(8, o))
        with torch.no_grad():
            model(diffusion.q_sample(x0, torch.full((3,), 90), noise), torch.full((3,), 90))
        hook.remove()
        want = F.adaptive_avg_pool2d(out[8], 1).numpy()
        got = s.features(split, 8, 90, 1, view=view, draw=draw)[:3].astype(np.float32)
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
    # the reported forwards count every (image, view or draw, t): 10 x 3 + 10 x 2
    assert report.totals.forwards == 50 and sum(f for _, f in report.advances) == 50


def test_views_differ_from_each_other(stores):
    _, cfg, _ = stores
    s = open_store(cfg.store.path)
    x = [s.features("train", 8, 90, 1, view=v).astype(np.float32) for v in range(3)]
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert np.abs(x[a] - x[b]).mean() > 1e-2 * np.abs(x[0]).mean(), (a, b)
    job = jobs.prepare(cfg)
    ids = list(s.ids("train"))
    images = job.source.load_views("train", ids, (0, 1, 2))
    # crops applied: a view equals the center crop only where its drawn shorter side is S itself
    same = [np.array_equal(im[0], im[v]) for im in images for v in (1, 2)]
    whole = [job.source.augmentation.draws(i, v, 32)[0] == 32 for i in ids for v in (1, 2)]
    assert same == whole and not all(same)
    draws = [s.features("val", 8, 90, 1, draw=m) for m in range(2)]
    assert not np.array_equal(draws[0], draws[1])


def test_a_flipped_view_of_a_symmetric_image_equals_the_unflipped_one():
    size = 32
    rng = np.random.default_rng(0)
    half = rng.integers(0, 256, (40, 20, 3), dtype=np.uint8)
    symmetric = Image.fromarray(np.concatenate([half, half[:, ::-1]], axis=1))  # 40 x 40, mirror-symmetric
    asymmetric = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    # crop_scale [1, 1] resizes the shorter side to exactly S: every view is the whole (square) image
    flip, keep = Augmentation((1.0, 1.0), flip=True), Augmentation((1.0, 1.0), flip=False)
    flipped = [v for v in range(1, 40) if flip.draws("img", v, size)[3]]
    assert 10 < len(flipped) < 30  # p 0.5, and the flip setting changes only the flip
    assert all(flip.draws("img", v, size)[:3] == keep.draws("img", v, size)[:3] for v in range(1, 40))
    for v in flipped[:5]:
        assert np.array_equal(flip.view(symmetric, "img", v, size), keep.view(symmetric, "img", v, size))
        assert np.array_equal(flip.view(symmetric, "img", v, size), preprocess(symmetric, size))
        assert not np.array_equal(flip.view(asymmetric, "img", v, size), keep.view(asymmetric, "img", v, size))
        np.testing.assert_array_equal(
            flip.view(asymmetric, "img", v, size), keep.view(asymmetric, "img", v, size)[:, :, ::-1]
        )


def test_crop_sizes_follow_random_crop_arr():
    """The shorter side is drawn from [ceil(S / max), ceil(S / min)] (guided-diffusion's
    random_crop_arr), every value reached, the same for the same (seed, id, view) only."""
    aug = Augmentation((0.8, 1.0))
    sides = {aug.draws("a", v, 32)[0] for v in range(1, 400)}
    assert sides == set(range(32, 41))
    assert aug.draws("a", 1, 32) == Augmentation((0.8, 1.0)).draws("a", 1, 32)
    assert aug.draws("a", 1, 32) != Augmentation((0.8, 1.0), seed=1).draws("a", 1, 32)


@pytest.mark.slow
def test_views_do_not_depend_on_the_batch_size(stores, tmp_path):
    _, views, _ = stores
    want = _all(views.store.path)
    for bs in (1, 7, 64):
        cfg = _cfg(tmp_path, f"bs{bs}.zarr", **VIEWS, **{"extract.batch_size": bs, "store.chunk_images": 64})
        extract_run(cfg)
        assert _all(cfg.store.path) == want, bs


def test_adding_views_computes_only_the_new_arrays(stores, tmp_path):
    plain, views, _ = stores
    cfg = _cfg(tmp_path, "grow.zarr")
    extract_run(cfg)
    before = {k: v for k, v in _all(cfg.store.path).items()}
    grown = _cfg(tmp_path, "grow.zarr", **VIEWS)
    report = Recorder()
    result = extract_run(grown, report)
    assert result["chunks_written"] == 6  # every chunk lacks a new array
    assert report.totals.forwards == 50 and report.totals.forwards_done == 20
    assert sum(f for _, f in report.advances) == 30  # 10 x 2 new views + 10 x 1 new draw
    after = _all(cfg.store.path)
    assert all(after[k] == v for k, v in before.items())
    assert after == _all(views.store.path)  # what a store with views from the start holds
    assert extract_run(grown)["chunks_written"] == 0


def test_a_store_with_other_augmentation_settings_is_refused(stores, tmp_path):
    _, views, _ = stores
    import shutil

    path = tmp_path / "copy.zarr"
    shutil.copytree(views.store.path, path)
    files = _files(path)
    for over in ({"data.crop_scale": [0.5, 1.0]}, {"data.flip": True}):
        cfg = _cfg(tmp_path, "copy.zarr", **VIEWS, **over)
        with pytest.raises(FingerprintMismatch, match=r"different preprocessing: preprocessing\.augmentation"):
            extract_run(cfg)
    assert _files(path) == files  # nothing written


def _files(path):
    """Every data file under ``path`` (not the lock) with its modification time."""
    return sorted((p, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file() and p.name != ".lock")


def test_reading_a_view_or_draw_the_store_does_not_hold(stores):
    plain, views, _ = stores
    s = open_store(views.store.path)
    assert s.views("train", 8, 90, 1) == 3 and s.views("val", 8, 90, 1) == 1
    assert s.noise_draws("val", 8, 90, 1) == 2 and s.noise_draws("train", 8, 90, 1) == 1
    with pytest.raises(
        StoreError, match=r"view 3 of block 8, t 90, pool 1 is not in split 'train'; it holds views 0-2"
    ):
        s.features("train", 8, 90, 1, view=3)
    with pytest.raises(StoreError, match=r"noise draw 1 .* split 'train'; it holds noise draw 0 only"):
        s.features("train", 8, 90, 1, draw=1)
    with pytest.raises(StoreError, match=r"view: -1 is not allowed"):
        s.features("train", 8, 90, 1, view=-1)
    with pytest.raises(StoreError, match="a view or a noise draw, not both"):
        FeatureKey(90, 8, 1, 1, 1)
    assert [k.name for k in s.keys("train")] == ["t90_b8_p1"]  # views only when asked for
    assert FeatureKey.parse("t90_b8_p1_v2") == FeatureKey(90, 8, 1, view=2)
    assert FeatureKey.parse("t90_b8_p1_n3") == FeatureKey(90, 8, 1, draw=3)
    assert open_store(plain.store.path).views("train", 8, 90, 1) == 1


@pytest.mark.parametrize(
    "over,pattern",
    [
        ({"extract.views": 0}, r"^extract\.views: 0 is out of range; allowed: in 1\.\.4096$"),
        ({"extract.views": {"train": 0}}, r"^extract\.views\.train: 0 is out of range"),
        ({"extract.noise_draws": 0}, r"^extract\.noise_draws: 0 is out of range"),
        (
            {"data.crop_scale": [0.9, 0.8]},
            r"^data\.crop_scale: \[0\.9, 0\.8\] is not allowed; allowed: \[min, max\] with 0 < min <= max <= 1$",
        ),
        ({"data.crop_scale": [0.0, 1.0]}, r"^data\.crop_scale: .* not allowed"),
        ({"data.crop_scale": [0.8, 1.5]}, r"^data\.crop_scale: .* not allowed"),
        ({"data.flip": "yes"}, r"^data\.flip: 'yes' is not allowed; allowed: 'auto', true, false$"),
    ],
)
def test_bad_settings_name_the_key(tmp_path, over, pattern):
    with pytest.raises(ConfigError, match=pattern):
        _cfg(tmp_path, "bad.zarr", **over)


def test_a_view_count_for_a_split_not_extracted_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"^extract\.views\.test: not a split being extracted; allowed: train, val$"):
        jobs.prepare(_cfg(tmp_path, "bad.zarr", **{"extract.views": {"test": 2}}))


def test_cli_bad_views_is_one_line_exit_2_and_writes_nothing(tmp_path):
    toml = tmp_path / "bad.toml"
    toml.write_text(f'[extract]\nviews = 0\n[store]\npath = "{tmp_path / "s.zarr"}"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "diffprobe.extract.cli", "run", "--config", str(toml)],
        cwd=tmp_path,
        capture_output=True,
        timeout=120,
    )
    err = proc.stderr.decode().strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "extract.views" in err, err
    assert not (tmp_path / "s.zarr").exists()


def test_plan_shows_the_views_bytes_and_forwards(tmp_path):
    base = jobs.prepare(_cfg(tmp_path, "p.zarr")).plan
    plan = jobs.prepare(_cfg(tmp_path, "p.zarr", **VIEWS)).plan
    assert plan.forwards == 10 * 3 + 10 * 2 and base.forwards == 20
    train = [a for a in base.arrays if a.split == "train"][0].nbytes
    val = [a for a in base.arrays if a.split == "val"][0].nbytes
    assert plan.nbytes == 3 * train + 2 * val
    d = plan.to_dict()
    assert d["views"] == {"train": 3, "val": 1} and d["noise_draws"] == {"train": 1, "val": 2}
    assert {(a["name"], a["view"], a["draw"]) for a in d["arrays"] if a["split"] == "val"} == {
        ("t90_b8_p1", 0, 0),
        ("t90_b8_p1_n1", 0, 1),
    }


def test_views_resume_after_sigkill(stores, tmp_path):
    """`extract run` SIGKILLs itself after train chunk 1's completion record (the extraction's
    kill hook); the resume keeps the complete chunks and ends bit-identical."""
    _, views, _ = stores
    cfg = _cfg(tmp_path, "kill.zarr", **VIEWS)
    killed_run(
        tmp_path,
        '[data]\nmax_per_class = 1\n[extract]\nblocks = "8"\ntimesteps = [90]\npools = [1]\nforward_batch = 8\n'
        'batch_size = 4\ndevice = "cpu"\nthreads = 1\nloaders = 2\nprefetch = 2\nwrite_behind = 1\n'
        "views = { train = 3 }\nnoise_draws = { val = 2 }\n"
        f'[store]\nchunk_images = 4\npath = "{cfg.store.path}"\n',
        "train/1",
    )
    s = open_store(cfg.store.path)
    assert [s.chunks_done("train", k) for k in s.keys("train", complete_only=False, variants=True)] == [2] * 3
    result = extract_run(cfg)
    assert result["chunks_already_done"] == 2 and result["chunks_written"] == 4
    assert _all(cfg.store.path) == _all(views.store.path)


@pytest.mark.slow
def test_views_with_two_dask_workers_equal_one_process(stores, tmp_path):
    pytest.importorskip("distributed")
    _, views, _ = stores
    cfg = _cfg(tmp_path, "w2.zarr", **VIEWS, **{"extract.workers": 2, "extract.threads_per_worker": 1})
    result = extract_run(cfg)
    assert result["workers"] == 2 and result["chunks_written"] == 6
    assert _all(cfg.store.path) == _all(views.store.path)


def test_status_counts_views_and_draws(stores):
    from typer.testing import CliRunner

    from diffprobe.extract.cli import app

    _, views, _ = stores
    r = CliRunner().invoke(app, ["status", "--store", views.store.path])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert "  views 0-2, noise draws 0-0 (extract.views, extract.noise_draws)" in lines
    assert "  views 0-0, noise draws 0-1 (extract.views, extract.noise_draws)" in lines
    arrays = open_store(views.store.path).status()["splits"]["train"]["arrays"]
    assert arrays["t90_b8_p1_v2"]["view"] == 2 and "view" not in arrays["t90_b8_p1"]
