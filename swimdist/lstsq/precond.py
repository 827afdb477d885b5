"""Sketch-preconditioned direct solve: gelsd's accuracy for about one ``N n r`` pass over ``A``.

Algorithm (``solver="sketch-direct"``)
--------------------------------------
1. Sketch: ``S A`` (s x n, ``s = ceil(gamma n)``) in one cheap pass with a sparse-sign ``S``
   (:mod:`.sketch`, about ``nnz`` nonzeros per column: one read of ``A``).
2. Preconditioner: SVD ``S A = U Sigma V^T`` (through the R factor of ``S A``: cheaper); keep
   ``sigma > (rcond / margin) sigma_max`` (``r`` directions) and set ``P = V_r Sigma_r^{-1}``
   (n x r). Because ``S`` embeds ``range(A)``, ``A P`` has singular values within the sketch's
   distortion of 1 (a condition number of 1.5 .. 5 for ``gamma = 2``) however ill-conditioned
   ``A`` is.
3. One pass over ``A``: per row block ``B_i = A_i P`` and ``C += B_i^T B_i``,
   ``c += B_i^T Y_i`` (2 N n r + N r^2 flops; r is the numerical rank plus a margin, often far
   below n for smooth regression problems). ``C`` is well conditioned, so its Cholesky factor
   ``C = R^T R`` is accurate; ``Q = A P R^{-1}`` is an orthonormal basis of ``range(A V_r)``
   (a randomized Cholesky QR).
4. Exact truncation (``truncation="exact"``, the default): ``A V_r = Q T`` with the small
   ``T = R Sigma_r``; its SVD ``T = U_T S W^T`` gives the singular values of ``A`` itself on the
   kept subspace. Keeping ``S > rcond S_max`` reproduces gelsd's cutoff and rank, not just the
   sketch's approximation of it (that is what ``margin`` is for: the sketch keeps a little more
   than gelsd will, the exact SVD then decides). ``X = V_r W_k S_k^{-1} U_k^T R^{-T} c``.
5. Refinement: one pass computes ``R = Y - A X`` (its norm is the exact residual) and
   ``A^T R``; the same factorization gives the correction and the amount ``g`` by which the
   residual could still shrink. ``g <= accept_tol ||R||`` accepts (``converged``); otherwise the
   correction is applied and the check repeats (``max_refine`` passes at most).

Why it is accurate: forming ``A P`` row by row is backward stable in ``A`` (each row's rounding
is ``eps |a_i| |P|``), so the computed ``A P`` is the exact product for an ``A + dA`` with
``|dA| <= eps |A|``, the same kind of backward error gelsd commits; the Gram matrix of the
well-conditioned ``A P`` then loses nothing. This is randomized Cholesky QR (Fan, Guo and Lin
2021; Balabanov 2022; Higgins et al. 2024) used as a least-squares solver, as in the
"sketch-and-precondition, then a direct solve and iterative refinement" analyses of Epperly,
Meier and Nakatsukasa (2024).

Where this deviates from those
------------------------------
- The rank cutoff ``rcond`` is applied twice: loosely to the sketch (``rcond / margin``,
  which sets ``r``) and exactly to ``A``'s own singular values on the kept subspace.
- Tikhonov damping (``alpha > 0``): the preconditioner comes from ``[S A; sqrt(alpha) I]``
  (``P = V_r (Sigma_r^2 + alpha)^{-1/2}``), the pass adds ``alpha P^T P`` to ``C``, and the
  cutoff applies to the sketch only (``margin`` 1), so it approximates ``direct``'s cutoff.

Costs: passes over ``A``: sketch, Gram of ``A P``, one refinement (plus one when the check
asks for it). Client memory: ``S A`` (``gamma n^2`` floats), ``P`` and ``C`` (``n r``, ``r^2``).
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import scipy.linalg as sla

from .._dask import single_thread_lapack
from ..design import as_design, reduce_blocks
from ..exceptions import ValidationError
from .kernels import CONVERT_BYTES, accept_gain, f64_pieces, gram_upper, verify_pass
from .normal import TILE
from .result import LstsqResult
from .sketch import DEFAULT_NNZ, KINDS, sketch_size
from .sketch import sketch as sketch_rows

logger = logging.getLogger("swimdist.lstsq")

TRUNCATIONS = ("exact", "sketch")
_EPS = float(np.finfo(np.float64).eps)

__all__ = ["TRUNCATIONS", "solve_sketch_direct"]


def _precond_gram(a: np.ndarray, y: np.ndarray, P: np.ndarray, tile: int) -> np.ndarray:
    """One row block: upper tiles of ``[a P, y]^T [a P, y]``, flattened."""
    r, K = P.shape[1], y.shape[1]
    out = np.zeros((r + K) * (r + K))
    y = np.asarray(y, dtype=np.float64)
    # rows at a time, so that a P stays within CONVERT_BYTES however tall the block
    step = max(1, CONVERT_BYTES // (8 * max(r, a.shape[1], 1)))
    for s0 in range(0, a.shape[0], step):
        for r0, ab in f64_pieces(a[s0 : s0 + step]):
            out += gram_upper(ab @ P, y[s0 + r0 : s0 + r0 + ab.shape[0]], tile)
    return out


class _Factor:
    """Solves with ``C = P^T (A^T A + alpha I) P`` and, in exact mode, the SVD of ``R Sigma_r``.

    ``apply(g)`` maps ``g = A^T R`` (n x K) to the correction ``dX`` (n x K) and the squared
    norm of the residual reduction it achieves, per column.
    """

    def __init__(
        self,
        C: np.ndarray,
        P: np.ndarray,
        Vr: np.ndarray,
        sr: np.ndarray,
        rcond: float,
        exact: bool,
    ):
        self.P, self.Vr = P, Vr
        self.cholesky = True
        try:
            with single_thread_lapack():
                self.R = sla.cholesky(C, lower=False, check_finite=False)
            d = np.abs(np.diagonal(self.R))
            self.cond_C = float((d.max() / d.min()) ** 2) if d.min() > 0 else math.inf
        except np.linalg.LinAlgError:
            # C is numerically singular (rcond below what the sketch resolves): fall back to
            # its eigendecomposition without the null directions; then C = F^T F with
            # F = Lambda^{1/2} W^T (not triangular).
            self.cholesky = False
            lam, W = np.linalg.eigh(C, UPLO="U")
            keep = lam > C.shape[0] * _EPS * lam[-1]
            self.Fw, self.Fs = W[:, keep], np.sqrt(lam[keep])
            self.cond_C = float(lam[-1] / lam[keep][0])
        self.exact = exact
        if exact:
            # A V_r = Q T with T = F Sigma_r; its SVD gives A's singular values on span(V_r)
            T = (self.R if self.cholesky else self.Fs[:, None] * self.Fw.T) * sr
            U, S, Wt = np.linalg.svd(T, full_matrices=False)
            k = int(np.sum(S > rcond * S[0])) if S.size and S[0] > 0 else 0
            self.U, self.S, self.Wt, self.rank = U[:, :k], S[:k], Wt[:k], k
            self.sigma_max = float(S[0]) if S.size else 0.0
        else:
            self.rank = P.shape[1] if self.cholesky else int(self.Fs.size)

    def _qt(self, h: np.ndarray) -> np.ndarray:
        """``F^{-T} h``: coordinates in the orthonormal basis ``Q`` of ``h = (A P)^T v``."""
        if self.cholesky:
            return sla.solve_triangular(self.R, h, trans="T", lower=False, check_finite=False)
        return (self.Fw.T @ h) / self.Fs[:, None]

    def from_q(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Least-squares solution from ``q = Q^T v`` and the squared norm of its fit, per column."""
        if self.exact:
            c = self.U.T @ q
            return self.Vr @ (self.Wt.T @ (c / self.S[:, None])), np.einsum("ij,ij->j", c, c)
        if self.cholesky:
            z = sla.solve_triangular(self.R, q, lower=False, check_finite=False)
        else:
            z = self.Fw @ (q / self.Fs[:, None])
        return self.P @ z, np.einsum("ij,ij->j", q, q)

    def apply(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Correction from the gradient ``g = A^T R`` and the residual reduction it gives."""
        return self.from_q(self._qt(self.P.T @ g))


def solve_sketch_direct(
    A,
    Y,
    *,
    rcond: float = 1e-10,
    alpha: float = 0.0,
    gamma: float = 2.0,
    sketch: str = "sparse-sign",
    nnz: int = DEFAULT_NNZ,
    seed: int = 0,
    margin: float = 4.0,
    truncation: str = "exact",
    accept_tol: float = 1e-2,
    max_refine: int = 2,
    tile: int = TILE,
    split_every: int | None = 4,
) -> LstsqResult:
    """Solve ``min ||A X - Y||_F`` (+ ``alpha ||X||_F^2``) by a sketch-preconditioned direct solve.

    Parameters
    ----------
    A : ndarray or dask.array.Array, shape (N, n)
        numpy, or row-chunked dask; float32 blocks are accumulated in float64.
    Y : ndarray or dask.array.Array, shape (N, K)
    rcond : float
        Relative singular-value cutoff (applied to ``A``'s singular values, see the module doc).
    alpha : float
        Tikhonov damping.
    gamma : float
        Sketch rows ``s = ceil(gamma n)``; must leave ``s <= N`` to save work.
    sketch : {"sparse-sign", "gaussian"}
        Sketching matrix (:mod:`.sketch`); the Gaussian costs ``2 s N n`` flops.
    nnz : int
        Nonzeros per column of the sparse-sign sketch.
    seed : int
        Seed of the sketch's keyed stream: the same on any number of workers.
    margin : float
        The sketch keeps ``sigma > rcond / margin * sigma_max``; larger than the sketch's
        distortion so that nothing gelsd keeps is lost before the exact cutoff.
    truncation : {"exact", "sketch"}
        ``"exact"``: cutoff on ``A``'s singular values from the SVD of ``R Sigma_r`` (one r x r
        SVD more); ``"sketch"``: cutoff on the sketch's singular values only (``margin`` 1).
    accept_tol : float
        Accept ``X`` when the refinement step ``D`` satisfies ``||A D||_F <= accept_tol *
        ||Y - A X||_F`` (the same test as ``normal``'s ``accept_tol``: the residual is then
        within a factor ``1 / sqrt(1 - accept_tol^2)`` of its minimum).
    max_refine : int
        Most refinement passes (0: none; the residual is then left to :func:`solve`).
    tile : int
        Most columns per Gram product.
    split_every : int, optional
        Fan-in of the tree reductions (dask input).

    Returns
    -------
    LstsqResult
        ``info``: sketch kind and size, ``sketch_rank`` (r), ``cond_C`` (condition number of the
        preconditioned Gram matrix), ``refine_gain``, ``passes``.
    """
    if truncation not in TRUNCATIONS:
        raise ValidationError(
            f"Unknown truncation {truncation!r}; valid truncations are: {', '.join(TRUNCATIONS)}."
        )
    if sketch not in KINDS:
        raise ValidationError(
            f"Unknown sketch {sketch!r}; valid sketches are: {', '.join(KINDS)}."
        )
    if not np.isfinite(margin) or margin < 1:
        raise ValidationError(f"margin must be a finite number >= 1; got {margin!r}.")
    A = as_design(A).array
    exact = truncation == "exact" and alpha == 0
    N, n = A.shape
    K = Y.shape[1]
    s = sketch_size(n, gamma)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    SA, _ = sketch_rows(A, None, s=s, kind=sketch, seed=seed, nnz=nnz,
                        split_every=split_every)
    t1 = time.perf_counter()
    timings["sketch"] = t1 - t0
    if not np.isfinite(SA).all():
        # dask input is not scanned by solve(); the sketch pass finds it for free
        raise ValidationError("The sketch S A is not finite: A contains NaN or infinity.")
    if alpha > 0:
        SA = np.concatenate([SA, math.sqrt(alpha) * np.eye(n)])
    if SA.shape[0] > SA.shape[1]:
        # R of S A first: its SVD has the same singular values and V, at a fraction of the cost
        SA = sla.qr(SA, mode="r", overwrite_a=True, check_finite=False)[0][: SA.shape[1]]
    _, sig, Vt = np.linalg.svd(SA, full_matrices=False)
    del SA
    smax = float(sig[0]) if sig.size else 0.0
    # the sketch resolves singular values down to about sqrt(n) eps sigma_max
    floor = 10 * math.sqrt(n) * _EPS
    cut = max(rcond / (margin if exact else 1.0), floor)
    r = int(np.sum(sig > cut * smax)) if smax > 0 else 0
    t2 = time.perf_counter()
    timings["svd"] = t2 - t1
    info: dict = {
        "sketch": sketch,
        "s": s,
        "gamma": gamma,
        "seed": seed,
        "truncation": "exact" if exact else "sketch",
        "sketch_rank": r,
    }
    if r == 0:
        info["reason"] = "A is zero"
        return LstsqResult(
            solution=np.zeros((n, K)), method="sketch-direct", rank=0, timings=timings, info=info
        )
    Vr = np.ascontiguousarray(Vt[:r].T)
    sr = sig[:r]
    del Vt
    # with alpha > 0, sig are the singular values of [S A; sqrt(alpha) I] (sqrt(s^2 + alpha))
    P = Vr / sr

    m = r + K
    flat = reduce_blocks(
        _precond_gram, A, (Y,), (P, int(tile)), length=m * m, split_every=split_every
    )
    M = flat.reshape(m, m)
    C, c = M[:r, :r].copy(), M[:r, r:]
    ynorm = math.sqrt(float(np.trace(M[r:, r:]))) or 1.0
    if alpha > 0:
        C += alpha * (P.T @ P)
    t3 = time.perf_counter()
    timings["gram"] = t3 - t2
    fac = _Factor(C, P, Vr, sr, rcond, exact)
    # first solve: (A P)^T Y = c is already known
    X, _ = fac.from_q(fac._qt(c))
    t4 = time.perf_counter()
    timings["factor"] = t4 - t3
    info.update(
        cond_C=fac.cond_C,
        cholesky=fac.cholesky,
        passes=2,
        sigma_max=fac.sigma_max if exact else smax,
    )

    history: list[float] = []
    resid, converged = None, True
    for it in range(int(max_refine)):
        out = reduce_blocks(
            verify_pass, A, (Y,), (np.zeros((n, 0)), X), length=K + n * K, split_every=split_every
        )
        rr, g = out[:K], out[K:].reshape(n, K)
        if alpha > 0:
            g = g - alpha * X
        resid = np.sqrt(np.maximum(rr, 0.0))
        history.append(math.sqrt(float(rr.sum())) / ynorm)
        dX, gain2 = fac.apply(g)
        rel, converged = accept_gain(
            float(gain2.sum()),
            float(rr.sum()),
            tol=accept_tol,
            sigma_max=info["sigma_max"],
            xnorm=float(np.linalg.norm(X)),
            ynorm=ynorm,
            n=n,
        )
        info["refine_gain"] = rel
        info["passes"] = 3 + it
        if converged:
            break
        if it + 1 < max_refine:
            X = X + dX
    timings["refine"] = time.perf_counter() - t4
    rank = fac.rank
    logger.debug("sketch-direct: n=%d r=%d rank=%d %s", n, r, rank, info)
    return LstsqResult(
        solution=X,
        method="sketch-direct",
        rank=rank,
        residual_norm=resid,
        residual_history=history,
        timings=timings,
        converged=converged,
        info=info,
    )
