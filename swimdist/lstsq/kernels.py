"""Per-row-block kernels shared by the normal-equations family of solvers.

Each kernel takes one row block ``a`` of ``A`` (any float dtype; converted to float64 a slice
of rows at a time, never whole) and returns a flat float64 vector; a pass over ``A`` sums
them over the blocks (:meth:`swimdist.design.DesignMatrix.reduce`). ``normal``,
``sketch-direct`` and ``normal-tiled`` use them; :func:`accept_gain` is their common
acceptance test.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

#: Rows converted to float64 at a time when ``A`` is stored in another dtype.
CONVERT_BYTES = 64 * 2**20
#: Float64 bytes of a piece of rows in the thin products of a pass (``a^T (a P)`` with a few
#: columns in ``P``): small enough that the piece, converted once, is still in the cache when
#: the second product reads it, so a pass reads each row block from memory once.
THIN_BYTES = 4 * 2**20
_EPS = float(np.finfo(np.float64).eps)

__all__ = ["CONVERT_BYTES", "THIN_BYTES", "accept_gain", "f64_pieces", "gram_upper",
           "verify_pass"]


def f64_pieces(a: np.ndarray, nbytes: int = CONVERT_BYTES, *, split: bool = False
               ) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, rows as float64)`` pieces of about ``nbytes`` each, one at a time and valid
    until the next is drawn: other dtypes are converted into one reused buffer; a float64
    ``a`` is yielded as it is, or in row views of that size with ``split`` (products that
    read each piece twice, ``a P`` then ``a^T t``, want it still in the cache the second
    time: :data:`THIN_BYTES`)."""
    rows = max(1, nbytes // max(1, 8 * a.shape[1]))
    if a.dtype == np.float64:
        if not split:
            yield 0, a
            return
        for r in range(0, a.shape[0], rows):
            yield r, a[r : r + rows]
        return
    buf = np.empty((min(rows, a.shape[0]), a.shape[1]))
    for r in range(0, a.shape[0], rows):
        k = min(rows, a.shape[0] - r)
        np.copyto(buf[:k], a[r : r + k], casting="same_kind")
        yield r, buf[:k]


def gram_upper(a: np.ndarray, y: np.ndarray, tile: int) -> np.ndarray:
    """Upper tiles of ``[a y]^T [a y]`` for one row block, flattened; float64 accumulation."""
    n, K = a.shape[1], y.shape[1]
    m = n + K
    out = np.zeros((m, m))
    y = np.asarray(y, dtype=np.float64)
    for r0, ab in f64_pieces(a):
        yb = y[r0 : r0 + ab.shape[0]]
        for p0 in range(0, n, tile):
            ap = ab[:, p0 : p0 + tile]
            p1 = p0 + ap.shape[1]
            for q0 in range(p0, n, tile):
                # tile x tile products; the diagonal ones take numpy's SYRK path (safe < 16000)
                q1 = min(q0 + tile, n)
                out[p0:p1, q0:q1] += ap.T @ ab[:, q0:q1]
            out[p0:p1, n:] += ap.T @ yb
        out[n:, n:] += yb.T @ yb
    return out.ravel()


def accept_gain(
    gain2: float, rr: float, *, tol: float, sigma_max: float, xnorm: float, ynorm: float, n: int
) -> tuple[float, bool]:
    """Relative possible residual reduction ``sqrt(gain2 / rr)`` and whether it is acceptable.

    Acceptable: at most ``tol``, or below the rounding level of any backward-stable solver,
    ``64 sqrt(n) eps (sigma_max ||X|| + ||Y||)`` (consistent systems have ``rr ~ 0``).
    """
    rel = math.sqrt(gain2 / max(rr, 1e-300))
    floor = 64 * math.sqrt(n) * _EPS * (sigma_max * xnorm + ynorm)
    return rel, bool(rel <= tol or math.sqrt(max(gain2, 0.0)) <= floor)


def verify_pass(a, y, V0, x):
    """One row block: ``Z = a V0``, ``R = y - a x``; returns ``Z^T Z, Z^T R, ||R||^2, a^T R``."""
    k, K = V0.shape[1], x.shape[1]
    n = a.shape[1]
    out = np.zeros(k * k + k * K + K + n * K)
    o1, o2, o3 = k * k, k * k + k * K, k * k + k * K + K
    y = np.asarray(y, dtype=np.float64)
    W = np.concatenate([V0, x], axis=1)
    for r0, ab in f64_pieces(a):
        P = ab @ W
        Z, R = P[:, :k], y[r0 : r0 + ab.shape[0]] - P[:, k:]
        out[:o1] += (Z.T @ Z).ravel()
        out[o1:o2] += (Z.T @ R).ravel()
        out[o2:o3] += np.einsum("ij,ij->j", R, R)
        out[o3:] += (ab.T @ R).ravel()
    return out
