"""`extract run` on dask.distributed, the client side: many worker processes, GPUs or machines, one store.

    extract run --workers 2                       # a local cluster of 2 worker processes
    extract run --scheduler tcp://10.0.0.5:8786   # an existing cluster (store on a shared filesystem)

How the work is split, and why the store ends bit-identical to a single-process run:

- A task is one whole image chunk of one split (`extract.extraction.ChunkWork`): every
  pending array of that chunk, its `skipped` entries and its row of completion records. Two
  tasks never touch the same file, so parallel Zarr writes cannot lose data (unaligned region
  writes do: zarr-python #3682, xarray #8371).
- Each worker loads the U-Net once, in a worker plugin (`ExtractorPlugin`), and keeps it for
  every task of the run; tasks on one worker run one at a time (the model's capture hooks and
  its device are per worker).
- The worker that computed a chunk writes its data and then its completion records
  (`extract.extraction.extract_chunks`, the loop the single-process run runs).
- The client holds the store's lock for the whole run; workers write through
  `StoreWriter.attach`, which refuses to write once the client's run no longer holds it.
- A worker killed mid-task: dask reruns the task elsewhere. The rerun rewrites the whole
  chunk; the features of an image depend only on (model, image, t, noise seed, device type,
  forward_batch), never on the worker, so a rewrite writes the same bytes (and Zarr's local
  store writes each chunk file atomically, by rename). A chunk written twice, by a retry or a
  task that outlived its worker's heartbeat, is therefore harmless.
- The scheduler lost: the run stops with one line, and `extract run` again resumes from the
  completion records.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import socket

import torch

from diffprobe.extract.dask_worker import ClusterError, ExtractorPlugin, _run_chunk
from diffprobe.extract.extraction import start_chunks
from diffprobe.extract.job import Job, open_writer
from diffprobe.extract.report import Reporter
from diffprobe.store.config import Config
from diffprobe.store.device import resolve_device
from diffprobe.store.errors import ConfigError, DiffprobeError
from diffprobe.store.feature_store import check_unlocked

WORKER_WAIT_S = 120  # how long a run waits for the first worker of an external cluster
CONNECT_TIMEOUT_S = 20  # how long it waits for a scheduler that does not refuse the connection


def check_scheduler_address(address: str) -> str:
    """A scheduler address dask accepts, checked before connecting: a refused TCP connection
    fails at once rather than after dask's connect timeout."""
    from distributed.comm.addressing import parse_address, parse_host_port

    bad = ConfigError(
        f"extract.scheduler: {address!r} is not a scheduler address; expected tcp://HOST:PORT (or tls://HOST:PORT)"
    )
    try:
        scheme, loc = parse_address(address if "://" in address else f"tcp://{address}")
        host, port = parse_host_port(loc)
    except (ValueError, TypeError):
        raise bad from None
    if not host or not port or scheme not in ("tcp", "tls", "ws", "wss", "ucx"):
        raise bad
    if scheme == "tcp":
        try:
            socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as e:
            why = "connection refused" if e.errno == errno.ECONNREFUSED else (e.strerror or str(e) or type(e).__name__)
            raise ClusterError(
                f"extract.scheduler: cannot reach a dask scheduler at {scheme}://{host}:{port} "
                f"({why}); start one or fix the address"
            ) from None
    return f"{scheme}://{host}:{port}"


def local_threads(workers: int, threads_per_worker: int) -> int:
    """Torch CPU threads per local worker: the setting, else this machine's cores shared out."""
    if threads_per_worker:
        return threads_per_worker
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // workers)


def _local_gpus(cfg: Config) -> int:
    """GPUs the local workers share out (0: CPU or MPS workers)."""
    device = cfg.extract.device
    if device == "cpu" or device == "mps":
        return 0
    if device.startswith("cuda:") and cfg.extract.workers > 1:
        raise ConfigError(
            f"extract.device: {device!r} names one GPU, but extract.workers = {cfg.extract.workers} "
            f"gives each worker its own GPU; use 'cuda' or 'auto'"
        )
    resolve_device(device)  # an explicit "cuda" on a machine without one is an error here
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _gpu_ids(count: int) -> list[str]:
    """The GPU ids this process sees, as CUDA_VISIBLE_DEVICES names them (it may hold a subset)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else []
    return ids[:count] if len(ids) >= count else [str(i) for i in range(count)]


@contextlib.contextmanager
def _local_cluster(cfg: Config, threads: int):
    """A local cluster of ``extract.workers`` processes on loopback; one GPU per worker on a
    CUDA machine (CUDA_VISIBLE_DEVICES); dask-cuda's LocalCUDACluster with cluster = "dask-cuda"."""
    import dask
    from distributed import Nanny, Scheduler, SpecCluster

    n = cfg.extract.workers
    dashboard = "127.0.0.1:0" if _has_bokeh() else None  # the dashboard needs bokeh
    common = dict(silence_logs=logging.CRITICAL)  # a lost worker is the client's to report, in one line
    # A nanny puts these in its worker's environment, and before spawning also in this
    # process's (undone below): the chosen threads, and no MALLOC_TRIM_THRESHOLD_ (see
    # _undo_malloc_trim).
    environ = {
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "OPENBLAS_NUM_THREADS": threads,
        "MALLOC_TRIM_THRESHOLD_": None,
    }
    saved_environ = dict(os.environ)
    cluster = None
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
            if cfg.extract.cluster == "dask-cuda":
                try:
                    from dask_cuda import LocalCUDACluster
                except ImportError:
                    raise ConfigError(
                        "extract.cluster: 'dask-cuda' needs the dask-cuda package; "
                        'pip install -e ".[cuda]" or use cluster = "local"'
                    ) from None
                cluster = LocalCUDACluster(
                    n_workers=n,
                    threads_per_worker=1,
                    host="127.0.0.1",
                    dashboard_address=dashboard,
                    memory_limit=0,
                    **common,
                )
            else:
                gpus = _local_gpus(cfg)
                if gpus and n > gpus:
                    raise ConfigError(
                        f"extract.workers: {n} workers but this machine has {gpus} GPU(s); "
                        f"one worker per GPU, so at most {gpus}"
                    )
                workers = {}
                for i in range(n):
                    # one GPU each; an explicit cuda:N (one worker) keeps every GPU visible and uses N
                    env = {"CUDA_VISIBLE_DEVICES": _gpu_ids(gpus)[i]} if gpus and ":" not in cfg.extract.device else {}
                    # nthreads 1: one chunk at a time. memory_limit 0: dask must not pause, spill
                    # or restart a worker for holding a model and a chunk.
                    workers[f"extract-{i}"] = {
                        "cls": Nanny,
                        "options": {"nthreads": 1, "memory_limit": 0, "env": env, "host": "127.0.0.1", **common},
                    }
                scheduler = {
                    "cls": Scheduler,
                    "options": {
                        "host": "127.0.0.1",
                        "dashboard": dashboard is not None,
                        "dashboard_address": dashboard,
                    },
                }
                cluster = SpecCluster(workers=workers, scheduler=scheduler, **common)
        yield cluster
    finally:
        if cluster is not None:
            cluster.close()
        os.environ.clear()
        os.environ.update(saved_environ)


@contextlib.contextmanager
def _quiet_distributed():
    """dask logs a lost connection or worker as tracebacks; the run reports it in one line."""
    logger = logging.getLogger("distributed")
    before = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(before)


@contextlib.contextmanager
def connect(cfg: Config):
    """A dask Client for the run: a local cluster (``extract.workers``) or an existing scheduler
    (``extract.scheduler``); yields (client, description, torch threads per worker)."""
    from distributed import Client

    e = cfg.extract
    if e.workers and e.scheduler:
        raise ConfigError(
            f"extract.workers = {e.workers} and extract.scheduler = {e.scheduler!r}: "
            f"give one of them (a local cluster, or an existing one)"
        )
    if e.scheduler:
        address = check_scheduler_address(e.scheduler)
        try:
            client = Client(address, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
        except (OSError, TimeoutError) as err:
            raise ClusterError(
                f"extract.scheduler: no dask scheduler answered at {address} ({type(err).__name__}: {err})"
            ) from None
        try:
            try:
                client.wait_for_workers(1, timeout=WORKER_WAIT_S)
            except TimeoutError:
                raise ClusterError(
                    f"extract.scheduler: no worker joined the scheduler at {address} "
                    f"within {WORKER_WAIT_S} s; start workers (`dask worker {address}`)"
                ) from None
            yield client, f"scheduler {address}", e.threads_per_worker
        finally:
            client.close()
        return
    threads = local_threads(e.workers, e.threads_per_worker)
    with _local_cluster(cfg, threads) as cluster, Client(cluster, set_as_default=False) as client:
        yield client, f"local cluster of {e.workers} worker processes", threads


def _dashboard(client) -> str | None:
    """The dashboard's link when the scheduler serves one (it needs bokeh where it runs)."""
    try:
        if client.run_on_scheduler(_serves_dashboard):
            return client.dashboard_link
    except Exception:  # a link is a convenience; never fail a run over it
        pass
    return None


def _serves_dashboard(dask_scheduler=None) -> bool:
    import sys

    return "distributed.dashboard.scheduler" in sys.modules  # imported only when the dashboard starts


def _has_bokeh() -> bool:
    try:
        import bokeh  # noqa: F401
    except ImportError:
        return False
    return True


def _worker_infos(client, name: str) -> list[dict]:
    infos = client.run(lambda dask_worker: dask_worker.plugins[name].info)
    infos = [infos[a] for a in sorted(infos)]
    if not infos:
        raise ClusterError("the cluster has no workers")
    cpu = infos[0]["device_type"] == "cpu"
    for key in ("checkpoint_sha256", "device_type", "torch") + (("torch_threads",) if cpu else ()):
        values = {i[key] for i in infos}
        if len(values) > 1:
            a, b = infos[0], next(i for i in infos if i[key] != infos[0][key])
            why = (
                "set extract.threads_per_worker: on CPU the thread count changes the last bits"
                if key == "torch_threads"
                else "a store's features come from one kind of device"
            )
            raise ClusterError(
                f"workers disagree on {key}: {a['address']} has {a[key]!r}, {b['address']} has {b[key]!r}; {why}"
            )
    return infos


def _lost(err: BaseException) -> bool:
    from distributed.comm.core import CommClosedError

    return isinstance(err, (CommClosedError, OSError, TimeoutError, asyncio.CancelledError)) or type(err).__name__ in (
        "CancelledError",
        "FutureCancelledError",
    )


def run_distributed(job: Job, report: Reporter | None = None) -> dict:
    """`extract.run.run` with the chunks computed on dask workers; the same result dict, plus
    ``workers`` (how many) and ``cluster`` (what ran them). ``report.advance`` comes per chunk
    (a worker's U-Net calls are not seen from here)."""
    from distributed import as_completed
    from distributed.client import FutureCancelledError
    from distributed.scheduler import KilledWorker

    report = report or Reporter()
    cfg = job.cfg
    check_unlocked(cfg.store.path)  # before the workers start and load the U-Net
    token = secrets.token_hex(4)
    name = f"diffprobe-extract-{token}"
    with _quiet_distributed(), connect(cfg) as (client, where, threads):
        link = _dashboard(client)
        report.log(f"{where}{f'; dashboard {link}' if link else ''}")
        try:
            # every worker loads the U-Net now, once, and keeps it for the whole run
            client.register_plugin(ExtractorPlugin(cfg.to_dict(), job.source, threads), name=name)
            infos = _worker_infos(client, name)
            device = torch.device(infos[0]["device_type"])
            sha = infos[0]["checkpoint_sha256"]
            workers = [{k: i[k] for k in ("address", "host", "device", "device_name", "torch_threads")} for i in infos]
            with open_writer(job, sha, device, infos[0]["torch_threads"], cluster=where, workers=workers) as writer:
                work, totals = start_chunks(job.plan, writer, report, job)
                total = totals.chunks
                by_key = {f"extract-{w.split}-{w.chunk}-{token}": w for w in work}
                expect = {"checkpoint_sha256": sha, "device_type": device.type}
                futures = [
                    client.submit(_run_chunk, name, w, str(writer.path), writer.owner, expect, pure=False, key=key)
                    for key, w in by_key.items()
                ]
                stats = {"chunks_written": 0, "chunks_already_done": totals.chunks_done, "images_skipped": 0}
                try:
                    for future in as_completed(futures, loop=client.loop):
                        r = future.result()
                        stats["chunks_written"] += 1
                        stats["images_skipped"] += r["skipped"]
                        report.advance(r["images"], by_key[future.key].forwards)
                        report.chunks(totals.chunks_done + stats["chunks_written"], total)
                except KilledWorker as err:
                    raise ClusterError(
                        f"a chunk's worker died {_allowed_failures() + 1} times running it ({err}); "
                        f"{_done(stats, total)}; `extract run` again resumes"
                    ) from None
                except DiffprobeError:
                    raise
                except (FutureCancelledError, Exception) as err:
                    if not _lost(err) and client.status == "running":
                        raise
                    raise ClusterError(
                        f"lost the dask scheduler ({where}) mid-run ({type(err).__name__}); "
                        f"{_done(stats, total)}; `extract run` again resumes from the "
                        f"completion records"
                    ) from None
                finally:
                    if client.status == "running":
                        client.cancel(futures)
        finally:
            if client.status == "running":
                with contextlib.suppress(Exception):
                    client.unregister_worker_plugin(name)  # frees the model on a long-lived cluster
    return {
        "store": str(cfg.store.path),
        "device": str(device),
        "images": sum(job.plan.split_sizes.values()),
        "timesteps": list(job.plan.timesteps),
        "workers": len(infos),
        "cluster": where,
        **stats,
    }


def _done(stats: dict, total: int) -> str:
    return f"{stats['chunks_already_done'] + stats['chunks_written']}/{total} chunks complete"


def _allowed_failures() -> int:
    import dask

    return int(dask.config.get("distributed.scheduler.allowed-failures"))
