"""The object every least-squares solver returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class LstsqResult:
    """Outcome of :func:`swimdist.solve`.

    Attributes
    ----------
    solution : ndarray, shape (n, K) (or (n,) when ``Y`` was 1-D)
        Minimum-norm least-squares solution over the kept singular subspace.
    method : str
        Registry name of the solver that produced it.
    rank : int or None
        Numerical rank used (singular values above ``rcond * sigma_max``), when known.
    residual_norm : ndarray, shape (K,)
        ``||A x_k - y_k||_2`` for every right-hand side.
    relative_residual : float
        ``||A X - Y||_F / ||Y||_F`` (``0`` when ``Y`` is zero).
    iterations : int
        Iterations of the iterative phase (0 for direct methods).
    residual_history : list of float
        Relative residual (or its estimate) after each iteration / block.
    timings : dict of str to float
        Seconds spent in each stage (e.g. ``"sketch"``, ``"svd"``, ``"iterate"``).
    converged : bool
        False when an iteration limit stopped the solver before its tolerance.
    info : dict
        Solver-specific details (sketch size, block order, chosen sub-solver, reasons...).
    """

    solution: np.ndarray
    method: str
    rank: int | None = None
    residual_norm: np.ndarray | None = None
    relative_residual: float | None = None
    iterations: int = 0
    residual_history: list[float] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    converged: bool = True
    info: dict = field(default_factory=dict)

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        rr = "?" if self.relative_residual is None else f"{self.relative_residual:.3e}"
        return (
            f"LstsqResult(method={self.method!r}, shape={self.solution.shape}, "
            f"rank={self.rank}, relative_residual={rr}, iterations={self.iterations}, "
            f"timings={ {k: round(v, 3) for k, v in self.timings.items()} })"
        )
