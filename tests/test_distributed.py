"""Distributed extraction on dask.distributed: the same store as one process, worker death,
an existing scheduler on loopback, rewrites, and one-line errors.

Every comparison is against a single-process run with the same torch thread count (1): on
CPU the bits of a matmul depend on how many threads split it (measured: 1 vs 2 threads
differ), never on which process or worker ran it.
"""

import json
import os
import shutil
import signal
import socket
import threading
import time

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from diffprobe.extract import job as jobs
from diffprobe.extract.cli import app
from diffprobe.extract.extraction import PAUSE_FILE, SIGKILL_FILE, ChunkWork, extract_chunks
from diffprobe.extract.report import Recorder, Totals
from diffprobe.extract.run import run as extract_run

from .conftest import small_config, writer_kwargs

distributed = pytest.importorskip("distributed")

runner = CliRunner()
N_CHUNKS = 10  # 20 train + 20 val images in chunks of 4


def _cfg(tmp_path, name, **over):
    return small_config(
        tmp_path,
        name,
        **{
            "data.max_per_class": 2,
            "store.chunk_images": 4,
            "extract.threads": 1,
            "extract.threads_per_worker": 1,
            **over,
        },
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One single-process run (1 torch thread); the thread count of the session is restored."""
    before = torch.get_num_threads()
    cfg = _cfg(tmp_path_factory.mktemp("ref"), "ref.zarr")
    try:
        result = extract_run(cfg)
    finally:
        torch.set_num_threads(before)
    assert result["chunks_written"] == N_CHUNKS
    return cfg


def _store_contents(path) -> dict:
    """sha256 of every array of every split (features, done records, skipped, labels, ids) and of
    the completion-record column names: what two identical stores share bit for bit."""
    from diffprobe.store.feature_store import open_store

    return open_store(path).contents()


def _assert_identical(a, b):
    ca, cb = _store_contents(a), _store_contents(b)
    assert ca.keys() == cb.keys()
    features = [k for k in ca if k.split("/")[1].startswith("t")]
    assert len(features) == 2 * 4 * 2 - 2  # 4 blocks x 2 pools per split; block 16 is 1x1
    for k in ca:
        assert ca[k] == cb[k], k
    done = np.asarray(zarr.open_group(str(b), mode="r")["train/done"][:])
    assert done.shape == (5, 7) and done.all()  # every (chunk, array) record of the split is there


@pytest.fixture(scope="module")
def cluster():
    """A dask cluster the test starts itself on loopback: a scheduler and 2 worker processes
    (started as `extract run --workers` starts its own: see extract.dask_client._local_cluster)."""
    import dask

    saved = dict(os.environ)  # the nannies write their workers' variables into this process's too
    environ = {"OMP_NUM_THREADS": 1, "MALLOC_TRIM_THRESHOLD_": None}
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
            c = distributed.LocalCluster(
                n_workers=2,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
                silence_logs=50,
            )
        with c, distributed.Client(c, set_as_default=False) as client:
            yield c.scheduler_address, client
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_two_local_workers_write_the_single_process_store(reference, tmp_path):
    cfg = _cfg(tmp_path, "w2.zarr", **{"extract.workers": 2})
    environ = dict(os.environ)
    report = Recorder()
    result = extract_run(cfg, report)
    assert result["chunks_written"] == N_CHUNKS and result["chunks_already_done"] == 0 and result["workers"] == 2
    assert report.totals == Totals(images=40, forwards=40, chunks=N_CHUNKS)
    assert sum(i for i, _ in report.advances) == 40 and sum(f for _, f in report.advances) == 40
    assert report.chunk_counts == [(i, N_CHUNKS) for i in range(1, N_CHUNKS + 1)]
    assert report.lines and report.lines[0].startswith("local cluster of 2 worker processes")
    assert dict(os.environ) == environ  # what the nannies wrote into this process's environment is undone
    _assert_identical(reference.store.path, cfg.store.path)
    run = zarr.open_group(cfg.store.path, mode="r").attrs["runs"][-1]
    assert len(run["workers"]) == 2 and {w["torch_threads"] for w in run["workers"]} == {1}
    assert len({w["address"] for w in run["workers"]}) == 2
    # the lock is released, and says no run owns the store any more
    from diffprobe.store.feature_store import lock_path

    assert os.path.getsize(lock_path(cfg.store.path)) == 0


def test_scheduler_on_loopback_through_the_cli(cluster, reference, tmp_path):
    address, _ = cluster
    cfg = _cfg(tmp_path, "sched.zarr")
    toml = tmp_path / "s.toml"
    toml.write_text(
        '[data]\nmax_per_class = 2\n[extract]\nblocks = "3,8,16,24"\ntimesteps = [90]\nforward_batch = 8\n'
        f'batch_size = 8\ndevice = "cpu"\nthreads_per_worker = 1\n[store]\nchunk_images = 4\n'
        f'path = "{cfg.store.path}"\n'
    )
    r = runner.invoke(app, ["run", "--config", str(toml), "--scheduler", address, "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["chunks_written"] == N_CHUNKS and out["workers"] == 2 and out["cluster"] == f"scheduler {address}"
    _assert_identical(reference.store.path, cfg.store.path)


def test_a_worker_that_cannot_load_the_model_is_a_one_line_error(cluster, tmp_path):
    address, client = cluster
    toml = tmp_path / "b.toml"
    toml.write_text(f'[model]\ncheckpoint = "{tmp_path / "nope.pt"}"\n[store]\npath = "{tmp_path / "b.zarr"}"\n')
    r = runner.invoke(app, ["run", "--config", str(toml), "--scheduler", address])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert lines[-1].startswith(f"error: model.checkpoint: no such file '{tmp_path / 'nope.pt'}'"), r.output
    assert "Traceback" not in r.output and not (tmp_path / "b.zarr").exists()
    assert not client.run(lambda dask_worker: [n for n in dask_worker.plugins if n.startswith("diffprobe")])[
        next(iter(client.scheduler_info()["workers"]))
    ]  # the failed plugin was taken back


def test_a_worker_killed_mid_run_leaves_the_store_complete_and_identical(cluster, reference, tmp_path):
    """The worker that writes train chunk 1's completion record SIGKILLs itself right after it
    (extract.extraction.SIGKILL_FILE), before its task returns: dask reruns that chunk elsewhere."""
    address, client = cluster
    pids = client.run(os.getpid)
    trigger = tmp_path / "kill-at"
    trigger.write_text("train/1")
    client.run(lambda: os.environ.__setitem__(SIGKILL_FILE, str(trigger)))  # the restarted worker lacks it
    try:
        result = extract_run(_cfg(tmp_path, "kill.zarr", **{"extract.scheduler": address}))
    finally:
        client.run(lambda: os.environ.pop(SIGKILL_FILE, None))
    assert not trigger.exists(), "no worker reached the kill"
    assert result["chunks_written"] == N_CHUNKS
    _assert_identical(reference.store.path, tmp_path / "kill.zarr")
    client.wait_for_workers(2, timeout=60)  # the nanny restarted the killed worker
    assert len(set(pids.values()) - set(client.run(os.getpid).values())) == 1  # exactly one was killed


def test_a_chunk_written_twice_keeps_every_byte(reference, tmp_path):
    """What a retry or a stolen task that ran twice does: rewrite a complete chunk."""
    path = tmp_path / "twice.zarr"
    shutil.copytree(reference.store.path, path)
    cfg = _cfg(tmp_path, "twice.zarr")
    job = jobs.prepare(cfg)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, sha = jobs.load_model(job, torch.device("cpu"))
        with jobs.open_writer(job, sha, torch.device("cpu"), 1) as writer:
            arrays = tuple((a.key, a.shape[1:]) for a in job.plan.arrays if a.split == "train")
            files = [path / "train" / k.name / "c" / "1" / "0" / "0" / "0" for k, _ in arrays]  # schema 2 layout
            old = {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in files}
            time.sleep(0.01)
            work = ChunkWork("train", 1, 4, 8, arrays, "float16", (), True)
            settings = jobs.compute_settings(cfg, torch.device("cpu"))
            assert extract_chunks(model, job.diffusion, job.source, [work], writer, settings) == 0
    finally:
        torch.set_num_threads(before)
    for f, (data, mtime) in old.items():
        assert f.stat().st_mtime_ns != mtime, f"{f} was not rewritten"
        assert f.read_bytes() == data, f
    _assert_identical(reference.store.path, path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--scheduler", "tcp://127.0.0.1:{port}"],
            r"^error: extract\.scheduler: cannot reach a dask scheduler at tcp://127\.0\.0\.1:{port} \(connection refused\); ",
        ),
        (["--scheduler", "no-port-here"], r"^error: extract\.scheduler: 'no-port-here' is not a scheduler address; "),
        (
            ["--scheduler", "tcp://127.0.0.1:{port}", "--workers", "2"],
            r"^error: extract\.workers = 2 and extract\.scheduler = 'tcp://127\.0\.0\.1:{port}': give one of them",
        ),
        (
            ["--workers", "2", "--device", "cuda:1"],
            r"^error: extract\.device: 'cuda:1' names one GPU, but extract\.workers = 2",
        ),
        pytest.param(
            ["--workers", "2", "--device", "cuda"],
            r"^error: extract\.device: 'cuda' requested but this torch sees no CUDA device",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU"),
        ),
    ],
)
def test_cluster_errors_are_one_line_exit_2(tmp_path, args, message):
    import re

    port = _free_port()
    cfg = tmp_path / "e.toml"
    cfg.write_text(f'[store]\npath = "{tmp_path / "e.zarr"}"\n')
    r = runner.invoke(app, ["run", "--config", str(cfg), *[a.format(port=port) for a in args]])
    assert r.exit_code == 2, r.output
    assert len(r.output.strip().splitlines()) == 1 and re.match(message.format(port=port), r.output.strip()), r.output
    assert not (tmp_path / "e.zarr").exists()  # nothing written


def test_scheduler_lost_mid_run_is_one_line_and_a_rerun_resumes(reference, tmp_path, monkeypatch):
    """A scheduler process SIGKILLed mid-run, while the worker (in this process: cheap to start)
    holds train chunk 3 just after its completion records (extract.extraction.PAUSE_FILE)."""
    import asyncio
    import subprocess
    import sys

    from diffprobe.extract.dask_worker import ClusterError

    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distributed.cli.dask_scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-dashboard",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stop = threading.Event()

    def worker():
        async def main():
            async with distributed.Worker(address, nthreads=1, host="127.0.0.1", silence_logs=50):
                while not stop.is_set():
                    await asyncio.sleep(0.05)

        asyncio.run(main())

    pause = tmp_path / "pause-at"
    pause.write_text("train/3")
    reached = tmp_path / "pause-at.reached"
    monkeypatch.setenv(PAUSE_FILE, str(pause))
    before = torch.get_num_threads()
    worker_thread = threading.Thread(target=worker, daemon=True)
    cfg = _cfg(tmp_path, "lost.zarr", **{"extract.scheduler": address, "store.chunk_images": 2})
    report = Recorder()
    failure = []
    run_thread = threading.Thread(target=lambda: _catch(failure, extract_run, cfg, report))

    def wait_for(event, what: str, seconds: float = 120) -> None:
        deadline = time.monotonic() + seconds
        while not event():
            assert time.monotonic() < deadline and run_thread.is_alive(), (what, failure)
            time.sleep(0.01)

    try:
        deadline = time.time() + 30
        while time.time() < deadline:  # the scheduler is up once it accepts connections
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        worker_thread.start()
        run_thread.start()
        # one worker thread runs one chunk at a time, its task returning after the chunk's records:
        # while it holds train/3, the chunks complete are train/3 and those whose tasks returned
        wait_for(reached.exists, "the worker to hold train/3")
        complete = _complete_chunks(cfg.store.path)
        n = len(complete["train"]) + len(complete["val"])
        assert 3 in complete["train"] and n < 20, complete
        wait_for(lambda: report.chunk_counts == [(i, 20) for i in range(1, n)], "the run to see the others")
        scheduler.send_signal(signal.SIGKILL)
        scheduler.wait(30)
        run_thread.join(60)  # the run ends (and lets go of the store) before the worker goes on
        assert not run_thread.is_alive()
    finally:
        scheduler.kill()
        pause.unlink(missing_ok=True)  # the worker goes on: its writes now find the store not held
        stop.set()
        worker_thread.join(30)
        torch.set_num_threads(before)
    assert len(failure) == 1 and isinstance(failure[0], ClusterError), failure
    message = str(failure[0])
    assert "\n" not in message and message.startswith(f"lost the dask scheduler (scheduler {address}) mid-run")
    assert message.endswith(f"; {n - 1}/20 chunks complete; `extract run` again resumes from the completion records")
    assert _complete_chunks(cfg.store.path) == complete  # nothing written after the kill
    # again, without a cluster: the complete chunks are kept, the rest computed
    monkeypatch.delenv(PAUSE_FILE)
    try:
        again = extract_run(_cfg(tmp_path, "lost.zarr", **{"store.chunk_images": 2}))
    finally:
        torch.set_num_threads(before)
    assert again["chunks_already_done"] == n and again["chunks_written"] == 20 - n
    ca, cb = _store_contents(reference.store.path), _store_contents(cfg.store.path)
    same = [k for k in ca if not k.endswith("/done")]  # chunking differs (2 vs 4): the records' shape
    assert ca.keys() == cb.keys() and len(same) == 2 * 4 + 2 * 4 * 2 - 2  # 4 per split + the features
    assert {k: ca[k] for k in same} == {k: cb[k] for k in same}
    assert _complete_chunks(cfg.store.path) == {"train": list(range(10)), "val": list(range(10))}


def _complete_chunks(path) -> dict[str, list[int]]:
    """Per split, the chunks whose every completion record is set, read from the Zarr arrays."""
    group = zarr.open_group(str(path), mode="r")
    return {
        split: np.flatnonzero(np.asarray(group[f"{split}/done"][:]).all(axis=1)).tolist() for split in ("train", "val")
    }


def _catch(failure, fn, *args):
    try:
        fn(*args)
    except BaseException as e:
        failure.append(e)


def test_workers_write_only_while_their_run_holds_the_store(reference, tmp_path):
    from diffprobe.store.errors import StoreLocked
    from diffprobe.store.feature_store import FeatureKey, StoreWriter, open_store

    path = tmp_path / "owned.zarr"
    shutil.copytree(reference.store.path, path)
    s = open_store(path)
    kw = writer_kwargs(path, 4)
    key = FeatureKey(90, 3, 1)
    data = {key: s.features("train", 3, 90, 1)[:4]}
    with StoreWriter.create(path, **kw) as client:
        assert client.owner.startswith(f"pid {os.getpid()} on ") and ", run " in client.owner
        worker = StoreWriter.attach(path, client.owner)
        worker.write_chunk("train", 0, data)  # same bytes: allowed while the run holds the store
        with pytest.raises(StoreLocked, match="no longer holds the store"):
            StoreWriter.attach(path, "pid 1 on elsewhere, run 0000")
    with pytest.raises(StoreLocked, match=r"no longer holds the store \(now: nobody\); not writing"):
        worker.write_chunk("train", 0, data)  # the run ended: a late task writes nothing
    with StoreWriter.create(path, **kw):
        with pytest.raises(StoreLocked, match="no longer holds the store"):
            worker.write_chunk("train", 0, data)  # another run owns it now
    _assert_identical(reference.store.path, path)


def test_threads_and_gpus_per_local_worker(monkeypatch):
    from diffprobe.extract.dask_client import _gpu_ids, local_threads

    cores = len(os.sched_getaffinity(0))
    assert local_threads(1, 0) == cores and local_threads(2, 0) == max(1, cores // 2) and local_threads(2, 3) == 3
    assert local_threads(10 * cores, 0) == 1
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert _gpu_ids(2) == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # a subset chosen by the user: worker i gets the i-th
    assert _gpu_ids(2) == ["3", "5"]


def test_a_locked_store_is_refused_before_any_worker_starts(reference, tmp_path, monkeypatch):
    from diffprobe.extract import dask_client
    from diffprobe.store.errors import StoreLocked
    from diffprobe.store.feature_store import StoreWriter, check_unlocked

    path = tmp_path / "held.zarr"
    shutil.copytree(reference.store.path, path)
    check_unlocked(path)  # nobody holds it: nothing to say
    cfg = _cfg(tmp_path, "held", **{"store.path": str(path), "extract.workers": 2})
    started = []
    monkeypatch.setattr(dask_client, "connect", lambda cfg: started.append(cfg))  # a cluster: workers load the U-Net
    with StoreWriter.create(path, **writer_kwargs(path, 4)) as other:
        with pytest.raises(StoreLocked, match=rf"another `extract run` is writing this store \({other.owner}\)"):
            dask_client.run_distributed(jobs.prepare(cfg))
    assert not started
    check_unlocked(path)  # released
