"""The normal equations: one pass forms ``A^T A`` and ``A^T Y``, then an ``n x n`` solve.

Algorithm
---------
1. One pass over ``A``: every row block contributes ``[A_i Y_i]^T [A_i Y_i]`` (the upper
   tiles only, in float64 whatever ``A``'s dtype); a tree reduction sums the partials.
2. ``alpha == 0``: eigendecomposition ``A^T A = V Lambda V^T``; with ``sigma = sqrt(lambda)``
   the directions with ``sigma <= rcond * sigma_max`` count as zero and
   ``X = V_k Lambda_k^{-1} V_k^T A^T Y`` (the minimum-norm solution over the kept subspace).
   ``alpha > 0``: Cholesky ``A^T A + alpha I = R^T R`` and two triangular solves (no cutoff:
   the damping keeps the system positive definite). ``factor=`` overrides either choice.
3. The residual ``||Y||^2 - 2 X^T A^T Y + X^T A^T A X`` comes from the Gram matrix without
   another pass when that difference is not dominated by cancellation; otherwise it is left
   to :func:`swimdist.solve` (one pass).

Accuracy: this squares the condition number
-------------------------------------------
The rounding error of ``A^T A`` is about ``eps ||A||^2``, so singular values below about
``sqrt(n eps) sigma_max`` (1e-6 .. 1e-7 relative) are lost in noise. On MNIST classification
(duplicate neurons merged: ``cond(A)`` 1e4 .. 1e6) this gives the same model as gelsd in a
third of the time; on the sine regression with ``rcond = 1e-10`` its test error is 100-250x
gelsd's. ``verify`` makes it safe.

The certificate
---------------
A solution ``X`` is *accepted* (``converged=True``) when a pass over ``A`` computes the
residual ``R = Y - A X`` and ``A^T R`` accurately (row by row: backward stable), and the best
correction ``D`` within the certified subspace then satisfies ``||A D||_F <= tau ||R||_F``
(``tau = accept_tol``). Since ``||R||^2 - ||R_best||^2 = ||A D||^2`` for the exact step, this
means ``||R|| <= ||R_best|| / sqrt(1 - tau^2)``: within ``1 + tau^2 / 2`` (``1.00005`` at the
default ``1e-2``) of the best residual over that subspace. The step is computed with the
Gram matrix's eigenvectors as a preconditioner: on the resolved directions (``lambda > trust n
eps lambda_max``) the eigenvalues carry a relative error of at most ``1 / trust`` (rounding
``n eps lambda_max``), so ``A V_1 Lambda_1^{-1/2}`` has singular values within
``sqrt(1 +- 1/trust)`` of 1 and the computed ``||A D||`` is within that factor of the exact
one (``trust = 16``: 3 %).

``verify="resolved"`` certifies the subspace the Gram matrix resolves (the cutoff is then
``max(rcond, trusted_rcond(n))``, recorded as ``info["cutoff"]``): only thin passes.
``verify=True`` certifies the subspace above ``rcond``: one more pass forms ``Z = A V_0`` for
the eigenvectors ``V_0`` the Gram matrix cannot resolve, solves the small problem in that
subspace from ``Z^T Z`` (accurate: its scale is ``||Z||``, not ``||A||``), and later passes are
thin again. ``solver="auto"`` uses the first for classification targets and the second for
regression.

Most unresolved directions are usually below ``rcond`` as well (smooth regression: 20 % of
them are kept). When it saves flops, a sparse-sign sketch and a randomized range finder first
narrow ``V_0`` to the part ``Q`` where ``Z`` reaches above the cutoff, so the pass forms
``Z Q`` (``l`` columns, ``2 N n l + N l^2`` flops, against ``2 N n k + N k^2``). The directions
left out enter the certificate through what they could still gain, at most
``||(I - Q Q^T) V_0^T A^T R||^2 / cut^2`` (``info["unresolved_rest"]``, relative to
``||R||^2``); when that alone exceeds ``accept_tol^2`` the next pass forms all of ``Z``
(``info["unresolved_sketched"]`` is then None).

The two levels' gains are added as if ``A V_1`` and ``Z`` were orthogonal; the Gram
matrix's rounding couples them (``||C|| = ||Lambda_1^{-1/2} V_1^T A^T Z W mu^{-1/2}||``
measured 0.02 on sine, 0.85 on a 2-D bump), and the best joint step can gain up to
``1 / (1 - c)`` times the sum. The refinement steps are block Jacobi, which contracts by
about ``c`` a pass, so the certificate divides the sum by ``1 - rho`` with ``rho`` the
observed contraction of the possible gain (``info["refine_contraction"]``, 0.03-0.23 on
those cases; at most 0.99, assumed on the first two-level pass).

OpenBLAS
--------
numpy's ``B.T @ B`` takes a multithreaded SYRK path that segfaults in the OpenBLAS of current
numpy wheels (0.3.31) once ``n >= 16000``. Gram products are therefore tiled to at most
:data:`TILE` columns per product.

Memory: the client holds the ``(n + K)^2`` Gram matrix and the ``n x n`` eigenvectors; each
worker thread holds one row block and one ``(n + K)^2`` partial sum per pending reduction
(``split_every`` of them).
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import scipy.linalg as sla

from .. import progress
from .._dask import single_thread_lapack
from ..design import as_design, reduce_blocks
from ..exceptions import ValidationError
from .kernels import accept_gain, gram_upper, verify_pass
from .result import LstsqResult

logger = logging.getLogger("swimdist.lstsq")

#: Most columns per Gram product: numpy's SYRK path segfaults in OpenBLAS 0.3.31 at n >= 16000.
TILE = 8000
#: Eigenvalues below ``TRUST * n * eps * lambda_max`` are not resolved by the Gram matrix.
TRUST = 16.0
FACTORS = ("eigh", "cholesky")
_EPS = float(np.finfo(np.float64).eps)

__all__ = ["FACTORS", "TILE", "accept_gain", "gram", "solve_normal", "trusted_rcond"]


# --------------------------------------------------------------------------- passes over A
def gram(A, Y, *, tile: int = TILE, split_every: int | None = 4):
    """``(A^T A, A^T Y, Y^T Y)`` in one pass over ``A`` (numpy or row-chunked dask).

    Only the upper triangle of ``A^T A`` is valid beyond the diagonal tiles; use
    :func:`numpy.linalg.eigh` with ``UPLO="U"`` or ``lower=False`` factorizations, or
    :func:`symmetrize` it.
    """
    tile = int(tile)
    if tile < 1:
        raise ValidationError(f"tile must be a positive number of columns; got {tile!r}.")
    n, K = A.shape[1], Y.shape[1]
    m = n + K
    flat = reduce_blocks(gram_upper, A, (Y,), (tile,), length=m * m, split_every=split_every,
                         label="gram")
    M = flat.reshape(m, m)
    return M[:n, :n], M[:n, n:], np.diagonal(M[n:, n:]).copy()


def symmetrize(G: np.ndarray, tile: int = TILE) -> np.ndarray:
    """Copy the upper triangle onto the lower one in place, tile by tile (no n x n temporary)."""
    n = G.shape[0]
    for p0 in range(0, n, tile):
        for q0 in range(p0, n, tile):
            blk = G[p0 : p0 + tile, q0 : q0 + tile]
            if p0 == q0:
                iu = np.triu_indices(blk.shape[0], 1)
                blk.T[iu] = blk[iu]
            else:
                G[q0 : q0 + tile, p0 : p0 + tile] = blk.T
    return G


def trusted_rcond(n: int, trust: float = TRUST) -> float:
    """Smallest relative singular value the Gram matrix of ``n`` columns resolves."""
    return math.sqrt(trust * n * _EPS)


# --------------------------------------------------------------------------- solves
def _eig_solve(
    lam: np.ndarray, V: np.ndarray, B: np.ndarray, keep: np.ndarray, alpha: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """``X = V_k (Lambda_k + alpha)^{-1} V_k^T B`` and the per-column energy ``B^T X``."""
    Vk = V[:, keep]
    C = Vk.T @ B
    W = C / (lam[keep] + alpha)[:, None]
    return Vk @ W, np.einsum("ij,ij->j", C, W)


def _residual_from_gram(yty, b, x, xgx) -> np.ndarray | None:
    """``||Y - A X||`` per column from Gram quantities, or None when cancellation spoils it."""
    rr = yty - 2 * np.einsum("ij,ij->j", x, b) + xgx
    scale = yty + np.abs(xgx)
    if np.all(rr > 1e-6 * scale):
        return np.sqrt(rr)
    return None


#: Most coupling between the resolved and the unresolved subspaces' images the certificate
#: assumes from an observed contraction (a stalled refinement: the possible gain counted 100x).
MAX_COUPLING = 0.99
#: Columns per block of the adaptive range finder (also its probes).
RANGE_BLOCK = 32


def _kept_estimate(lam_resolved: np.ndarray, cut2: float, k: int) -> float | None:
    """How many of the ``k`` unresolved directions lie above the cutoff, extrapolated from
    the resolved spectrum's decay (geometric for the smooth activations of SWIM features:
    within 20 % of the count gelsd keeps on sine, bump and wide cases); None when the
    resolved spectrum shows no decay to extrapolate (relu's is not geometric)."""
    lam = np.sort(lam_resolved)[::-1]
    r1 = lam.size
    m = max(8, r1 // 3)
    if r1 < m or cut2 <= 0 or lam[-1] <= cut2:
        return None
    logs = 0.5 * np.log(lam[r1 - m :])
    slope = float(np.polyfit(np.arange(m), logs, 1)[0])
    if slope >= 0:
        return None
    return float(min(k, max(0.0, (0.5 * math.log(cut2) - logs[-1]) / slope)))


def _narrow_unresolved(A, V0, lam_resolved, *, cut2, tol, split_every, seed: int = 0):
    """``Q`` (``k x l``, orthonormal): the part of ``span(V0)``, in its coordinates, in which
    ``Z = A V0`` reaches above the cutoff, or None when narrowing would not save flops.

    On smooth regression targets most of the directions the Gram matrix cannot resolve lie
    below ``rcond`` too (sine: 195 of 996): forming all of ``Z`` (``2 N n k + N k^2`` flops)
    then costs more than the Gram pass. A sparse-sign sketch ``S A`` (``s`` rows, about one
    read of ``A``) gives ``M = S Z = (S A) V0``. An adaptive randomized range finder on ``M``
    (Halko, Martinsson & Tropp, SIAM Rev. 2011, Alg. 4.2) adds Gaussian blocks until a
    block's squared distance from the range found (about ``||(I - P) M||_F^2``, the energy
    left out) is below ``N tol^2 cut^2 / 16``: a residual spread over the ``N`` rows then puts
    ``1/N`` of its energy on each direction left out, which could gain at most that energy
    times ``(sigma / cut)^2``: a sixteenth of what ``accept_tol`` allows, the rest left to the
    refinement. ``M``'s dominant row space is ``Q``. The verification then forms ``Z Q``
    only, and its certificate bounds what the rest of ``Z`` could still gain from ``Z^T R``
    (see :func:`_verified`), so a residual that is not spread costs a full ``Z`` pass, never
    a wrong answer.

    Whether to try is a flop count: with ``l`` predicted from the resolved spectrum
    (:func:`_kept_estimate`; the range finder ends at about 1.7 times the directions kept)
    and ``s = min(N, n, 3 l)`` sketch rows, the sketch, ``M``, the range finder and the
    narrowed pass must cost at most 3/4 of the full pass, or, where the spectrum gives no
    prediction, trying (the sketch and ``M``) must cost at most 1/16 of it; the range finder
    gives up as soon as what it spent and the narrowed pass would cost as much as the full
    pass.

    Written here: scipy and scikit-learn's randomized SVDs take a fixed rank, not a
    tolerance.
    """
    from .sketch import DEFAULT_NNZ, sketch

    N, n = A.shape
    k = V0.shape[1]
    if np.dtype(A.dtype).itemsize < 8 and cut2 > 0:
        # float32 storage rounds every entry by up to eps32 / 2 relative: a noise matrix
        # whose singular values sit near eps32 sigma_max / sqrt(n), so Z keeps about all
        # of its directions above a cutoff below that, and there is no tail to leave out
        # (tall sine, 40000 x 1001: the range finder ran to 500 columns before giving up)
        eps32 = float(np.finfo(np.float32).eps)
        if cut2 * n < eps32 * eps32 * float(np.max(lam_resolved, initial=0.0)):
            return None
    full = 2.0 * N * n * k + N * k * k
    kept = _kept_estimate(lam_resolved, cut2, k)
    ell = k if kept is None else min(k, 1.7 * kept + RANGE_BLOCK)
    s = int(min(N, n, max(3 * ell, 2 * RANGE_BLOCK)))

    def pass_flops(width):
        return 2.0 * N * n * width + N * width * width

    trying = DEFAULT_NNZ * N * n + 2.0 * s * n * k  # the sketch and M
    predicted = trying + 4.0 * s * k * ell + 2.0 * s * ell**2 + pass_flops(ell)
    # worth it by the prediction, or (no prediction) cheap enough to find out: tall A,
    # where s / N is small
    if cut2 <= 0 or (predicted > 0.75 * full and (kept is not None or trying > full / 16)):
        return None
    rng = np.random.default_rng(seed)
    SA, _ = sketch(A, s=s, kind="sparse-sign", seed=seed, split_every=split_every)
    M = SA @ V0
    thresh2 = N * tol * tol * cut2 / 16
    Q = np.zeros((s, 0))
    spent = trying
    while True:
        Yb = M @ rng.standard_normal((k, RANGE_BLOCK))
        for _ in range(2):  # twice is enough (Giraud et al. 2005)
            Yb -= Q @ (Q.T @ Yb)
        if float(np.max(np.einsum("ij,ij->j", Yb, Yb))) <= thresh2:
            break
        width = Q.shape[1] + RANGE_BLOCK
        # the sketch must stay well taller than the range it finds (s >= 1.5 l), and what
        # was spent plus the narrowed pass must stay below the full pass
        spent += 4.0 * s * k * RANGE_BLOCK + 4.0 * s * width * RANGE_BLOCK
        if 3 * width > 2 * s or width >= k or spent + pass_flops(width) >= full:
            return None
        Q = np.concatenate([Q, np.linalg.qr(Yb)[0]], axis=1)
    if Q.shape[1] == 0:
        return None
    return np.linalg.qr(M.T @ Q)[0]


def _verified(
    A, Y, lam, V, b, *, rcond, trust, tol, max_refine, max_unresolved, split_every, history,
    ynorm, subspace="rcond",
):
    """Two-level check and refinement of a normal-equations solution (see the module doc).

    ``subspace="resolved"`` certifies the best solution over the directions the Gram matrix
    resolves (no ``Z`` pass: every pass is thin); ``"rcond"`` over every direction above
    ``rcond``, the unresolved ones solved from ``Z = A V_0``.
    """
    n, K = V.shape[0], Y.shape[1]
    lam_max = float(lam[-1]) if lam.size else 0.0
    cut2 = (rcond * rcond) * lam_max
    trust2 = trust * n * _EPS * lam_max
    res1 = lam > max(cut2, trust2)
    V1, lam1 = V[:, res1], lam[res1]
    two_level = subspace == "rcond" and cut2 < trust2
    V0 = np.ascontiguousarray(V[:, ~res1]) if two_level else np.zeros((n, 0))
    k = V0.shape[1]
    info = {"unresolved_dim": int((~res1).sum()) if cut2 < trust2 else 0,
            "certified_subspace": "rcond" if (two_level or cut2 >= trust2) else "resolved"}
    if not two_level and cut2 < trust2:
        info["cutoff"] = math.sqrt(trust * n * _EPS)
    # start from the resolved subspace only; the rest comes from Z's least-squares problem
    x = V1 @ ((V1.T @ b) / lam1[:, None])
    rank, converged, rr, x_out = int(res1.sum()), False, None, x
    mu = W = None
    kz = 0
    # Narrow V0 to the directions in which Z = A V0 can reach above the cutoff (a sketch
    # says which); the certificate bounds what the rest could gain
    V0_full, Qs = V0, None
    prev_rel = None
    if k:
        Qs = _narrow_unresolved(A, V0, lam1, cut2=cut2, tol=tol, split_every=split_every)
        if Qs is not None:
            V0 = V0 @ Qs
            info["unresolved_sketched"] = int(Qs.shape[1])

    def over_budget(width):
        if width <= max_unresolved * n:
            return False
        info["reason"] = (
            f"the Gram matrix leaves {k} of {n} directions unresolved, and verifying them "
            f"would form {width} columns of Z = A V0 (more than max_unresolved="
            f"{max_unresolved:g} of {n})")
        return True

    if over_budget(V0.shape[1]):
        info["verify_passes"] = 0
        return x, rank, None, False, info
    passes = max(1, max_refine) + (Qs is not None)
    # the passes are iterations: each shows the residual reduction still possible against
    # accept_tol
    with progress.stage("verification", unit="passes", target=tol) as st:
        for _it in range(passes):
            # The first pass forms Z^T Z (Z = A V0); later ones are thin (A^T R and ||R||^2):
            # Z^T R = V0^T (A^T R), whose rounding (eps ||A|| ||R||) is far below Z's scale.
            V0p = V0 if mu is None else np.zeros((n, 0))
            kp = V0p.shape[1]
            flat = reduce_blocks(
                verify_pass,
                A,
                (Y,),
                (V0p, x),
                length=kp * kp + kp * K + K + n * K,
                split_every=split_every,
            )
            rr = flat[kp * kp + kp * K : kp * kp + kp * K + K]
            AtR = flat[kp * kp + kp * K + K :].reshape(n, K)
            x_out = x
            history.append(math.sqrt(float(rr.sum())) / ynorm)
            # refinement step in the resolved subspace
            C1 = V1.T @ AtR
            d1 = V1 @ (C1 / lam1[:, None])
            gain2 = float(np.sum(C1 * C1 / lam1[:, None]))
            # least squares in the unresolved subspace, from Z's own Gram matrix
            d0 = 0.0
            if k:
                if mu is None:
                    mu, W = np.linalg.eigh(flat[: kp * kp].reshape(kp, kp))
                ZtR = V0.T @ AtR
                zero_floor = trust * V0.shape[1] * _EPS * max(float(mu[-1]), 0.0)
                # Z = A V0 itself is only known to about sqrt(n) eps sigma_max
                noise2 = (64 * math.sqrt(n) * _EPS) ** 2 * lam_max
                keep = mu > max(cut2, zero_floor, noise2)
                kz = int(keep.sum())
                if kz:
                    C0 = W[:, keep].T @ ZtR
                    d0 = V0 @ (W[:, keep] @ (C0 / mu[keep][:, None]))
                    gain2 += float(np.sum(C0 * C0 / mu[keep][:, None]))
                info["unresolved_kept"] = kz
                if Qs is not None:
                    # Directions of Z outside span(Qs): each with sigma >= cut could gain
                    # at most (its share of Z^T R)^2 / cut^2, so all of them at most
                    # ||(I - Qs Qs^T) V0^T A^T R||^2 / cut^2 (exact when Qs spans right
                    # singular vectors of Z, second order in its error otherwise).
                    g = V0_full.T @ AtR - Qs @ ZtR
                    rest2 = float(np.sum(g * g)) / cut2
                    info["unresolved_rest"] = rest2 / max(float(rr.sum()), 1e-300)
                    gain2 += rest2
                    if rest2 > tol * tol * float(rr.sum()):
                        # the sketch missed directions that matter: form all of Z next,
                        # from the resolved step alone (as if Z had been formed at first)
                        V0, mu, W, Qs = V0_full, None, None, None
                        info["unresolved_sketched"] = None
                        x = x + d1
                        st.update(1)
                        if over_budget(k):
                            break
                        continue
                if cut2 < zero_floor and mu[-1] > cut2:
                    info["unresolvable"] = True  # rcond below what Z^T Z resolves
            rank = int(res1.sum()) + kz
            if kz:
                # Two levels: the gains of the resolved and the Z subspace are added as if
                # their images were orthogonal. They are not quite (the Gram matrix's
                # rounding couples A V1 to Z), and with coupling c the best joint step
                # gains up to 1 / (1 - c) times that sum. Block Jacobi, which these steps
                # are, contracts by c a pass, so the observed contraction of the possible
                # gain estimates it (at most MAX_COUPLING; the first two-level pass, which
                # has none to observe, assumes that).
                raw = math.sqrt(gain2 / max(float(rr.sum()), 1e-300))
                rho = min(MAX_COUPLING, raw / prev_rel) if prev_rel else MAX_COUPLING
                info["refine_contraction"] = rho
                prev_rel = raw
                gain2 = gain2 / (1.0 - rho)
            rel, ok = accept_gain(
                gain2,
                float(rr.sum()),
                tol=tol,
                sigma_max=math.sqrt(lam_max),
                xnorm=float(np.linalg.norm(x)),
                ynorm=ynorm,
                n=n,
            )
            info["refine_gain"] = rel
            st.update(1, residual=rel)
            if ok and not info.get("unresolvable"):
                converged = True
                break
            x = x + d1 + d0
    info["verify_passes"] = _it + 1
    if not converged and "reason" not in info:
        info["reason"] = (
            "rcond is below what Z^T Z resolves" if info.get("unresolvable") else
            f"after {_it + 1} verification passes a refinement step could still reduce the "
            f"residual by {info.get('refine_gain', math.nan):.2e} (accept_tol={tol:g})")
    return x_out, rank, np.sqrt(np.maximum(rr, 0.0)), converged, info


def solve_normal(
    A,
    Y,
    *,
    rcond: float = 1e-10,
    alpha: float = 0.0,
    factor: str | None = None,
    verify: bool | str = False,
    accept_tol: float = 1e-2,
    max_refine: int = 3,
    max_unresolved: float = 1.0,
    trust: float = TRUST,
    tile: int = TILE,
    split_every: int | None = 4,
) -> LstsqResult:
    """Solve ``min ||A X - Y||_F`` (+ ``alpha ||X||_F^2``) through the normal equations.

    Parameters
    ----------
    A : ndarray or dask.array.Array, shape (N, n)
        numpy, or row-chunked dask; float32 blocks are accumulated in float64.
    Y : ndarray or dask.array.Array, shape (N, K)
    rcond : float
        Relative cutoff applied to ``sigma = sqrt(lambda)`` (``factor="eigh"``).
    alpha : float
        Tikhonov damping: ``(A^T A + alpha I) X = A^T Y``.
    factor : {"eigh", "cholesky"}, optional
        Default ``"eigh"`` for ``alpha == 0``, ``"cholesky"`` for ``alpha > 0``. Cholesky
        applies no cutoff and fails on a singular ``A^T A + alpha I``.
    verify : bool or {"rcond", "resolved"}
        ``True`` / ``"rcond"``: one more pass (and up to ``max_refine`` in all, the later ones
        thin) checks and refines the solution over every direction above ``rcond``, solving
        the ones the Gram matrix cannot resolve from ``Z = A V_0`` (module doc).
        ``"resolved"``: the solution is the best over the directions the Gram matrix resolves
        (cutoff ``max(rcond, trusted_rcond(n))``), certified by thin passes only (``A^T R``:
        ``4 N n K`` flops each). ``converged`` tells whether it passed the ``accept_tol``
        test. ``alpha == 0`` and ``factor="eigh"`` only.
    accept_tol : float
        With ``verify``: accept ``X`` when the refinement step ``D`` it computes satisfies
        ``||A D||_F <= accept_tol * ||Y - A X||_F`` (or is below the rounding floor of
        :func:`.kernels.accept_gain`). For an exact step this bounds the residual:
        ``||R||^2 - ||R_min||^2 <= accept_tol^2 ||R||^2``, i.e. ``||R|| <= ||R_min|| /
        sqrt(1 - accept_tol^2)`` (about ``1 + accept_tol^2 / 2``: 1.00005 at 1e-2).
    max_refine : int
        Most verification passes.
    max_unresolved : float
        Give up (``converged=False``, ``info["reason"]``) without a verification pass when
        verifying the directions the Gram matrix leaves unresolved would form more than this
        fraction of ``n`` columns of ``Z`` (all ``k`` of them, or the narrowed ``l``).
    trust : float
        Eigenvalues above ``trust * n * eps * lambda_max`` count as resolved.
    tile : int
        Most columns per Gram product (<= 8000 keeps clear of the OpenBLAS SYRK crash).
    split_every : int, optional
        Fan-in of the tree reductions (dask input).

    Returns
    -------
    LstsqResult
        ``info``: ``factor``, ``sigma_max``, ``cond_kept`` (``sigma_max / sigma_min`` kept),
        with ``verify`` also ``unresolved_dim``, ``refine_gain``, ``verify_passes``, and
        ``unresolved_sketched`` (the columns of ``Z`` formed when a sketch narrowed them).
    """
    A = as_design(A).array
    factor = factor or ("eigh" if alpha == 0 else "cholesky")
    if factor not in FACTORS:
        raise ValidationError(
            f"Unknown factor {factor!r}; valid factors are: {', '.join(FACTORS)}."
        )
    if verify not in (False, True, "rcond", "resolved"):
        raise ValidationError(
            f"verify must be True, False, 'rcond' or 'resolved'; got {verify!r}.")
    if verify and (alpha != 0 or factor != "eigh"):
        raise ValidationError(
            f"verify=True needs alpha == 0 and factor='eigh'; got "
            f"alpha={alpha!r}, factor={factor!r}."
        )
    t0 = time.perf_counter()
    G, b, yty = gram(A, Y, tile=tile, split_every=split_every)
    if not (np.isfinite(np.diagonal(G)).all() and np.isfinite(yty).all()):
        # dask input is not scanned by solve(); the Gram pass finds it for free
        raise ValidationError(
            "A^T A or Y^T Y is not finite: A or Y contains NaN or infinity, or entries too "
            "large to square (|a| > 1e154). Rescale A or use solver='direct'."
        )
    t1 = time.perf_counter()
    timings = {"gram": t1 - t0}
    n = G.shape[0]
    info: dict = {"factor": factor, "tile": int(tile), "passes": 1}
    history: list[float] = []
    ynorm = math.sqrt(float(yty.sum())) or 1.0
    converged, resid = True, None
    if factor == "eigh":
        # one LAPACK call: the stage says what runs, not how far it is
        with progress.stage("factorization", total=1, unit="steps") as st:
            lam, V = np.linalg.eigh(G, UPLO="U")
            st.update(1)
        del G
        lam_max = max(float(lam[-1]), 0.0)
        sig = np.sqrt(np.maximum(lam, 0.0))
        cut = rcond
        if not verify:
            # Unverified, the Gram matrix cannot vouch for directions below its own
            # resolution (eigenvalues within trust * n * eps * lambda_max are rounding):
            # cut there, and say so, rather than keep noise as signal.
            cut = max(rcond, trusted_rcond(n, trust))
            if cut > rcond:
                converged = False
                info["reason"] = (
                    f"rcond={rcond:g} is below what the Gram matrix resolves ({cut:.1e}); "
                    f"cut at {cut:.1e} instead (use verify=True or solver='auto' to reach "
                    "rcond)")
            info["cutoff"] = cut
        keep = sig > cut * math.sqrt(lam_max) if lam_max > 0 else np.zeros(n, bool)
        x, energy = _eig_solve(lam, V, b, keep, alpha)
        rank = int(keep.sum())
        info.update(
            sigma_max=math.sqrt(lam_max),
            cond_kept=float(math.sqrt(lam_max / lam[keep][0])) if rank else math.inf,
        )
        timings["eigh"] = time.perf_counter() - t1
        if verify:
            t2 = time.perf_counter()
            x, rank, resid, converged, vinfo = _verified(
                A,
                Y,
                lam,
                V,
                b,
                rcond=rcond,
                trust=trust,
                tol=accept_tol,
                max_refine=max_refine,
                max_unresolved=max_unresolved,
                split_every=split_every,
                history=history,
                ynorm=ynorm,
                subspace="resolved" if verify == "resolved" else "rcond",
            )
            info.update(vinfo)
            info["passes"] += vinfo["verify_passes"]
            timings["verify"] = time.perf_counter() - t2
        else:
            # X^T A^T A X = sum lambda c^2 with c = V_k^T X; alpha > 0: subtract alpha ||X||^2
            xgx = energy - alpha * np.einsum("ij,ij->j", x, x)
            resid = _residual_from_gram(yty, b, x, xgx)
    else:
        Gd = G
        # Cholesky of G + alpha I is backward stable: it solves G + dG + alpha I with
        # ||dG|| <= n eps trace(G), so the solution's relative error is at most
        # n eps trace(G) / alpha; vouched for when that is within accept_tol^2 (the
        # residual bound the certificate of the eigh path gives)
        need = n * _EPS * float(np.trace(G)) / (accept_tol * accept_tol)
        info["alpha_resolved"] = bool(alpha >= need)
        converged = info["alpha_resolved"]  # else the damping does not vouch for accuracy
        if not converged:
            info["reason"] = (f"alpha={alpha:g} does not dominate the Gram matrix's rounding "
                              f"(needs alpha >= n eps trace(A^T A) / accept_tol^2 = "
                              f"{need:.1e}); not verified")
        Gd[np.diag_indices(n)] += alpha
        try:
            with single_thread_lapack():
                R = sla.cholesky(Gd, lower=False, overwrite_a=True, check_finite=False)
        except np.linalg.LinAlgError:
            raise ValidationError(
                f"A^T A + alpha I is not positive definite (alpha={alpha!r}); use a larger "
                f"alpha or factor='eigh' with an rcond cutoff."
            ) from None
        x = sla.cho_solve((R, False), b, check_finite=False)
        Rx = R @ x
        xgx = np.einsum("ij,ij->j", Rx, Rx) - alpha * np.einsum("ij,ij->j", x, x)
        rank = n
        d = np.abs(np.diagonal(R))
        info.update(cond_estimate=float((d.max() / d.min()) ** 2) if d.min() > 0 else math.inf)
        timings["cholesky"] = time.perf_counter() - t1
        resid = _residual_from_gram(yty, b, x, xgx)
    res = LstsqResult(
        solution=x,
        method="normal",
        rank=rank,
        residual_norm=resid,
        residual_history=history,
        timings=timings,
        converged=converged,
        info=info,
    )
    logger.debug("normal: n=%d rank=%d %s", n, rank, info)
    return res
