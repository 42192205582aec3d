"""store/feature_store.py: creation that is whole or absent (kills at every step and over the
creation window), clean resume after kills, the schema-2 layout that xarray opens, schema-1
stores still read and extended, and one-line refusals and write errors."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr

from diffprobe.store import feature_store as fs
from diffprobe.store.errors import FingerprintMismatch, StoreError
from diffprobe.store.feature_store import FeatureKey, StoreWriter, lock_path, open_store

REPO = Path(__file__).resolve().parents[1]  # not from conftest: the killed children must not import torch

SPLITS = {"train": 20, "val": 6}  # val is smaller than a chunk: its feature chunks are capped at 6
CHUNK = 8
KEYS = {FeatureKey(90, 24, 2): 16, FeatureKey(90, 8, 1): 4, FeatureKey(150, 24, 2): 16}
BLOCKS = [{"number": b, "module": f"m{b}", "channels": 16 if b > 8 else 4, "spatial": 4} for b in range(1, 38)]
STEPS = ["locked", "root", "split train", "split val", "attributes", "renamed"]


def _splits():
    return {s: ([f"{s}/c{i % 3}/{i:03d}.png" for i in range(n)], np.arange(n) % 3) for s, n in SPLITS.items()}


def _fingerprints(**compute):
    return {"model": {"m": 1}, "preprocessing": {}, "noise": {"seed": 0}, "compute": compute, "dataset": {"d": 1}}


def _rows(key: FeatureKey, split: str, lo: int, hi: int) -> np.ndarray:
    c = KEYS[key]
    rng = np.random.default_rng([key.t, key.block, key.pool, SPLITS[split], lo])
    return rng.normal(size=(hi - lo, c, key.pool, key.pool)).astype(np.float16)


def _writer(path, cpu_threads: int = 1) -> StoreWriter:
    return StoreWriter.create(
        path,
        fingerprints=_fingerprints(cpu_threads=cpu_threads),
        provenance={},
        blocks=BLOCKS,
        class_names=["a", "b", "c"],
        splits=_splits(),
        chunk_images=CHUNK,
    )


def fill(path, hook=None) -> None:
    """Create (or resume) the test store and write every chunk still missing: what a run does."""
    fs.creation_hook = hook
    try:
        w = _writer(path)
    finally:
        fs.creation_hook = None
    with w:
        w.record_run({"run": 1})
        for split, n in SPLITS.items():
            w.ensure_arrays(split, KEYS, "float16", "none")
            masks = w.done_masks(split)
            for c in range(w.n_chunks(split)):
                lo, hi = c * CHUNK, min(n, (c + 1) * CHUNK)
                todo = {k: _rows(k, split, lo, hi) for k in KEYS if not masks[k][c]}
                if todo:
                    w.write_chunk(split, c, todo)


def _kill_self(at: str):
    def hook(step):
        if step == at:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


_CHILD = """
import sys, os
sys.path.insert(0, {repo!r})
from tests.test_feature_store import fill, _kill_self
at = sys.argv[2]
if at == "-":
    print("go", flush=True)
fill(sys.argv[1], None if at == "-" else _kill_self(at))
"""


def _child(path, at: str = "-", **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD.format(repo=str(REPO)), str(path), at],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kw,
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("ref") / "ref.zarr"
    fill(path)
    return open_store(path).contents()


def _assert_clean_and_equal(path: Path, reference: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # zarr's "Object at ... is not recognized" would fail here
        assert open_store(path).contents() == reference
        zarr.open_group(str(path), mode="r").members(max_depth=None)
    leftovers = [p for p in path.rglob("*") if p.name.endswith(".partial")]
    assert not leftovers and not list(path.parent.glob(f".{path.name}.creating-*"))
    assert lock_path(path).is_file() and not (path / ".lock").exists()  # the lock is outside the Zarr tree


@pytest.mark.parametrize("step", STEPS)
def test_a_kill_at_each_step_of_creation_resumes_to_the_same_store(tmp_path, reference, step):
    path = tmp_path / "s.zarr"
    proc = _child(path, step)
    assert proc.wait(timeout=60) == -signal.SIGKILL, proc.stderr.read().decode()
    if step == "locked":  # nothing made but the lock beside it
        with pytest.raises(StoreError, match=r"no diffprobe store here \(run `extract run --store"):
            open_store(path)
    elif step != "renamed":  # before the rename there is no store, and status says what there is
        assert not path.exists()
        with pytest.raises(
            StoreError, match=r"no complete diffprobe store here, only a creation cut off .*extract run"
        ):
            open_store(path)
    fill(path)
    _assert_clean_and_equal(path, reference)


@pytest.mark.slow
def test_kills_over_the_whole_creation_window_resume_to_the_same_store(tmp_path, reference):
    """A real SIGKILL after N ms, N over the whole time from the start of creation to the last
    chunk; whatever the kill left, the next run ends with the same bits and no leftovers."""
    timed = _child(tmp_path / "timed.zarr")
    assert timed.stdout.readline() == b"go\n"
    start = time.perf_counter()
    assert timed.wait(timeout=60) == 0
    window = time.perf_counter() - start
    outcomes = set()
    for i, ms in enumerate(np.linspace(0, 1000 * window, 12)):
        path = tmp_path / f"k{i}.zarr"
        proc = _child(path)
        assert proc.stdout.readline() == b"go\n"
        time.sleep(ms / 1000)
        proc.send_signal(signal.SIGKILL)
        outcomes.add(proc.wait(timeout=60))
        fill(path)
        _assert_clean_and_equal(path, reference)
    assert -signal.SIGKILL in outcomes  # at least some kills landed mid-run


def test_leftovers_of_killed_writes_are_removed_on_resume(tmp_path, reference):
    path = tmp_path / "s.zarr"
    fill(path)
    g = zarr.open_group(str(path / "train"), mode="r+")
    col = g.attrs["done_columns"].index("t90_b24_p2")
    g["done"][1, col] = 0  # chunk 1 of that array was in flight when the run was killed
    chunk_dir = path / "train" / "t90_b24_p2" / "c" / "1" / "0" / "0"
    planted = [
        chunk_dir / f"0.{'a' * 32}.partial",  # a chunk write in flight
        path / f"zarr.{'b' * 32}.partial",  # an attributes update in flight
        path / "val" / "skipped" / f"zarr.{'c' * 32}.partial",
    ]
    for p in planted:
        p.write_bytes(b"x" * 100)
    half = path / "train" / "t300_b24_p2"  # an array whose creation was cut off: no metadata yet
    half.mkdir()
    (half / f"zarr.{'d' * 32}.partial").write_text("{")
    complete = path / "train" / "t90_b8_p1" / "c" / "0" / "0" / "0"
    kept = complete.with_name(f"0.{'e' * 32}.partial")  # under a complete chunk: never listed, so kept
    kept.write_bytes(b"y")
    fill(path)
    assert not any(p.exists() for p in planted) and not half.exists()
    kept.unlink()
    _assert_clean_and_equal(path, reference)


def test_a_creation_cut_off_by_an_earlier_version_is_finished_anything_else_refused(tmp_path, reference):
    old = tmp_path / "old.zarr"  # what an in-place creation killed in its first milliseconds left
    old.mkdir()
    (old / ".lock").write_text("pid 1 on host, run 0")
    (old / f"zarr.{'f' * 32}.partial").write_text("{")
    with pytest.raises(StoreError, match="no complete diffprobe store here, only a creation cut off"):
        open_store(old)
    fill(old)
    assert open_store(old).contents() == reference and not (old / ".lock").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / ".lock").write_text("")
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(StoreError, match="exists and is not a diffprobe store; pick a new or empty path"):
        fill(other)
    assert (other / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    fill(empty)
    assert open_store(empty).contents() == reference


def test_xarray_opens_a_split_and_selects_by_label(tmp_path):
    xr = pytest.importorskip("xarray")
    path = tmp_path / "s.zarr"
    fill(path)
    s = open_store(path)
    ds = xr.open_zarr(path, group="train", chunks=None, consolidated=False)  # numpy-backed, lazy
    assert list(ds.image.values) == list(s.ids("train"))
    assert set(ds.coords) == {"image", "label", "skipped"}
    x = ds["t90_b24_p2"]
    assert x.dims == ("image", "channel16", "y2", "x2")
    assert x.attrs == {"t": 90, "block": 24, "pool": 2, "module": "m24"}
    picked = x.sel(image=ds.image[ds.label == 2])
    want = s.features("train", 24, 90, 2)[s.labels("train") == 2]
    assert picked.shape == want.shape and np.array_equal(picked.values.astype(np.float16), want)
    one = x.sel(image="train/c1/004.png").values
    assert np.array_equal(one, s.features("train", 24, 90, 2)[4])
    assert ds["t90_b8_p1"].dims == ("image", "channel4", "y1", "x1")
    tree = xr.open_datatree(path, engine="zarr", chunks=None, consolidated=False)  # the whole store, every split
    assert set(tree.children) == {"train", "val"}


def test_feature_chunks_are_capped_at_the_split_size(tmp_path):
    path = tmp_path / "s.zarr"
    fill(path)
    val = zarr.open_group(str(path / "val"), mode="r")
    assert val["t90_b24_p2"].chunks == (6, 16, 2, 2) and val["t90_b24_p2"].shape == (6, 16, 2, 2)
    assert zarr.open_group(str(path / "train"), mode="r")["t90_b24_p2"].chunks == (CHUNK, 16, 2, 2)


def _write_schema_1(path: Path) -> None:
    """A store as schema version 1 laid it out (ids, labels, features/ subgroup, lock inside)."""
    root = zarr.create_group(
        str(path),
        attributes={
            "schema": "diffprobe-features",
            "schema_version": 1,
            "initialized": True,
            "fingerprints": _fingerprints(cpu_threads=1),
            "provenance": {},
            "blocks": BLOCKS,
            "class_names": ["a", "b", "c"],
            "splits": list(SPLITS),
        },
    )
    (path / ".lock").write_text("")
    for split, (ids, labels) in _splits().items():
        n = len(ids)
        g = root.create_group(split, attributes={"n_images": n, "chunk_images": CHUNK})
        g.create_array("labels", shape=(n,), chunks=(min(CHUNK, n),), dtype="int64")[:] = labels
        g.create_array("ids", shape=(n,), chunks=(min(CHUNK, n),), dtype=str)[:] = np.asarray(ids)
        g.create_array("skipped", shape=(n,), chunks=(min(CHUNK, n),), dtype="bool", fill_value=False)
        g.create_group("features")
        g.create_array("done", shape=(-(-n // CHUNK), 0), chunks=(1, 1024), dtype="uint8", fill_value=0)


def test_a_schema_1_store_is_read_and_extended_in_its_own_layout(tmp_path, reference):
    path = tmp_path / "v1.zarr"
    _write_schema_1(path)
    fill(path)
    s = open_store(path)
    assert s.schema_version == 1 and s.contents() == reference
    g = zarr.open_group(str(path / "val"), mode="r")
    assert "t90_b24_p2" in g["features"] and g["features"]["t90_b24_p2"].chunks == (CHUNK, 16, 2, 2)
    assert s.describe_holdings("train") == "block 8 at t 90, pool 1; block 24 at t 90,150, pool 2"


def test_fingerprint_refusals_name_the_setting_that_fixes_them(tmp_path):
    path = tmp_path / "s.zarr"
    fill(path)
    kw = dict(provenance={}, blocks=BLOCKS, class_names=["a", "b", "c"], chunk_images=CHUNK)
    with pytest.raises(
        FingerprintMismatch,
        match=r"compute.cpu_threads: store has 1, this run has 2; set extract.threads = 1 to continue this store$",
    ):
        StoreWriter.create(path, fingerprints=_fingerprints(cpu_threads=2), splits=_splits(), **kw)
    splits = _splits()
    ids, labels = splits["train"]
    splits["train"] = (ids[:4] + ids[5:] + ["train/c0/new.png"], np.append(np.delete(labels, 4), 0))
    dataset = _fingerprints(cpu_threads=1) | {"dataset": {"d": 2}}
    with pytest.raises(
        FingerprintMismatch,
        match=r"different dataset: split 'train': 1 image removed \(train/c1/004.png\); 1 image added "
        r"\(train/c0/new.png\)$",
    ):
        StoreWriter.create(path, fingerprints=dataset, splits=splits, **kw)


def test_a_bad_codec_is_named():
    with pytest.raises(StoreError, match=r"store.codec: unknown codec 'lz9'; allowed: 'none', 'zstd', 'blosc-lz4'"):
        fs._codecs("lz9")


def test_a_full_disk_is_one_line_naming_path_need_and_what_is_kept(tmp_path):
    from .places import tiny_filesystem

    with tiny_filesystem(tmp_path / "small", megabytes=1) as small:
        path = small / "s.zarr"
        fill(path)  # the skeleton and the small arrays fit
        big = {FeatureKey(90, 30, 4): 16}
        with _writer(path) as w:
            w.ensure_arrays("train", big, "float32", "none")
            filler = small / "filler"
            with pytest.raises(OSError):
                with open(filler, "wb") as f:  # take what space is left
                    while True:
                        f.write(b"\0" * 65536)
            with pytest.raises(StoreError) as e:
                for c in range(3):
                    w.write_chunk("train", c, {k: np.ones((CHUNK, 16, 4, 4), np.float32) for k in big})
        msg = str(e.value)
        assert "\n" not in msg and "No space left on device" in msg
        assert "the run still needs about" in msg and "completed chunks are kept" in msg
        assert f"run `extract run --store {path}` again to continue" in msg
        filler.unlink()
        assert open_store(path).contents().keys() >= {"train/t90_b24_p2"}  # what was complete still reads


def test_status_of_a_missing_store_says_how_to_make_it(tmp_path):
    with pytest.raises(StoreError, match=r"no diffprobe store here \(run `extract run --store"):
        open_store(tmp_path / "none.zarr")


def test_contents_differ_when_one_bit_does(tmp_path, reference):
    path = tmp_path / "s.zarr"
    fill(path)
    arr = zarr.open_array(str(path / "val" / "t90_b8_p1"), mode="r+")
    x = arr[:]
    x.view(np.uint16)[0, 0, 0, 0] ^= 1
    arr[:] = x
    changed = open_store(path).contents()
    assert [k for k in reference if changed[k] != reference[k]] == ["val/t90_b8_p1"]


def test_lock_path_is_beside_the_store():
    assert lock_path("runs/a.zarr") == Path("runs/a.zarr.lock")


def test_a_full_disk_during_creation_is_one_line_and_leaves_nothing(tmp_path):
    from .places import tiny_filesystem

    with tiny_filesystem(tmp_path / "small", megabytes=1) as small:
        with pytest.raises(OSError):
            with open(small / "filler", "wb") as f:  # the disk fills up during the store's creation
                while True:
                    f.write(b"\0" * 4096)
        os.truncate(small / "filler", os.path.getsize(small / "filler") - 3 * 4096)  # the lock and a file or two
        path = small / "s.zarr"
        with pytest.raises(StoreError, match=r"cannot write \(No space left on device\); the store was not created"):
            fill(path)
        assert not path.exists() and not list(small.glob(".s.zarr.creating-*"))
        (small / "filler").unlink()
        fill(path)  # space freed: the same command makes the store
        assert open_store(path).n_images("train") == SPLITS["train"]


def test_a_thread_count_refusal_names_the_workers_the_store_was_made_with(tmp_path):
    path = tmp_path / "s.zarr"
    with _writer(path) as w:
        w.record_run({"workers": [{"torch_threads": 1}, {"torch_threads": 1}]})
    with pytest.raises(FingerprintMismatch, match=r"set extract.threads = 1 \(or --workers 2, as the store was made\)"):
        _writer(path, cpu_threads=2)


def _synthetic(tmp_path, codec: str):
    from diffprobe.store.synthetic import write_synthetic_store

    key = FeatureKey(90, 24, 2)
    x = np.random.default_rng(0).normal(size=(100, 3, 2, 2)).astype(np.float16)  # chunks of 16: the last 4 rows
    path = write_synthetic_store(
        tmp_path / f"{codec}.zarr", {"train": {key: x}}, {"train": np.zeros(100, int)}, chunk_images=16, codec=codec
    )
    return open_store(path).feature_array("train", 24, 90, 2)


def test_read_rows_reads_chunk_files_as_zarr_does(tmp_path):
    arr = _synthetic(tmp_path, "none")
    for lo in range(0, 100, 16):
        hi = min(lo + 16, 100)
        assert fs._chunk_file(arr, lo, hi) is not None  # the fast path, not Zarr
        assert fs.read_rows(arr, lo, hi).tobytes() == np.asarray(arr[lo:hi]).tobytes()
    assert fs.read_rows(arr, 96, 100).shape == (4, 3, 2, 2)
    assert fs._chunk_file(arr, 8, 24) is None and fs._chunk_file(arr, 16, 31) is None  # not one chunk
    assert fs.read_rows(arr, 8, 24).tobytes() == np.asarray(arr[8:24]).tobytes()
    fs._chunk_file(arr, 32, 48).unlink()  # a missing chunk: the fill value (NaN), as Zarr reads it
    got = fs.read_rows(arr, 32, 48)
    assert np.isnan(got).all() and got.tobytes() == np.asarray(arr[32:48]).tobytes()


def test_read_rows_into_out_with_each_seeing_every_row_once(tmp_path, monkeypatch):
    """``out``: filled in place (a contiguous one read into straight, a strided one too); ``each``:
    every row once, in order, a few rows at a time while read from a chunk file (an edge chunk
    too), once through Zarr and once for a missing chunk's fill value."""
    arr = _synthetic(tmp_path, "none")
    monkeypatch.setattr(fs, "SEGMENT", 3 * 3 * 2 * 2 * 2 - 1)  # two rows a segment (whole rows, at least one)

    def seen(lo, hi, out=None):
        calls = []
        got = fs.read_rows(arr, lo, hi, out=out, each=lambda x, at: calls.append((at, x.copy())))
        assert [at for at, _ in calls] == list(np.cumsum([0] + [len(x) for _, x in calls])[:-1])
        assert np.concatenate([x for _, x in calls]).tobytes() == got.tobytes()
        return got, calls

    for lo, hi in [(0, 16), (96, 100)]:
        out = np.empty((hi - lo, 3, 2, 2), np.float16)
        got, calls = seen(lo, hi, out)
        assert got is out and out.tobytes() == np.asarray(arr[lo:hi]).tobytes()
        assert {len(x) for _, x in calls} <= {1, 2} and len(calls) == -(-(hi - lo) // 2)
    strided = np.zeros((16, 2, 3, 2, 2), np.float16)
    got, _ = seen(16, 32, strided[:, 1])
    assert (strided[:, 1] == arr[16:32]).all() and not strided[:, 0].any()
    assert len(seen(8, 24)[1]) == 1  # not one chunk: through Zarr, seen once
    fs._chunk_file(arr, 32, 48).unlink()
    got, calls = seen(32, 48)
    assert np.isnan(got).all() and len(calls) == 1


def test_read_rows_of_some_rows_reads_only_those(tmp_path, monkeypatch):
    """``keep``: those rows of the chunk, in order, read run by run from the chunk file (the
    bytes read are the kept rows' alone), through Zarr for a compressed array, the fill value
    for a missing chunk; ``each`` sees each kept row once."""
    arr = _synthetic(tmp_path, "none")
    keep = np.array([0, 1, 2, 5, 9, 10, 15])
    want = np.asarray(arr[0:16])[keep]
    read: list[int] = []

    class Counted(io.FileIO):  # the chunk file, its reads counted
        def readinto(self, b):
            read.append(len(b))
            return super().readinto(b)

    monkeypatch.setattr(fs, "open", lambda path, mode, buffering: Counted(path, "r"), raising=False)
    calls = []
    got = fs.read_rows(arr, 0, 16, keep=keep, each=lambda x, at: calls.append((at, len(x))))
    monkeypatch.undo()
    assert got.tobytes() == want.tobytes() and sum(read) == want.nbytes and len(read) == 4  # 4 runs
    assert [at for at, _ in calls] == [0, 3, 4, 6] and sum(k for _, k in calls) == len(keep)
    out = np.zeros((len(keep), 2, 3, 2, 2), np.float16)
    fs.read_rows(arr, 0, 16, out=out[:, 1], keep=keep)  # a strided out
    assert (out[:, 1] == want).all() and not out[:, 0].any()
    edge = fs.read_rows(arr, 96, 100, keep=np.array([1, 3]))
    assert edge.tobytes() == np.asarray(arr[96:100])[[1, 3]].tobytes()
    fs._chunk_file(arr, 16, 32).unlink()
    assert np.isnan(fs.read_rows(arr, 16, 32, keep=keep)).all()
    z = _synthetic(tmp_path / "z", "zstd")
    assert fs.read_rows(z, 0, 16, keep=keep).tobytes() == np.asarray(z[0:16])[keep].tobytes()


def test_read_rows_goes_through_zarr_for_compressed_arrays(tmp_path):
    arr = _synthetic(tmp_path, "zstd")
    assert fs._chunk_file(arr, 0, 16) is None
    for lo in range(0, 100, 16):
        assert fs.read_rows(arr, lo, min(lo + 16, 100)).tobytes() == np.asarray(arr[lo : lo + 16]).tobytes()


def _empty_pair(tmp_path, codec: str):
    """Two empty float16 arrays of 100 rows in chunks of 16, Zarr's `create_array` defaults else."""
    import zarr

    g = zarr.open_group(tmp_path / f"{codec}.zarr", mode="w")
    kw = {"compressors": None} if codec == "none" else {}
    return [
        g.create_array(name, shape=(100, 3, 2, 2), chunks=(16, 3, 2, 2), dtype="float16", fill_value=float("nan"), **kw)
        for name in ("zarr", "fast")
    ]


def test_write_rows_writes_the_chunk_files_zarr_writes(tmp_path):
    by_zarr, fast = _empty_pair(tmp_path, "none")
    x = np.random.default_rng(1).normal(size=(100, 3, 2, 2)).astype(np.float16)
    for lo in range(0, 100, 16):  # the last chunk is an edge chunk of 4 rows
        by_zarr[lo : lo + 16] = x[lo : lo + 16]
        assert fs._chunk_file(fast, lo, min(lo + 16, 100)) is not None  # the fast path, not Zarr
        fs.write_rows(fast, lo, x[lo : lo + 16])
        assert fs._chunk_file(fast, lo, min(lo + 16, 100)).read_bytes() == (
            fs._chunk_file(by_zarr, lo, min(lo + 16, 100)).read_bytes()
        )
    assert np.asarray(fast[:]).tobytes() == x.tobytes()
    assert not list(Path(fast.store.root).rglob("*.partial"))


def test_write_rows_goes_through_zarr_for_compressed_arrays_and_partial_rows(tmp_path):
    by_zarr, fast = _empty_pair(tmp_path, "zstd")
    x = np.ones((16, 3, 2, 2), np.float16)
    fs.write_rows(fast, 16, x)
    assert np.asarray(fast[16:32]).tobytes() == x.tobytes()
    plain, _ = _empty_pair(tmp_path / "p", "none")
    fs.write_rows(plain, 8, x[:8])  # rows 8-15: not a whole chunk, so Zarr keeps rows 0-7 as they are
    got = np.asarray(plain[:16])
    assert np.isnan(got[:8]).all() and (got[8:] == 1).all()


def test_write_rows_cut_off_leaves_no_chunk_and_only_a_partial_file_the_store_drops(tmp_path, monkeypatch):
    _, fast = _empty_pair(tmp_path, "none")
    temporary: list[Path] = []

    def full_disk(src, dst):
        temporary.append(Path(src))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fs.os, "replace", full_disk)
    with pytest.raises(OSError):
        fs.write_rows(fast, 0, np.ones((16, 3, 2, 2), np.float16))
    monkeypatch.undo()
    assert not fs._chunk_file(fast, 0, 16).exists()
    assert not list(Path(fast.store.root).rglob("*.partial"))  # removed on the way out
    (tmp,) = temporary
    assert tmp.parent == fs._chunk_file(fast, 0, 16).parent
    assert fs._PARTIAL.search(tmp.name)  # a kill before the rename leaves a name the store's clean-up removes
