"""LSQR and Chebyshev semi-iteration over a row-chunked matrix, all right-hand sides in lockstep.

Both iterations solve the right-preconditioned, optionally damped problem

    min_Z || [A; d I] P Z - [Y; 0] ||_F ,    X = P Z ,

for K right-hand sides at once, with ``A`` (N, n) held in row blocks (numpy, or a dask array
persisted on the workers or read from its store) and everything else small. Each iteration is
**one pass over A** (:class:`RowBlockOperator`): every row block updates its slice of the
residual-like vector ``U_i <- a * U_i + A_i W`` and returns ``A_i^T U_i`` and ``||U_i||^2``,
which a tree reduction sums. Only (n, K) and (K,) arrays reach the client; the (N, K) vectors
stay where the rows are. Each step builds a graph of the same size from persisted pieces and
computes once, so no task graph grows from one iteration to the next.

LSQR (Paige and Saunders 1982) is written out here rather than taken from
``scipy.sparse.linalg.lsqr`` because scipy's takes one right-hand side and two separate
operator calls (``A v`` and ``A^T u``) per iteration; fusing them into one pass and running K
columns in lockstep is the point. The recurrences and stopping tests follow scipy's
``lsqr.py`` (``atol = btol = tol``):

- ``rnorm <= tol * ||Y_k|| + tol * ||B|| * ||z_k||``  (a consistent system is solved), or
- ``||B^T r_k|| <= tol * ||B|| * ||r_k||``              (a least-squares solution is reached),

with ``B = [A; d I] P`` and ``||B||`` scipy's running Frobenius estimate, plus scipy's
machine-precision stops (the same tests at ``eps``: ``1 + test <= 1``). A column that meets
any test is converged (its ``arnorm``, the certificate, is in the outcome); the iteration
stops when all are.

The Chebyshev semi-iteration (Golub and Varga 1961; as in LSRN, Meng, Saunders and Mahoney
2014, Algorithm 2) needs bounds ``sigma_lo <= sigma(B) <= sigma_hi`` instead of inner products:
its coefficients are fixed in advance, so an iteration is the same one pass with no
data-dependent scalars. It stops after the a-priori count of :func:`chebyshev_iterations`
(the error then fell by ``tol``), or earlier when the tests above hold (with
``||B|| = sigma_hi``: residual norms and ``B^T r`` come out of the pass anyway), and returns
the best iterate (smallest ``||B^T r||``).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np

from .. import progress
from ..design import row_chunked, rows_like
from ..exceptions import ConvergenceWarning, ValidationError
from ._common import column_norms, is_dask
from .kernels import f64_pieces

logger = logging.getLogger("swimdist.lstsq.lsqr")

__all__ = ["IterationOutcome", "RowBlockOperator", "chebyshev", "lsqr"]


class RowBlockOperator:
    """``A`` (N, n) kept in row blocks, with the one fused pass the iterations need.

    Parameters
    ----------
    A : ndarray or dask.array.Array, shape (N, n)
        numpy, or a row-chunked dask array (columns are merged into one chunk).
    persist : bool
        dask input only: keep ``A`` in (worker) memory, so that later passes do not recompute
        it. With False every pass reads ``A`` from its source (e.g. a Zarr store), once.
    split_every : int
        Fan-in of the tree reductions.
    """

    def __init__(self, A, *, persist: bool = True, split_every: int = 4) -> None:
        self.split_every = split_every
        if is_dask(A):
            A = row_chunked(A)
            if persist:
                A = A.map_blocks(_aligned, dtype=A.dtype).persist()
        else:
            A = np.asarray(A)
        self.A = A
        self.shape = A.shape
        self.distributed = is_dask(A)
        #: Number of tasks in the graph of every pass (dask input), for inspection.
        self.graph_sizes: list[int] = []

    def rows(self, Y):
        """``Y`` placed like ``A``'s rows: a persisted dask array, or a float64 numpy copy."""
        if self.distributed:
            return rows_like(Y, self.A).astype(np.float64).persist()
        Y = Y.compute() if is_dask(Y) else np.asarray(Y)
        return np.array(Y.reshape(Y.shape[0], -1), dtype=np.float64)

    def update(self, U, W: np.ndarray, a: np.ndarray):
        """One pass: ``U' = a * U + A W``; return ``(U', A^T U', ||U'_k||^2)``.

        ``U`` is (N, K) placed like the rows of ``A``; ``W`` is (n, K); ``a`` is (K,).
        """
        A = self.A
        if not self.distributed:
            Un = _times(A, W)
            Un += a * U
            return Un, A.T @ Un, np.einsum("ij,ij->j", Un, Un)
        K = W.shape[1]
        Wd = da.from_array(W, chunks=W.shape)
        ad = da.from_array(np.asarray(a, dtype=np.float64), chunks=len(a))
        # per row block: U_i' = a * U_i + A_i W  (one task per block)
        Un = da.blockwise(
            _axpy_block,
            "ik",
            A,
            "ij",
            Wd,
            "jk",
            U,
            "ik",
            ad,
            "k",
            dtype=np.float64,
            concatenate=True,
        )
        # per row block: [A_i^T U_i'; ||U_i'||^2] (1, n + 1, K), summed by a tree reduction
        parts = da.blockwise(
            _reduce_block,
            "bjk",
            A,
            "bj",
            Un,
            "bk",
            dtype=np.float64,
            adjust_chunks={"b": 1, "j": A.shape[1] + 1},
            concatenate=True,
        )
        red = parts.sum(axis=0, split_every=self.split_every)
        self.graph_sizes.append(_graph_size(Un, red))
        Un, red = dask.persist(Un, red)
        red = np.asarray(red.compute())
        assert red.shape == (A.shape[1] + 1, K)
        return Un, red[:-1], red[-1]

    def gather(self, U) -> np.ndarray:
        """Bring a row-placed (N, K) array to the client (for tests and diagnostics)."""
        return U.compute() if isinstance(U, da.Array) else U


def _graph_size(*collections) -> int:
    """Number of tasks in the graph computing ``collections`` together."""
    return sum(len(c.__dask_graph__()) for c in collections)


def _aligned(x: np.ndarray) -> np.ndarray:
    """``x`` itself when its data are aligned for its dtype, else an aligned copy.

    Arrays deserialized by distributed can start at any byte; numpy does not hand unaligned
    data to BLAS and sums them in another order, which would make results depend on where a
    block happened to land in memory (and so on the number of workers).
    """
    return np.require(x, requirements=["A"])


def _times(A: np.ndarray, W: np.ndarray) -> np.ndarray:
    """``A @ W`` for a tall ``A`` and a narrow ``W``, computed as ``(W^T A^T)^T``.

    Same product; OpenBLAS runs this layout 1.4-1.8x faster for (N, n) x (n, ~10) shapes
    (measured at 60 000 x 1001, 1 and 2 threads). The result is Fortran-ordered.
    """
    return (W.T @ A.T).T


def _axpy_block(A_i, W, U_i, a):
    A_i, W = _aligned(A_i), _aligned(W)
    if A_i.dtype == W.dtype:
        out = _times(A_i, W)
    else:
        # float32 A: a mixed-dtype product runs numpy's non-BLAS loop (29x slower); convert
        # a cache-sized slice of rows at a time and multiply in float64 (BLAS)
        out = np.empty((A_i.shape[0], W.shape[1]), order="F")
        for r0, ab in f64_pieces(A_i):
            out[r0:r0 + ab.shape[0]] = _times(ab, W)
    out += a * U_i
    return out


def _reduce_block(A_i, U_i):
    A_i, U_i = _aligned(A_i), _aligned(U_i)
    out = np.zeros((1, A_i.shape[1] + 1, U_i.shape[1]))
    if A_i.dtype == U_i.dtype:
        np.matmul(A_i.T, U_i, out=out[0, :-1])
    else:  # float32 A: as in _axpy_block
        for r0, ab in f64_pieces(A_i):
            out[0, :-1] += ab.T @ U_i[r0:r0 + ab.shape[0]]
    out[0, -1] = np.einsum("ij,ij->j", U_i, U_i)
    return out


@dataclass
class IterationOutcome:
    """What :func:`lsqr` and :func:`chebyshev` return.

    Attributes
    ----------
    z : ndarray, shape (r, K)
        The iterate in preconditioned coordinates (``X = P z``).
    iterations : int
        Iterations run (passes over ``A`` after the starting one).
    residual_history : list of float
        ``||[A; d I] X - [Y; 0]||_F / ||Y||_F`` after each iteration (from the recurrences);
        entry 0 is the starting point.
    rnorm : ndarray, shape (K,)
        Residual norm of every column at the returned iterate (recurrence value).
    converged : ndarray of bool, shape (K,)
        Columns that met the stopping tests.
    stop_reason : str
        ``"tolerance"``, ``"iteration limit"`` or ``"diverged"`` (Chebyshev).
    certificate : ndarray, shape (K,), optional
        ``||B^T r|| / (||B|| ||r||)`` per column at the returned iterate (LSQR's estimates):
        the least-squares optimality certificate; 0 for a consistent system solved exactly.
    """

    z: np.ndarray
    iterations: int
    residual_history: list[float]
    rnorm: np.ndarray
    converged: np.ndarray
    stop_reason: str
    certificate: np.ndarray | None = None


def _check_iteration_args(op, Y, P, z0, tol, max_iter):
    if not isinstance(op, RowBlockOperator):
        op = RowBlockOperator(op)
    N, n = op.shape
    if Y.ndim == 1:
        Y = Y[:, None]
    if Y.ndim != 2 or Y.shape[0] != N:
        raise ValidationError(f"Y must have shape ({N}, K) like A's rows; got {Y.shape}.")
    K = Y.shape[1]
    P = np.eye(n) if P is None else np.asarray(P, dtype=np.float64)
    if P.ndim != 2 or P.shape[0] != n:
        raise ValidationError(f"P must have shape ({n}, r); got {P.shape}.")
    r = P.shape[1]
    z0 = np.zeros((r, K)) if z0 is None else np.asarray(z0, dtype=np.float64).reshape(r, K)
    if not (np.isfinite(tol) and 0 <= tol < 1):
        raise ValidationError(f"tol must be in [0, 1); got {tol!r}.")
    if int(max_iter) != max_iter or max_iter < 0:
        raise ValidationError(f"max_iter must be a non-negative integer; got {max_iter!r}.")
    return op, Y, P, z0, K


def _start(op, Y, P, damp, z0):
    """Residual at the warm start, one pass: row part, damping part, ``A^T R``, norms^2, ||Y||."""
    ynorm = column_norms(Y)
    U = op.rows(Y)
    K = U.shape[1]
    R, AtR, rn2 = op.update(U, -(P @ z0), np.ones(K))
    R_aug = -damp * (P @ z0)
    return R, R_aug, AtR, rn2 + np.einsum("ij,ij->j", R_aug, R_aug), ynorm


def lsqr(
    op,
    Y,
    *,
    P: np.ndarray | None = None,
    damp: float = 0.0,
    z0: np.ndarray | None = None,
    tol: float = 1e-12,
    max_iter: int = 500,
    checkpoint=None,
    checkpoint_every: int = 10,
) -> IterationOutcome:
    """LSQR on ``min ||[A; d I] P z - [Y; 0]||`` for all K columns in lockstep.

    Parameters
    ----------
    op : RowBlockOperator or array_like
        ``A`` in row blocks (an array is wrapped).
    Y : ndarray or dask.array.Array, shape (N, K)
    P : ndarray, shape (n, r), optional
        Right preconditioner (default: identity).
    damp : float
        ``d`` above; Tikhonov ``alpha = d**2`` on ``X = P z``.
    z0 : ndarray, shape (r, K), optional
        Warm start (LSQR then solves for the correction).
    tol : float
        ``atol = btol`` of the stopping tests (module docstring).
    max_iter : int
        Iteration limit; reaching it warns (:class:`ConvergenceWarning`) and returns the last
        iterate, which has the smallest residual of all (LSQR's residual is monotone).
    checkpoint : SolveCheckpoint, optional
        Every ``checkpoint_every`` iterations the iterate ``z`` is saved there as ``lsqr``
        (a resumed solve warm-starts from it; see :func:`.lsrn.solve_lsrn`).

    Returns
    -------
    IterationOutcome
    """
    op, Y, P, z0, K = _check_iteration_args(op, Y, P, z0, tol, max_iter)
    eps = np.finfo(np.float64).eps
    U, u_aug, AtU, rn2, ynorm = _start(op, Y, P, damp, z0)
    beta = np.sqrt(rn2)
    bsafe = np.where(beta > 0, beta, 1.0)
    v = P.T @ (AtU + damp * u_aug) / bsafe
    alpha = np.linalg.norm(v, axis=0)
    v /= np.where(alpha > 0, alpha, 1.0)
    w = v.copy()
    dz = np.zeros_like(z0)
    phibar, rhobar = beta.copy(), alpha.copy()
    anorm = np.zeros(K)
    yn = np.where(ynorm > 0, ynorm, 1.0)
    yF = max(float(np.linalg.norm(ynorm)), np.finfo(float).tiny)
    rnorm = beta.copy()
    arnorm = alpha * beta  # ||B^T r|| at the start
    history = [float(np.linalg.norm(beta)) / yF]
    # converged at the start: exact start (beta = 0) or B^T r = 0 (alpha = 0)
    converged = (beta <= tol * yn) | (alpha * beta == 0)
    it, reason = 0, "tolerance"
    with progress.stage("lsqr", unit="it", target=tol) as st:
        while not converged.all():
            if it >= max_iter:
                reason = "iteration limit"
                break
            it += 1
            # fused pass: U <- A P v - alpha u  (u = U / beta), then A^T U and ||U||^2
            a = -alpha / bsafe
            U, AtU, rn2 = op.update(U, P @ v, a)
            u_aug = damp * (P @ v) + a * u_aug
            beta = np.sqrt(rn2 + np.einsum("ij,ij->j", u_aug, u_aug))
            bsafe = np.where(beta > 0, beta, 1.0)
            anorm = np.sqrt(anorm**2 + alpha**2 + beta**2)
            v = P.T @ (AtU + damp * u_aug) / bsafe - beta * v
            alpha = np.linalg.norm(v, axis=0)
            v /= np.where(alpha > 0, alpha, 1.0)
            # plane rotation (scipy's _sym_ortho without the sign refinements: rho >= 0 here)
            rho = np.hypot(rhobar, beta)
            rsafe = np.where(rho > 0, rho, 1.0)
            c, s = rhobar / rsafe, beta / rsafe
            theta = s * alpha
            rhobar = -c * alpha
            phi = c * phibar
            phibar = s * phibar
            tau = s * phi
            dz += (phi / rsafe) * w
            w = v - (theta / rsafe) * w
            rnorm = np.abs(phibar)
            arnorm = alpha * np.abs(tau)
            znorm = np.linalg.norm(z0 + dz, axis=0)
            history.append(float(np.linalg.norm(rnorm)) / yF)
            test1 = rnorm <= tol * ynorm + tol * anorm * znorm
            test2 = arnorm <= tol * (anorm * rnorm + eps)
            # scipy's machine-precision stops (istop 4 and 5): the same tests with tol = eps,
            # met where rounding leaves nothing to gain, whatever tol asked for
            with np.errstate(divide="ignore", invalid="ignore"):
                prec1 = 1.0 + rnorm / (ynorm + anorm * znorm) <= 1.0
                prec2 = 1.0 + arnorm / (anorm * rnorm + eps) <= 1.0
            converged = converged | test1 | test2 | prec1 | prec2
            if checkpoint is not None and it % max(1, checkpoint_every) == 0:
                checkpoint.save("lsqr", z=z0 + dz, it=np.array(it))
            logger.debug(
                "lsqr it %d: relative residual %.3e, converged %d/%d",
                it,
                history[-1],
                converged.sum(),
                K,
            )
            # the stopping quantity of the farthest column (LSQR stops at tol)
            with np.errstate(divide="ignore", invalid="ignore"):
                stop = np.minimum(rnorm / (ynorm + anorm * znorm), arnorm / (anorm * rnorm + eps))
            st.update(1, residual=float(np.nan_to_num(stop, nan=0.0, posinf=0.0).max()))
    if not converged.all():
        warnings.warn(
            f"LSQR stopped at the iteration limit max_iter={max_iter} with {K - converged.sum()} "
            f"of {K} right-hand sides above tol={tol:g} (relative residual {history[-1]:.3e}); "
            "returning the last iterate. Raise max_iter or tol.",
            ConvergenceWarning,
            stacklevel=2,
        )
    with np.errstate(divide="ignore", invalid="ignore"):
        cert = np.where(rnorm > 0, arnorm / (anorm * rnorm + eps), 0.0)
    return IterationOutcome(z0 + dz, it, history, rnorm, converged, reason, cert)


def chebyshev_iterations(sigma_lo: float, sigma_hi: float, tol: float) -> int:
    """Iterations the Chebyshev semi-iteration needs for a ``tol`` error reduction (a priori).

    ``k = ceil(log(tol / 2) / log((sigma_hi - sigma_lo) / (sigma_hi + sigma_lo)))``.
    """
    q = (sigma_hi - sigma_lo) / (sigma_hi + sigma_lo)
    if q <= 0:
        return 1
    return max(1, math.ceil(math.log(max(tol, 1e-300) / 2) / math.log(q)))


def chebyshev(
    op,
    Y,
    *,
    sigma_bounds: tuple[float, float],
    P: np.ndarray | None = None,
    damp: float = 0.0,
    z0: np.ndarray | None = None,
    tol: float = 1e-12,
    max_iter: int = 500,
) -> IterationOutcome:
    """Chebyshev semi-iteration on the normal equations of ``B = [A; d I] P``, K columns at once.

    Parameters
    ----------
    op, Y, P, damp, z0, tol, max_iter
        As in :func:`lsqr`.
    sigma_bounds : (float, float)
        ``0 < sigma_lo <= sigma_hi`` bounding the singular values of ``B``; from the sketch's
        distortion bounds in LSRN. A lower bound above the true smallest value slows
        convergence; an upper bound below the largest can make it diverge, which is detected
        (the residual grows tenfold) and reported as a :class:`ConvergenceWarning`.

    Returns
    -------
    IterationOutcome
        The iterate with the smallest ``||B^T r||`` of each column.
    """
    lo, hi = (float(b) for b in sigma_bounds)
    if not (0 < lo <= hi and np.isfinite(hi)):
        raise ValidationError(
            f"sigma_bounds must satisfy 0 < lo <= hi < inf; got {sigma_bounds!r}."
        )
    op, Y, P, z0, K = _check_iteration_args(op, Y, P, z0, tol, max_iter)
    eps = np.finfo(np.float64).eps
    R, r_aug, AtR, rn2, ynorm = _start(op, Y, P, damp, z0)
    d = (hi**2 + lo**2) / 2
    c = (hi**2 - lo**2) / 2
    z = z0.copy()
    v = np.zeros_like(z0)
    rnorm = np.sqrt(rn2)
    yF = max(float(np.linalg.norm(ynorm)), np.finfo(float).tiny)
    history = [float(np.linalg.norm(rnorm)) / yF]
    g = P.T @ (AtR + damp * r_aug)  # B^T r
    # best iterate: smallest ||B^T r|| (proportional to the error; ||r|| stops telling iterates
    # apart once it is near its least-squares minimum)
    best_z, best_r, best_g = z.copy(), rnorm.copy(), np.linalg.norm(g, axis=0)
    converged = rnorm <= tol * ynorm
    r_start = float(np.linalg.norm(rnorm))
    k_pred = chebyshev_iterations(lo, hi, tol)
    it, reason, a = 0, "tolerance", 0.0
    with progress.stage("chebyshev", total=min(k_pred, int(max_iter)), unit="it",
                        target=tol) as st:
        while not converged.all():
            if it >= max_iter:
                reason = "iteration limit"
                break
            if it == 0:
                b, a = 0.0, 1.0 / d
            elif it == 1:
                b = 0.5 * (c / d) ** 2
                a = 1.0 / (d - c**2 / (2 * d))
            else:
                b = (a * c / 2) ** 2
                a = 1.0 / (d - b / a)
            it += 1
            v = b * v + g
            z = z + a * v
            # fused pass: r <- r - a B v, then B^T r and ||r||^2
            Pv = P @ v
            R, AtR, rn2 = op.update(R, -a * Pv, np.ones(K))
            r_aug = r_aug - (a * damp) * Pv
            rnorm = np.sqrt(rn2 + np.einsum("ij,ij->j", r_aug, r_aug))
            g = P.T @ (AtR + damp * r_aug)
            gnorm = np.linalg.norm(g, axis=0)
            better = gnorm < best_g
            best_z[:, better] = z[:, better]
            best_r[better], best_g[better] = rnorm[better], gnorm[better]
            history.append(float(np.linalg.norm(rnorm)) / yF)
            znorm = np.linalg.norm(z, axis=0)
            test1 = rnorm <= tol * ynorm + tol * hi * znorm
            test2 = gnorm <= tol * (hi * rnorm + eps)
            # the a-priori count bounds the error reduction by tol; the tests may stop earlier
            # (test2 has a rounding floor of about eps * cond(A) when A is ill-conditioned)
            converged = converged | test1 | test2 | (it >= k_pred)
            st.update(1, residual=float(np.max(gnorm / (hi * rnorm + eps))))
            if float(np.linalg.norm(rnorm)) > 10 * r_start:
                reason = "diverged"
                break
    if not converged.all():
        why = (
            "diverged (the residual grew tenfold): the singular-value bounds "
            f"{(lo, hi)} do not hold; use LSQR or a larger gamma"
            if reason == "diverged"
            else f"stopped at the iteration limit max_iter={max_iter}"
        )
        warnings.warn(
            f"Chebyshev semi-iteration {why}, with {K - converged.sum()} of {K} right-hand sides "
            f"above tol={tol:g} (relative residual {history[-1]:.3e}); returning the best iterate.",
            ConvergenceWarning,
            stacklevel=2,
        )
    return IterationOutcome(best_z, it, history, best_r, converged, reason)
