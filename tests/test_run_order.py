"""`extract run`'s order of work (issue 17, section 4): refusals, the store's lock and the no-op
rerun of a complete store come before the model is loaded or the checkpoint hashed; the
forward_batch default and its refusal; the progress bar's arithmetic."""

from pathlib import Path

import pytest

from diffprobe.extract import job as jobs
from diffprobe.extract import run as runs
from diffprobe.extract import unet
from diffprobe.extract.report import BarReporter, Totals, clock, eta_seconds, rate_text
from diffprobe.store.errors import FingerprintMismatch, StoreLocked
from diffprobe.store.feature_store import StoreWriter, open_store

from .conftest import small_config, writer_kwargs


@pytest.fixture(scope="module")
def complete(tmp_path_factory):
    cfg = small_config(tmp_path_factory.mktemp("order"), **{"extract.blocks": "3", "extract.pools": [1]})
    runs.run(cfg)
    return cfg


def _on(complete, **over):
    """The complete store's config with ``over``."""
    base = {"store.path": complete.store.path, "extract.blocks": "3", "extract.pools": [1]}
    return small_config(Path(complete.store.path).parent, **{**base, **over})


def _no_model(monkeypatch):
    """Loading the model or hashing the checkpoint now fails the test."""

    def boom(*a, **k):
        raise AssertionError("the model was loaded or the checkpoint hashed")

    monkeypatch.setattr(runs, "load_model", boom)
    monkeypatch.setattr(jobs, "file_sha256", boom)


def test_a_complete_store_reruns_without_loading_or_hashing(complete, monkeypatch):
    _no_model(monkeypatch)
    r = runs.run(complete)
    assert r["chunks_written"] == 0 and r["chunks_already_done"] == 8


def test_the_checkpoint_hash_is_reused_only_for_the_same_file(complete, tmp_path, monkeypatch):
    stored = open_store(complete.store.path).attrs
    job = jobs.prepare(complete)
    rec = stored["runs"][-1]["checkpoint_file"]
    assert rec["sha256"] == unet.file_sha256(job.checkpoint) == stored["fingerprints"]["model"]["checkpoint_sha256"]
    assert rec["size"] == (unet.TINY_CHECKPOINT).stat().st_size
    copy = tmp_path / "copy.pt"
    copy.write_bytes(unet.TINY_CHECKPOINT.read_bytes())
    other = jobs.prepare(small_config(tmp_path, **{"model.checkpoint": str(copy)}))
    calls = []
    real = jobs.file_sha256
    monkeypatch.setattr(jobs, "file_sha256", lambda path: calls.append(path) or real(path))
    assert jobs.checkpoint_sha256(job, stored) == rec["sha256"] and not calls  # same file: recorded
    assert jobs.checkpoint_sha256(other, stored) == rec["sha256"] and calls == [str(copy)]  # another: hashed


def test_a_forward_batch_unlike_the_stores_is_refused_with_the_fix_before_loading(complete, monkeypatch):
    _no_model(monkeypatch)
    cfg = _on(complete, **{"extract.forward_batch": 4})
    with pytest.raises(
        FingerprintMismatch,
        match=r"compute\.forward_batch: store has 8, this run has 4; set extract\.forward_batch = 8 \(or 0",
    ):
        runs.run(cfg)


def test_auto_forward_batch_adopts_the_stores(complete, monkeypatch):
    _no_model(monkeypatch)
    cfg = _on(complete, **{"extract.forward_batch": 0})
    assert jobs.prepare(cfg).cfg.extract.forward_batch == 8
    assert runs.run(cfg)["chunks_already_done"] == 8


def test_auto_forward_batch_wastes_little():
    # the case: 18 images x 2 t = 36 rows -> 2 calls of 18 (32 would pad 28 rows)
    assert jobs.auto_forward_batch({"train": 18}, 64, 512, 2, None) == 18
    assert jobs.auto_forward_batch({"train": 1437, "val": 360}, 64, 512, 6, None) == 32  # the embedded default
    assert jobs.auto_forward_batch({"train": 10**6}, 64, 512, 3, None) == 32  # 192 rows: 6 calls of 32
    assert jobs.auto_forward_batch({"train": 5}, 64, 512, 1, None) == 5
    assert jobs.auto_forward_batch({"train": 50}, 64, 512, 1, None) == 25  # 2 calls of 25, not 32 + 18
    assert jobs.auto_forward_batch({"a": 9}, 64, 512, 2, {"fingerprints": {"compute": {"forward_batch": 7}}}) == 7


def test_the_lock_is_taken_before_the_model_is_loaded(complete, monkeypatch):
    kw = writer_kwargs(complete.store.path, 8)
    more = _on(complete, **{"extract.blocks": "3,8"})
    _no_model(monkeypatch)
    with StoreWriter.create(complete.store.path, **kw):
        with pytest.raises(StoreLocked, match="another `extract run` is writing this store"):
            runs.run(more)


def test_rate_is_never_rounded_to_zero():
    assert rate_text(30, 10, "images") == "3 images/s"
    assert rate_text(1, 50, "forwards") == "1.2 forwards/min"  # 0.02/s
    assert rate_text(1, 3600 * 2, "images") == "0.5 images/h"
    assert rate_text(0, 10, "images") == "- images/s"


def test_eta_from_the_first_call():
    assert eta_seconds(0, 100, 5.0) is None
    assert eta_seconds(2, 34, 60.0) == 34 * 30.0
    assert clock(None) == "-:--:--" and clock(3723) == "1:02:03"


def test_the_bar_moves_per_call_with_an_eta():
    now = [100.0]
    bar = BarReporter(console=None, disable=True, now=lambda: now[0])
    bar.start(None, Totals(images=18, forwards=36, chunks=1))
    assert bar.text() == "images 0/18, forwards 0/36, chunks 0/1, - forwards/s, ETA -:--:--"
    now[0] += 120.0
    bar.advance(0, 2)  # the first U-Net call: 2 real rows in 2 minutes
    assert bar.text() == "images 0/18, forwards 2/36, chunks 0/1, 1 forwards/min, ETA 0:34:00"
    bar.advance(1, 0)
    bar.chunks(1, 1)
    assert bar.text().startswith("images 1/18, forwards 2/36, chunks 1/1")
    bar.stop()
