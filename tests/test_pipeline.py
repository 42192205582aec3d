"""The overlapped extraction pipeline (extract.extraction): the same bits as the plain loop of
one t per forward, with loaders and the writer on or off; failures of either; device options;
progress per U-Net call."""

import threading

import numpy as np
import pytest
import torch

from diffprobe.extract import job as jobs
from diffprobe.extract.extraction import ComputeSettings, pool_features
from diffprobe.extract.noise import batch_noise
from diffprobe.extract.report import Recorder
from diffprobe.extract.run import run as extract_run
from diffprobe.extract.unet import capture
from diffprobe.store.config import ExtractConfig
from diffprobe.store.errors import ImageError
from diffprobe.store.feature_store import StoreWriter, open_store

from .conftest import small_config

OFF = {"extract.loaders": 0, "extract.write_behind": 0}


def _one_t_per_forward(cfg) -> dict:
    """The features as the loop before the pipeline made them, written here independently: per
    split, chunk, batch and t, x_t on CPU and calls of exactly forward_batch rows (zero-padded)."""
    job = jobs.prepare(cfg)
    model, _ = jobs.load_model(job, torch.device("cpu"))
    e, fb = cfg.extract, cfg.extract.forward_batch
    out = {}
    for split in cfg.data.splits:
        ids = list(job.source.split(split).ids)
        for c0 in range(0, len(ids), cfg.store.chunk_images):
            chunk = ids[c0 : c0 + cfg.store.chunk_images]
            for b0 in range(0, len(chunk), e.batch_size):
                bids = chunk[b0 : b0 + e.batch_size]
                x0 = torch.from_numpy(np.stack(job.source.load(split, bids)))
                for t in e.timesteps:
                    x_t = job.diffusion.q_sample(x0, torch.full((len(x0),), t), batch_noise(0, bids, t, (3, 32, 32)))
                    for g0 in range(0, len(x_t), fb):
                        g = x_t[g0 : g0 + fb]
                        n = len(g)
                        g = torch.cat([g, g.new_zeros((fb - n, *g.shape[1:]))])
                        with torch.no_grad():
                            feats = capture(model, g, torch.full((fb,), t), e.blocks)
                        for b in e.blocks:
                            for p in {min(p, feats[b].shape[-1]) for p in e.pools}:
                                v = pool_features(feats[b][:n].float(), p).half().numpy()
                                out.setdefault((split, t, b, p), []).append(v)
    return {k: np.concatenate(v) for k, v in out.items()}


def _stored(path) -> dict:
    s = open_store(path)
    return {(sp, k.t, k.block, k.pool): s.features(sp, k.block, k.t, k.pool) for sp in s.splits for k in s.keys(sp)}


@pytest.mark.slow
def test_pipeline_on_and_off_give_the_bits_of_one_t_per_forward(tmp_path):
    # 2 t share forwards; batches of 5 in chunks of 8: padded tails of every size
    over = {"extract.timesteps": [90, 300], "extract.batch_size": 5, "data.max_per_class": 2}
    want = _one_t_per_forward(small_config(tmp_path, **over))
    for name, extra in (("off", OFF), ("on", {"extract.loaders": 2, "extract.prefetch": 1, "extract.write_behind": 2})):
        cfg = small_config(tmp_path, f"{name}.zarr", **over, **extra)
        extract_run(cfg)
        got = _stored(cfg.store.path)
        assert got.keys() == want.keys() and len(got) == 2 * 2 * 7
        for k in want:
            assert got[k].tobytes() == want[k].tobytes(), (name, k)


@pytest.mark.slow
def test_loader_processes_give_the_same_bits(tmp_path):
    a = small_config(tmp_path, "threads.zarr", **{"extract.blocks": "8"})
    b = small_config(tmp_path, "procs.zarr", **{"extract.blocks": "8", "extract.loader_kind": "process"})
    extract_run(a)
    extract_run(b)
    ga, gb = _stored(a.store.path), _stored(b.store.path)
    assert ga.keys() == gb.keys() and all(ga[k].tobytes() == gb[k].tobytes() for k in ga)


def test_progress_advances_per_u_net_call_in_forwards_and_images(tmp_path):
    # 30 + 30 images x 2 t; chunks of 8 images (8, 8, 8, 6 per split), batches of 8
    cfg = small_config(tmp_path, **{"extract.timesteps": [90, 300], "extract.blocks": "8", "extract.forward_batch": 6})
    report = Recorder()
    extract_run(cfg, report)
    assert report.totals.forwards == 120 and report.totals.images == 60 and report.totals.chunks == 8
    calls = [f for i, f in report.advances if f]
    assert sum(calls) == 120 and sum(i for i, _ in report.advances) == 60
    # per batch of b images: 2b rows in calls of 6 (the last partial); chunks of 8 images: 3 full
    # batches and a tail of 6 per split -> 16 rows (6, 6, 4) x 3 + 12 rows (6, 6)
    assert calls == ([6, 6, 4] * 3 + [6, 6]) * 2
    assert report.chunk_counts == [(i, 8) for i in range(1, 9)]
    again = Recorder()
    extract_run(cfg, again)  # a complete store: everything found done, nothing computed
    assert again.totals.forwards_done == 120 and again.totals.chunks_done == 8 and not again.advances


def test_a_corrupt_image_stops_the_run_naming_the_file_with_loader_threads(tmp_path):
    from .test_extract import _imagefolder

    root, bad = _imagefolder(tmp_path, corrupt=True)
    over = {"data.source": "imagefolder", "data.root": str(root), "data.max_per_class": 0}
    cfg = small_config(tmp_path, **over, **{"extract.loaders": 3, "extract.prefetch": 2, "extract.batch_size": 1})
    with pytest.raises(ImageError, match=f"^{bad}: cannot read image"):
        extract_run(cfg)


def test_a_failing_writer_stops_the_run_with_its_error_and_marks_nothing_complete(tmp_path, monkeypatch):
    calls = []

    def failing(self, split, chunk, data):
        calls.append((split, chunk))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(StoreWriter, "write_chunk", failing)
    # prefetch 1 and 1 chunk behind: the loaders and the model both wait on a full queue
    cfg = small_config(tmp_path, **{"extract.prefetch": 1, "extract.write_behind": 1, "store.chunk_images": 2})
    failure: list[BaseException] = []
    thread = threading.Thread(target=lambda: _catch(failure, extract_run, cfg))
    thread.start()
    thread.join(300)
    assert not thread.is_alive(), "the run deadlocked"
    assert len(failure) == 1 and isinstance(failure[0], OSError) and "No space left" in str(failure[0])
    assert calls == [("train", 0)]  # nothing written after the failed write
    monkeypatch.undo()
    s = open_store(cfg.store.path)
    assert all(s.chunks_done(sp, k) == 0 for sp in s.splits for k in s.keys(sp, complete_only=False))


def _catch(failure, fn, *args):
    try:
        fn(*args)
    except BaseException as e:
        failure.append(e)


def _both(tmp_path, over: dict, extra: dict):
    """Run ``over`` and ``over`` + ``extra``: (first's features, second's, second's result, second's
    compute fingerprint, first's compute fingerprint)."""
    a, b = small_config(tmp_path, "a.zarr", **over), small_config(tmp_path, "b.zarr", **over, **extra)
    extract_run(a)
    result = extract_run(b)
    fa, fb = (open_store(c.store.path).fingerprints["compute"] for c in (a, b))
    return _stored(a.store.path), _stored(b.store.path), result, fb, fa


def _relative_errors(x: dict, y: dict) -> list[float]:
    return [float(np.linalg.norm(y[k].astype(np.float32) - x[k]) / np.linalg.norm(x[k].astype(np.float32))) for k in x]


def test_channels_last_is_close_to_the_default_and_fingerprinted(tmp_path):
    x, y, _, fp, before = _both(tmp_path, {"extract.blocks": "8,24"}, {"extract.channels_last": True})
    assert max(_relative_errors(x, y)) < 1e-2
    assert fp["channels_last"] is True and "channels_last" not in before


@pytest.mark.slow
def test_compile_is_close_to_eager_and_its_time_reported_apart(tmp_path):
    over = {"extract.blocks": "3", "extract.pools": [1]}  # compiles blocks 1-3 only
    x, y, result, fp, _ = _both(tmp_path, over, {"extract.compile": True})
    assert result["compile_seconds"] > 0 and fp["compile"] is True
    assert max(_relative_errors(x, y)) < 1e-2


def test_bf16_autocast_runs_on_cpu_close_to_float32(tmp_path):
    x, y, _, fp, _ = _both(tmp_path, {"extract.blocks": "8", "extract.pools": [1]}, {"extract.autocast": "bf16"})
    assert all(0 < e < 0.05 for e in _relative_errors(x, y)) and fp["autocast"] == "bf16"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_pipeline_on_and_off_give_the_same_bits(tmp_path):
    x, y, *_ = _both(
        tmp_path,
        {"extract.device": "cuda", "extract.timesteps": [90, 300], **OFF},
        {"extract.loaders": 2, "extract.write_behind": 1},
    )
    assert x.keys() == y.keys() and all(x[k].tobytes() == y[k].tobytes() for k in x)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_bf16_autocast_stays_close_to_float32(tmp_path):
    x, y, *_ = _both(tmp_path, {"extract.device": "cuda", "extract.blocks": "24"}, {"extract.autocast": "bf16"})
    assert max(_relative_errors(x, y)) < 0.05


def test_compute_settings_carry_every_pipeline_key(tmp_path):
    cfg = small_config(tmp_path, **{"extract.loaders": 3, "extract.loader_kind": "process", "extract.prefetch": 7})
    s = jobs.compute_settings(cfg, torch.device("cpu"))
    assert (s.loaders, s.loader_kind, s.prefetch, s.write_behind) == (3, "process", 7, 1)
    d, e = ComputeSettings(torch.device("cpu")), ExtractConfig()
    assert (d.loaders, d.loader_kind, d.prefetch, d.write_behind) == (
        e.loaders,
        e.loader_kind,
        e.prefetch,
        e.write_behind,
    )
