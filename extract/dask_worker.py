"""`extract run` on dask.distributed, the worker side: what runs inside each dask worker.

`ExtractorPlugin` loads the U-Net once per worker and keeps it for the whole run; `_run_chunk`
is the dask task (one image chunk, through `extract.extraction.extract_chunks`, the loop the
single-process run uses). The client side (clusters, the run's lock, progress) is
`extract.dask_client`; how the work is split and why the store ends bit-identical is in its
docstring.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import threading
import time

import torch
from distributed import WorkerPlugin

from diffprobe.extract.extraction import ChunkWork, extract_chunks
from diffprobe.extract.job import compute_settings, load_model, prepare
from diffprobe.store.config import Config
from diffprobe.store.device import resolve_device
from diffprobe.store.errors import DiffprobeError
from diffprobe.store.feature_store import StoreWriter


class ClusterError(DiffprobeError):
    """A dask scheduler that cannot be reached or was lost, or workers that disagree."""


class ExtractorPlugin(WorkerPlugin):
    """Worker-side state of one run: the U-Net (loaded once per worker), the image source,
    the compute settings and the store, attached under the run's lock.

    ``setup`` runs on every worker of the cluster, including one that joins or is restarted
    mid-run; ``teardown`` (the run's end) frees the model on a long-lived cluster.
    """

    def __init__(self, cfg: dict, job_source, threads: int):
        self.cfg = cfg  # Config.to_dict(): plain data that pickles
        self.source = job_source  # the client's image source and index: every worker reads the same ids
        self.threads = threads  # torch CPU threads (0 = the worker's dask thread count)

    async def setup(self, worker) -> None:
        # dask's sampling profiler takes the GIL 100 times a second to walk every thread's
        # stack; the U-Net forward is Python-heavy (many small ops), so it costs (measured: a
        # 1-worker run's chunks 7.5 -> 6.5 s and 7.8 -> 6.8 s without it). Paused for the run.
        self.paused = [
            pc
            for name, pc in worker.periodic_callbacks.items()
            if name in ("profile", "profile-cycle") and pc.is_running()
        ]
        for pc in self.paused:
            pc.stop()
        # Loading a checkpoint takes seconds: off the worker's event loop, so heartbeats go on.
        await asyncio.get_running_loop().run_in_executor(None, self._load, worker)

    def _load(self, worker) -> None:
        _undo_malloc_trim()
        cfg = Config.from_dict(self.cfg)
        job = prepare(cfg, self.source)  # the client's image index: no second directory scan
        self.threads = self.threads or worker.state.nthreads
        torch.set_num_threads(self.threads)
        device = resolve_device(cfg.extract.device)
        self.model, sha = load_model(job, device)
        self.job = job
        # one chunk per task, and a dask worker may not start processes: loaders are threads
        self.settings = dataclasses.replace(compute_settings(cfg, device), loader_kind="thread")
        self.lock = threading.Lock()
        self.writers: dict[tuple[str, str], StoreWriter] = {}
        self.info = {
            "address": worker.address,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": str(device),
            "device_type": device.type,
            "device_name": _device_name(device),
            "checkpoint_sha256": sha,
            "torch": torch.__version__,
            "torch_threads": self.threads,
        }

    def teardown(self, worker) -> None:
        for pc in getattr(self, "paused", ()):
            pc.start()
        for name in ("model", "job", "writers"):
            self.__dict__.pop(name, None)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def run_chunk(self, work: ChunkWork, store: str, owner: str, expect: dict) -> dict:
        with self.lock:  # one chunk at a time per worker, whatever its dask thread count
            for key in ("checkpoint_sha256", "device_type"):
                if self.info[key] != expect[key]:
                    raise ClusterError(
                        f"worker {self.info['address']} on {self.info['host']}: {key} "
                        f"{self.info[key]!r} differs from the store's {expect[key]!r}"
                    )
            if torch.get_num_threads() != self.threads:  # the setting is per OS thread under some OpenMPs
                torch.set_num_threads(self.threads)
            writer = self.writers.get((store, owner))
            if writer is None:
                writer = self.writers[(store, owner)] = StoreWriter.attach(store, owner)
            start = time.perf_counter()
            skipped = extract_chunks(self.model, self.job.diffusion, self.job.source, [work], writer, self.settings)
            return {
                "split": work.split,
                "chunk": work.chunk,
                "images": work.images,
                "skipped": skipped,
                "seconds": time.perf_counter() - start,
                "worker": self.info["address"],
                "pid": os.getpid(),
            }


def _undo_malloc_trim() -> None:
    """Undo dask's MALLOC_TRIM_THRESHOLD_ in a worker its nanny started.

    The nanny sets it (65536) to hand freed memory back to the OS; setting it also switches
    off glibc's adaptive mmap threshold, so every large tensor of every batch is a fresh mmap,
    page-faulted in and unmapped again. Measured here on a single-process run: 1.5-2.5x
    slower extraction. Restore the ceiling glibc adapts to (mmap above 32 MB, trim above 64 MB).
    """
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: the variable meant nothing here
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 64 << 20)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def _run_chunk(plugin: str, work: ChunkWork, store: str, owner: str, expect: dict) -> dict:
    """The dask task: one chunk, on the plugin state of the worker it lands on."""
    from distributed import get_worker

    return get_worker().plugins[plugin].run_chunk(work, store, owner, expect)
