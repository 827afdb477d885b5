"""Normal equations for very wide layers, in a fixed memory budget ("normal-tiled").

The one-pass ``normal`` solver sums per-row-block partial Gram matrices with a tree
reduction, so every worker holds whole ``n x n`` partials: 3.2 GB each at n = 20 000. Here the
Gram matrix of ``B = [A | Y]`` is cut into column tiles instead, and one task per tile pair
``(p, q)``, ``p <= q``, streams the row blocks of just those columns from the feature store and
accumulates ``B_p^T B_q``. Tiles are disjoint, so no partial sums are reduced: a worker holds
one tile and one row block; the client assembles the upper triangle as tiles arrive (each
tile is released once copied) and factors it in place.

Solve: Cholesky of ``A^T A + lam I`` with ``lam = max(alpha, ridge * trace(A^T A) / n)``
(the ridge stands in for the ``rcond`` cutoff, which would need an ``n x n`` eigen- or SVD
decomposition: far too slow at this size), then ``refine`` steps of iterative refinement,
each one pass over ``A`` on the workers in float64: ``x += (A^T A + lam I)^{-1} (A^T (Y - A x)
- alpha x)``; the same pass yields the residual. The ridge part of ``lam`` beyond ``alpha``
only preconditions: a direction with ``sigma^2 >> lam`` converges to the undamped solution
within a step or two, one with ``sigma^2 << lam`` hardly moves (it stays damped, like a soft
cutoff). With ``gram_dtype="float32"`` the tile products
run at float32 GEMM speed (accumulated over row blocks in float64) and the refinement
passes recover float64 accuracy in every direction the ridge keeps.

This squares the condition number like ``normal``: use it for classification and other
targets that need no more than ~1e-6 relative resolution (``auto`` picks it only then).
Reused from elsewhere: Cholesky and triangular solves from scipy.linalg; the per-row-block
residual pass is a dask blockwise + tree reduction. Written by hand: the tile scheduling,
which dask.array cannot express without holding a tile per row block.
"""

from __future__ import annotations

import logging
import math
import time

import dask
import dask.array as da
import numpy as np
import scipy.linalg as sla

from ..exceptions import ValidationError
from ._common import is_dask, row_chunked, rows_like
from .result import LstsqResult

logger = logging.getLogger("swimdist.lstsq")

#: Columns per Gram tile. <= 8000: numpy's SYRK path segfaults in OpenBLAS 0.3.31 at >= 16000.
TILE = 5000

__all__ = ["TILE", "solve_normal_tiled"]


def _tiles(n: int, tile: int) -> list[tuple[int, int]]:
    k = max(1, math.ceil(n / tile))
    edges = np.linspace(0, n, k + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def _columns(read, Y, n_feat: int, bias: int, r0: int, r1: int, c0: int, c1: int,
             dtype) -> np.ndarray:
    """Columns ``[c0, c1)`` of ``B = [H, 1, Y]`` (``bias`` = 1) or ``[H, Y]`` (``bias`` = 0)
    for rows ``[r0, r1)``."""
    parts = []
    if c0 < n_feat:
        parts.append(np.asarray(read(r0, r1, c0, min(c1, n_feat)), dtype=dtype))
    if bias and c0 <= n_feat < c1:
        parts.append(np.ones((r1 - r0, 1), dtype=dtype))
    y0 = n_feat + bias
    if c1 > y0:
        parts.append(np.asarray(Y[r0:r1, max(c0, y0) - y0:c1 - y0], dtype=dtype))
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def _tile_task(source, Y, n_feat, bias, N, rows, p, q, gram_dtype) -> np.ndarray:
    """``B[:, p]^T B[:, q]`` summed over row blocks (float64 accumulation)."""
    read = source() if callable(source) and not isinstance(source, np.ndarray) else (
        lambda r0, r1, c0, c1: source[r0:r1, c0:c1])
    # Accumulate in place with BLAS gemm (beta = 1): ``acc += bp.T @ bq`` would allocate a
    # second tile-sized temporary on every row block.
    acc = np.zeros((p[1] - p[0], q[1] - q[0]), order="F")
    f32 = np.dtype(gram_dtype) == np.float32
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        bp = _columns(read, Y, n_feat, bias, r0, r1, p[0], p[1], gram_dtype)
        bq = bp if p == q else _columns(read, Y, n_feat, bias, r0, r1, q[0], q[1], gram_dtype)
        if f32:
            acc += sla.blas.sgemm(1.0, bp, bq, trans_a=True)
        else:
            acc = sla.blas.dgemm(1.0, bp, bq, beta=1.0, c=acc, trans_a=True, overwrite_c=True)
    return acc


def blocked_cholesky(G: np.ndarray, block: int = 4000) -> np.ndarray:
    """Upper Cholesky factor ``R`` (``G = R^T R``) computed in place in ``G``'s upper triangle.

    LAPACK's potrf updates the trailing matrix with SYRK, and the multithreaded SYRK of the
    OpenBLAS in current numpy/scipy wheels (0.3.31) segfaults once the update is about
    16 000 wide; this right-looking blocked version factors ``block``-sized diagonal blocks
    with potrf, solves panels with trsm and updates the trailing matrix with GEMM in column
    tiles, so no BLAS call sees more than ``2 * block`` columns. The lower triangle is left
    as it was (callers use the upper one only). Raises ``LinAlgError`` if not positive
    definite.
    """
    n = G.shape[0]
    for k0 in range(0, n, block):
        k1 = min(n, k0 + block)
        R_kk, info = sla.lapack.dpotrf(G[k0:k1, k0:k1], lower=0, clean=1, overwrite_a=0)
        if info != 0:
            raise np.linalg.LinAlgError(f"matrix is not positive definite (block at {k0})")
        G[k0:k1, k0:k1] = R_kk
        if k1 == n:
            break
        panel = sla.blas.dtrsm(1.0, R_kk, G[k0:k1, k1:], side=0, lower=0, trans_a=1)
        G[k0:k1, k1:] = panel
        for c0 in range(k1, n, block):  # trailing upper triangle, one column tile at a time
            c1 = min(n, c0 + block)
            G[k1:c1, c0:c1] -= panel[:, :c1 - k1].T @ panel[:, c0 - k1:c1 - k1]
    return G


def _refine_pass(A, Yd, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``A^T (Y - A x)`` and the squared residual norm of every column, in one float64 pass
    over ``A``."""
    K = x.shape[1]

    def part(a, y, xx):
        r = np.asarray(y, dtype=np.float64) - np.asarray(a, dtype=np.float64) @ xx
        return np.concatenate([(a.T @ r).ravel(), np.einsum("ij,ij->j", r, r)])[None]

    if not is_dask(A):
        out = part(np.asarray(A), np.asarray(Yd), x)[0]
    else:
        parts = da.blockwise(part, "bc", A, "br", Yd, "bk", dask.delayed(x, pure=True), None,
                             new_axes={"c": (A.shape[1] + 1) * K}, adjust_chunks={"b": 1},
                             concatenate=True, dtype=np.float64, meta=np.empty((0, 0)))
        out = parts.sum(axis=0, split_every=8).compute()
    return out[:-K].reshape(A.shape[1], K), out[-K:]


def solve_normal_tiled(A, Y, *, rcond: float = 1e-10, alpha: float = 0.0,
                       feature_store=None, tile: int = TILE, gram_dtype: str = "float64",
                       ridge: float | None = None, refine: int = 2, **_ignored) -> LstsqResult:
    """Memory-bounded normal equations with a column-tiled Gram matrix and refinement.

    Parameters
    ----------
    A : ndarray or dask array (N, n)
        The design matrix ``[H, 1]`` (used for the refinement passes and, without
        ``feature_store``, for the tiles).
    Y : ndarray (N, K)
    rcond : float
        Sets the default ridge (``ridge = rcond`` for float64 tiles, ``max(rcond, 1e-4)`` for
        float32 tiles), relative to ``trace(A^T A) / n``.
    alpha : float
        Tikhonov damping; the larger of ``alpha`` and the ridge is used.
    feature_store : (url, store_format, rows) or None
        The store holding ``H`` (``A`` without its bias column). Tile tasks read their
        columns straight from it on the workers. Without it, a numpy ``A`` is tiled in
        place and a dask ``A``'s row blocks stream through the client once.
    tile : int
        Columns per tile (at most 8000).
    gram_dtype : {"float64", "float32"}
        Precision of the tile products (accumulated in float64 either way).
    refine : int
        Iterative-refinement passes (each one float64 pass over ``A``).
    """
    t0 = time.perf_counter()
    N, n = A.shape
    Y = np.asarray(Y.compute() if is_dask(Y) else Y, dtype=np.float64)
    K = Y.shape[1]
    if not 1 <= tile <= 8000:
        raise ValidationError(f"tile must be between 1 and 8000 columns; got {tile}.")
    if gram_dtype not in ("float64", "float32"):
        raise ValidationError(f"gram_dtype must be float64 or float32; got {gram_dtype!r}.")
    gdt = np.dtype(gram_dtype)
    if feature_store is not None:
        from ..storage import store_backend

        url, fmt, rows = feature_store
        backend = store_backend(url, fmt)
        source = backend.reader  # called on the worker: opens the store there
        n_feat, bias = n - 1, 1
    elif not is_dask(A):
        source, n_feat, bias, rows = np.asarray(A), n, 0, 4096  # A's columns, bias included
    else:  # a dask A without its store: row blocks stream through the client, once
        source, n_feat, bias, rows = None, n, 0, None
    width = n_feat + bias + K  # columns of B = [A | Y]
    tiles = _tiles(width, tile)
    pairs = [(p, q) for i, p in enumerate(tiles) for q in tiles[i:]]
    # Assembled and factored in float64 whatever the tile products' precision: a float32
    # Cholesky of n = 20 000 loses ~n eps32 = 1e-3 relative and needs that much ridge.
    G = np.empty((width, width))
    try:
        from distributed import as_completed, get_client

        client = get_client()
    except (ImportError, ValueError):
        client = None
    if source is None:
        for p, q in pairs:
            G[p[0]:p[1], q[0]:q[1]] = 0.0
        r0 = 0
        for blk in row_chunked(A).to_delayed()[:, 0]:
            a = np.asarray(blk.compute())
            r1 = r0 + a.shape[0]
            for p, q in pairs:
                G[p[0]:p[1], q[0]:q[1]] += _tile_task(a, Y[r0:r1], n_feat, bias, a.shape[0],
                                                      a.shape[0], p, q, gdt)
            r0 = r1
    elif client is not None:
        Yf = client.scatter(Y, broadcast=True)
        futs = {client.submit(_tile_task, source, Yf, n_feat, bias, N, rows, p, q, gdt,
                              pure=False):
                (p, q) for p, q in pairs}
        for fut in as_completed(list(futs)):
            (p, q) = futs[fut]
            G[p[0]:p[1], q[0]:q[1]] = fut.result()
            fut.release()
    else:
        for p, q in pairs:
            G[p[0]:p[1], q[0]:q[1]] = _tile_task(source, Y, n_feat, bias, N, rows, p, q, gdt)
    t1 = time.perf_counter()
    na = width - K
    AtY = G[:na, na:].astype(np.float64)
    Gaa = G[:na, :na]
    scale = float(np.trace(Gaa, dtype=np.float64)) / na if na else 1.0
    if ridge is None:
        ridge = rcond if gdt == np.float64 else max(rcond, 1e-4)
    lam = max(float(alpha), ridge * scale)
    d = np.diag_indices(na)
    Gaa[d] += lam
    try:
        # In place: the Gram matrix is the biggest object here; no second copy.
        factor = (blocked_cholesky(Gaa, block=2000), False)
    except np.linalg.LinAlgError:
        raise ValidationError(
            f"normal-tiled: A^T A + {lam:.3g} I is not positive definite (the Gram matrix "
            "lost it to rounding); pass a larger ridge, e.g. solver_options={'ridge': "
            f"{max(ridge, 1e-12) * 100:.0e}}}, or use gram_dtype='float64'.") from None
    del G

    def precond(b):
        return sla.cho_solve(factor, b, check_finite=False)

    x = precond(AtY)
    t2 = time.perf_counter()
    A_ = row_chunked(A) if is_dask(A) else A
    Yd = rows_like(Y, A_) if is_dask(A_) else Y
    history = []
    rsq = None
    for _ in range(max(0, int(refine))):
        g, rsq = _refine_pass(A_, Yd, x)
        history.append(math.sqrt(rsq.sum()))
        # Refine the damped (alpha) problem; the extra ridge (lam - alpha) only
        # preconditions, so well-resolved directions converge to the undamped solution.
        x = x + precond(g - float(alpha) * x)
    if refine:
        _, rsq = _refine_pass(A_, Yd, x)
    t3 = time.perf_counter()
    ynorm = float(np.linalg.norm(Y))
    res = LstsqResult(
        solution=x, method="normal-tiled", rank=None, iterations=int(refine),
        residual_history=[h / ynorm if ynorm else h for h in history],
        timings={"gram": t1 - t0, "factor": t2 - t1, "refine": t3 - t2},
        info={"ridge": lam, "tiles": len(tiles), "tile_pairs": len(pairs),
              "gram_dtype": gdt.name},
    )
    if rsq is not None:
        res.residual_norm = np.sqrt(rsq)
        total = math.sqrt(rsq.sum())
        res.relative_residual = total / ynorm if ynorm else total
        res.residual_history.append(res.relative_residual)
    return res
