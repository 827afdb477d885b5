"""The Dask plumbing every module shares: the current client, waiting, broadcasting
constants, memory probes and the BLAS thread guards.

Nothing else in swimdist imports ``distributed.get_client`` or probes memory itself.
"""

from __future__ import annotations

import contextlib
import os
from contextvars import ContextVar

import dask

from . import config

__all__ = [
    "available_memory",
    "blas_for_local_threads",
    "broadcast",
    "compute",
    "compute_all",
    "client_memory",
    "configured_budget",
    "current_client",
    "fit_memory",
    "hold",
    "keep_alive",
    "lost_client_data",
    "remote_client",
    "single_thread_lapack",
    "tree_sum",
    "wait_for",
    "worker_memory",
]


def current_client():
    """The active ``distributed.Client``, or None (dask's threaded scheduler then)."""
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


def remote_client():
    """The active client if its cluster is not a ``LocalCluster`` of this process, else None."""
    client = current_client()
    if client is None:
        return None
    from distributed import LocalCluster

    return None if isinstance(client.cluster, LocalCluster) else client


def wait_for(collection) -> None:
    """Block until the futures behind a persisted dask collection are done (no-op without a
    distributed client: ``persist()`` computed it already)."""
    try:
        from distributed import futures_of, wait
    except ImportError:  # pragma: no cover - distributed is a dependency
        return
    futs = futures_of(collection)
    if futs:
        wait(futs)


#: Futures that must outlive the graphs that first used them (see :func:`keep_alive`).
_HELD: ContextVar[list | None] = ContextVar("swimdist_held_futures", default=None)


@contextlib.contextmanager
def keep_alive(into: list | None = None):
    """Hold every future that :func:`hold` or :func:`broadcast` makes inside the block.

    A persisted result whose worker dies is recomputed from its dependencies; a scattered
    dependency that no client holds any more is forgotten by then. Holding the futures for
    the life of a solve (or of a :class:`~swimdist.design.DesignMatrix`) keeps them on the
    cluster while anything may need them. ``into``: a list that keeps them after the block.
    """
    held = [] if into is None else into
    token = _HELD.set(held)
    try:
        yield held
    finally:
        _HELD.reset(token)
        if into is None:
            held.clear()


def hold(futures):
    """Register ``futures`` (one or a list) with the innermost :func:`keep_alive`."""
    held = _HELD.get()
    if held is not None:
        held.extend(futures if isinstance(futures, list) else [futures])
    return futures


def broadcast(obj):
    """``obj`` as a graph argument that is sent to the cluster once, not once per task.

    With a distributed client the object is scattered (``hash=False``: equal constants of
    two graphs must not share, and release, one key), held for the enclosing
    :func:`keep_alive`, and a delayed wrapper of the future is returned; each worker that
    needs it fetches it once from a peer and keeps it. Without a client, a pure
    ``dask.delayed`` (one key shared by all tasks).

    Not ``scatter(broadcast=True)``: the scheduler's ``replicate`` behind it (distributed
    2026.8) loops forever when a target worker dies mid-replication, retrying it every
    30 s. A lost constant is recovered as lost X blocks are: :func:`lost_client_data` tells
    the fit, which sends it again.
    """
    client = current_client()
    if client is None:
        return dask.delayed(obj, pure=True)
    fut = hold(client.scatter(obj, hash=False))
    return dask.delayed(fut)


def lost_client_data(exc: BaseException) -> bool:
    """Whether ``exc`` means that data this client sent (scattered X blocks, broadcast
    constants) was lost with a worker, so that sending it again recovers.

    Scattered data has no lineage: when the last worker holding it dies, the scheduler
    forgets it and every computation that needs it is cancelled ("lost dependencies").
    (Replicas do not help for long: distributed's Active Memory Manager drops extra ones.)
    A lost connection to the scheduler is not this: re-sending cannot help there.
    """
    from concurrent.futures import CancelledError  # distributed's FutureCancelledError too

    from distributed.comm.core import CommClosedError

    text = str(exc).lower()
    if isinstance(exc, CommClosedError):
        # a worker's connection closed under a scatter or a gather: the worker died
        return ("worker" in text or "scatter" in text or "gather" in text) and \
            _client_running()
    if not isinstance(exc, CancelledError):
        return False
    if "scheduler-connection-lost" in text or "lost the connection" in text:
        return False
    return _client_running()


def worker_loss_error(exc: BaseException, resent: int, attempts: int):
    """A :class:`~swimdist.exceptions.WorkerLostError` that says what happened and what to
    change when ``exc`` means workers kept dying beyond what a fit recovers from, else None.

    Two ways end there: distributed gave up on a task after every worker that ran it died
    (:class:`distributed.KilledWorker`), or data sent from the client was lost with a
    worker once more after ``attempts`` re-sends. The usual cause is memory: a worker over
    its limit is restarted by its nanny.
    """
    from distributed import KilledWorker

    from .exceptions import WorkerLostError

    if isinstance(exc, KilledWorker):
        what = (f"every worker that ran one of its tasks died ({exc.allowed_failures + 1} "
                f"of them, the last {getattr(exc.last_worker, 'address', '?')})")
    elif lost_client_data(exc) and resent >= attempts:
        what = (f"a worker died with data sent from the client, after {resent} re-sends "
                f"of it (swimdist.resend-attempts={attempts})")
    else:
        return None
    limits = []
    client = current_client()
    if client is not None:
        try:
            limits = [w.get("memory_limit") or 0
                      for w in client.scheduler_info().get("workers", {}).values()]
        except Exception:  # the scheduler itself may be gone too: say what is known
            limits = []
    limit = (f"each worker may use {min(limits) / 2**20:.0f} MiB" if limits and min(limits)
             else "the workers have no memory limit")
    return WorkerLostError(
        f"Dask workers kept dying during the fit: {what}. The usual cause is memory ({limit}): "
        "give the workers more memory (--memory-limit, or the cluster's memory_limit), fewer "
        "threads each, or smaller row blocks (chunk_rows); the workers' logs say why they "
        "died. Verified blocks of a feature store are kept, so the same job resumes.")


def _client_running() -> bool:
    client = current_client()
    return client is not None and client.status == "running"


def compute(x, label: str = "", *, unit: str = "blocks", persist: bool = False):
    """Compute a dask collection (with ``persist``: persist it), reporting its progress as
    the stage ``label`` (:mod:`swimdist.progress`) when anything listens: its output blocks
    counted as they complete (their futures on a distributed client, a dask callback on
    the threaded scheduler)."""
    from dask.core import flatten

    from . import progress

    if not label or not progress.active():
        return x.persist() if persist else x.compute()
    with progress.stage(label, total=sum(1 for _ in flatten(x.__dask_keys__())),
                        unit=unit) as st:
        return progress.track(x, st, persist=persist)


def compute_all(tasks: list, label: str = "", *, unit: str = "blocks") -> list:
    """``dask.compute(*tasks)`` as a list, reporting the tasks done as the stage ``label``
    when anything listens (their futures on a distributed client, a dask callback on the
    threaded scheduler)."""
    from . import progress

    if not label or not progress.active():
        return list(dask.compute(*tasks))
    with progress.stage(label, total=len(tasks), unit=unit) as st:
        client = current_client()
        if client is None:
            with progress.counting([t.key for t in tasks], st):
                return list(dask.compute(*tasks, optimize_graph=False))
        from distributed import as_completed

        futures = client.compute(list(tasks))
        for _ in as_completed(futures):
            st.update(1)
        return client.gather(futures)


def tree_sum(parts, split_every: int | None = None, label: str = "", *,
             unit: str = "blocks"):
    """``parts.sum(axis=0, split_every=split_every).compute()`` for a dask array of one
    partial result per block along axis 0, reporting the partials done as the stage
    ``label`` when anything listens.

    The sum is dask's own tree reduction in both cases. Under a distributed client the
    partials are also asked for as outputs of the same graph, so that their futures can be
    counted as they complete; each is released once counted (its parent in the tree holds
    it until summed), so none stays in memory longer than in the plain reduction. The graph
    is left unoptimized there (and on the threaded scheduler, where a callback counts
    them), since blockwise fusion would rename the partials.
    """
    from dask.core import flatten

    from . import progress

    total = parts.sum(axis=0, split_every=split_every)
    if not label or not progress.active():
        return total.compute()
    with progress.stage(label, total=parts.numblocks[0], unit=unit) as st:
        client = current_client()
        if client is None:
            return progress.track(total, st, count=flatten(parts.__dask_keys__()))
        from distributed import as_completed

        futures = client.compute([total, *parts.to_delayed(optimize_graph=False).ravel()],
                                 optimize_graph=False)
        result, counting = futures[0], as_completed(futures[1:])
        del futures
        for _ in counting:
            st.update(1)
        return result.result()


# --------------------------------------------------------------------------- memory
def configured_budget() -> float | None:
    """``swimdist.memory-budget`` in bytes (set by ``swimdist train --memory-limit``)."""
    budget = config.get("memory-budget")
    return None if budget is None else float(dask.utils.parse_bytes(budget))


def client_memory() -> float | None:
    """Bytes the client may use for dense work: ``swimdist.client-memory`` (the client's
    share of an embedded cluster's budget, :func:`swimdist.cluster.plan_memory`), else the
    whole budget, else None (no budget: the memory available)."""
    share = config.get("client-memory", None)
    if share is not None:
        return float(dask.utils.parse_bytes(share))
    return configured_budget()


def available_memory() -> float:
    """Bytes of memory available on this machine now."""
    import psutil

    return float(psutil.virtual_memory().available)


def worker_memory(client=None) -> tuple[int, float | None, float | None]:
    """``(workers, smallest limit, sum of limits)`` of the current cluster; limits are None
    where any worker has none (or without a client)."""
    client = client or current_client()
    if client is None:
        return 0, None, None
    workers = client.scheduler_info().get("workers", {})
    limits = [w.get("memory_limit") or 0 for w in workers.values()]
    if not workers or not all(limits):
        return len(workers), None, None
    return len(workers), float(min(limits)), float(sum(limits))


def fit_memory() -> float:
    """The memory the feature matrix's holders may use: the workers' limits together (a
    distributed client whose workers all have one) and the configured budget, whichever is
    smaller; else the one there is; else the memory available now."""
    budget = configured_budget()
    _, _, total = worker_memory()
    known = [m for m in (budget, total) if m is not None]
    return min(known) if known else available_memory()


# --------------------------------------------------------------------------- BLAS threads
def blas_for_local_threads():
    """Keep BLAS threads x dask threads within the cores on the local threaded scheduler.

    The per-block tasks are BLAS-bound: two dask threads each running a two-thread OpenBLAS
    product on two cores ran the MNIST Gram pass 1.4x slower. Worker processes of a cluster
    get their BLAS thread count from :mod:`swimdist.cluster`; nothing is changed there.
    """
    if current_client() is not None:
        return contextlib.nullcontext()
    if dask.config.get("scheduler", None) not in (None, "threads", "threading"):
        return contextlib.nullcontext()
    cores = os.cpu_count() or 1
    threads = int(dask.config.get("num_workers", None) or cores)
    if threads <= 1:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(max(1, cores // threads))


def single_thread_lapack():
    """One BLAS thread for a LAPACK factorization.

    The threaded ``potrf`` of the OpenBLAS in current numpy/scipy wheels (0.3.31) is
    pathological: a 3335-wide Cholesky took 4.9 s on two threads and 0.27 s on one.
    """
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1)
