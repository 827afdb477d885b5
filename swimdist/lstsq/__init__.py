"""Least-squares solvers for ``min ||A X - Y||_F`` with a relative singular-value cutoff.

``solve(A, Y, method=...)`` dispatches through the :data:`SOLVERS` registry. Every solver is
one pure function ``fn(A, Y, *, rcond, alpha, <its options>) -> LstsqResult`` that honours
the same ``rcond`` (singular values below ``rcond * sigma_max`` count as zero; minimum-norm
solution over the kept subspace) and ``alpha`` (Tikhonov damping, ``alpha = damp**2``), so
solvers are comparable on residual and accuracy. ``A`` is a
:class:`~swimdist.design.DesignMatrix` (what ``fit`` hands over: placement, store, checkpoint,
block builder), or a numpy or row-chunked dask array (rows = samples) that ``solve`` wraps
in one; ``Y`` has the same number of rows.

Options are keyword-only parameters with one meaning each across solvers
(:func:`solver_options` lists them; an unknown one is an error that names it):

======================  =============================================================
``seed``                seed of the randomized pieces (sketches, random orders)
``gamma``               sketch rows ``s = ceil(gamma * n)``
``tol``                 LSQR's ``atol = btol`` (lsrn; :mod:`.lsqr` has the formulas)
``accept_tol``          accept ``X`` when the refinement step ``D`` has
                        ``||A D|| <= accept_tol ||Y - A X||`` (normal, sketch-direct, auto)
``cg_tol``              CG stop on the normal equations' relative residual (normal-tiled)
``stop``                what ends normal-tiled's CG: ``"objective"`` (its error estimate)
                        or ``"accuracy"`` (the training error stopped improving; auto's
                        choice for classification)
``accuracy_tol``        ``stop="accuracy"``: the training-error improvement that counts,
                        within ``n_iter_no_change`` steps
``sweep_tol``           split: stop when a sweep lowers the residual by less than this
``max_iter``            most Krylov iterations, one pass over ``A`` each
``tile``                most columns per Gram-matrix tile
======================  =============================================================
"""

from __future__ import annotations

import inspect
import logging
import numbers
import time
from collections.abc import Callable

import numpy as np

from .._dask import keep_alive
from ..design import as_design
from ..exceptions import ValidationError
from ._common import column_norms, is_dask, power_of_two_exponent, residual_norms
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


def solver_options(method: str) -> tuple[str, ...]:
    """The options solver ``method`` takes (besides ``rcond`` and ``alpha``), sorted.

    Read from the solver function's keyword-only parameters; ``auto`` also takes every
    option of its candidate solvers (:data:`.auto.CANDIDATES`).
    """
    fn = get_solver(method)
    params = inspect.signature(fn).parameters.values()
    names = {p.name for p in params if p.kind is p.KEYWORD_ONLY} - {"rcond", "alpha"}
    if any(p.kind is p.VAR_KEYWORD for p in params):
        if method != "auto":  # pragma: no cover - a registration error
            raise TypeError(f"solver {method!r} takes **kwargs; list its options instead")
        from .auto import CANDIDATES

        for cand in CANDIDATES:
            if cand in SOLVERS:
                names |= set(solver_options(cand))
    return tuple(sorted(names))


def _option_kinds(method: str) -> dict:
    """``int`` or ``float`` for every numeric option of solver ``method`` (``auto``: of its
    candidates too), from its default, or its annotation (``float | None``) where the
    default is None."""
    out = {}
    names = [method]
    if method == "auto":
        from .auto import CANDIDATES

        names += [c for c in CANDIDATES if c in SOLVERS]
    for name in names:
        for p in inspect.signature(get_solver(name)).parameters.values():
            if p.kind is not p.KEYWORD_ONLY or p.name in out:
                continue
            d, ann = p.default, str(p.annotation).replace(" ", "")
            if isinstance(d, bool):
                continue
            if isinstance(d, int) or (d is None and ann in ("int|None", "int")):
                out[p.name] = int
            elif isinstance(d, float) or (d is None and ann in ("float|None", "float")):
                out[p.name] = float
    return out


def check_options(method: str, options: dict) -> None:
    """Refuse options that solver ``method`` does not take, naming them and the valid ones,
    and values of the wrong kind for a numeric option (an int or a float by its default or
    annotation: every candidate of ``auto`` is checked, not only the one it will choose)."""
    valid = solver_options(method)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        what = "option" if len(unknown) == 1 else "options"
        raise ValidationError(
            f"Unknown {what} {', '.join(map(repr, unknown))} for solver {method!r}; valid "
            f"options are: {', '.join(valid) or 'none (rcond and alpha only)'}."
        )
    kinds = _option_kinds(method)
    for key, value in options.items():
        kind = kinds.get(key)
        if kind is None or value is None or _reads_as(value, kind):
            continue
        raise ValidationError(f"{key} must be {'an integer' if kind is int else 'a number'} "
                              f"(an option of solver {method!r}); got {value!r}.")


def _reads_as(value, kind) -> bool:
    """``value`` is a number of ``kind`` (int: integral), or a string that reads as one
    (YAML 1.1 leaves ``1e-3`` a string)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, str):
        try:
            kind(value)
        except ValueError:
            return False
        return True
    return isinstance(value, numbers.Integral if kind is int else numbers.Real)


def solve(A, Y, method: str = "auto", *, rcond: float = 1e-10, alpha: float = 0.0,
          **options) -> LstsqResult:
    """Solve ``min_X ||A X - Y||_F`` (plus ``alpha ||X||_F^2`` when ``alpha > 0``).

    Parameters
    ----------
    A : DesignMatrix, array_like or dask.array.Array, shape (N, n)
        Design matrix; a dask array should be chunked along rows only.
    Y : array_like or dask.array.Array, shape (N,) or (N, K)
        Right-hand sides, solved together.
    method : str
        A key of :data:`SOLVERS`; ``"auto"`` (the default, as in the estimators) chooses.
    rcond : float
        Relative singular-value cutoff (not a regularization).
    alpha : float
        Tikhonov damping (ridge); 0 for none.
    **options
        The solver's options (:func:`solver_options`; e.g. ``seed``, ``tol``,
        ``max_iter``). An option the solver does not take raises ``ValidationError``.

    Returns
    -------
    LstsqResult
        Solution, rank, per-column residual norms, relative residual, timings.
    """
    fn = get_solver(method)
    check_options(method, options)
    design = as_design(A)
    A = design.array
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
    if y_ndim == 2 and Y.shape[1] == 0:
        raise ValidationError(f"Y has no columns (shape {Y.shape}); need at least one "
                              "right-hand side.")
    if not np.isfinite(rcond) or not 0 <= rcond < 1:
        raise ValidationError(f"rcond must be a number in [0, 1) (singular values below rcond "
                              f"* sigma_max count as zero); got {rcond!r}.")
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
    A_in, Y_in = A, Y2
    eA = eY = 0
    # one scan of an in-memory A gives each column's range: the scaling below and the
    # merge of constant columns both read it
    cols = (A.min(axis=0), A.max(axis=0)) if design.placement == "array" and not is_dask(A) \
        else None
    if design.placement == "array":
        # Extreme scales (entries near 1e-200 or 1e200) are brought near 1 by exact powers
        # of two; features built by swimdist are bounded by their activations.
        A, Y2, alpha, eA, eY = _rescale(A, Y2, alpha, cols)
    merge = None if cols is None else _constant_columns(A, *(np.ldexp(c, -eA) for c in cols))
    A_solve = A if merge is None else merge.merged(A)
    with keep_alive():  # constants and right-hand sides sent to the workers stay there
        res = fn(design.with_array(A_solve), Y2, rcond=rcond, alpha=alpha, **options)
    del A_solve
    if merge is not None:
        res.solution = merge.expand(np.asarray(res.solution).reshape(-1, Y2.shape[1]))
        res.info["merged_columns"] = merge.merged_count
    # Residuals are measured on the scaled problem (entries near 1: the squares of 1e-200
    # underflowed to a relative residual of 0, those of 1e200 overflowed to NaN), then
    # scaled back with the solution.
    if res.residual_norm is None:
        t1 = time.perf_counter()
        res.residual_norm = residual_norms(A, res.solution, Y2)
        res.timings["residual"] = time.perf_counter() - t1
    if res.relative_residual is None:
        ynorm = float(np.linalg.norm(column_norms(Y2)))
        rnorm = float(np.linalg.norm(np.asarray(res.residual_norm, dtype=np.float64)))
        res.relative_residual = rnorm / ynorm if ynorm > 0 else rnorm
    if eA or eY:
        res.solution = np.ldexp(res.solution, eY - eA)
        res.residual_norm = np.ldexp(np.asarray(res.residual_norm, dtype=np.float64), eY)
        res.info["power_of_two_scaling"] = {"A": -eA, "Y": -eY}
        A, Y2 = A_in, Y_in
    res.timings["total"] = time.perf_counter() - t0
    if y_ndim == 1:
        res.solution = res.solution[:, 0]
    logger.debug("solve: %r", res)
    return res


class _ConstantMerge:
    """Columns of ``A`` that are constant on its rows (zero ones included) merged exactly.

    With ``c`` the vector of the constant values, those columns are ``1 c^T = (||c|| 1)
    (c / ||c||)^T``: one column ``||c|| 1`` and an orthonormal map back, so the minimum-norm
    solution (and the ridge one) over the merged matrix, ``z``, gives the original one as
    ``x_j = c_j z / ||c||``; zero columns get weight 0 (``c = 0``: the column is dropped).
    """

    def __init__(self, const: np.ndarray, values: np.ndarray):
        self.const, self.keep = const, np.flatnonzero(~const)
        self.values = values.astype(np.float64)
        self.norm = float(np.linalg.norm(self.values))
        self.merged_count = int(const.sum()) - (1 if self.norm > 0 else 0)

    def merged(self, A: np.ndarray) -> np.ndarray:
        out = A[:, self.keep]
        if self.norm > 0:
            out = np.concatenate([out, np.full((A.shape[0], 1), self.norm, dtype=A.dtype)],
                                 axis=1)
        return out

    def expand(self, z: np.ndarray) -> np.ndarray:
        x = np.zeros((self.const.size, z.shape[1]))
        x[self.keep] = z[: self.keep.size]
        if self.norm > 0:
            x[self.const] = np.outer(self.values / self.norm, z[-1])
        return x


def _constant_columns(A, lo: np.ndarray, hi: np.ndarray) -> _ConstantMerge | None:
    """The merge of ``A``'s constant columns (``lo``, ``hi``: its column minima and maxima),
    or None when there is nothing to merge (at most one constant column, not zero: the
    bias). A copy of ``A`` only when it finds some."""
    if A.shape[1] < 2:
        return None
    const = lo == hi
    count = int(const.sum())
    if count == 0 or (count == 1 and not np.any(lo[const] == 0)) or count == A.shape[1]:
        return None
    return _ConstantMerge(const, lo[const])


def _rescale(A, Y, alpha, cols=None):
    """``(2^-eA A, 2^-eY Y, 2^-2eA alpha, eA, eY)`` with the exponents of
    :func:`power_of_two_exponent` (0: left as they are; no copy). ``cols``: ``A``'s column
    minima and maxima when known."""
    def amax(a, rng=None):
        hi, lo = (a.max(), a.min()) if rng is None else (rng[1].max(), rng[0].min())
        if is_dask(hi):
            import dask

            hi, lo = dask.compute(hi, lo)
        return max(float(hi), -float(lo))

    eA = power_of_two_exponent(amax(A, cols), A.dtype)
    eY = power_of_two_exponent(amax(Y), np.float64)
    if eA:
        A = A * np.asarray(np.ldexp(1.0, -eA), dtype=A.dtype if A.dtype.kind == "f"
                           else np.float64)
        alpha = float(np.ldexp(alpha, -2 * eA))
    if eY:
        Y = Y * np.ldexp(1.0, -eY)
    return A, Y, alpha, eA, eY


from . import direct as _direct  # noqa: E402  (registers "direct")

register("direct")(_direct.solve_direct)

__all__ = ["SOLVERS", "LstsqResult", "check_options", "get_solver", "register", "solve",
           "solver_options"]

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
