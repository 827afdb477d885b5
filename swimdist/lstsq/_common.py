"""Small numerical helpers shared by the solvers: residuals, norms, SVD solves, digests.

Row placement (``row_chunked``, ``rows_like``) and passes over ``A`` live in
:mod:`swimdist.design`; thread guards in :mod:`swimdist._dask`.
"""

from __future__ import annotations

import dask.array as da
import numpy as np

from ..design import row_chunked, rows_like


def is_dask(a) -> bool:
    """True for a dask array."""
    return isinstance(a, da.Array)


def looks_like_classification(Y) -> bool:
    """True when ``Y`` holds class indicators: every entry 0 or 1 (one-hot, or multi-label)
    or every entry -1 or +1 (one column per class or a single +-1 column)."""
    return decision_rule(Y) is not None


def decision_rule(Y: np.ndarray):
    """How class decisions are read off scores fitted to indicator targets ``Y``:
    ``("argmax", N)`` when every row has one positive entry (one-hot, or +-1 with one +1),
    else ``(threshold, N K)`` with the threshold midway between the two target values
    (0.5 for 0/1, 0 for +-1: multi-label or one binary column); None for other targets."""
    Y = Y.compute() if is_dask(Y) else np.asarray(Y)
    Y = Y.reshape(Y.shape[0], -1)
    if not Y.size:
        return None
    lo = 0.0 if np.all((Y == 0) | (Y == 1)) else (-1.0 if np.all(np.abs(Y) == 1) else None)
    if lo is None:
        return None
    if Y.shape[1] > 1 and np.all((Y > lo).sum(axis=1) == 1):
        return "argmax", Y.shape[0]
    return (lo + 1.0) / 2, Y.size


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


def power_of_two_exponent(amax: float, dtype) -> int:
    """The exponent ``e`` such that ``2**-e * a`` brings an array of largest magnitude
    ``amax`` near 1, when it lies outside ``2**(+-maxexp/4)`` for its dtype; else 0.

    Scaling by a power of two is exact (no significant bit changes). The bound leaves the
    squares that the normal equations form (``amax**2``), times ``rcond**2`` and the
    machine precision, inside the dtype's normal range: float64 within ``2**+-256``,
    float32 within ``2**+-32``. Outside it, entries near ``1e-200`` square to zero (a
    Gram matrix of zeros) and entries near ``1e200`` to infinity.
    """
    if not np.isfinite(amax) or amax == 0:
        return 0
    dtype = np.dtype(dtype)
    limit = np.finfo(dtype if dtype.kind == "f" else np.float64).maxexp // 4
    e = int(np.frexp(amax)[1])
    return e if abs(e) > limit else 0


def digest_array(Y: np.ndarray) -> str:
    """A short content hash of an array (checkpoints record which right-hand sides they
    belong to)."""
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(Y).view(np.uint8)).hexdigest()[:16]
