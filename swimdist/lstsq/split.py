"""Split-and-solve: block Gauss-Seidel over ordered column blocks of ``A``.

The columns of ``A`` (the hidden neurons) are put in an order, grouped into ``n_splits``
contiguous blocks ``A_1 .. A_k`` of near-equal width, and solved one block at a time against
the running residual::

    R_0 = Y
    for j in 1..k:   c_j = argmin ||A_j c - R_{j-1}||   (sub-solver, same rcond and alpha)
                     R_j = R_{j-1} - A_j c_j

One pass over the blocks is one block Gauss-Seidel sweep; ``split_sweeps > 1`` repeats it
(each block then solves for a correction ``d`` of its coefficients against the current
residual), stopping early once a sweep improves the relative residual by less than
``sweep_tol`` of its value. Every block solve minimises the residual over a subspace that
contains the current iterate's block, so the residual never grows (up to rounding); a sweep
that ends with a larger residual than it started with is undone and the iteration stops.

Orders (``split_order``)
------------------------
``"norm"``
    Ascending norm of the neurons' weight vectors (``column_norms``; for a plain matrix
    without ``column_norms``, the norms of ``A``'s columns): small-norm (smooth, wide)
    neurons first, sharp ones last. The seed report's "sorted" strategy.
``"norm-desc"``
    Descending norm.
``"ordered"``
    As sampled (the column order of ``A``).
``"random"``
    A permutation drawn from ``numpy.random.default_rng(seed)``.
An integer array (a permutation of the neuron columns) is used as given.

The bias column
---------------
With a design matrix whose ``bias`` flag is set, the last column of ``A`` is the all-ones
bias column of the output layer. It takes no part in the ordering: it is appended to *every*
block, so each block solve also re-centres the residual, and the intercept is the sum of the
blocks' bias coefficients. (Measured on the sine problem this is as accurate as or more
accurate than solving it with the first block only; and it makes one block identical to the
full solve.)

Memory and data movement
------------------------
With a numpy ``A`` everything runs in memory with numpy. With a dask ``A`` (row-chunked,
one column chunk) or a design matrix with a block builder, one block at a time is built on the
workers and persisted there (generated once, used by the sub-solver and the residual
update, then released), and the residual ``R`` (N x K) stays persisted on the workers in
``A``'s row chunks: ``R_j = R_{j-1} - A_j c_j`` runs row block by row block, and the task
graph does not grow from block to block. ``design.block_features(columns)`` returns the lazy
(row-chunked) features of just those neurons, so the full ``A`` is never built: the
memory for features at any time is one block (plus what the sub-solver needs: ``"direct"``
gathers that block on the client). Extra sweeps build every block again.

Where this deviates from the seed report: the report describes one pass in sorted order;
sweeps, the shared bias column and the choice of sub-solver are additions.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from .. import progress
from .._dask import wait_for
from ..design import as_design, row_chunked, rows_like
from ..exceptions import ValidationError
from ..features import add_bias_column
from ._common import column_norms as _column_norms
from ._common import digest_array, is_dask
from .result import LstsqResult

logger = logging.getLogger("swimdist.lstsq.split")

#: Accepted names of ``split_order``.
SPLIT_ORDERS = ("norm", "norm-desc", "ordered", "random")


def neuron_order(n: int, split_order, *, norms: np.ndarray | None = None,
                 seed: int = 0) -> np.ndarray:
    """The permutation of ``n`` neuron columns that ``split_order`` asks for.

    Parameters
    ----------
    n : int
        Number of neuron columns.
    split_order : str or array of int
        One of :data:`SPLIT_ORDERS`, or a permutation of ``range(n)``.
    norms : ndarray, shape (n,), optional
        Weight-vector norms; required by ``"norm"`` and ``"norm-desc"``.
    seed : int
        Seed of ``"random"``.
    """
    if not isinstance(split_order, str):
        order = np.asarray(split_order)
        if (order.shape != (n,) or not np.issubdtype(order.dtype, np.integer)
                or not np.array_equal(np.sort(order), np.arange(n))):
            raise ValidationError(f"split_order given as an array must be a permutation of the "
                                  f"{n} neuron columns; got shape {order.shape}, dtype "
                                  f"{order.dtype}.")
        return order.astype(np.intp)
    if split_order not in SPLIT_ORDERS:
        raise ValidationError(f"Unknown split_order {split_order!r}; valid orders are: "
                              f"{', '.join(SPLIT_ORDERS)} (or a permutation array).")
    if split_order == "ordered":
        return np.arange(n, dtype=np.intp)
    if split_order == "random":
        return np.random.default_rng(seed).permutation(n).astype(np.intp)
    if norms is None or np.shape(norms) != (n,):
        raise ValidationError(f"split_order={split_order!r} needs column_norms of shape ({n},); "
                              f"got {None if norms is None else np.shape(norms)}.")
    key = np.asarray(norms, dtype=np.float64)
    # Stable sort, so equal norms (duplicate neurons) keep their sampled order.
    return np.argsort(-key if split_order == "norm-desc" else key, kind="stable").astype(np.intp)


def solve_split(A, Y, *, rcond: float = 1e-10, alpha: float = 0.0, n_splits: int | None = None,
                split_order="norm", sub_solver: str = "direct", split_sweeps: int = 1,
                sweep_tol: float = 1e-3, seed: int = 0,
                sub_options: dict | None = None) -> LstsqResult:
    """Solve ``min ||A X - Y||_F`` block by block over ordered column blocks (see module doc).

    Parameters
    ----------
    A : DesignMatrix, ndarray or dask array, shape (N, n)
        The design matrix. Its ``bias`` flag marks the last column as the all-ones bias
        column (solved with every block); its ``column_norms`` (the norms of the neurons'
        weight vectors) feed the ``"norm"`` orders; with a block builder
        (:meth:`~swimdist.design.DesignMatrix.block_features`) only the array's shape and
        row chunks are used (the lazy full matrix is never computed); its ``checkpoint``
        keeps the coefficients and residual after every block, so that a solve of the same
        problem started again skips the blocks already solved (their features are never
        generated again) and reaches the same solution.
    Y : ndarray or dask array, shape (N, K)
    rcond, alpha : float
        Cutoff and Tikhonov damping of every block solve. With ``alpha > 0`` each block is
        damped separately: the result is not the ridge solution of the full problem.
    n_splits : int, optional
        Number of column blocks of the neurons (1: the sub-solver on all of ``A``); by
        default 4, or one per neuron when there are fewer.
    split_order : {"norm", "norm-desc", "ordered", "random"} or array of int
        Order of the neurons before they are grouped (see module doc).
    sub_solver : str
        A registered solver name (not ``"split"``) used for every block.
    split_sweeps : int
        Maximum number of block Gauss-Seidel sweeps.
    sweep_tol : float
        Stop when a sweep lowers the relative residual by less than ``sweep_tol`` times it.
    seed : int
        Seed of the ``"random"`` order; sub-solver seeds are derived from it per block
        (``SeedSequence([seed, sweep, block])``).
    sub_options : dict, optional
        Options of the sub-solver (e.g. ``{"gamma": 3, "tol": 1e-10}`` for ``"lsrn"``);
        unknown ones are refused.

    Returns
    -------
    LstsqResult
        ``solution`` in ``A``'s column order. ``residual_history``: relative residual after
        every block of every sweep. ``info``: ``neuron_order`` (the permutation),
        ``blocks`` (block sizes), ``block_residuals`` (one list per sweep), ``sweeps``,
        ``stop_reason``, ``block_ranks``, ``sub_solver``, ``split_order``, ``bias``.
    """
    from . import check_options, get_solver, solver_options  # late: the registry imports us

    t_start = time.perf_counter()
    design = as_design(A)
    A, intercept, column_norms = design.array, design.bias, design.column_norms
    block_features = design.block_builder
    checkpoint = design.checkpoint
    N, n = A.shape
    if sub_solver == "split":
        raise ValidationError("sub_solver cannot be 'split'; choose e.g. 'direct'.")
    sub = get_solver(sub_solver)
    if sub_options is not None and not isinstance(sub_options, dict):
        raise ValidationError(f"sub_options must be a dict; got {type(sub_options).__name__}.")
    sub_options = dict(sub_options or {})
    check_options(sub_solver, sub_options)
    takes_seed = "seed" in solver_options(sub_solver)
    n_neurons = n - int(bool(intercept))
    if n_splits is None:
        n_splits = max(1, min(4, n_neurons))
    if isinstance(n_splits, bool) or not isinstance(n_splits, int | np.integer) or n_splits < 1:
        raise ValidationError(f"n_splits must be a positive integer; got {n_splits!r}.")
    if n_neurons < 1:
        raise ValidationError(f"A has no neuron columns to split (shape {A.shape}, "
                              f"intercept={intercept}).")
    if n_splits > n_neurons:
        raise ValidationError(f"n_splits={n_splits} exceeds the {n_neurons} neuron columns of "
                              "A; use at most one block per column.")
    if isinstance(split_sweeps, bool) or not isinstance(split_sweeps, int | np.integer) \
            or split_sweeps < 1:
        raise ValidationError(f"split_sweeps must be a positive integer; got {split_sweeps!r}.")
    if not np.isfinite(sweep_tol) or sweep_tol < 0:
        raise ValidationError(f"sweep_tol must be a finite number >= 0; got {sweep_tol!r}.")
    if block_features is not None and not is_dask(A):
        raise ValidationError("a block builder needs A as a (lazy) row-chunked dask array "
                              "giving the shape and row chunks of the design matrix.")
    norms = column_norms
    if norms is None and isinstance(split_order, str) and split_order.startswith("norm"):
        if block_features is not None:
            raise ValidationError(f"split_order={split_order!r} with a block builder needs "
                                  "the design matrix's column_norms (the norms of the "
                                  "neurons' weight vectors).")
        norms = _column_norms(A[:, :n_neurons])
    order = neuron_order(n_neurons, split_order, norms=norms, seed=seed)
    groups = list(np.array_split(order, n_splits))

    lazy = is_dask(A) or block_features is not None or is_dask(Y)
    if lazy:
        A = row_chunked(A)
        R = rows_like(Y, A).astype(np.float64).persist()
        Rn = R.compute()
    else:
        A = np.asarray(A)
        R = Rn = np.array(Y, dtype=np.float64)
    # Rn: the residual (N x K, small) on the client, as the sub-solvers take it.
    K = R.shape[1]
    ynorm = float(np.linalg.norm(Rn))
    scale = ynorm if ynorm > 0 else 1.0
    X = np.zeros((n, K), dtype=np.float64)

    def block(cols: np.ndarray):
        """The block's columns of A (bias appended): numpy, or a persisted dask array."""
        if not lazy:
            idx = np.r_[cols, n - 1] if intercept else cols
            return A[:, idx]
        if block_features is not None:
            B = block_features(np.asarray(cols))
            if B.shape != (N, len(cols)):
                raise ValidationError(f"block_features returned shape {B.shape}; expected "
                                      f"({N}, {len(cols)}).")
            B = row_chunked(B)
            if B.chunks[0] != A.chunks[0]:
                B = B.rechunk({0: A.chunks[0]})
            B = add_bias_column(B) if intercept else B
        else:
            B = A[:, np.r_[cols, n - 1] if intercept else cols]
        B = B.persist()
        wait_for(B)  # in worker memory: honest stage timings
        return B

    history: list[float] = []
    per_sweep: list[list[float]] = []
    ranks: list[list[int | None]] = []
    timings = {"build": 0.0, "solve": 0.0, "update": 0.0}
    rel = 1.0 if ynorm > 0 else 0.0
    stop_reason = "max_sweeps"
    sweeps_done = 0
    start = (0, 0)  # (sweep, block) to start from
    resumed = None
    if checkpoint is not None:
        checkpoint.open({"solver": "split", "N": int(N), "n": int(n), "K": int(K),
                         "order": [int(i) for i in order], "n_splits": len(groups),
                         "sub_solver": sub_solver, "sweeps": int(split_sweeps),
                         "rcond": float(rcond), "alpha": float(alpha), "seed": int(seed),
                         "sub_options": sorted(map(str, sub_options.items())),
                         "y": digest_array(Rn)})
        state = checkpoint.load("split")
        if state is not None:
            X, Rn, rel = state["X"], state["Rn"], float(state["rel"])
            history = [float(v) for v in state["history"]]
            nb = len(groups)
            per_sweep = [history[i:i + nb] for i in range(0, len(history), nb)]
            ranks = [[None if r < 0 else int(r) for r in state["ranks"][i:i + nb]]
                     for i in range(0, len(history), nb)]
            start = (len(history) // nb, len(history) % nb)
            resumed, sweeps_done = start, start[0]
            if lazy:
                R = rows_like(Rn, A).persist()
            else:
                R = Rn
            logger.info("split: resumed after %d solved blocks", len(history))

    def save(X_prev, Rn_prev, rel_prev):
        flat_ranks = [(-1 if r is None else r) for rs in ranks for r in rs]
        checkpoint.save("split", X=X, Rn=Rn, rel=np.array(rel), history=np.array(history),
                        ranks=np.array(flat_ranks, dtype=np.int64), X_prev=X_prev,
                        Rn_prev=Rn_prev, rel_prev=np.array(rel_prev))

    if resumed is not None and start[1] == 0 and start[0] > 0:
        # killed between a sweep's last block and its stopping test: take the test now
        rel_prev = float(state["rel_prev"])
        if start[0] > 1 and rel > rel_prev:
            X, Rn, rel = state["X_prev"], state["Rn_prev"], rel_prev
            R = rows_like(Rn, A).persist() if lazy else Rn
            start, stop_reason = (split_sweeps, 0), "no_improvement"
        elif (start[0] > 1 and rel_prev - rel <= sweep_tol * rel_prev) or rel == 0:
            start, stop_reason = (split_sweeps, 0), "converged"
    for sweep in range(start[0], split_sweeps):
        if (sweep, 0) < start:  # resuming inside this sweep: its start state was saved
            X_prev, Rn_prev = state["X_prev"], state["Rn_prev"]
            rel_prev = float(state["rel_prev"])
            R_prev = rows_like(Rn_prev, A).persist() if lazy else Rn_prev
            sweep_res, sweep_ranks = per_sweep.pop(), ranks.pop()
        else:
            X_prev, R_prev, Rn_prev, rel_prev = X.copy(), R, Rn, rel
            sweep_res, sweep_ranks = [], []
        name = "split blocks" if split_sweeps == 1 else f"split sweep {sweep + 1}"
        todo = sum((sweep, j) >= start for j in range(len(groups)))  # resumed: fewer
        with progress.stage(name, total=todo, unit="blocks") as st:
            for j, cols in enumerate(groups):
                if (sweep, j) < start:
                    continue
                t0 = time.perf_counter()
                B = block(cols)
                t1 = time.perf_counter()
                sub_seed = int(np.random.SeedSequence([seed, sweep, j]).generate_state(1)[0])
                seed_kw = {"seed": sub_seed} if takes_seed else {}
                res = sub(B, Rn, rcond=rcond, alpha=alpha, **seed_kw, **sub_options)
                d = np.asarray(res.solution, dtype=np.float64).reshape(-1, K)
                t2 = time.perf_counter()
                # the sub-solver's stages, summed over blocks
                for key, sec in res.timings.items():
                    timings[f"sub_{key}"] = timings.get(f"sub_{key}", 0.0) + sec
                if lazy:
                    # Row block by row block on the workers; the persisted R keeps the graph
                    # flat.
                    R = (R - B.dot(d)).persist()
                    Rn = R.compute()
                else:
                    R = Rn = R - B @ d
                del B
                X[cols] += d[:len(cols)]
                if intercept:
                    X[n - 1] += d[-1]
                rel = float(np.linalg.norm(Rn)) / scale
                t3 = time.perf_counter()
                timings["build"] += t1 - t0
                timings["solve"] += t2 - t1
                timings["update"] += t3 - t2
                history.append(rel)
                sweep_res.append(rel)
                sweep_ranks.append(res.rank)
                logger.debug("split sweep %d block %d/%d (%d columns): relative residual %.3e",
                             sweep + 1, j + 1, len(groups), len(cols), rel)
                st.update(1, residual=rel)
                if checkpoint is not None:
                    ranks.append(sweep_ranks)  # saved with the current sweep's ranks included
                    save(X_prev, Rn_prev, rel_prev)
                    ranks.pop()
        per_sweep.append(sweep_res)
        ranks.append(sweep_ranks)
        sweeps_done = sweep + 1
        if sweep > 0 and rel > rel_prev:
            # Rounding made this sweep worse: keep the previous iterate.
            X, R, Rn, rel = X_prev, R_prev, Rn_prev, rel_prev
            stop_reason = "no_improvement"
            break
        if sweep > 0 and rel_prev - rel <= sweep_tol * rel_prev:
            stop_reason = "converged"
            break
        if rel == 0:
            stop_reason = "converged"
            break
    converged = split_sweeps == 1 or stop_reason != "max_sweeps"
    resid = np.sqrt(np.einsum("ij,ij->j", Rn, Rn))
    timings["split_total"] = time.perf_counter() - t_start
    logger.info("split: %d blocks, order %s, %d sweep(s), relative residual %.3e (%s)",
                len(groups), split_order if isinstance(split_order, str) else "given",
                sweeps_done, rel, stop_reason)
    return LstsqResult(
        solution=X,
        method="split",
        rank=None,
        residual_norm=resid,
        relative_residual=rel,
        iterations=sweeps_done,
        residual_history=history,
        timings=timings,
        converged=converged,
        info={
            "neuron_order": order,
            "blocks": [len(g) for g in groups],
            "block_residuals": per_sweep,
            "block_ranks": ranks,
            "sweeps": sweeps_done,
            "stop_reason": stop_reason,
            "sub_solver": sub_solver,
            "split_order": split_order if isinstance(split_order, str) else "given",
            "n_splits": len(groups),
            "bias": "every block" if intercept else "none",
            "resumed_after_blocks": 0 if resumed is None else resumed[0] * len(groups)
            + resumed[1],
        },
    )
