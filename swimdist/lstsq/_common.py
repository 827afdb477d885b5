"""Small helpers shared by the solvers: array coercion and one-pass residuals."""

from __future__ import annotations

import contextlib
import os

import dask
import dask.array as da
import numpy as np


def is_dask(a) -> bool:
    """True for a dask array."""
    return isinstance(a, da.Array)


def row_chunked(A, chunk_rows: int | None = None) -> da.Array:
    """Return ``A`` as a dask array with a single column chunk (rows chunked).

    numpy input becomes one chunk per ``chunk_rows`` rows (default: all rows).
    """
    if not is_dask(A):
        A = np.asarray(A)
        return da.from_array(A, chunks=(chunk_rows or A.shape[0], A.shape[1]))
    if len(A.chunks[1]) != 1:
        A = A.rechunk({1: -1})
    return A


def rows_like(Y, A: da.Array) -> da.Array:
    """Y (N,) or (N, K) as a dask array whose row chunks match ``A``'s."""
    if is_dask(Y):
        Y = Y if Y.ndim == 2 else Y[:, None]
        if Y.chunks[0] != A.chunks[0] or len(Y.chunks[1]) != 1:
            Y = Y.rechunk((A.chunks[0], -1))
        return Y
    Y = np.asarray(Y)
    Y = Y if Y.ndim == 2 else Y[:, None]
    return da.from_array(Y, chunks=(A.chunks[0], Y.shape[1]))


def residual_norms(A, X: np.ndarray, Y) -> np.ndarray:
    """``||A X[:, k] - Y[:, k]||`` for every column k, in one pass over ``A``."""
    if is_dask(A) or is_dask(Y):
        A = row_chunked(A)
        Yd = rows_like(Y, A)
        R = A.dot(X) - Yd
        return np.sqrt((R * R).sum(axis=0).compute())
    R = np.asarray(A) @ X - np.asarray(Y)
    return np.sqrt(np.einsum("ij,ij->j", R, R))


def column_norms(Y) -> np.ndarray:
    """Euclidean norm of every column of ``Y`` (numpy or dask)."""
    if is_dask(Y):
        return np.sqrt((Y * Y).sum(axis=0).compute())
    Y = np.asarray(Y)
    return np.sqrt(np.einsum("ij,ij->j", Y, Y))


def svd_solve(U: np.ndarray, s: np.ndarray, Vt: np.ndarray, B: np.ndarray, *, rcond: float,
              alpha: float = 0.0) -> tuple[np.ndarray, int]:
    """Minimum-norm (optionally Tikhonov-damped) solution from an SVD ``U diag(s) Vt``.

    Singular values below ``rcond * s.max()`` count as zero. With ``alpha > 0`` the kept
    components are damped by ``s / (s**2 + alpha)`` (ridge, ``alpha`` = damp**2).
    Returns ``(X, rank)`` with ``X = V f(s) U^T B``.
    """
    if s.size == 0 or s[0] == 0:
        return np.zeros((Vt.shape[1], B.shape[1]), dtype=np.result_type(Vt, B)), 0
    keep = s > rcond * s.max()
    r = int(keep.sum())
    sk = s[:r]
    f = 1.0 / sk if alpha == 0 else sk / (sk * sk + alpha)
    X = Vt[:r].T @ (f[:, None] * (U[:, :r].T @ B))
    return X, r


def blas_for_local_threads():
    """Keep BLAS threads x dask threads within the cores on the local threaded scheduler.

    The per-block tasks are BLAS-bound: two dask threads each running a two-thread OpenBLAS
    product on two cores ran the MNIST Gram pass 1.4x slower. Worker processes of a cluster
    get their BLAS thread count from :mod:`swimdist.cluster`; nothing is changed there.
    """
    try:
        from distributed import get_client

        get_client()
        return contextlib.nullcontext()
    except (ImportError, ValueError):
        pass
    if dask.config.get("scheduler", None) not in (None, "threads", "threading"):
        return contextlib.nullcontext()
    cores = os.cpu_count() or 1
    threads = int(dask.config.get("num_workers", None) or cores)
    if threads <= 1:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # run the blocks one at a time and let BLAS have the cores
        return dask.config.set(num_workers=1)
    return threadpool_limits(max(1, cores // threads))


def single_thread_lapack():
    """One BLAS thread for a LAPACK factorization (a no-op without threadpoolctl).

    The threaded ``potrf`` of the OpenBLAS in current numpy/scipy wheels (0.3.31) is
    pathological: a 3335-wide Cholesky took 4.9 s on two threads and 0.27 s on one.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        return contextlib.nullcontext()
    return threadpool_limits(1)


def digest_array(Y: np.ndarray) -> str:
    """A short content hash of an array (checkpoints record which right-hand sides they
    belong to)."""
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(Y).view(np.uint8)).hexdigest()[:16]
