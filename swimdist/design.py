"""The design matrix ``A = [H, 1]``: the one handle every least-squares solver receives.

A :class:`DesignMatrix` is what a solver needs to know about ``A`` besides its numbers:

- **where it lives** (:attr:`placement`): ``"array"`` (a numpy or dask array handed to
  :func:`swimdist.solve`), ``"memory"`` (persisted in the workers' memory), ``"temporary"``
  (a feature store deleted after the fit), ``"store"`` (a persistent, resumable Zarr or
  npy store) or ``"regenerate"`` (never stored: blocks are generated from ``X`` when a
  solver asks for them);
- the **row-block builder** (:meth:`block_features`: the features of some neurons only,
  generated on the workers; split-and-solve) and the **column reader** (:attr:`reader`:
  columns of ``H`` read straight from the store by worker tasks; the tiled Gram panels);
- the **fingerprint** of the job that produced it, the **lock** on its store and the
  **solve checkpoint** beside it;
- **one pass over A** (:meth:`reduce`): a per-row-block function summed over the blocks on
  the workers, its constants sent to every worker once (:func:`swimdist._dask.broadcast`),
  never embedded in each task.

``fit`` builds one with :func:`build_design` and closes it (lock released, temporary store
deleted) when the solve is done; ``solve(A, Y)`` wraps a plain array with :func:`as_design`.
"""

from __future__ import annotations

import logging
import operator
import os
from collections.abc import Callable, Sequence

import dask
import dask.array as da
import numpy as np

from ._dask import (
    blas_for_local_threads,
    broadcast,
    compute,
    current_client,
    fit_memory,
    hold,
    keep_alive,
    remote_client,
    tree_sum,
)

logger = logging.getLogger("swimdist.design")  # a child of the "swimdist" logger

PLACEMENTS = ("array", "memory", "temporary", "store", "regenerate")

__all__ = [
    "PLACEMENTS",
    "DesignMatrix",
    "as_design",
    "build_design",
    "reduce_blocks",
    "row_chunked",
    "rows_like",
]


# --------------------------------------------------------------------------- row blocks
def row_chunked(A, chunk_rows: int | None = None) -> da.Array:
    """``A`` as a dask array with a single column chunk (rows chunked); numpy input becomes
    one chunk per ``chunk_rows`` rows (default: all rows)."""
    if not isinstance(A, da.Array):
        A = np.asarray(A)
        return da.from_array(A, chunks=(chunk_rows or A.shape[0], A.shape[1]))
    if len(A.chunks[1]) != 1:
        A = A.rechunk({1: -1})
    return A


def rows_like(Y, A: da.Array) -> da.Array:
    """``Y`` (N,) or (N, K) as a dask array whose row chunks match ``A``'s.

    numpy ``Y`` travels to the workers once (:func:`~swimdist._dask.broadcast`: replicated
    on every worker under a distributed client) and each row block is a slice of it, so no
    copy of ``Y`` is embedded in the graph of every pass.
    """
    if isinstance(Y, da.Array):
        Y = Y if Y.ndim == 2 else Y[:, None]
        if Y.chunks[0] != A.chunks[0] or len(Y.chunks[1]) != 1:
            Y = Y.rechunk((A.chunks[0], -1))
        return Y
    Y = np.asarray(Y)
    Y = Y if Y.ndim == 2 else Y[:, None]
    if current_client() is None:
        return da.from_array(Y, chunks=(A.chunks[0], Y.shape[1]))
    whole = broadcast(Y)
    parts, r0 = [], 0
    for rows in A.chunks[0]:
        piece = dask.delayed(operator.getitem)(whole, slice(r0, r0 + rows))
        parts.append(da.from_delayed(piece, shape=(rows, Y.shape[1]), dtype=Y.dtype))
        r0 += rows
    return da.concatenate(parts, axis=0)


def reduce_blocks(
    fn: Callable[..., np.ndarray],
    A,
    others: Sequence = (),
    consts: Sequence = (),
    *,
    length: int,
    split_every: int | None = 4,
    label: str = "",
) -> np.ndarray:
    """One pass over ``A``: the sum over its row blocks of ``fn(A_i, *others_i, *consts)``,
    a flat float64 vector of ``length`` entries.

    numpy ``A``: one call on the whole array (BLAS threads do the parallel work). dask ``A``:
    one task per row block on the workers, ``consts`` sent to every worker once, and the
    partial vectors summed by a tree reduction (``split_every`` per node). ``label``: report
    the pass as a progress stage of that name (:mod:`swimdist.progress`).
    """
    if isinstance(A, DesignMatrix):
        A = A.array
    if not isinstance(A, da.Array):
        return np.asarray(fn(A, *[np.asarray(o) for o in others], *consts), dtype=np.float64)
    A = row_chunked(A)
    args = [fn, None, A, "br"]  # fn is an argument: the task says what it runs
    for j, o in enumerate(others):
        args += [rows_like(o, A), f"b{j}"]
    for c in consts:
        args += [broadcast(c), None]
    parts = da.blockwise(
        _partial_sum,
        "bc",
        *args,
        new_axes={"c": int(length)},
        adjust_chunks={"b": 1},
        concatenate=True,
        dtype=np.float64,
        meta=np.empty((0, 0)),
    )
    with blas_for_local_threads():
        return tree_sum(parts, split_every, label)


def _partial_sum(fn, *args) -> np.ndarray:
    """One row block's term of :func:`reduce_blocks`, as a (1, length) array."""
    return fn(*args)[None]


# --------------------------------------------------------------------------- the handle
class DesignMatrix:
    """``A`` (N, n) for the solvers: its array plus where it lives and what comes with it.

    Parameters
    ----------
    array : ndarray or dask.array.Array, shape (N, n)
        The matrix itself (numpy, or row-chunked dask: persisted, read from a store, or lazy).
    bias : bool
        The last column is the all-ones bias column (``A = [H, 1]``).
    placement : {"array", "memory", "temporary", "store", "regenerate"}
        Where ``A`` lives (module doc).
    store : str, optional
        URL of the feature store holding ``H`` (``A`` without its bias column).
    store_format : {"zarr", "npy"}, optional
    rows : int, optional
        Rows per block of the store (and of ``array``).
    fingerprint : str, optional
        Hash of what produced ``H`` (data, layers, dtype, blocking).
    checkpoint : swimdist.store.checkpoint.SolveCheckpoint, optional
        Where an interrupted solve keeps its state (resumable solvers use it).
    block_builder : callable, optional
        ``block_builder(columns) -> dask array (N, len(columns))``: the features of just those
        neurons, generated on the workers with ``array``'s row chunks.
    column_norms : ndarray, optional
        Norms of the neurons' weight vectors (split-and-solve's "norm" orders).
    """

    def __init__(self, array, *, bias: bool = False, placement: str = "array",
                 store: str | None = None, store_format: str | None = None,
                 rows: int | None = None, fingerprint: str | None = None, checkpoint=None,
                 block_builder: Callable[[np.ndarray], da.Array] | None = None,
                 column_norms: np.ndarray | None = None, lock=None,
                 build_info: dict | None = None) -> None:
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}; got {placement!r}")
        self.array = array
        self.bias = bool(bias)
        self.placement = placement
        self.store = store
        self.store_format = store_format
        self.rows = rows
        self.fingerprint = fingerprint
        self.checkpoint = checkpoint
        self.block_builder = block_builder
        self.column_norms = column_norms
        self.lock = lock
        #: What building the store did (blocks written, reused, verified).
        self.build_info = dict(build_info or {})
        #: Why ``A`` lives where it does, and the predicted seconds of the alternatives
        #: (:func:`choose_placement`; empty when there was no choice to make).
        self.placement_reason: str | None = None
        self.placement_costs: dict = {}
        #: Futures the array depends on (scattered X, broadcast layers): held while the
        #: handle is open, so that a lost block can be recomputed.
        self.held: list = []

    # array-like surface -------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def is_dask(self) -> bool:
        return isinstance(self.array, da.Array)

    @property
    def n_features(self) -> int:
        """Columns of ``H`` (``n - 1`` with the bias column)."""
        return self.shape[1] - int(self.bias)

    def with_array(self, array) -> DesignMatrix:
        """The same handle around another array of the same rows (e.g. a float64 copy)."""
        out = DesignMatrix.__new__(DesignMatrix)
        out.__dict__.update(self.__dict__)
        out.array = array
        return out

    # what comes with A --------------------------------------------------------------
    @property
    def reader(self):
        """A picklable zero-argument callable that, called on a worker, opens the store and
        returns ``read(r0, r1, c0, c1) -> H[r0:r1, c0:c1]``; None without a store."""
        if self.store is None:
            return None
        from .store.backends import store_backend

        return store_backend(self.store, self.store_format).reader

    def stored(self) -> da.Array:
        """``H`` read lazily from the store (one dask chunk per store row block)."""
        from .store.backends import store_backend

        return store_backend(self.store, self.store_format).array(self.rows)

    def block_features(self, columns) -> da.Array | None:
        """The features of the neurons ``columns`` (no bias column), or None without a
        builder."""
        if self.block_builder is None:
            return None
        return self.block_builder(np.asarray(columns))

    def reduce(self, fn, others: Sequence = (), consts: Sequence = (), *, length: int,
               split_every: int | None = 4) -> np.ndarray:
        """One pass over ``A`` (:func:`reduce_blocks`)."""
        return reduce_blocks(fn, self.array, others, consts, length=length,
                             split_every=split_every)

    # lifetime -----------------------------------------------------------------------
    def solved(self) -> None:
        """The model is safe: the solve checkpoint is no longer needed."""
        if self.checkpoint is not None:
            self.checkpoint.remove()

    def close(self) -> None:
        """Release the store lock and delete a temporary store."""
        self.held.clear()
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if self.placement == "temporary" and self.store is not None:
            from .store.build import remove_store

            remove_store(self.store)

    def __enter__(self) -> DesignMatrix:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        where = self.placement if self.store is None else f"{self.placement} {self.store!r}"
        return (f"DesignMatrix(shape={self.shape}, dtype={self.dtype}, {where}, "
                f"bias={self.bias})")


def as_design(A) -> DesignMatrix:
    """``A`` itself if it is a :class:`DesignMatrix`, else a handle around the array."""
    return A if isinstance(A, DesignMatrix) else DesignMatrix(A)


# --------------------------------------------------------------------------- building
def fits_in_memory(n_rows: int, n_cols: int, dtype) -> bool:
    """Whether the feature matrix takes at most a quarter of the memory a fit may use
    (:func:`swimdist._dask.fit_memory`); the rest is room for the solve (gelsd copies ``A``
    twice)."""
    return n_rows * n_cols * np.dtype(dtype).itemsize <= fit_memory() / 4


def row_blocks(X, rows: int) -> da.Array:
    """``X`` as a dask array of regular ``rows``-row blocks.

    A dask ``X`` is rechunked (its own chunks may be irregular). In-memory ``X`` under a
    distributed client is scattered straight to the workers: embedded in the graph, it would
    pass through the scheduler, which keeps a copy of X for as long as the graph lives.
    """
    if isinstance(X, da.Array):
        Xd = X.rechunk((rows, -1))
        if len(set(Xd.chunks[0][:-1])) > 1 or Xd.chunks[0][-1] > Xd.chunks[0][0]:
            Xd = Xd.rechunk((rows, -1))
        return Xd
    client = current_client()
    if client is None:
        return da.from_array(X, chunks=(rows, -1))
    parts = [X[r:r + rows] for r in range(0, X.shape[0], rows)]
    futures = hold(client.scatter(parts, hash=False))  # two fits' equal data: not one key
    return da.concatenate([da.from_delayed(f, shape=p.shape, dtype=p.dtype)
                           for f, p in zip(futures, parts, strict=True)])


def placement_costs(N: int, d: int, layers, dtype, passes: int, root: str, *,
                    x_itemsize: int = 8, threads: int | None = None,
                    rates=None) -> dict[str, float]:
    """Predicted seconds of the feature work of a fit that makes ``passes`` passes over ``A``,
    with ``A`` written to a temporary store under ``root`` (``"store"``) or generated again
    from ``X`` for every pass (``"regenerate"``).

    With ``F`` the seconds to generate the features once (:meth:`.lstsq.costs.Rates.features`:
    ``2 N d_in M`` flops per layer at the measured product rate, ``N M`` activations at the
    measured rate over ``threads`` worker threads), ``B = N M itemsize`` the bytes of ``H``
    and ``r``, ``w`` the read and write rates of ``root``'s disk
    (:func:`.lstsq.costs.disk_rates`)::

        store      = F + B / w + passes * B / r
        regenerate = passes * F + (passes - 1) * N d x_itemsize / r     (X read again)

    The work the solver does with each block (the Gram products) is the same either way and
    left out. Compute spreads over the workers' threads; one disk does not.
    """
    from .lstsq.costs import disk_rates, machine_rates

    rates = rates or machine_rates()
    if threads is None:
        client = current_client()
        threads = (sum(client.nthreads().values()) if client is not None
                   else int(dask.config.get("num_workers", None) or os.cpu_count() or 1))
    dims = (d, *(layer.width for layer in layers))
    gen = rates.features(N, dims, layers[-1].activation, threads=threads)
    read, write = disk_rates(root, rates)
    nbytes = float(N) * layers[-1].width * np.dtype(dtype).itemsize
    return {"store": gen + nbytes / write + passes * nbytes / read,
            "regenerate": passes * gen + (passes - 1) * float(N) * d * x_itemsize / read,
            "passes": int(passes), "generate": gen, "read": nbytes / read,
            "write": nbytes / write}


def choose_placement(X, layers, *, dtype, passes: int | None,
                     rates=None) -> tuple[str, str, dict]:
    """``("temporary" | "regenerate", reason, costs)`` for a fit whose ``A`` does not stay in
    memory: the cheaper of the two by :func:`placement_costs`, unless the solver needs a
    stored ``A`` (``passes`` None) or ``swimdist.placement`` says otherwise.

    Until this machine's rates are measured (by a larger problem), a problem whose features
    take fewer than :data:`.lstsq.auto.CALIBRATION_FLOPS` flops is regenerated: that takes
    less time than measuring the rates would.
    """
    from . import config
    from .exceptions import ValidationError
    from .lstsq.auto import CALIBRATION_FLOPS
    from .lstsq.costs import rates_known
    from .store.build import temporary_root

    forced = config.get("placement", "auto")
    if forced not in ("auto", "store", "regenerate"):
        raise ValidationError(f"swimdist.placement must be auto, store or regenerate; got "
                              f"{forced!r} (set it with DASK_SWIMDIST__PLACEMENT or "
                              "dask.config.set).")
    if forced != "auto":
        return ("temporary" if forced == "store" else "regenerate",
                f"swimdist.placement={forced}", {})
    if passes is None:
        return "temporary", "the solver reads columns of A from a store", {}
    N, dims = X.shape[0], (X.shape[1], *(layer.width for layer in layers))
    flops = sum(N * m * (2 * d_in + 1) for d_in, m in zip(dims[:-1], dims[1:], strict=True))
    if rates is None and flops <= CALIBRATION_FLOPS and not rates_known():
        return "regenerate", (f"A is small ({flops:.2g} flops to generate); regenerating "
                              "takes less than measuring the rates"), {}
    costs = placement_costs(N, X.shape[1], layers, dtype, passes, temporary_root(),
                            x_itemsize=np.dtype(X.dtype).itemsize, rates=rates)
    place = "regenerate" if costs["regenerate"] <= costs["store"] else "temporary"
    reason = (f"{passes} pass(es) over A ({X.shape[0]} x {layers[-1].width}): regenerating "
              f"from X {costs['regenerate']:.3g} s, a temporary store {costs['store']:.3g} s "
              f"(generate {costs['generate']:.3g} s, write {costs['write']:.3g} s, read "
              f"{costs['read']:.3g} s a pass)")
    return place, reason, costs


def build_design(X, layers, *, store=None, dtype="float64", chunk_rows: int | None = None,
                 lazy: bool = False, passes: int | None = None) -> DesignMatrix:
    """The design matrix of a fit: features of ``X`` through ``layers``, bias appended.

    Parameters
    ----------
    X : ndarray or dask array, shape (N, d)
    layers : list of swimdist.sampling.Layer
    store : None, "memory", or a path / fsspec URL
        None: in memory when ``A`` takes at most a quarter of the fit's memory (always on a
        remote cluster); else regenerated from ``X`` for every pass or written to a
        temporary local store, whichever :func:`choose_placement` predicts cheaper for
        ``passes`` passes (logged; :attr:`DesignMatrix.placement_reason`). A path or URL: a
        persistent, resumable store there (locked while the design is open).
    dtype : {"float64", "float32"}
    chunk_rows : int, optional
        Rows per block (default from the configuration and the block budget).
    lazy : bool
        Placement ``"regenerate"``: never compute ``A`` whole; split-and-solve builds one
        neuron block at a time from :meth:`DesignMatrix.block_features` and no features are
        stored (a persistent ``store`` then holds only the lock and the solve checkpoint).
    passes : int, optional
        Passes over ``A`` the solver will make (:func:`.lstsq.costs.solver_passes`); None:
        it needs ``A`` stored.

    Returns
    -------
    DesignMatrix
        Close it (or use it as a context manager) when the solve is done.
    """
    from .features import block_rows

    dtype = np.dtype(dtype)
    rows = block_rows(layers[-1].width + 1, dtype, chunk_rows)
    design = DesignMatrix(None, bias=True, rows=rows)
    with keep_alive(into=design.held):
        _build(design, X, layers, store=store, dtype=dtype, rows=rows, lazy=lazy,
               passes=passes)
    logger.debug("design matrix: %r", design)
    return design


def _build(design: DesignMatrix, X, layers, *, store, dtype, rows, lazy, passes) -> None:
    """Fill ``design`` (see :func:`build_design`); closes it on failure."""
    from .features import add_bias_column, hidden_features
    from .store.backends import store_backend
    from .store.build import (
        build_feature_store,
        fingerprint_array,
        fingerprint_job,
        temporary_store_path,
    )
    from .store.checkpoint import SolveCheckpoint
    from .store.lock import StoreLock

    N, M = X.shape[0], layers[-1].width
    persistent = store is not None and store != "memory"
    url = str(store) if persistent else None
    reason, costs = None, {}
    if lazy:
        placement, reason = "regenerate", "split-and-solve builds its column blocks from X"
    elif persistent:
        placement, reason = "store", f"a persistent store at {url!r}"
    elif store == "memory" or remote_client() is not None or fits_in_memory(N, M + 1, dtype):
        placement = "memory"
        reason = ("store='memory'" if store == "memory" else "a remote cluster" if
                  remote_client() is not None else "A takes at most a quarter of the memory")
    else:
        placement, reason, costs = choose_placement(X, layers, dtype=dtype, passes=passes)
        if placement == "temporary":
            url = temporary_store_path()
    logger.info("design matrix %d x %d: %s (%s)", N, M + 1, placement, reason)
    design.placement = placement
    design.placement_reason, design.placement_costs = reason, costs
    try:
        Xd = row_blocks(X, rows)
        if persistent:
            design.lock = StoreLock(url).acquire()
        if url is not None:
            design.fingerprint = fingerprint_job(x=fingerprint_array(X), layers=layers,
                                                 dtype=dtype.str, rows=rows)
        if placement == "regenerate":
            # In-memory X goes to the workers once, not with every block's graph.
            Xd = Xd if isinstance(X, da.Array) else Xd.persist()
            # Each block of A is generated inside the task that uses it (the Gram pass: one
            # pass over X, nothing stored), the bias column written in place.
            design.array = hidden_features(Xd, layers, dtype=dtype, add_bias=True)
            design.block_builder = lambda cols: hidden_features(Xd, layers, columns=cols,
                                                                dtype=dtype)
            design.column_norms = np.linalg.norm(layers[-1].weights, axis=0)
        elif placement == "memory":
            with blas_for_local_threads():
                design.array = compute(hidden_features(Xd, layers, dtype=dtype, add_bias=True),
                                       "features", unit="blocks", persist=True)
        else:
            with blas_for_local_threads():
                H, built = build_feature_store(Xd, layers, url,
                                                           fingerprint=design.fingerprint,
                                                           dtype=dtype)
            design.build_info = built
            design.array = add_bias_column(H)
            design.store, design.store_format = url, store_backend(url).kind
        if persistent:
            # An interrupted solve resumes from here: normal-tiled's Gram panels and CG
            # state, LSQR's iterate (lsrn), split's solved blocks.
            design.checkpoint = SolveCheckpoint.for_store(url, design.fingerprint)
    except BaseException:
        design.close()
        raise
