"""Extraction into the store: correctness against a plain forward, determinism, resume, refusal."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffprobe.extract import job as jobs
from diffprobe.extract.noise import image_noise
from diffprobe.extract.run import run as extract_run
from diffprobe.extract.unet import build_diffusion, build_model, load_checkpoint
from diffprobe.store.errors import FingerprintMismatch, ImageError, StoreError, StoreLocked
from diffprobe.store.feature_store import FeatureKey, StoreWriter, open_store
from diffprobe.store.synthetic import write_synthetic_store

from .conftest import REPO, killed_run, small_config, writer_kwargs


def _arrays(path):
    s = open_store(path)
    return {(split, k): s.features(split, k.block, k.t, k.pool) for split in s.splits for k in s.keys(split)}


def _assert_same_store(a, b):
    fa, fb = _arrays(a), _arrays(b)
    assert fa.keys() == fb.keys() and fa
    for k in fa:
        assert fa[k].tobytes() == fb[k].tobytes(), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run of the small config, shared by the comparisons below."""
    tmp = tmp_path_factory.mktemp("ref")
    cfg = small_config(tmp)
    extract_run(cfg)
    return cfg


def test_features_equal_an_independent_plain_forward(reference):
    cfg = reference
    s = open_store(cfg.store.path)
    job = jobs.prepare(cfg)
    model = build_model(job.spec).eval()
    load_checkpoint(model, job.checkpoint)
    diffusion = build_diffusion(job.spec)
    ids = list(s.ids("val")[:5])
    x0 = torch.from_numpy(np.stack(job.source.load("val", ids)))
    noise = torch.stack([image_noise(0, i, 90, (3, 32, 32)) for i in ids])
    x_t = diffusion.q_sample(x0, torch.full((5,), 90), noise)
    outs = {}
    hooks = [
        m.register_forward_hook(lambda _m, _i, o, b=b: outs.__setitem__(b, o))
        for b, m in [
            (3, model.input_blocks[2]),
            (8, model.input_blocks[7]),
            (16, model.input_blocks[15]),
            (24, model.output_blocks[4]),
        ]
    ]
    with torch.no_grad():
        model(x_t, torch.full((5,), 90))  # the full, uncaptured forward
    for h in hooks:
        h.remove()
    for b in (3, 8, 16, 24):
        for p in (1, 2):
            want = F.adaptive_avg_pool2d(outs[b], min(p, outs[b].shape[-1])).numpy()
            got = s.features("val", b, 90, p)[:5].astype(np.float32)
            np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
    assert s.labels("val").tolist() == list(job.source.split("val").labels)
    assert s.features("val", 16, 90, 2).shape == (30, 128, 1, 1)  # pool capped at the 1x1 map
    assert s.features("train", 24, 90, 2).shape == (30, 128, 2, 2)


@pytest.mark.slow
def test_batch_size_does_not_change_a_bit(reference, tmp_path):
    # chunks of 64 (the reference has 8) so that a batch of 64 really holds 30 images
    for bs in (1, 7, 64):
        cfg = small_config(tmp_path, name=f"bs{bs}.zarr", **{"extract.batch_size": bs, "store.chunk_images": 64})
        extract_run(cfg)
        _assert_same_store(reference.store.path, cfg.store.path)


def test_resume_computes_only_what_is_missing(tmp_path):
    cfg = small_config(tmp_path, **{"extract.blocks": "8", "extract.timesteps": [90]})
    first = extract_run(cfg)
    assert first["chunks_written"] == 8 and first["chunks_already_done"] == 0  # 30+30 images / 8
    again = extract_run(cfg)
    assert again["chunks_written"] == 0 and again["chunks_already_done"] == 8
    more = small_config(tmp_path, **{"extract.blocks": "8,24", "extract.timesteps": [90, 300]})
    third = extract_run(more)
    assert third["chunks_written"] == 8
    s = open_store(cfg.store.path)
    assert {(k.block, k.t) for k in s.keys("train")} == {(8, 90), (24, 90), (8, 300), (24, 300)}
    # a later run with another chunk size adopts the store's chunking
    other_chunks = small_config(
        tmp_path, **{"extract.blocks": "8,24", "extract.timesteps": [90, 300], "store.chunk_images": 5}
    )
    assert extract_run(other_chunks)["chunks_already_done"] == 8
    # the new arrays equal a fresh run that asked for them from the start
    fresh = small_config(tmp_path, name="fresh.zarr", **{"extract.blocks": "8,24", "extract.timesteps": [90, 300]})
    extract_run(fresh)
    _assert_same_store(cfg.store.path, fresh.store.path)


@pytest.mark.parametrize(
    "override,what",
    [
        ({"extract.noise_seed": 1}, "noise: noise.seed: store has 0, this run has 1"),
        ({"data.max_per_class": 2}, "dataset"),
        ({"extract.forward_batch": 4}, "compute"),
        ({"model.checkpoint": "OTHER"}, "model: model.checkpoint_sha256"),
    ],
)
def test_fingerprint_mismatch_is_refused(reference, tmp_path, override, what):
    if override.get("model.checkpoint") == "OTHER":
        model = build_model(jobs.prepare(reference).spec)
        other = tmp_path / "other.pt"
        torch.save(model.state_dict(), other)
        override = {"model.checkpoint": str(other)}
    cfg = small_config(tmp_path, **override, **{"store.path": reference.store.path})
    before = _snapshot(reference.store.path)
    with pytest.raises(FingerprintMismatch, match=f"different .*{what}"):
        extract_run(cfg)
    assert _snapshot(reference.store.path) == before  # nothing written


def _snapshot(path):
    """Every data file under path (not the lock) with its size and modification time."""
    out = {}
    for d, _, files in os.walk(path):
        for f in (f for f in files if f != ".lock"):
            st = os.stat(os.path.join(d, f))
            out[os.path.relpath(os.path.join(d, f), path)] = (st.st_size, st.st_mtime_ns)
    return out


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    path = write_synthetic_store(
        tmp_path / "s.zarr", {"train": {FeatureKey(90, 3, 1): np.zeros((4, 2, 1, 1))}}, {"train": np.arange(4) % 2}
    )
    kw = writer_kwargs(path, 8)
    with StoreWriter.create(path, **kw):
        with pytest.raises(StoreLocked, match="another `extract run` is writing this store"):
            StoreWriter.create(path, **kw)
    StoreWriter.create(path, **kw).close()  # released again


def test_store_api_and_its_errors(reference):
    s = open_store(reference.store.path)
    assert s.splits == ["train", "val"] and s.class_names == [str(i) for i in range(10)]
    assert len(s.ids("train")) == 30 and s.ids("train")[0].startswith("digits/")
    assert not s.skipped("train").any()
    lazy = s.features("train", 24, 90, 2, dask=True)
    assert lazy.shape == (30, 128, 2, 2) and np.array_equal(lazy.compute(), s.features("train", 24, 90, 2))
    with pytest.raises(
        StoreError,
        match=r"no features for block 24, t 91, pool 2 in split 'train'; it holds "
        r"blocks 3,8,24 at t 90, pools 1-2; block 16 at t 90, pool 1",
    ):
        s.features("train", 24, 91, 2)
    with pytest.raises(StoreError, match="no split 'test'"):
        s.labels("test")
    with pytest.raises(StoreError, match="block 99 does not exist"):
        s.features("train", 99, 90, 1)
    with pytest.raises(StoreError, match="no diffprobe store"):
        open_store(REPO / "tests")
    fp = s.fingerprints
    assert set(fp) == {"model", "preprocessing", "noise", "compute", "dataset"}
    assert len(fp["model"]["checkpoint_sha256"]) == 64
    prov = s.attrs["provenance"]
    assert prov["config"]["extract"]["blocks"] == [3, 8, 16, 24] and prov["tool_version"]
    assert s.attrs["runs"][0]["device"] == "cpu" and fp["compute"]["device_type"] == "cpu"


def test_incomplete_arrays_are_refused_by_readers(tmp_path):
    cfg = small_config(tmp_path, **{"extract.blocks": "8"})
    extract_run(cfg)
    import zarr

    group = zarr.open_group(f"{cfg.store.path}/train", mode="r+")
    group["done"][1, group.attrs["done_columns"].index("t90_b8_p1")] = 0  # as if killed before chunk 1's record
    with pytest.raises(StoreError, match=r"block 8, t 90, pool 1 in split 'train' is incomplete \(3/4 chunks\)"):
        open_store(cfg.store.path).features("train", 8, 90, 1)
    assert extract_run(cfg)["chunks_written"] == 1


def test_refuses_a_directory_that_is_not_a_store(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    cfg = small_config(tmp_path, **{"store.path": str(tmp_path)})
    with pytest.raises(StoreError, match="exists and is not a diffprobe store"):
        extract_run(cfg)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def _imagefolder(tmp_path, corrupt: bool):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            d = tmp_path / "data" / split / c
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(d / f"{i}.png")
    bad = tmp_path / "data" / "train" / "dog" / "1.png"
    if corrupt:
        bad.write_bytes(bad.read_bytes()[:60])  # truncated PNG
    return tmp_path / "data", bad


def test_corrupt_image_stops_the_run_naming_the_file(tmp_path):
    root, bad = _imagefolder(tmp_path, corrupt=True)
    cfg = small_config(tmp_path, **{"data.source": "imagefolder", "data.root": str(root), "data.max_per_class": 0})
    with pytest.raises(ImageError, match=f"{bad}: cannot read image"):
        extract_run(cfg)


def test_a_skipped_image_stays_skipped_in_later_arrays(tmp_path):
    root, bad = _imagefolder(tmp_path, corrupt=True)
    over = {"data.source": "imagefolder", "data.root": str(root), "data.max_per_class": 0, "data.on_corrupt": "skip"}
    extract_run(small_config(tmp_path, **over))
    _imagefolder(tmp_path / "fixed", corrupt=False)[1].replace(bad)  # the file is readable again
    cfg = small_config(tmp_path, **over, **{"extract.blocks": "3,8,16,24,30"})
    extract_run(cfg)
    s = open_store(cfg.store.path)
    i = list(s.ids("train")).index("dog/1.png")
    assert np.isnan(s.features("train", 30, 90, 1)[i].astype(np.float32)).all() and s.skipped("train")[i]


def test_an_image_read_before_must_not_fail_later(tmp_path):
    root, bad = _imagefolder(tmp_path, corrupt=False)
    over = {"data.source": "imagefolder", "data.root": str(root), "data.max_per_class": 0, "data.on_corrupt": "skip"}
    extract_run(small_config(tmp_path, **over))
    bad.write_bytes(bad.read_bytes()[:60])
    with pytest.raises(FingerprintMismatch, match=r"image 'dog/1.png' of split 'train' changed \(size"):
        extract_run(small_config(tmp_path, **over, **{"extract.blocks": "30"}))  # the store's record of the file


def test_corrupt_image_skipped_on_request_is_recorded(tmp_path):
    root, bad = _imagefolder(tmp_path, corrupt=True)
    cfg = small_config(
        tmp_path,
        **{"data.source": "imagefolder", "data.root": str(root), "data.max_per_class": 0, "data.on_corrupt": "skip"},
    )
    assert extract_run(cfg)["images_skipped"] == 1
    s = open_store(cfg.store.path)
    assert s.class_names == ["cat", "dog"]
    i = list(s.ids("train")).index("dog/1.png")
    assert s.skipped("train").tolist() == [j == i for j in range(6)]
    x = s.features("train", 24, 90, 2).astype(np.float32)
    assert np.isnan(x[i]).all() and not np.isnan(np.delete(x, i, axis=0)).any()


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(reference, tmp_path):
    """`extract run` SIGKILLs itself right after train chunk 2's completion record (a hook the test
    controls: extract.extraction.SIGKILL_FILE), with loaders ahead and the writer behind; a resume
    keeps exactly the 3 complete chunks and ends bit-identical."""
    cfg = small_config(tmp_path, **{"store.chunk_images": 2, "extract.forward_batch": 8})
    killed_run(
        tmp_path,
        '[data]\nmax_per_class = 3\n[extract]\nblocks = "3,8,16,24"\ntimesteps = [90]\nforward_batch = 8\n'
        f'batch_size = 8\ndevice = "cpu"\nthreads = 2\nloaders = 2\nprefetch = 2\nwrite_behind = 2\n'
        f'[store]\nchunk_images = 2\npath = "{cfg.store.path}"\n',
        "train/2",
    )
    s = open_store(cfg.store.path)
    assert [s.chunks_done("train", k) for k in s.keys("train", complete_only=False)] == [3] * 7
    result = extract_run(cfg)
    assert result["chunks_already_done"] == 3 and result["chunks_written"] == 15 + 12
    # chunking differs from the reference (2 vs 8 images) and the features do not care
    _assert_same_store(reference.store.path, cfg.store.path)


def test_another_cpu_thread_count_is_refused(reference, tmp_path):
    # CPU kernels split sums by thread count (last-bit differences), so a CPU store records it
    assert open_store(reference.store.path).fingerprints["compute"]["cpu_threads"] == torch.get_num_threads() == 2
    cfg = small_config(tmp_path, **{"store.path": reference.store.path, "extract.threads": 1})
    before = _snapshot(reference.store.path)
    try:
        with pytest.raises(FingerprintMismatch, match="compute: compute.cpu_threads: store has 2, this run has 1"):
            extract_run(cfg)
    finally:
        torch.set_num_threads(2)
    assert _snapshot(reference.store.path) == before
