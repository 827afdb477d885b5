"""Connect to a Dask scheduler, or start an embedded LocalCluster sized to the machine.

Every cluster swimdist starts pins BLAS/OpenMP threads per worker so that worker threads x
BLAS threads never exceed the cores (oversubscribed LAPACK runs many times slower).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import dask
import dask.config
from dask.utils import format_bytes, parse_bytes

from . import config
from .exceptions import SchedulerError, ValidationError

logger = logging.getLogger("swimdist.cluster")

#: distributed's default ``MALLOC_TRIM_THRESHOLD_`` for worker processes.
_DISTRIBUTED_TRIM = 65536
_BLAS_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
              "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


def scheduler_address(address: str | None = None) -> str | None:
    """The scheduler to use: argument, ``swimdist.cluster.scheduler-address``, or
    ``DASK_SCHEDULER_ADDRESS`` (dask's ``scheduler-address``); None = embedded."""
    return (address or config.get("cluster.scheduler-address")
            or dask.config.get("scheduler-address", default=None)
            or os.environ.get("DASK_SCHEDULER_ADDRESS") or None)


def parse_budget(value) -> int:
    """A memory size (``"6GB"``, ``"500MiB"`` or bytes) as a positive number of bytes, or a
    ValidationError naming it."""
    try:
        total = parse_bytes(value) if isinstance(value, str) else int(value)
    except (ValueError, TypeError):
        raise ValidationError(f"memory_limit {value!r} is not a size such as '6GB'.") from None
    if total <= 0:
        raise ValidationError(f"memory_limit must be a positive size such as '6GB'; got "
                              f"{value!r}.")
    return int(total)


def local_cluster_kwargs(*, n_workers: int | None = None, threads_per_worker: int | None = None,
                         memory_limit: str | int | None = None,
                         processes: bool = True) -> dict:
    """Keyword arguments for ``LocalCluster``: workers x threads = cores, memory split evenly.

    ``memory_limit`` is the budget of *all* workers together (e.g. "6GB").
    """
    cores = os.cpu_count() or 1
    threads = int(threads_per_worker if threads_per_worker is not None
                  else config.get("cluster.threads-per-worker") or 1)
    workers = int(n_workers if n_workers is not None
                  else config.get("cluster.n-workers") or max(1, cores // threads))
    if workers < 1 or threads < 1:
        raise ValidationError(f"n_workers and threads_per_worker must be >= 1; got {workers}, "
                              f"{threads}.")
    budget = memory_limit or config.get("cluster.memory-limit")
    per_worker: int | str = "auto"
    if budget not in (None, "auto"):
        per_worker = max(parse_budget(budget) // workers, 1)
    blas = str(config.get("cluster.blas-threads") or 1)
    return {
        "n_workers": workers, "threads_per_worker": threads, "processes": processes,
        # the dashboard of an embedded cluster is for this machine only: ":0" would listen
        # on every interface
        "memory_limit": per_worker, "dashboard_address": "127.0.0.1:0",
        "env": {v: blas for v in _BLAS_VARS} if processes else None,
    }


#: What an embedded cluster adds to the client process (its scheduler and nannies; measured
#: 94 -> 117 MB when a 2-worker LocalCluster starts) and its multiprocessing resource
#: tracker (16 MB), rounded up.
CLUSTER_OVERHEAD = 48 * 2**20
#: The least a worker may get: its interpreter with numpy, scipy, dask and zarr loaded
#: (about 100 MB) and room for a few small feature blocks.
WORKER_FLOOR = 256 * 2**20
#: An idle worker process with swimdist's libraries loaded (measured 95-130 MB).
WORKER_BASELINE = 128 * 2**20
#: A worker's planned peak stays below this fraction of its limit (Dask's nanny restarts a
#: worker at 95 %).
WORKER_HEADROOM = 0.9


@dataclass(frozen=True)
class MemoryPlan:
    """How one budget is split over all of a job's processes (:func:`plan_memory`)."""

    total: int  # the budget: every process together
    client_fixed: int  # the client now (interpreter, libraries, the data) + cluster overhead
    client_dense: int  # the client's dense work (Gram matrix, factors) planned for
    worker_limit: int  # each worker's memory limit (its baseline included)
    n_workers: int
    plan: str  # which solve family the split was made for
    gram_tile: int | None = None  # rows per Gram panel (the row-panel plan)

    def settings(self) -> dict:
        """dask.config settings that keep a fit inside the plan: the budget, the client's
        share for dense work, and feature blocks of an eighth of a worker's limit (a worker
        holds a few at a time: the one it generates or reads, the one it reduces, inputs)."""
        out = {"swimdist.memory-budget": self.total,
               "swimdist.client-memory": self.client_dense,
               "swimdist.max-block-bytes": max(self.worker_limit // 8, 1 << 20)}
        if self.gram_tile:
            out["swimdist.gram-tile"] = self.gram_tile
        return out

    def describe(self) -> str:
        mb = 2**20
        return (f"memory plan ({self.plan}): {format_bytes(self.total)} = client "
                f"{self.client_fixed / mb:.0f} MB now + {self.client_dense / mb:.0f} MB dense "
                f"work, "
                f"{self.n_workers} workers x {self.worker_limit / mb:.0f} MB")


def plan_memory(total: int | str, n_workers: int, n_columns: int, *,
                client_rss: int | None = None) -> MemoryPlan:
    """Split a memory budget over the client and the workers of an embedded cluster.

    The client keeps what it holds now (``client_rss``: default, this process's RSS, taken
    after the data are loaded) plus :data:`CLUSTER_OVERHEAD`, and a reserve for its dense
    work on ``n_columns`` columns; the workers share the rest evenly, their baselines
    included (Dask's ``memory_limit`` caps a worker's whole RSS). The reserve is that of the
    normal equations on the client (:func:`swimdist.lstsq.auto.client_dense_bytes`) when the
    workers' share then still holds the Gram reduction's partial sums in half a limit, as
    ``auto`` requires; otherwise that of the row-panel Gram matrix (``normal-tiled``: half
    the square), for which ``auto`` then decides. The same byte counts drive ``auto``'s
    choice, so the plan and the solve agree.
    """
    import psutil

    from .lstsq.auto import (
        client_dense_bytes,
        gram_partials_bytes,
        tiled_client_bytes,
        tiled_worker_bytes,
    )
    from .lstsq.tiled import TILE

    total = parse_budget(total)
    rss = int(psutil.Process().memory_info().rss if client_rss is None else client_rss)
    fixed = rss + CLUSTER_OVERHEAD
    free = total - fixed
    n = int(n_columns)
    w = max(1, int(n_workers))
    dense = int(client_dense_bytes(n))
    need = max(WORKER_FLOOR, int(2 * gram_partials_bytes(n)))
    smallest = dense + w * need  # the least either plan needs besides the client's share
    tile = None
    if dense + w * need <= free:
        plan, reserve = "normal equations", dense
    else:
        # Row panels: the tallest panel (fewest passes over the store) whose client copy
        # and worker tasks fit; panel heights halve down to 500 rows.
        plan = "row-panel Gram matrix"
        for tile in (TILE, 3000, 2000, 1500, 1000, 500):
            reserve = int(tiled_client_bytes(n, tile))
            need = max(WORKER_FLOOR, int((WORKER_BASELINE + tiled_worker_bytes(n, tile))
                                         / WORKER_HEADROOM))
            smallest = min(smallest, reserve + w * need)
            if reserve + w * need <= free:
                break
    limit = (free - reserve) // w
    if limit < need:
        mb = 2**20
        raise ValidationError(
            f"A memory limit of {format_bytes(total)} is too small for {n} columns on {w} "
            f"workers: the client holds {fixed / mb:.0f} MB (libraries and data), and the "
            f"least plan needs {smallest / mb:.0f} MB more for the dense work and the "
            f"workers. Raise --memory-limit to at least {format_bytes(fixed + smallest)}, "
            "use fewer workers or fewer neurons.")
    return MemoryPlan(total=total, client_fixed=fixed, client_dense=reserve,
                      worker_limit=int(limit), n_workers=w, plan=plan, gram_tile=tile)


def _check_address(address: str) -> None:
    """Refuse what is not a scheduler address before a Client tries it (distributed's parse
    fails inside the client's connection loop, which keeps running after the error)."""
    from distributed.comm import parse_address
    from distributed.comm.addressing import parse_host_port

    try:
        scheme, loc = parse_address(str(address))
        if scheme not in ("tcp", "tls", "inproc", "ucx", "ws", "wss"):
            raise ValueError(f"unknown address scheme {scheme!r}")
        if scheme in ("tcp", "tls", "ws", "wss"):
            parse_host_port(loc)
    except ValueError as exc:
        raise SchedulerError(f"{address!r} is not a Dask scheduler address ({exc}); give one "
                             "such as tcp://host:8786 (tls://host:8786 with TLS).") from None


@contextlib.contextmanager
def _workers_ignore_sigint():
    """Start worker processes with SIGINT ignored (they inherit it; Python then installs no
    KeyboardInterrupt handler in them): Ctrl-C in a terminal reaches the whole process
    group, and the workers dying of it mid-task printed dozens of traceback lines while
    the client was already shutting them down in order."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def connect(address: str | None = None, *, n_workers: int | None = None,
            threads_per_worker: int | None = None, memory_limit: str | int | None = None,
            processes: bool = True, timeout: float | None = None, security=None):
    """Return ``(client, cluster)``: a Client on ``address`` or on a new LocalCluster.

    ``cluster`` is the LocalCluster started here (close it when done) or None.
    An unreachable address fails within ``timeout`` seconds with :class:`SchedulerError`.
    """
    from distributed import Client, LocalCluster

    address = scheduler_address(address)
    timeout = float(timeout or config.get("cluster.connect-timeout") or 10)
    if address:
        if str(address).startswith("tls://") and security is None:
            from distributed.security import Security

            security = Security()  # TLS files from the Dask config (distributed.comm.tls.*)
            if security.get_connection_args("client").get("ssl_context") is None:
                raise SchedulerError(
                    f"The scheduler at {address!r} uses TLS, and no client certificate is "
                    "configured: pass --tls-ca-file, --tls-cert and --tls-key (job spec: "
                    "cluster.tls_ca_file, tls_cert, tls_key), or set distributed.comm.tls.* "
                    "in the Dask config.")
        _check_address(address)
        try:
            client = Client(address, timeout=f"{timeout}s", security=security,
                            set_as_default=True)
        except (OSError, TimeoutError) as exc:
            raise SchedulerError(
                f"Could not reach the Dask scheduler at {address!r} within {timeout:g} s "
                f"({type(exc).__name__}: {exc}). Check the address, that the scheduler is "
                "running, and TLS settings; or omit --scheduler to use an embedded cluster."
            ) from None
        logger.info("connected to %s", address)
        logger.debug("dashboard %s", client.dashboard_link)
        return client, None
    kw = local_cluster_kwargs(n_workers=n_workers, threads_per_worker=threads_per_worker,
                              memory_limit=memory_limit, processes=processes)
    if kw["env"] is None:
        kw.pop("env")
    # The dashboard listens on 127.0.0.1 only, so its websockets need no wildcard origin
    # (distributed's default "*", which bokeh warns about on every start).
    local_origins = {"distributed.scheduler.dashboard.bokeh-application."
                     "allow_websocket_origin": ["127.0.0.1", "localhost"]}
    # glibc's own malloc tuning in the workers, not distributed's MALLOC_TRIM_THRESHOLD_=64k:
    # that setting also fixes the mmap threshold at 128 kB, so every block-sized temporary
    # of a pass is a fresh mapping whose pages fault in again (a CG pass over the MNIST
    # M=20000 store took 4.8 s with it and 2.6 s without). An embedded cluster's workers
    # hold at most their memory plan's working set, which glibc then keeps for reuse.
    no_trim = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
    if os.environ.get("MALLOC_TRIM_THRESHOLD_") == str(_DISTRIBUTED_TRIM):
        os.environ.pop("MALLOC_TRIM_THRESHOLD_")  # left here by an earlier nanny's spawn
    with dask.config.set({**local_origins, **no_trim}), _workers_ignore_sigint():
        cluster = LocalCluster(silence_logs=logging.WARNING, **kw)
    client = Client(cluster, set_as_default=True)
    mem = kw["memory_limit"]
    logger.info("started LocalCluster: %d workers x %d threads, memory %s per worker",
                kw["n_workers"], kw["threads_per_worker"],
                mem if isinstance(mem, str) else format_bytes(mem))
    logger.debug("dashboard %s", client.dashboard_link)
    return client, cluster


def tls_security(ca_file: str, cert: str, key: str):
    """A distributed ``Security`` for a TLS cluster: this client presents ``cert``/``key``
    and trusts servers signed by ``ca_file``; plain-TCP connections are refused."""
    from distributed.security import Security

    for name, path in (("CA file", ca_file), ("certificate", cert), ("key", key)):
        if not os.path.exists(path):
            raise ValidationError(f"TLS {name} {path!r} does not exist.")
    return Security(tls_ca_file=ca_file, tls_client_cert=cert, tls_client_key=key,
                    require_encryption=True)


@contextlib.contextmanager
def session(address: str | None = None, **kwargs):
    """Context manager yielding a connected Client; closes what it started."""
    client, cluster = connect(address, **kwargs)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
