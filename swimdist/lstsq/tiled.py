"""Normal equations for very wide layers, in a fixed memory budget ("normal-tiled").

The one-pass ``normal`` solver sums per-row-block partial Gram matrices with a tree
reduction, so every worker holds whole ``n x n`` partials: 3.2 GB each at n = 20 000. Here
the upper triangle of the Gram matrix of ``B = [A | Y]`` is cut into row *panels* (tile
``p``'s rows, every column from ``p`` on), one task per panel: it streams the row blocks of
just those columns from the feature store and accumulates ``B_p^T B_{p:}`` in place with one
GEMM per row block. Panels are disjoint, so nothing is reduced: a worker holds one panel and
one row block, and the client keeps only the upper triangle, panel by panel (half of
``n x n``), and factors it in place.

Solve: the Gram matrix only *preconditions*. It is factored (blocked Cholesky on the
panels) with a ridge ``lam_p = precond_ridge * trace(A^T A) / n`` large enough for the tile
products' rounding (float32 tiles: 1e-4), and preconditioned conjugate gradients, every
right-hand side in lockstep, solve ``(A^T A + lam I) x = A^T Y`` with the small ridge of the
target, ``lam = max(alpha, ridge * trace / n)`` (``ridge`` defaults to ``rcond``: a soft
cutoff in place of an ``n x n`` eigen- or SVD decomposition, far too slow at this size).
Each CG step is one float64 pass over ``A`` on the workers: every row block returns
``a^T (a P)`` and a tree reduction sums them. The preconditioned spectrum is
``(mu + lam) / (mu + lam_p)``: directions with ``mu >> lam_p`` converge at once, the ones
below ``lam_p`` take the CG steps (unlike plain iterative refinement, which leaves them
damped).

This squares the condition number like ``normal``: use it for classification and other
targets that need no more than ~1e-6 relative resolution (``auto`` picks it only then).

Resume: with the design matrix's ``checkpoint`` (:mod:`swimdist.store.checkpoint`), each panel is
written there by the task that computed it, and the CG state every ``checkpoint_every``
steps; a solve started again with the same checkpoint reuses the panels it finds and
continues from the last CG state, reaching the same solution as an uninterrupted one.

Reused from elsewhere: potrf, trsm and GEMM from scipy.linalg / numpy; the per-row-block CG
pass is :func:`swimdist.design.reduce_blocks` (dask blockwise + tree reduction). Written by hand:
the panel scheduling (dask.array cannot express it without holding a tile per row block),
the Cholesky on panels (LAPACK's potrf on the whole matrix segfaults at n ~ 20 000 in
current OpenBLAS wheels, and would need the full square), and block CG (scipy's ``cg``
takes one right-hand side at a time: ``K`` passes over ``A`` per step instead of one).
"""

from __future__ import annotations

import logging
import math
import numbers
import time

import numpy as np
import scipy.linalg as sla

from .. import config, progress
from .._dask import current_client, single_thread_lapack
from ..design import as_design, reduce_blocks, row_chunked, rows_like
from ..exceptions import ConvergenceWarning, ValidationError
from ..validation import check_nonnegative, check_nonnegative_int, check_positive_int
from ._common import decision_rule, digest_array, is_dask
from .kernels import CONVERT_BYTES, THIN_BYTES, f64_pieces
from .normal import symmetrize
from .result import LstsqResult

logger = logging.getLogger("swimdist.lstsq")

#: Rows per Gram tile (panel height). <= 8000: numpy's SYRK path segfaults in OpenBLAS 0.3.31
#: at >= 16000.
TILE = 4000
_EPS = float(np.finfo(np.float64).eps)
#: Bytes of one row block of a panel task (its columns from the store, as the tile dtype).
PANEL_BLOCK_BYTES = 128 * 2**20


def _block_bytes() -> int:
    """Bytes of one row block a worker task reads: :data:`PANEL_BLOCK_BYTES`, or a sixteenth
    of the smallest worker's memory limit when that is less (the store's decompressed chunk,
    the slice, its conversion and the task's output sit beside it)."""
    from .._dask import worker_memory

    _, limit, _ = worker_memory()
    return int(min(PANEL_BLOCK_BYTES, limit / 16)) if limit else PANEL_BLOCK_BYTES

__all__ = ["TILE", "PanelCholesky", "blocked_cholesky", "solve_normal_tiled"]


def _tiles(n: int, tile: int) -> list[tuple[int, int]]:
    k = max(1, math.ceil(n / tile))
    edges = np.linspace(0, n, k + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def _columns(read, Y, n_feat: int, bias: int, r0: int, r1: int, c0: int,
             out: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """Consecutive column ranges of ``B = [H, 1, Y]`` (``bias`` = 1) or ``[H, Y]``
    (``bias`` = 0) for rows ``[r0, r1)``, from column ``c0`` on: ``out[i][:r1 - r0]`` gets
    the next ``out[i].shape[1]`` columns (buffers the caller reuses for every row block: a
    new array per block cost more in first-touch page faults than the copy itself). The
    store is read once for all of them."""
    k = r1 - r0
    c_end = c0 + sum(o.shape[1] for o in out)
    # view=True: the store's reused read buffer (valid until its next read)
    src = read(r0, r1, c0, min(c_end, n_feat), view=True) if c0 < n_feat else None
    y0, c, blocks = n_feat + bias, c0, []
    for o in out:
        blk, c1 = o[:k], c + o.shape[1]
        if c < n_feat:
            np.copyto(blk[:, :min(c1, n_feat) - c], src[:, c - c0:min(c1, n_feat) - c0],
                      casting="same_kind")
        if bias and c <= n_feat < c1:
            blk[:, n_feat - c] = 1.0
        if c1 > y0:
            np.copyto(blk[:, max(c, y0) - c:], Y[r0:r1, max(c, y0) - y0:c1 - y0],
                      casting="same_kind")
        blocks.append(blk)
        c = c1
    return tuple(blocks)


def _panel_task(source, Y, n_feat, bias, N, rows, p, width, gram_dtype, out=None,
                report=None):
    """Panel ``B[:, p0:p1]^T B[:, p0:width]`` summed over row blocks, in ``gram_dtype``.

    Per row block, the diagonal tile ``B_p^T B_p`` is one SYRK (its upper triangle: half
    the GEMM's flops; mirrored once at the end) and the rest of the panel one GEMM, both
    accumulating in place (beta = 1) into the panel, Fortran-ordered ``(p1 - p0, width -
    p0)`` as :class:`PanelCholesky` wants it. The block's columns are copied out of the
    store's read buffer into two row-major buffers (the panel's own columns and the rest),
    whose transposes are the Fortran-contiguous operands BLAS takes without another copy.
    With ``out`` = (checkpoint directory, name) the panel is written there (atomically)
    and the path returned instead of the array. ``report`` = (topic, key): the work of each
    row block goes to the client's progress as it is done
    (:class:`swimdist.progress.TaskWork`, in units of ``(p1 - p0) (width - p0)`` per pass).
    """
    read = source() if callable(source) and not isinstance(source, np.ndarray) else (
        lambda r0, r1, c0, c1, view=False: source[r0:r1, c0:c1])
    dt = np.dtype(gram_dtype)
    gemm, syrk = (sla.blas.sgemm, sla.blas.ssyrk) if dt == np.float32 else (
        sla.blas.dgemm, sla.blas.dsyrk)
    p0, p1 = p
    m = p1 - p0
    acc = np.zeros((m, width - p0), dtype=dt, order="F")
    bufs = (np.empty((min(rows, N), m), dtype=dt),
            np.empty((min(rows, N), width - p1), dtype=dt))
    tick = progress.task_ticker(*report) if report is not None else None
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        bp, br = _columns(read, Y, n_feat, bias, r0, r1, p0, bufs)
        # acc[:, :m] += bp^T bp (upper), acc[:, m:] += bp^T br; bp.T and br.T are
        # Fortran-contiguous as they stand
        syrk(1.0, bp.T, beta=1.0, c=acc[:, :m], lower=0, overwrite_c=1)
        if br.shape[1]:
            gemm(1.0, bp.T, br.T, trans_b=1, beta=1.0, c=acc[:, m:], overwrite_c=1)
        if tick is not None:
            tick(m * (width - p0) * (r1 - r0) / N)
    symmetrize(acc[:, :m], tile=512)  # SYRK filled the upper triangle
    if out is None:
        return acc
    from ..store import save_npy_atomic

    directory, name = out
    return save_npy_atomic(directory, name, acc)


class PanelCholesky:
    """Upper Cholesky factor of a symmetric matrix held as row panels of its upper triangle.

    ``panels[k]`` holds rows ``tiles[k]`` and columns ``tiles[k][0]:`` (float64; Fortran
    order is the fast layout: the diagonal tile ``P[:, :m]`` and every column block are then
    contiguous, so potrf, trsm and the trailing GEMMs work in place with no copies, and the
    triangular solves pass the tiles to BLAS as they are; C-ordered views, as
    :func:`blocked_cholesky` has them, work too, at the cost of those copies).
    (A float32 factor was tried: half the memory and time, but its rounding, about
    eps32 ||G|| and so above the preconditioner's ridge, slowed CG down on ill-conditioned
    tests, and a slightly inexact preconditioner stalls CG near float32's resolution.)
    :meth:`factor` overwrites them with ``R`` (``G = R^T R``); :meth:`solve` applies
    ``G^{-1}``. Memory: about ``n^2 / 2`` numbers, half of LAPACK's full square.
    """

    def __init__(self, panels: list[np.ndarray], tiles: list[tuple[int, int]]):
        self.panels, self.tiles = panels, tiles
        self.n = tiles[-1][1] if tiles else 0

    def add_diagonal(self, lam: float) -> None:
        for (a, b), P in zip(self.tiles, self.panels, strict=True):
            P[np.arange(b - a), np.arange(b - a)] += lam

    def trace(self) -> float:
        return float(sum(np.trace(P[:, :b - a]) for (a, b), P in zip(self.tiles, self.panels,
                                                                     strict=True)))

    def matvec(self, x: np.ndarray) -> np.ndarray:
        """``G x`` before :meth:`factor` (the panels hold ``G``'s upper triangle, full
        diagonal tiles)."""
        y = np.zeros_like(x, dtype=np.float64)
        for (a, b), P in zip(self.tiles, self.panels, strict=True):
            y[a:b] += P @ x[a:]
            if b < self.n:
                y[b:] += P[:, b - a:].T @ x[a:b]
        return y

    def largest_eigenvalue(self) -> float:
        """``lambda_max(G)`` to a few percent (Lanczos: scipy's ``eigsh`` on :meth:`matvec`),
        before :meth:`factor`."""
        from scipy.sparse.linalg import LinearOperator, eigsh

        n = self.n
        if self.trace() <= 0:  # G = 0 (A^T A with A = 0): Lanczos has no starting vector
            return 0.0
        if n <= 2:
            G = np.array([[float(self.matvec(e)[i]) for e in np.eye(n)] for i in range(n)])
            return float(np.linalg.eigvalsh(G)[-1])
        op = LinearOperator((n, n), matvec=lambda v: self.matvec(np.ravel(v)), dtype=np.float64)
        v0 = np.ones(n) / math.sqrt(n)  # deterministic start (the Gram matrix is nonnegative
        # along ones for the bias column, never orthogonal to its top eigenvector by chance)
        return float(eigsh(op, k=1, which="LA", tol=1e-3, v0=v0,
                           return_eigenvectors=False)[0])

    def factor(self, column_block: int = 4000) -> PanelCholesky:
        """Right-looking blocked Cholesky in place; ``LinAlgError`` if not positive definite.

        Trailing updates go through GEMM in column blocks (no BLAS call sees more than
        ``column_block`` output columns, no temporary larger than a tile x block)."""
        T, P = self.tiles, self.panels
        # work of step k: the trailing panels it updates, about (T - k)^2 / 2 tile products
        work = [(len(T) - k) * (len(T) - k + 1) // 2 for k in range(len(T))]
        with progress.stage("factorization", total=len(T), unit="tiles", work=sum(work)) as st:
            for k, (k0, k1) in enumerate(T):
                diag = P[k][:, :k1 - k0]
                with single_thread_lapack():  # in place when diag is Fortran-contiguous
                    Rkk, info = sla.lapack.dpotrf(diag, lower=0, clean=1, overwrite_a=1)
                inplace = np.shares_memory(Rkk, diag)
                if info != 0:
                    err = np.linalg.LinAlgError(
                        f"matrix is not positive definite (tile at {k0}, pivot {info})")
                    # the leading k0 + info - 1 columns are factored: keep them in place
                    # (callers that certify a leading block read them)
                    good = max(info - 1, 0)
                    if not inplace:
                        diag[:good, :good] = Rkk[:good, :good]
                    err.leading_order = k0 + good
                    raise err
                if not inplace:
                    diag[...] = Rkk
                Rkk = diag
                if k1 == self.n:
                    st.update(1, work=work[k])
                    break
                for c0 in range(k1, self.n, column_block):  # R_k,later = R_kk^{-T} G_k,later
                    c1 = min(self.n, c0 + column_block)
                    blk = P[k][:, c0 - k0:c1 - k0]
                    got = sla.blas.dtrsm(1.0, Rkk, blk, side=0, lower=0, trans_a=1,
                                         overwrite_b=1)
                    if not np.shares_memory(got, blk):
                        blk[...] = got
                Rk = P[k]
                for j in range(k + 1, len(T)):
                    j0, j1 = T[j]
                    Rkj = Rk[:, j0 - k0:j1 - k0]
                    for c0 in range(j0, self.n, column_block):  # G_j,l -= R_kj^T R_kl, l >= j
                        c1 = min(self.n, c0 + column_block)
                        blk = P[j][:, c0 - j0:c1 - j0]
                        if blk.flags.f_contiguous:  # in place, no temporary (beta = 1)
                            sla.blas.dgemm(-1.0, Rkj, Rk[:, c0 - k0:c1 - k0], beta=1.0,
                                           c=blk, trans_a=1, overwrite_c=1)
                        else:
                            blk -= Rkj.T @ Rk[:, c0 - k0:c1 - k0]
                st.update(1, work=work[k])
        return self

    def solve(self, B: np.ndarray) -> np.ndarray:
        """``(R^T R)^{-1} B`` for ``B`` of shape (n, K)."""
        T, P = self.tiles, self.panels
        Z = np.array(B, dtype=np.float64, copy=True)
        for k, (k0, k1) in enumerate(T):  # R^T z = b, forward
            Z[k0:k1] = sla.solve_triangular(P[k][:, :k1 - k0], Z[k0:k1], trans=1, lower=False,
                                            check_finite=False)
            if k1 < self.n:
                # (z^T R_k,later)^T, not R_k,later^T z: OpenBLAS runs this skinny product
                # 4x faster with the panel as the right-hand operand
                Z[k1:] -= (Z[k0:k1].T @ P[k][:, k1 - k0:]).T
        for k in range(len(T) - 1, -1, -1):  # R x = z, backward
            k0, k1 = T[k]
            if k1 < self.n:
                Z[k0:k1] -= P[k][:, k1 - k0:] @ Z[k1:]
            Z[k0:k1] = sla.solve_triangular(P[k][:, :k1 - k0], Z[k0:k1], lower=False,
                                            check_finite=False)
        return Z


def blocked_cholesky(G: np.ndarray, block: int = 4000) -> np.ndarray:
    """Upper Cholesky factor ``R`` (``G = R^T R``) of a full square ``G``, in place in its
    upper triangle (the lower one is left as it was); the square-matrix form of
    :class:`PanelCholesky`, which never hands BLAS more than ``block`` columns at once
    (LAPACK's potrf at n ~ 20 000 segfaults in OpenBLAS 0.3.31's threaded SYRK). Raises
    ``LinAlgError`` if not positive definite."""
    n = G.shape[0]
    tiles = _tiles(n, block)
    panels = [G[a:b, a:] for a, b in tiles]  # views: factored in place
    PanelCholesky(panels, tiles).factor(column_block=block)
    return G


def _ne_pass(a: np.ndarray, P: np.ndarray, bias: int) -> np.ndarray:
    """``b^T (b P)`` for one row block ``b = [a, 1]`` (``bias`` = 1) or ``b = a``, in float64
    (cache-sized pieces of rows, each converted once and read by both products while it is
    in the cache; the bias column is never materialized)."""
    return _ne_errors_pass(a, None, P, bias, None)[:-1]


def _ne_errors_pass(a: np.ndarray, y, P: np.ndarray, bias: int, decide) -> np.ndarray:
    """:func:`_ne_pass` and, with ``decide`` (``"argmax"`` or a threshold) and ``P = [p, x]``,
    the wrong decisions of the iterate ``x`` on these rows against the indicators ``y``
    (rows whose argmax class differs, or entries on the wrong side of the threshold) as
    the last entry. ``b x`` comes out of the same forward product: a few more columns of a
    skinny product cost next to nothing, since it is bound by reading ``b``."""
    nf = a.shape[1]
    K = P.shape[1] if decide is None else P.shape[1] // 2
    out = np.zeros((nf + bias) * K + 1)
    g = out[:-1].reshape(nf + bias, K)
    Pf, gT = np.ascontiguousarray(P[:nf]), g[:nf].T  # gT: Fortran (K, nf), a view
    for r, ab in f64_pieces(a, THIN_BYTES, split=True):
        t = ab @ Pf
        if bias:
            t += P[nf]
        tp = t[:, :K] if decide is not None else t
        if bias:
            g[nf] += tp.sum(axis=0)
        # g^T += tp^T ab in place (BLAS gemm, beta = 1): no (K, nf) temporary per piece
        sla.blas.dgemm(1.0, tp.T, ab.T, trans_b=1, beta=1.0, c=gT, overwrite_c=1)
        if decide is not None:
            score, yr = t[:, K:], y[r:r + ab.shape[0]]
            if decide == "argmax":
                out[-1] += np.count_nonzero(score.argmax(axis=1) != yr.argmax(axis=1))
            else:
                out[-1] += np.count_nonzero((score > decide) != (yr > decide))
    return out


def _residual_pass(a: np.ndarray, y: np.ndarray, x: np.ndarray, bias: int) -> np.ndarray:
    """``b^T (y - b x)`` and the squared residual norm of every column, in float64 (``b`` as
    in :func:`_ne_pass`)."""
    nf, K = a.shape[1], x.shape[1]
    n = nf + bias
    out = np.zeros(n * K + K)
    acc = out[:n * K].reshape(n, K)
    accT, xf = acc[:nf].T, np.ascontiguousarray(x[:nf])
    for r, ab in f64_pieces(a, THIN_BYTES, split=True):
        res = np.asarray(y[r:r + ab.shape[0]], dtype=np.float64) - ab @ xf
        if bias:
            res -= x[nf]
            acc[nf] += res.sum(axis=0)
        sla.blas.dgemm(1.0, res.T, ab.T, trans_b=1, beta=1.0, c=accT, overwrite_c=1)
        out[n * K:] += np.einsum("ij,ij->j", res, res)
    return out


def _sketch_pass(a: np.ndarray, omega: np.ndarray, bias: int) -> np.ndarray:
    """``b^T (b Omega)`` and ``||b||_F^2`` for one row block (``b`` as in :func:`_ne_pass`):
    float32 products for a float32 block (the sketch only preconditions), accumulated in
    float64 across pieces."""
    nf, r = a.shape[1], omega.shape[1]
    dt = np.dtype(np.float32 if a.dtype == np.float32 else np.float64)
    gemm = sla.blas.sgemm if dt == np.float32 else sla.blas.dgemm
    om = np.asarray(omega[:nf], dtype=dt)
    accT = np.zeros((r, nf), dtype=dt, order="F")  # (nf, r) in C order, summed in place
    out = np.zeros((nf + bias) * r + 1)
    rows = max(1, CONVERT_BYTES // max(1, dt.itemsize * nf))
    for r0 in range(0, a.shape[0], rows):
        ab = np.ascontiguousarray(a[r0:r0 + rows], dtype=dt)
        t = ab @ om
        if bias:
            t += np.asarray(omega[nf], dtype=dt)
            out[nf * r:(nf + 1) * r] += t.sum(axis=0, dtype=np.float64)
        gemm(1.0, t.T, ab.T, trans_b=1, beta=1.0, c=accT, overwrite_c=1)  # acc += ab^T t
        out[-1] += float(np.linalg.norm(ab)) ** 2 + bias * ab.shape[0]
    out[:nf * r] = accT.T.ravel()
    return out


class NystromPreconditioner:
    """Randomized Nystrom preconditioner of ``G + mu I`` from ``Y = G Omega`` (Frangella,
    Tropp and Udell, SIMAX 2023, Algorithms 2.1 and 5.1): ``G ~ U diag(lam) U^T`` of rank
    ``r``, and ``P^{-1} = (lam_r + mu) U (lam + mu)^{-1} U^T + (I - U U^T)``.

    Reused: QR, Cholesky, triangular solve and SVD from numpy / scipy.linalg; the formulas
    are the paper's (no library provides the preconditioner).
    """

    def __init__(self, Y: np.ndarray, omega: np.ndarray, mu: float):
        n = Y.shape[0]
        nu = math.sqrt(n) * float(np.finfo(np.float32).eps) * float(np.linalg.norm(Y, 2))
        Yn = Y + nu * omega
        C = sla.cholesky(omega.T @ Yn + 0.0, lower=False, check_finite=False)
        B = sla.solve_triangular(C, Yn.T, trans=1, lower=False, check_finite=False).T
        U, S, _ = sla.svd(B, full_matrices=False, check_finite=False)
        self.U = U
        self.lam = np.maximum(S**2 - nu, 0.0)
        self.mu = float(mu)

    @property
    def rank(self) -> int:
        return int(self.lam.size)

    def solve(self, R: np.ndarray) -> np.ndarray:
        UR = self.U.T @ R
        scale = (self.lam[-1] + self.mu) / (self.lam + self.mu)
        return R + self.U @ ((scale[:, None] - 1.0) * UR)


def _reduce(fn, A, others, consts, length):
    return reduce_blocks(fn, A, others, consts, length=length, split_every=8)


def _store_pass_task(source, n_feat, r0, r1, rows, fn, Y, consts):
    """Sum of ``fn(rows of H[, rows of Y], *consts)`` over rows ``[r0, r1)`` of the store
    (into the store's reused read buffer where it has one: the kernels convert cache-sized
    pieces themselves, so a new array per block would only add a pass through memory)."""
    read = source()
    out = None
    for a0 in range(r0, r1, rows):
        a1 = min(r1, a0 + rows)
        block = read(a0, a1, 0, n_feat, view=True)
        args = (block,) if Y is None else (block, Y[a0 - r0:a1 - r0])
        part = fn(*args, *consts)
        del block, args
        if out is None:
            out = part
        else:
            out += part
    return out


class _StorePasses:
    """Passes over the feature store as one task per range of rows, straight on the workers.

    The dask-array form of the same pass (blockwise + tree reduction over the store's
    chunks) spent half of its time outside the products: a copy of every block in
    ``concatenate3``, one task per chunk, a graph built per pass. Here a task reads its rows
    in pieces of ``rows``, the constants travel once per pass to each worker, and the
    client adds the partial sums in task order (the same order on every run).
    """

    def __init__(self, client, source, n_feat, N, rows, Y):
        self.client, self.source, self.n_feat, self.N, self.rows = client, source, n_feat, N, rows
        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        k = max(1, min(math.ceil(N / rows), 4 * n_workers))
        edges = np.linspace(0, N, k + 1).round().astype(int)
        self.ranges = [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]
        self.Y = [client.scatter(np.ascontiguousarray(Y[a:b]), hash=False) for a, b in self.ranges]

    def __call__(self, fn, with_y: bool, consts):
        # hash=False: equal constants of two passes must not share (and release) one key
        consts_f = self.client.scatter(list(consts), hash=False)
        futs = [self.client.submit(_store_pass_task, self.source, self.n_feat, a, b, self.rows,
                                   fn, self.Y[i] if with_y else None, consts_f, pure=False)
                for i, (a, b) in enumerate(self.ranges)]
        parts = self.client.gather(futs)
        out = parts[0]
        for part in parts[1:]:
            out += part
        return out


def _gram_panels(A, Y, n, K, *, reader, tile, gdt, checkpoint):
    """The upper triangle of ``[A | Y]^T [A | Y]`` as Fortran-ordered float64 row panels
    (``reader``: the store's column reader, called on the worker: it opens the store
    there)."""
    if reader is not None:
        source = reader  # panel tasks choose their own row blocks (below)
        n_feat, bias = n - 1, 1
    elif not is_dask(A):
        source, n_feat, bias = np.asarray(A), n, 0  # A's columns, bias included
    else:  # a dask A without its store: row blocks stream through the client, once
        source, n_feat, bias = None, n, 0
    width = n + K
    tiles = _tiles(width, tile)
    # Panel tasks block the rows themselves: one block of the widest panel is about
    # PANEL_BLOCK_BYTES, whatever the store's own chunking.
    rows = max(1, _block_bytes() // (width * gdt.itemsize))
    panels: list[np.ndarray | None] = [None] * len(tiles)
    done = 0
    if checkpoint is not None:
        for i in range(len(tiles)):
            got = checkpoint.load_npy(f"panel-{i}")
            if got is not None and got.shape == (tiles[i][1] - tiles[i][0], width - tiles[i][0]):
                panels[i] = np.asfortranarray(got, dtype=np.float64)
                done += 1
        if done:
            logger.info("normal-tiled: %d of %d Gram panels reused from the checkpoint", done,
                        len(tiles))
    todo = [i for i in range(len(tiles)) if panels[i] is None]
    # a panel's products: its rows x the columns from its first one on (progress weights)
    work = [(b - a) * (width - a) for a, b in tiles]
    client = current_client()
    N = A.shape[0]
    if source is None:
        for i in todo:
            panels[i] = np.zeros((tiles[i][1] - tiles[i][0], width - tiles[i][0]),
                                 order="F")
        r0 = 0
        blocks = row_chunked(A).to_delayed()[:, 0]
        with progress.stage("gram blocks", total=len(blocks), unit="blocks") as st:
            for blk in blocks:
                a = np.asarray(blk.compute())
                r1 = r0 + a.shape[0]
                for i in todo:
                    panels[i] += _panel_task(a, Y[r0:r1], n_feat, bias, a.shape[0],
                                             a.shape[0], tiles[i], width, gdt)
                r0 = r1
                st.update(1)
    elif client is not None and todo:
        from distributed import as_completed

        Yf = client.scatter(Y, hash=False)  # not broadcast=True: see _dask.broadcast
        with progress.stage("gram panels", total=len(todo), unit="panels",
                            work=sum(work[i] for i in todo)) as st, \
                progress.TaskWork(st, client) as tw:
            futs = {}
            for i in todo:  # widest panels first: they take longest
                out = None if checkpoint is None else (checkpoint.path, f"panel-{i}")
                report = None if tw.topic is None else (tw.topic, str(i))
                futs[client.submit(_panel_task, source, Yf, n_feat, bias, N, rows, tiles[i],
                                   width, gdt, out, report, pure=False,
                                   priority=len(tiles) - i)] = i
            for fut in as_completed(list(futs)):
                i = futs[fut]
                got = fut.result()
                fut.release()
                if isinstance(got, str):
                    got = checkpoint.load_npy(f"panel-{i}")
                panels[i] = np.asfortranarray(got, dtype=np.float64)
                del got
                tw.finish(str(i), work[i])
    else:
        with progress.stage("gram panels", total=len(todo), unit="panels",
                            work=sum(work[i] for i in todo)) as st:
            for i in todo:
                acc = _panel_task(source, Y, n_feat, bias, N, rows, tiles[i], width, gdt)
                if checkpoint is not None:
                    checkpoint.save_npy(f"panel-{i}", acc)
                panels[i] = np.asfortranarray(acc, dtype=np.float64)
                del acc
                st.update(1, work=work[i])
    return panels, tiles, done


def _cholesky_preconditioner(A, Y, n, K, *, reader, tile, gdt, checkpoint, alpha, rcond,
                             ridge, precond_ridge):
    """The Gram matrix's panels, factored with the preconditioner's ridge (see
    :func:`solve_normal_tiled`)."""
    panels, tiles, reused = _gram_panels(A, Y, n, K, reader=reader, tile=tile, gdt=gdt,
                                         checkpoint=checkpoint)
    t1 = time.perf_counter()
    # Split [A | Y]'s panels into A^T A's panels (factored in place) and A^T Y.
    AtY = np.empty((n, K))
    a_tiles = []
    for i, (a, b) in enumerate(tiles):
        if a >= n:
            panels[i] = None
            continue
        bb = min(b, n)
        AtY[a:bb] = panels[i][:bb - a, n - a:]
        # a view (the Y columns go with the base), still Fortran-contiguous; the tile that
        # also holds Y's rows is copied (its rows cut, the view would not be)
        panels[i] = panels[i][:bb - a, :n - a]
        if not panels[i].flags.f_contiguous:
            panels[i] = np.asfortranarray(panels[i])
        a_tiles.append((a, bb))
    panels = [P for P in panels if P is not None]
    if a_tiles and a_tiles[-1][1] < n:  # pragma: no cover - tiles cover [0, width)
        raise AssertionError("tiles do not cover A's columns")
    chol = PanelCholesky(panels, a_tiles)
    # (A = 0: any ridge makes a preconditioner; CG then stops at x = 0, A^T Y being 0)
    scale = (chol.trace() / n if n else 0.0) or 1.0
    lam_max = chol.largest_eigenvalue() if n else 0.0
    if ridge is None:
        lam = max(float(alpha), (float(rcond) ** 2) * lam_max)
    else:
        lam = max(float(alpha), float(ridge) * scale)
    if precond_ridge is None:
        precond_ridge = 1e-4 if gdt == np.float32 else max(lam / max(scale, 1e-300), 1e-12)
    lam_p = max(lam, float(precond_ridge) * scale)
    # Factored in place (no copy: memory first). On failure the panels are read again from
    # the checkpoint (or computed again without one) and the ridge raised.
    attempts = 0
    while True:
        chol.add_diagonal(lam_p)
        try:
            chol.factor()
            break
        except np.linalg.LinAlgError:
            attempts += 1
            if attempts > 3:
                raise ValidationError(
                    f"normal-tiled: A^T A + {lam_p:.3g} I is not positive definite (the Gram "
                    "matrix lost it to rounding); pass a larger precond_ridge, e.g. "
                    f"solver_options={{'precond_ridge': {precond_ridge * 100:.0e}}}, or use "
                    "gram_dtype='float64'.") from None
            precond_ridge *= 10
            lam_p = max(lam, float(precond_ridge) * scale)
            logger.warning("normal-tiled: not positive definite; preconditioner ridge raised "
                           "to %.0e trace/n", precond_ridge)
            fresh, _, _ = _gram_panels(A, Y, n, K, reader=reader, tile=tile, gdt=gdt,
                                       checkpoint=checkpoint)
            for i, (a, b) in enumerate(a_tiles):
                panels[i][...] = fresh[i][:b - a, :n - a]
            del fresh
    t2 = time.perf_counter()
    return chol, tiles, reused, AtY, lam, lam_p, lam_max, t1, t2



def solve_normal_tiled(A, Y, *, rcond: float = 1e-10, alpha: float = 0.0,
                       tile: int | None = None, gram_dtype: str = "float64",
                       ridge: float | None = None, precond_ridge: float | None = None,
                       max_iter: int = 40, cg_tol: float | None = None,
                       accept_tol: float = 1e-2, stop: str = "objective",
                       accuracy_tol: float = 2e-4, n_iter_no_change: int = 3,
                       checkpoint_every: int = 5, preconditioner: str = "cholesky",
                       rank: int = 1000, seed: int = 0) -> LstsqResult:
    """Memory-bounded normal equations: a panelled Gram matrix preconditions block CG.

    Parameters
    ----------
    A : DesignMatrix, ndarray or dask array (N, n)
        The design matrix ``[H, 1]``. When it lives in a feature store (its ``reader``),
        panel tasks read their columns of ``H`` straight from the store on the workers and
        the CG passes read ``H`` there too, adding the bias column's terms themselves;
        otherwise a numpy ``A`` is read in place and a dask ``A``'s row blocks stream
        through the client once. Its ``checkpoint`` keeps every panel (written by the task
        that computed it) and the CG state every ``checkpoint_every`` steps, so that a solve
        started again reuses the panels and continues from the last CG state.
    Y : ndarray (N, K)
    rcond : float
        Relative singular-value cutoff, applied softly: the target ridge is
        ``lam = max(alpha, (rcond sigma_max)^2)`` (a ridge ``lam`` damps the directions with
        ``sigma < sqrt(lam)`` and keeps the others), ``sigma_max^2`` from a Lanczos estimate
        on the Gram panels.
    alpha : float
        Tikhonov damping.
    tile : int, optional
        Rows per panel (at most 8000; default ``swimdist.gram-tile``, which an embedded
        cluster's memory plan sets from the budget, else :data:`TILE`).
    gram_dtype : {"float64", "float32"}
        Precision of the panel products. float32 runs at twice the GEMM rate; CG recovers
        float64 accuracy.
    ridge : float, optional
        Target ridge relative to ``trace(A^T A) / n``, in place of the one from ``rcond``.
    precond_ridge : float, optional
        Ridge of the factored preconditioner, relative to ``trace / n`` (default 1e-4 for
        float32 panels, ``max(lam n / trace, 1e-12)`` for float64 ones). Raised tenfold (up to
        three times) when the factorization finds the matrix not positive definite.
    max_iter : int
        Most CG steps (one pass over ``A`` each); reaching it warns with a
        ``ConvergenceWarning``. ``max_iter = 0`` returns the preconditioner's solution.
    cg_tol : float, optional
        A fixed stop in place of the certificate: CG stops when every column ``k`` has
        ``||A^T y_k - (A^T A + lam I) x_k|| <= cg_tol * ||A^T y_k||``.
    accept_tol : float
        The default stop, an error estimate: every PCG step ``j`` lowers the objective
        ``f(x) = ||y - A x||^2 + lam ||x||^2`` by exactly ``alpha_j r_j^T z_j``, so what is
        left, ``f(x_k) - f_min``, is the sum of the steps still to come (Hestenes and
        Stiefel; Strakos and Tichy 2002). It is estimated from the last steps' geometric
        decay, and CG stops when it is at most ``accept_tol^2 f(x_k)`` for every column (the
        residual within about ``1 + accept_tol^2 / 2`` of the ridge problem's optimum, as
        ``normal``'s certificate) or below the rounding of the products.
    stop : {"objective", "accuracy"}
        ``"objective"``: the error estimate above (or ``cg_tol``). ``"accuracy"``, for
        class-indicator targets (0/1 or +-1; one-hot, multi-label or one column): CG also
        stops when the training error has not fallen by more than ``accuracy_tol`` for
        ``n_iter_no_change`` steps in a row (scikit-learn's ``tol`` / ``n_iter_no_change``
        idiom, with the training error as the score). Wrong decisions are rows whose argmax
        class differs from the target's, or entries on the wrong side of the threshold
        midway between the two target values. They are counted in the steps' own passes
        (the iterate rides along in the skinny forward product, which is bound by reading
        ``A``), so the check costs no pass of its own. A classifier's error settles many
        steps before the least-squares objective does (MNIST, 4000 tanh neurons, float32
        preconditioner: training error within 0.02 points of its final value after 10
        steps, test error within 0.03; the objective stop takes 23), and with float32
        panels the objective stop may be out of reach. ``auto`` picks it for
        classification.
    accuracy_tol : float
        The improvement of the training error (a fraction of the decisions) that counts
        (default 2e-4: the 0.02 points within which two error rates count as the same).
    n_iter_no_change : int
        Steps in a row without such an improvement before CG stops.
    checkpoint_every : int
        CG steps between saved states.
    preconditioner : {"cholesky", "nystrom"}
        ``"cholesky"``: the panelled Gram matrix, factored. ``"nystrom"``: never forms the
        Gram matrix; one pass sketches ``A^T A Omega`` with ``rank`` Gaussian columns and
        CG runs with the randomized Nystrom preconditioner of that sketch (Frangella, Tropp
        and Udell, SIMAX 2023): ``4 N n rank`` flops in place of the Gram matrix's
        ``N n^2``, but CG needs more steps the more of ``A``'s spectrum lies between the
        sketch's smallest eigenvalue and the ridge.
    rank : int
        Sketch size of the Nystrom preconditioner.
    seed : int
        Seed of its Gaussian test matrix.
    """
    design = as_design(A)
    A, checkpoint = design.array, design.checkpoint
    reader = design.reader
    t0 = time.perf_counter()
    N, n = A.shape
    Y = np.asarray(Y.compute() if is_dask(Y) else Y, dtype=np.float64)
    if Y.ndim == 1:
        Y = Y[:, None]
    K = Y.shape[1]
    if tile is None:
        tile = int(config.get("gram-tile", None) or TILE)
    if isinstance(tile, bool) or not isinstance(tile, numbers.Integral) or not 1 <= tile <= 8000:
        raise ValidationError(f"tile must be an integer between 1 and 8000 columns; got "
                              f"{tile!r}.")
    if gram_dtype not in ("float64", "float32"):
        raise ValidationError(f"gram_dtype must be float64 or float32; got {gram_dtype!r}.")
    gdt = np.dtype(gram_dtype)
    if preconditioner not in ("cholesky", "nystrom"):
        raise ValidationError("preconditioner must be 'cholesky' or 'nystrom'; got "
                              f"{preconditioner!r}.")
    rank = check_positive_int(rank, "rank")
    cg_tol = None if cg_tol is None else check_nonnegative(cg_tol, "cg_tol")
    if stop not in ("objective", "accuracy"):
        raise ValidationError(f"stop must be 'objective' or 'accuracy'; got {stop!r}.")
    accuracy_tol = check_nonnegative(accuracy_tol, "accuracy_tol")
    n_iter_no_change = check_positive_int(n_iter_no_change, "n_iter_no_change")
    rule = decision_rule(Y) if stop == "accuracy" else None
    if stop == "accuracy" and rule is None:
        raise ValidationError("stop='accuracy' needs class-indicator targets (every entry 0 "
                              "or 1, or every entry -1 or +1); use stop='objective' for "
                              "regression.")
    accept_tol = check_nonnegative(accept_tol, "accept_tol")
    max_iter = check_nonnegative_int(max_iter, "max_iter")
    checkpoint_every = check_positive_int(checkpoint_every, "checkpoint_every")
    ridge = None if ridge is None else check_nonnegative(ridge, "ridge")
    precond_ridge = (None if precond_ridge is None
                     else check_nonnegative(precond_ridge, "precond_ridge"))
    if checkpoint is not None:
        meta = {"solver": "normal-tiled", "N": N, "n": n, "K": K, "tile": int(tile),
                "gram_dtype": gdt.name, "y": digest_array(Y)}
        if preconditioner != "cholesky":
            meta.update(preconditioner=preconditioner, rank=int(rank), seed=int(seed))
        checkpoint.open(meta)
    passes = None
    if reader is not None:
        # CG passes read H from the store and add the bias column's terms themselves: no
        # concatenated copy of every row block
        client = current_client()
        if client is not None:
            passes = _StorePasses(client, reader, n - 1, N,
                                  max(1, _block_bytes() // (8 * n)), Y)
        A_, pbias = design.stored(), 1
    else:
        A_, pbias = (row_chunked(A) if is_dask(A) else A), 0
    Yd = rows_like(Y, A_) if is_dask(A_) else Y

    spent = {"passes": 0.0, "precond": 0.0, "n_passes": 0}  # where CG's time goes

    def run_pass(fn, with_y, consts, length):
        t = time.perf_counter()
        try:
            if passes is not None:
                return passes(fn, with_y, consts)
            return _reduce(fn, A_, (Yd,) if with_y else (), consts, length)
        finally:
            spent["passes"] += time.perf_counter() - t
            spent["n_passes"] += 1

    def apply_precond(R):
        t = time.perf_counter()
        try:
            return precond.solve(R)
        finally:
            spent["precond"] += time.perf_counter() - t

    if preconditioner == "nystrom":
        r_ = min(rank, n)
        omega = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, r_)))[0]
        with progress.stage("nystrom sketch", total=1, unit="passes") as st:
            flat = run_pass(_sketch_pass, False, (np.ascontiguousarray(omega), pbias),
                            n * r_ + 1)
            st.update(1)
        t1 = time.perf_counter()
        scale = float(flat[-1]) / n if n else 1.0
        Ysk = flat[:-1].reshape(n, r_)
        del flat
        nys = NystromPreconditioner(Ysk, omega, 0.0)
        del Ysk, omega
        lam_max = float(nys.lam[0]) if nys.rank else 0.0
        if ridge is None:
            lam = max(float(alpha), (float(rcond) ** 2) * lam_max)
        else:
            lam = max(float(alpha), float(ridge) * scale)
        nys.mu = lam_p = max(lam, 1e-300)
        precond, tiles, reused, AtY = nys, [], 0, None
        t2 = time.perf_counter()
        logger.info("normal-tiled: Nystrom preconditioner of rank %d, eigenvalues %.2e .. "
                    "%.2e", nys.rank, lam_max, float(nys.lam[-1]) if nys.rank else 0.0)
    else:
        precond, tiles, reused, AtY, lam, lam_p, lam_max, t1, t2 = _cholesky_preconditioner(
            A, Y, n, K, reader=reader, tile=tile, gdt=gdt, checkpoint=checkpoint, alpha=alpha,
            rcond=rcond, ridge=ridge, precond_ridge=precond_ridge)
    spent.update(passes=0.0, n_passes=0)  # from here on: the CG stage's own

    errors: list[float] = []  # training error of each iterate (stop="accuracy")

    def ne(P, watch=None):  # (A^T A + lam) P, one pass; with watch=x, x's training error
        if watch is None:
            flat = run_pass(_ne_pass, False, (np.ascontiguousarray(P), pbias), n * K)
        else:
            flat = run_pass(_ne_errors_pass, True,
                            (np.ascontiguousarray(np.hstack([P, watch])), pbias, rule[0]),
                            n * K + 1)
            errors.append(float(flat[-1]) / rule[1])
            flat = flat[:-1]
        return flat.reshape(n, K) + lam * P

    state = checkpoint.load("pcg") if checkpoint is not None else None
    history: list[float] = []
    resumed = 0
    ynorm2 = np.einsum("ij,ij->j", Y, Y)
    if state is not None:
        x, r, p, rz, bnorm, it = (state["x"], state["r"], state["p"], state["rz"],
                                  state["bnorm"], int(state["it"]))
        history = list(state["history"])
        terms = list(state["terms"]) if "terms" in state else []
        if "fval" in state:
            fval = state["fval"]
        else:  # a checkpoint of an older release: the objective from one pass
            flat = run_pass(_residual_pass, True, (np.ascontiguousarray(x), pbias), n * K + K)
            fval = flat[n * K:] + lam * np.einsum("ij,ij->j", x, x)
        resumed = it
        logger.info("normal-tiled: CG resumed at step %d", it)
    else:
        x = apply_precond(AtY) if AtY is not None else np.zeros((n, K))
        # r = A^T (Y - A x) - lam x in float64: the first pass also gives the true A^T Y
        flat = run_pass(_residual_pass, True, (np.ascontiguousarray(x), pbias), n * K + K)
        if AtY is None:
            AtY = flat[:n * K].reshape(n, K).copy()
        r = flat[:n * K].reshape(n, K) - lam * x
        # the objective ||Y - A x||^2 + lam ||x||^2 per column, lowered by every step
        fval = flat[n * K:] + lam * np.einsum("ij,ij->j", x, x)
        terms = []
        bnorm = np.linalg.norm(AtY, axis=0)
        z = apply_precond(r)
        p, rz, it = z, np.einsum("ij,ij->j", r, z), 0
        history.append(float(np.max(np.linalg.norm(r, axis=0) / np.maximum(bnorm, 1e-300))))
    # rounding floor of the products (accept_gain's): a smaller step is noise
    sig = math.sqrt(max(lam_max, 0.0))

    def floor2() -> np.ndarray:
        xn = np.linalg.norm(x, axis=0)
        return (64 * math.sqrt(n) * _EPS * (sig * xn + np.sqrt(ynorm2))) ** 2

    def left() -> np.ndarray:
        """Estimate of f(x_k) - f_min per column from the last steps' decrease terms."""
        if len(terms) < 3:
            return np.full(K, np.inf)  # no decay rate known yet
        t = np.maximum(np.asarray(terms[-4:]), 1e-300)
        # the slowest recent decay (pessimistic: PCG's first steps are often the fastest)
        ratio = np.clip(np.max(t[1:] / t[:-1], axis=0), 0.0, 0.99)
        return t[-1] * ratio / (1 - ratio)

    def settled() -> bool:
        """No improvement of the training error by more than accuracy_tol in the last
        n_iter_no_change steps (scikit-learn's no-improvement count)."""
        if rule is None or len(errors) <= n_iter_no_change:
            return False
        best = min(errors[:-n_iter_no_change])
        return min(errors[-n_iter_no_change:]) > best - accuracy_tol

    def done() -> bool:
        if settled():
            return True
        if cg_tol is not None:
            return bool(history and history[-1] <= cg_tol)
        est = left()
        return bool(np.all((est <= accept_tol**2 * np.maximum(fval, 0.0)) | (est <= floor2())))

    def measure() -> float | None:  # what the progress line shows against its target
        if cg_tol is not None:
            return history[-1] if history else None
        gap = left()
        return float(np.max(gap / np.maximum(fval, 1e-300))) if np.all(np.isfinite(gap)) else None

    converged = done() if (cg_tol is not None or terms) else False
    with progress.stage("cg", unit="it",
                        target=cg_tol if cg_tol is not None else accept_tol**2) as st:
        st.update(0, done=it, residual=measure())
        while not converged and it < max_iter:
            q = ne(p, x if rule is not None else None)  # x's training error rides along
            pq = np.einsum("ij,ij->j", p, q)
            step = np.where(pq > 0, rz / np.where(pq > 0, pq, 1.0), 0.0)
            x = x + step * p
            r = r - step * q
            gain = step * rz  # f(x_j) - f(x_{j+1})
            fval = fval - gain
            terms.append(gain)
            z = apply_precond(r)
            rz_new = np.einsum("ij,ij->j", r, z)
            p = z + np.where(rz > 0, rz_new / np.where(rz > 0, rz, 1.0), 0.0) * p
            rz = rz_new
            it += 1
            rel = np.linalg.norm(r, axis=0) / np.maximum(bnorm, 1e-300)
            history.append(float(rel.max()))
            converged = done()
            logger.debug("normal-tiled: CG step %d, relative residual %.3e, objective left "
                         "%.1e of %.1e%s", it, rel.max(), float(np.max(left())),
                         float(np.max(fval)),
                         f", training error {errors[-1]:.4%}" if errors else "")
            st.update(1, residual=measure())
            if checkpoint is not None and it % checkpoint_every == 0:
                checkpoint.save("pcg", x=x, r=r, p=p, rz=rz, bnorm=bnorm, it=np.array(it),
                                history=np.array(history), fval=fval,
                                terms=np.array(terms).reshape(-1, K))
    if not converged and max_iter > 0:
        import warnings

        what = (f"relative residual {history[-1]:.2e} (cg_tol {cg_tol:g})" if cg_tol is not None
                else f"an estimated objective gap of {float(np.max(left())):.1e} "
                     f"(accept_tol {accept_tol:g})")
        warnings.warn(f"normal-tiled: CG stopped after {it} steps at {what}.",
                      ConvergenceWarning, stacklevel=3)
    # the least-squares residual, one more pass
    flat = run_pass(_residual_pass, True, (np.ascontiguousarray(x), pbias), n * K + K)
    rsq = flat[n * K:]
    t3 = time.perf_counter()
    ynorm = float(np.linalg.norm(Y))
    res = LstsqResult(
        solution=x, method="normal-tiled", rank=None, iterations=it,
        residual_history=list(history),
        timings={"sketch" if preconditioner == "nystrom" else "gram": t1 - t0,
                 "factor": t2 - t1, "cg": t3 - t2},
        info={"ridge": lam, "precond_ridge": lam_p, "tiles": len(tiles),
              "panels": len(tiles), "panels_reused": reused, "gram_dtype": gdt.name,
              "cg_converged": converged, "cg_resumed_at": resumed, "sigma_max": sig,
              "stop": ("accuracy" if settled() else
                       "cg_tol" if cg_tol is not None else "accept_tol"),
              **({"train_errors": [round(e, 8) for e in errors]} if rule else {}),
              "preconditioner": preconditioner,
              # the CG stage's time: its passes over A (on the workers) and the
              # preconditioner's solves (on the client); the rest is the client's vector work
              "cg_passes": spent["n_passes"], "cg_pass_seconds": round(spent["passes"], 3),
              "cg_precond_seconds": round(spent["precond"], 3),
              **({"rank": precond.rank} if preconditioner == "nystrom" else {})},
    )
    res.converged = converged or max_iter == 0
    res.residual_norm = np.sqrt(np.maximum(rsq, 0.0))
    total = math.sqrt(float(max(rsq.sum(), 0.0)))
    res.relative_residual = total / ynorm if ynorm else total
    return res


