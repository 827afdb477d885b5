"""Problem makers with known solution and spectrum, and assertion helpers for tests.

Shipped with the package (like opt_einsum's ``testing``) so that users and the test suite
build the same problems.
"""

from __future__ import annotations

import numpy as np


def make_lstsq_problem(n_rows: int, n_cols: int, *, cond: float = 1e6, rank: int | None = None,
                       n_rhs: int = 1, noise: float = 0.0, spectrum: str = "geometric",
                       seed: int = 0) -> dict:
    """A matrix ``A = U diag(s) V^T`` of known spectrum and a right-hand side.

    Parameters
    ----------
    n_rows, n_cols : int
        Shape of ``A`` (``n_rows >= n_cols``).
    cond : float
        ``s[0] / s[rank-1]``; the kept singular values run from 1 down to ``1/cond``.
    rank : int, optional
        Number of nonzero singular values (default ``n_cols``); the rest are exactly 0.
    n_rhs : int
        Number of right-hand sides ``K``.
    noise : float
        Norm fraction of ``Y`` orthogonal to ``range(A)`` (0: consistent system).
    spectrum : {"geometric", "linear", "cluster"}
        How the singular values fall from 1 to ``1/cond``.
    seed : int
        Seed of the generator.

    Returns
    -------
    dict with ``A`` (N, n), ``Y`` (N, K), ``x`` (n, K) the minimum-norm solution,
    ``s`` the singular values, ``residual`` = ``||A x - Y||_F``.
    """
    rng = np.random.default_rng(seed)
    rank = n_cols if rank is None else rank
    U, _ = np.linalg.qr(rng.standard_normal((n_rows, n_cols + n_rhs)))
    V, _ = np.linalg.qr(rng.standard_normal((n_cols, n_cols)))
    if spectrum == "geometric":
        s = np.logspace(0, -np.log10(cond), rank)
    elif spectrum == "linear":
        s = np.linspace(1, 1 / cond, rank)
    elif spectrum == "cluster":
        s = np.r_[np.ones(rank - 1), 1 / cond] if rank > 1 else np.ones(1)
    else:
        raise ValueError(f"unknown spectrum {spectrum!r}; use geometric, linear or cluster")
    s_full = np.r_[s, np.zeros(n_cols - rank)]
    A = (U[:, :n_cols] * s_full) @ V.T
    x = V[:, :rank] @ rng.standard_normal((rank, n_rhs))
    Y = A @ x
    if noise:
        perp = U[:, n_cols:n_cols + n_rhs] if n_rhs <= U.shape[1] - n_cols else 0
        Y = Y + noise * np.linalg.norm(Y, axis=0) * perp
    resid = float(np.linalg.norm(A @ x - Y))
    return {"A": A, "Y": Y, "x": x, "s": s_full, "residual": resid}


def assert_lstsq_close(result, reference, *, rtol: float = 1.5) -> None:
    """Assert ``result``'s relative residual is within ``rtol`` times ``reference``'s.

    A floor of ``1e-15`` keeps consistent systems (reference residual ~0) comparable.
    """
    a = max(result.relative_residual, 1e-15)
    b = max(reference.relative_residual, 1e-15)
    assert a <= rtol * b + 1e-13, (
        f"{result.method}: relative residual {a:.3e} > {rtol} x {reference.method}'s {b:.3e}"
    )
