"""The dense reference solver every other solver is tested against.

It gathers ``A`` on the client and calls LAPACK's ``gelsd`` (``numpy.linalg.lstsq``, what
the reference implementation swimnetworks uses) with the ``rcond`` cutoff; with Tikhonov
damping ``alpha > 0`` it uses an SVD and the filter factors ``s / (s**2 + alpha)``.
Memory: about twice ``A`` on the client. Use it for small problems and as the yardstick.
"""

from __future__ import annotations

import time

import numpy as np

from ..design import as_design
from ..exceptions import ValidationError
from ._common import is_dask, svd_solve
from .result import LstsqResult


def solve_direct(A, Y, *, rcond: float = 1e-10, alpha: float = 0.0) -> LstsqResult:
    """Solve ``min ||A X - Y||_F`` densely with a relative singular-value cutoff ``rcond``.

    No options: gelsd (``alpha == 0``) or an SVD with filter factors (``alpha > 0``).
    """
    t0 = time.perf_counter()
    A = as_design(A).array
    A = A.compute() if is_dask(A) else np.asarray(A)
    Y = Y.compute() if is_dask(Y) else np.asarray(Y)
    t1 = time.perf_counter()
    if not (np.isfinite(A).all() and np.isfinite(Y).all()):
        raise ValidationError("A or Y contains NaN or infinity.")
    if alpha == 0:
        X, res, rank, s = np.linalg.lstsq(A, Y, rcond=rcond)
        rank = int(rank)
    else:
        U, s, Vt = np.linalg.svd(A, full_matrices=False)
        X, rank = svd_solve(U, s, Vt, Y, rcond=rcond, alpha=alpha)
    t2 = time.perf_counter()
    R = A @ X - Y
    resid = np.sqrt(np.einsum("ij,ij->j", R, R))
    return LstsqResult(
        solution=X,
        method="direct",
        rank=rank,
        residual_norm=resid,
        timings={"gather": t1 - t0, "solve": t2 - t1},
        info={"driver": "gelsd" if alpha == 0 else "gesdd",
              "sigma_max": float(s[0]) if s.size else 0.0,
              "sigma_min_kept": float(s[rank - 1]) if rank else 0.0},
    )
