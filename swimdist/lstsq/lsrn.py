"""LSRN: sketch -> SVD with a rank cutoff -> preconditioner -> LSQR or Chebyshev, on the workers.

Meng, Saunders and Mahoney, "LSRN: A parallel iterative solver for strongly over- or
underdetermined systems", SIAM J. Sci. Comput. 36 (2014):

1. ``s = ceil(gamma * n)``; sketch ``S [A | Y]`` in one pass (:mod:`.sketch`: ``S`` is drawn
   block by block on the workers from a stream keyed by (seed, row block), never stored).
2. SVD ``S A = U Sigma V^T`` (s x n, on the client); keep ``sigma > rcond * sigma_max``.
3. ``P = V_r (Sigma_r^2 + alpha)^(-1/2)`` (``alpha = 0``: LSRN's ``V_r Sigma_r^-1``).
4. Iterate on ``min ||[A; sqrt(alpha) I] P z - [Y; 0]||`` from the sketch-and-solve solution
   ``z0`` (:mod:`.lsqr`): one pass over ``A`` per iteration, K right-hand sides in lockstep.
5. ``X = P z``.

Where this deviates from the paper
----------------------------------
- Warm start from sketch-and-solve, ``z0 = (Sigma_r^2 + alpha)^(-1/2) Sigma_r U_r^T (S Y)``:
  with a zero start, sketch-and-precondition is not numerically stable (Meier, Nakatsukasa,
  Townsend and Webb, SIAM J. Matrix Anal. Appl. 2024). ``S Y`` comes out of the same pass.
- The rank cutoff ``rcond`` is applied to the sketch's singular values, so the solution lies in
  the kept subspace of ``S A``; the paper keeps the full numerical rank.
- Tikhonov damping: the preconditioner is built from ``[S A; sqrt(alpha) I]`` (the identity rows
  need no sketch), so ``[A; sqrt(alpha) I] P`` keeps the distortion bounds below.
- Sparse-sign sketches (about ``nnz`` nonzeros per column of ``S``; Clarkson-Woodruff,
  Tropp et al.) are offered besides the Gaussian; they cost about one read of ``A``.
- The Chebyshev bounds use Davidson-Szarek's ``1 -+ sqrt(n/s) -+ t/sqrt(s)`` with
  ``t = sqrt(2 log(1/delta))`` for a failure probability ``delta`` (default 1e-3); they are
  proved for the Gaussian only. For the sparse sign they are a heuristic (checked in tests);
  a divergence is detected and reported.

Distortion bounds: for a Gaussian ``S`` with N(0, 1/s) entries and ``sigma_i(S U_A)`` in
``[1 - e, 1 + e]`` (``U_A`` an orthonormal basis of ``range(A)``), every singular value of
``A P`` lies in ``[1 / (1 + e), 1 / (1 - e)]`` whatever the conditioning of ``A``; hence LSQR's
iteration count for a fixed tolerance does not grow with ``cond(A)``.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np

from .. import config, progress
from .._dask import wait_for
from ..design import as_design
from ..exceptions import ValidationError
from ..validation import check_nonnegative, check_nonnegative_int, check_positive_int
from ._common import digest_array, is_dask
from .lsqr import RowBlockOperator, chebyshev, chebyshev_iterations, lsqr
from .result import LstsqResult
from .sketch import DEFAULT_NNZ, KINDS, sketch_size
from .sketch import sketch as sketch_rows

logger = logging.getLogger("swimdist.lstsq.lsrn")

ITERATIONS = ("lsqr", "chebyshev")

__all__ = ["ITERATIONS", "chebyshev_bounds", "solve_lsrn"]


def chebyshev_bounds(n: int, s: int, delta: float = 1e-3) -> tuple[float, float]:
    """Bounds ``(lo, hi)`` on the singular values of ``A P`` after an (s x N) Gaussian sketch.

    ``e = sqrt(n / s) + sqrt(2 log(1 / delta)) / sqrt(s)``; ``(lo, hi) = (1/(1+e), 1/(1-e))``,
    valid with probability at least ``1 - delta`` (Davidson and Szarek 2001).

    Raises
    ------
    ValidationError
        When ``1 - e < 0.1`` (the bound is useless): the message gives the ``gamma`` needed.
    """
    t = math.sqrt(2 * math.log(1 / delta))
    e = math.sqrt(n / s) + t / math.sqrt(s)
    if 1 - e < 0.1:
        need = ((math.sqrt(n) + t) / 0.9) ** 2 / n
        raise ValidationError(
            f"The Chebyshev iteration needs singular-value bounds from the sketch, but with "
            f"n={n} columns and s={s} sketch rows the lower distortion edge 1 - {e:.3f} is below "
            f"0.1. Use gamma >= {math.ceil(need * 10) / 10:g} or lsrn_iterations='lsqr'."
        )
    return 1 / (1 + e), 1 / (1 - e)


def solve_lsrn(
    A,
    Y,
    *,
    rcond: float = 1e-10,
    alpha: float = 0.0,
    gamma: float | None = None,
    tol: float | None = None,
    max_iter: int | None = None,
    sketch: str = "gaussian",
    lsrn_iterations: str = "lsqr",
    seed: int = 0,
    nnz: int = DEFAULT_NNZ,
    sketch_block_bytes: int | str | None = None,
    persist: bool = True,
    delta: float = 1e-3,
    checkpoint_every: int = 10,
) -> LstsqResult:
    """Solve ``min ||A X - Y||_F`` (+ ``alpha ||X||_F^2``) with LSRN on row blocks of ``A``.

    Parameters
    ----------
    A : DesignMatrix, ndarray or dask.array.Array, shape (N, n)
        numpy, or row-chunked dask (from a Zarr store or still lazy). Passes over ``A``:
        one to persist it (``persist=True``, dask), one for the sketch, one per iteration,
        plus one to start the iteration. With a design matrix that has a ``checkpoint``,
        LSQR saves its iterate there every ``checkpoint_every`` iterations; a solve started
        again with the checkpoint of the same problem (the sketch is recomputed: it is
        seeded) warm-starts from the last saved iterate instead of the sketch-and-solve
        one, and converges to the same solution within ``tol``.
    Y : ndarray, shape (N, K)
        Right-hand sides, solved in lockstep.
    rcond : float
        Relative cutoff on the sketch's singular values.
    alpha : float
        Tikhonov damping.
    gamma : float, optional
        Oversampling, ``s = ceil(gamma * n)`` (default ``swimdist.solver.gamma``, 2).
    tol : float, optional
        LSQR's stopping tolerance, scipy's ``atol = btol = tol`` (default
        ``swimdist.solver.tol``): a column stops when ``||r|| <= tol (||Y|| + ||B|| ||z||)``
        or ``||B^T r|| <= tol ||B|| ||r||`` with ``B = [A; sqrt(alpha) I] P`` (:mod:`.lsqr`).
    max_iter : int, optional
        Iteration limit (default ``swimdist.solver.max-iter``); reaching it warns with
        :class:`~swimdist.exceptions.ConvergenceWarning` and returns the best iterate.
    sketch : {"gaussian", "sparse-sign"}
        Sketching matrix (:mod:`.sketch`).
    lsrn_iterations : {"lsqr", "chebyshev"}
        LSQR (adaptive, two scalars per column per step) or the Chebyshev semi-iteration
        (fixed coefficients from the distortion bounds: for high-latency clusters).
    seed : int
        Seed of the sketch's keyed random stream: with the same seed and chunking the solution
        is the same on any number of workers.
    nnz : int
        Nonzeros per column of the sparse-sign sketch.
    sketch_block_bytes : int or str, optional
        Memory budget of the piece of ``S`` one task (worker thread) holds, e.g. ``"64MiB"``
        (default ``swimdist.solver.sketch-block-bytes`` if set, else 64 MiB). A task also holds
        its (s, n + K) partial sum and its row block.
    persist : bool
        Keep ``A`` in worker memory for the iterations (dask input). With False every pass
        reads ``A`` from its source: use it when ``A`` is in a store and memory is short.
    delta : float
        Failure probability of the Chebyshev bounds.
    checkpoint_every : int
        Iterations between saved LSQR iterates (with the design matrix's checkpoint).

    Returns
    -------
    LstsqResult
        With ``iterations``, ``residual_history`` (relative, from the recurrences; entry 0 is
        the sketch-and-solve start), ``timings`` (``persist``, ``sketch``, ``svd``,
        ``iterate``) and ``info`` (sketch size, bounds, stop reason, graph sizes...).
    """
    gamma = check_nonnegative(config.get("solver.gamma", 2.0) if gamma is None else gamma,
                              "gamma")
    tol = check_nonnegative(config.get("solver.tol", 1e-12) if tol is None else tol, "tol")
    max_iter = check_nonnegative_int(
        int(config.get("solver.max-iter", 500)) if max_iter is None else max_iter, "max_iter")
    if sketch not in KINDS:
        raise ValidationError(f"Unknown sketch {sketch!r}; valid sketches are: {', '.join(KINDS)}.")
    if lsrn_iterations not in ITERATIONS:
        raise ValidationError(
            f"Unknown lsrn_iterations {lsrn_iterations!r}; valid: {', '.join(ITERATIONS)}."
        )
    if sketch_block_bytes is None:
        sketch_block_bytes = config.get("solver.sketch-block-bytes", None)
    if isinstance(sketch_block_bytes, str):
        from dask.utils import parse_bytes

        sketch_block_bytes = parse_bytes(sketch_block_bytes)
    checkpoint_every = check_positive_int(checkpoint_every, "checkpoint_every")
    design = as_design(A)
    A, checkpoint = design.array, design.checkpoint
    n = A.shape[1]
    s = sketch_size(n, gamma)
    bounds = chebyshev_bounds(n, s, delta) if lsrn_iterations == "chebyshev" else None
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    op = RowBlockOperator(A, persist=persist)
    if op.distributed:
        wait_for(op.A)
    timings["persist"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    Yn = Y.compute() if is_dask(Y) else np.asarray(Y, dtype=np.float64)
    SA, SY = sketch_rows(
        op.A, Yn, s=s, kind=sketch, seed=seed, nnz=nnz, block_bytes=sketch_block_bytes
    )
    timings["sketch"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    with progress.stage("svd", total=1, unit="steps") as st:  # one LAPACK call
        U, sig, Vt = np.linalg.svd(SA, full_matrices=False)
        st.update(1)
    smax = float(sig[0]) if sig.size else 0.0
    rank = int(np.sum(sig > rcond * smax)) if smax > 0 else 0
    timings["svd"] = time.perf_counter() - t0
    if rank == 0:
        X = np.zeros((n, Yn.shape[1]))
        return LstsqResult(
            X,
            "lsrn",
            rank=0,
            timings=timings,
            info={"sketch": sketch, "s": s, "stop_reason": "the sketch of A is zero"},
        )
    sr = sig[:rank]
    scale = 1.0 / np.sqrt(sr**2 + alpha)
    P = Vt[:rank].T * scale
    z0 = (scale * sr)[:, None] * (U[:, :rank].T @ SY)
    del U, SA

    resumed = 0
    if checkpoint is not None and lsrn_iterations == "lsqr":
        checkpoint.open({"solver": "lsrn", "N": int(A.shape[0]), "n": int(n),
                         "K": int(Yn.shape[1]), "sketch": sketch, "seed": int(seed),
                         "gamma": gamma, "rcond": float(rcond), "alpha": float(alpha),
                         "rank": rank, "y": digest_array(Yn)})
        state = checkpoint.load("lsqr")
        if state is not None and state["z"].shape == z0.shape:
            z0, resumed = state["z"], int(state["it"])
            logger.info("lsrn: LSQR resumed from its iterate at iteration %d", resumed)

    t0 = time.perf_counter()
    if lsrn_iterations == "lsqr":
        out = lsqr(op, Yn, P=P, damp=math.sqrt(alpha), z0=z0, tol=tol, max_iter=max_iter,
                   checkpoint=checkpoint, checkpoint_every=checkpoint_every)
    else:
        out = chebyshev(
            op,
            Yn,
            sigma_bounds=bounds,
            P=P,
            damp=math.sqrt(alpha),
            z0=z0,
            tol=tol,
            max_iter=max_iter,
        )
    timings["iterate"] = time.perf_counter() - t0
    X = P @ out.z
    assert X.dtype == np.float64
    info = {
        "sketch": sketch,
        "s": s,
        "gamma": gamma,
        "seed": seed,
        "lsrn_iterations": lsrn_iterations,
        "sketch_sigma_max": smax,
        "sketch_sigma_min_kept": float(sr[-1]),
        "stop_reason": out.stop_reason,
        "converged_columns": int(out.converged.sum()),
        "arnorm_certificate": (None if out.certificate is None
                               else float(np.max(out.certificate))),
        "graph_sizes": list(op.graph_sizes),
        "resumed_at": resumed,
    }
    if bounds is not None:
        info["sigma_bounds"] = bounds
        info["predicted_iterations"] = chebyshev_iterations(*bounds, tol)
    logger.info(
        "lsrn: s=%d rank=%d iterations=%d (%s) timings=%s",
        s,
        rank,
        out.iterations,
        out.stop_reason,
        timings,
    )
    return LstsqResult(
        solution=X,
        method="lsrn",
        rank=rank,
        iterations=out.iterations,
        residual_history=out.residual_history,
        timings=timings,
        converged=bool(out.converged.all()),
        info=info,
    )
