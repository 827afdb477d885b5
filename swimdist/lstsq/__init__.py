"""Least-squares solvers for ``min ||A X - Y||_F`` with a relative singular-value cutoff.

``solve(A, Y, method=...)`` dispatches through the :data:`SOLVERS` registry. Every solver is
one pure function ``fn(A, Y, *, rcond, alpha, **options) -> LstsqResult`` that honours the
same ``rcond`` (singular values below ``rcond * sigma_max`` count as zero; minimum-norm
solution over the kept subspace) and ``alpha`` (Tikhonov damping, ``alpha = damp**2``), so
solvers are comparable on residual and accuracy. ``A`` may be a numpy array or a
row-chunked dask array (rows = samples); ``Y`` has the same number of rows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from ..exceptions import ValidationError
from ._common import column_norms, is_dask, residual_norms
from .result import LstsqResult

logger = logging.getLogger("swimdist.lstsq")

#: name -> solver function. Filled by :func:`register` as the solver modules import.
SOLVERS: dict[str, Callable[..., LstsqResult]] = {}


def register(name: str) -> Callable:
    """Decorator adding a solver function to :data:`SOLVERS` under ``name``."""

    def deco(fn: Callable[..., LstsqResult]) -> Callable[..., LstsqResult]:
        SOLVERS[name] = fn
        return fn

    return deco


def get_solver(name: str) -> Callable[..., LstsqResult]:
    """Return the solver registered as ``name``; the error lists the valid names."""
    try:
        return SOLVERS[name]
    except (KeyError, TypeError):
        raise ValidationError(
            f"Unknown solver {name!r}; valid solvers are: {', '.join(sorted(SOLVERS))}."
        ) from None


def solve(A, Y, method: str = "direct", *, rcond: float = 1e-10, alpha: float = 0.0,
          **options) -> LstsqResult:
    """Solve ``min_X ||A X - Y||_F`` (plus ``alpha ||X||_F^2`` when ``alpha > 0``).

    Parameters
    ----------
    A : array_like or dask.array.Array, shape (N, n)
        Design matrix; a dask array should be chunked along rows only.
    Y : array_like or dask.array.Array, shape (N,) or (N, K)
        Right-hand sides, solved together.
    method : str
        A key of :data:`SOLVERS` (``"direct"``, ...).
    rcond : float
        Relative singular-value cutoff (not a regularization).
    alpha : float
        Tikhonov damping (ridge); 0 for none.
    **options
        Passed to the solver (e.g. ``seed``, ``tol``, ``max_iter``).

    Returns
    -------
    LstsqResult
        Solution, rank, per-column residual norms, relative residual, timings.
    """
    fn = get_solver(method)
    if getattr(A, "ndim", None) != 2:
        raise ValidationError(
            f"A must be 2-D (samples x features); got shape {getattr(A, 'shape', None)}."
        )
    y_ndim = getattr(Y, "ndim", np.ndim(Y))
    if y_ndim not in (1, 2):
        raise ValidationError(f"Y must be 1-D or 2-D; got shape {np.shape(Y)}.")
    if Y.shape[0] != A.shape[0]:
        raise ValidationError(
            f"A and Y must have the same number of rows; got A {A.shape} and Y {Y.shape}."
        )
    if A.shape[0] == 0 or A.shape[1] == 0:
        raise ValidationError(f"A is empty (shape {A.shape}); need at least one row and column.")
    if not np.isfinite(rcond) or rcond < 0:
        raise ValidationError(f"rcond must be a finite number >= 0; got {rcond!r}.")
    if not np.isfinite(alpha) or alpha < 0:
        raise ValidationError(f"alpha must be a finite number >= 0; got {alpha!r}.")
    if getattr(A, "dtype", None) is not None and np.dtype(A.dtype).kind == "c":
        raise ValidationError(f"A has complex dtype {A.dtype}; complex data is not supported.")
    if not is_dask(A):
        A = np.asarray(A)
        if A.dtype.kind == "c":
            raise ValidationError(f"A has complex dtype {A.dtype}; complex data is not supported.")
        if A.dtype not in (np.float32, np.float64):
            try:
                A = A.astype(np.float64)
            except (TypeError, ValueError) as exc:
                raise ValidationError(f"A has dtype {A.dtype} holding values that are not "
                                      f"numbers: {exc}") from None
        if not np.isfinite(A).all():
            raise ValidationError("A contains NaN or infinity.")
    if not is_dask(Y):
        try:
            Y = np.asarray(Y, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValidationError(f"Y holds values that are not real numbers: {exc}") from None
        if not np.isfinite(Y).all():
            raise ValidationError("Y contains NaN or infinity.")
    Y2 = Y if y_ndim == 2 else Y[:, None]
    t0 = time.perf_counter()
    res = fn(A, Y2, rcond=rcond, alpha=alpha, **options)
    if res.residual_norm is None:
        t1 = time.perf_counter()
        res.residual_norm = residual_norms(A, res.solution, Y2)
        res.timings["residual"] = time.perf_counter() - t1
    if res.relative_residual is None:
        ynorm = float(np.sqrt(np.sum(column_norms(Y2) ** 2)))
        rnorm = float(np.sqrt(np.sum(res.residual_norm**2)))
        res.relative_residual = rnorm / ynorm if ynorm > 0 else rnorm
    res.timings["total"] = time.perf_counter() - t0
    if y_ndim == 1:
        res.solution = res.solution[:, 0]
    logger.debug("solve: %r", res)
    return res


from . import direct as _direct  # noqa: E402  (registers "direct")

register("direct")(_direct.solve_direct)

__all__ = ["SOLVERS", "LstsqResult", "get_solver", "register", "solve"]

from . import lsrn as _lsrn  # noqa: E402  (registers "lsrn")

register("lsrn")(_lsrn.solve_lsrn)

from . import split as _split  # noqa: E402  (registers "split")

register("split")(_split.solve_split)

from . import normal as _normal  # noqa: E402  (registers "normal")
from . import precond as _precond  # noqa: E402  (registers "sketch-direct")

register("normal")(_normal.solve_normal)
register("sketch-direct")(_precond.solve_sketch_direct)

from . import auto as _auto  # noqa: E402  (registers "auto")

register("auto")(_auto.solve_auto)

from . import tiled as _tiled  # noqa: E402  (registers "normal-tiled")

register("normal-tiled")(_tiled.solve_normal_tiled)
