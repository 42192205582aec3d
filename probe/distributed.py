"""`probe sweep` on dask.distributed: the cells of a sweep spread over worker processes, GPUs or
machines, on the pattern of `extract run` (extract/distributed.py).

    probe sweep --workers 2                        # a local cluster of 2 worker processes
    probe sweep --scheduler tcp://10.0.0.5:8786    # an existing cluster (store on a shared filesystem)

How the work is split, and why the results equal a single-process sweep:

- A task is one pass of `probe.linear.passes` (the cells trained together, in the order the
  single-process sweep trains them), run by `probe.linear.linear_probes` on the worker with
  the client's selection (`probe.protocol.Selection`, made once and shipped to every task).
  A head trained in a pass equals the head trained alone, so the grouping never changes a
  number; the workers run torch at the client's thread count and on its device type.
- Each worker opens the store read-only; nothing on a worker writes anything. The client
  writes every ledger row (`probe.ledger.append_row`, under the ledger's lock) as each task
  comes back, so there are never two rows for one cell.
- A worker killed mid-task: dask reruns its task on another worker (``retries``). A client
  killed mid-sweep: `probe sweep` again skips the cells whose rows are in the ledger. Tests
  kill both at a cell they name (store/hooks.py's SIGKILL_FILE: "24/90/2" kills the worker
  starting that cell, "ledger/24/90/2" the client once it has written that cell's row).
- One GPU per worker: a worker whose device resolves to CUDA uses GPU (worker index mod the
  GPUs it sees).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch

from diffprobe.probe.data import Views
from diffprobe.probe.protocol import Selection
from diffprobe.store.config import ProbeConfig
from diffprobe.store.device import resolve_device
from diffprobe.store.errors import DiffprobeError
from diffprobe.store.feature_store import FeatureKey, FeatureStore, open_store
from diffprobe.store.hooks import sigkill_hook

RETRIES = 2  # reruns of a task whose worker died
CONNECT_TIMEOUT_S = 20


class ClusterError(DiffprobeError):
    """A dask scheduler that cannot be reached, or a cluster without workers."""


def check_scheduler(address: str) -> None:
    """Fail at once, in one line, for a scheduler address nothing listens on (dask itself would
    retry for its whole connect timeout). Only tcp:// addresses are probed."""
    import socket

    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        scheme, loc = parse_address(address if "://" in address else f"tcp://{address}")
        host, port = parse_host_port(loc)
    except (ValueError, TypeError):
        raise ClusterError(f"--scheduler: {address!r} is not a scheduler address; expected tcp://HOST:PORT") from None
    if scheme == "tcp":
        try:
            socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as e:
            raise ClusterError(
                f"--scheduler: cannot reach a dask scheduler at {address!r} ({e.strerror or e}); start one or fix the address"
            ) from None


def _worker_device(device: str) -> torch.device:
    """The worker's device: ``device`` resolved; CUDA without an index spreads workers over GPUs."""
    resolved = resolve_device(device, "probe.device")
    if resolved.type == "cuda" and resolved.index is None and torch.cuda.device_count() > 1:
        from distributed import get_worker

        name = str(get_worker().name)
        index = int(name.rsplit("-", 1)[-1]) if name.rsplit("-", 1)[-1].isdigit() else 0
        return torch.device("cuda", index % torch.cuda.device_count())
    return resolved


def probe_pass(
    store_path: str,
    cells: list[tuple[int, int, int]],
    recipe: str,
    seed: int,
    settings: ProbeConfig,
    device: str,
    threads: int,
    selection: Selection,
    views: Views = Views(),
):
    """One task: `linear_probes` of ``cells`` (one pass) on this worker; returns the results."""
    from diffprobe.probe import linear as lin

    for b, t, pool in cells:
        sigkill_hook(f"{b}/{t}/{pool}")  # testing: a worker killed as it starts this cell (store/hooks.py)
    torch.set_num_threads(threads)
    store = open_store(store_path)
    return lin.linear_probes(
        store, cells, recipe, seed, settings, _worker_device(device), selection=selection, views=views
    )


@contextlib.contextmanager
def connect(workers: int, scheduler: str | None, threads: int):
    """A dask Client: a local cluster of ``workers`` processes, or the scheduler at ``scheduler``."""
    from distributed import Client, LocalCluster

    logger = logging.getLogger("distributed")
    before = logger.level
    logger.setLevel(logging.CRITICAL)  # a lost worker is reported by the retry, not as tracebacks
    cluster = client = None
    try:
        if scheduler:
            check_scheduler(scheduler)
            try:
                client = Client(scheduler, timeout=CONNECT_TIMEOUT_S)
            except (OSError, TimeoutError) as e:
                raise ClusterError(
                    f"--scheduler: cannot reach a dask scheduler at {scheduler!r} ({type(e).__name__}: {e}); "
                    f"start one or fix the address"
                ) from None
        else:
            cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
                memory_limit=0,
                silence_logs=logging.CRITICAL,
                env={"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)},
            )
            client = Client(cluster)
        yield client
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
        logger.setLevel(before)


def linear_probes_distributed(
    store: FeatureStore,
    keys: list[FeatureKey],
    recipe: str,
    seed: int,
    settings: ProbeConfig,
    device: str,
    selection: Selection,
    workers: int = 0,
    scheduler: str | None = None,
    on_result: Callable | None = None,
    views: Views = Views(),
) -> list:
    """`probe.linear.linear_probes` of ``keys``, one task per pass, on a dask cluster; calls
    ``on_result(result)`` in this process as each result comes back. Returns them in ``keys`` order."""
    from distributed import as_completed

    from diffprobe.probe import linear as lin

    groups = lin.passes(store, keys, recipe, settings, len(selection.fit) + len(selection.hold))
    threads = torch.get_num_threads()
    out: list = [None] * len(keys)
    with connect(workers, scheduler, threads) as client:
        futures = {
            client.submit(
                probe_pass,
                str(store.path),
                [(keys[i].block, keys[i].t, keys[i].pool) for i in group],
                recipe,
                seed,
                settings,
                device,
                threads,
                selection,
                views,
                key=f"probe-pass-{n}-{keys[group[0]].name}",
                retries=RETRIES,
                pure=False,
            ): group
            for n, group in enumerate(groups)
        }
        for future in as_completed(futures):
            group = futures[future]
            for i, r in zip(group, future.result()):
                out[i] = r
                if on_result:
                    on_result(r)
    return out
