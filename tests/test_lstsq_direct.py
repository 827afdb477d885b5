"""The solve() entry point, the registry, and the direct reference solver."""

import dask.array as da
import numpy as np
import pytest

from swimdist import solve
from swimdist.exceptions import ValidationError
from swimdist.lstsq import SOLVERS, LstsqResult, get_solver
from swimdist.testing import make_lstsq_problem

CASES = [
    # (rows, cols, cond, rank, rhs, noise): one row per property the cutoff must handle
    (200, 20, 1e3, None, 1, 0.0),  # well conditioned, consistent
    (200, 20, 1e8, None, 3, 0.3),  # ill conditioned, inconsistent, 3 right-hand sides
    (200, 20, 1e3, 12, 2, 0.1),  # exactly rank deficient: min-norm solution
]


@pytest.mark.parametrize("n, m, cond, rank, k, noise", CASES)
def test_direct_returns_min_norm_solution(n, m, cond, rank, k, noise):
    p = make_lstsq_problem(n, m, cond=cond, rank=rank, n_rhs=k, noise=noise, seed=1)
    r = solve(p["A"], p["Y"], method="direct", rcond=1e-12)
    assert isinstance(r, LstsqResult) and r.method == "direct"
    assert r.rank == (rank or m)
    # error bound of a backward-stable solver: cond * eps * (1 + cond * tan(theta))
    tol = 1e-12 * cond * (1 + cond * noise)
    np.testing.assert_allclose(r.solution, p["x"], atol=max(tol, 1e-10))
    np.testing.assert_allclose(np.linalg.norm(r.residual_norm), p["residual"], rtol=1e-8,
                               atol=1e-12)


def test_rcond_cuts_small_singular_values():
    p = make_lstsq_problem(100, 10, cond=1e6, seed=0)
    full = solve(p["A"], p["Y"], rcond=1e-8)
    cut = solve(p["A"], p["Y"], rcond=1e-3)
    assert full.rank == 10 and cut.rank == int(np.sum(p["s"] > 1e-3 * p["s"][0]))
    assert np.linalg.norm(cut.solution) < np.linalg.norm(full.solution)


def test_b_orthogonal_to_range_gives_zero_solution():
    p = make_lstsq_problem(80, 8, cond=10, seed=2)
    Q, _ = np.linalg.qr(p["A"], mode="complete")
    b = Q[:, 9]
    r = solve(p["A"], b)
    np.testing.assert_allclose(r.solution, 0.0, atol=1e-12)
    assert r.relative_residual == pytest.approx(1.0)


def test_tikhonov_alpha_matches_augmented_system():
    p = make_lstsq_problem(60, 6, cond=1e4, seed=3)
    alpha = 1e-3
    r = solve(p["A"], p["Y"], alpha=alpha, rcond=0)
    aug = np.vstack([p["A"], np.sqrt(alpha) * np.eye(6)])
    ref = np.linalg.lstsq(aug, np.vstack([p["Y"], np.zeros((6, 1))]), rcond=None)[0]
    np.testing.assert_allclose(r.solution, ref, rtol=1e-10)


def test_dask_input_and_1d_rhs():
    p = make_lstsq_problem(300, 15, cond=1e5, n_rhs=1, noise=0.1, seed=4)
    r1 = solve(p["A"], p["Y"][:, 0])
    r2 = solve(da.from_array(p["A"], chunks=(70, 15)), da.from_array(p["Y"][:, 0], chunks=70))
    assert r1.solution.shape == (15,)
    np.testing.assert_allclose(r2.solution, r1.solution, rtol=1e-10)
    assert r2.relative_residual == pytest.approx(r1.relative_residual, rel=1e-10)


def test_registry_lists_valid_names():
    assert "direct" in SOLVERS and get_solver("direct") is SOLVERS["direct"]
    with pytest.raises(ValidationError, match="valid solvers are: .*direct"):
        solve(np.eye(3), np.ones(3), method="nope")


@pytest.mark.parametrize("A, Y, msg", [
    (np.ones(3), np.ones(3), "A must be 2-D"),
    (np.ones((3, 2)), np.ones(4), "same number of rows"),
    (np.ones((3, 2)), np.ones((3, 2, 1)), "Y must be 1-D or 2-D"),
    (np.ones((0, 2)), np.ones(0), "A is empty"),
    (np.array([[1.0, np.nan]]), np.ones(1), "A contains NaN"),
    (np.ones((2, 2)), np.array([1.0, np.inf]), "Y contains NaN"),
    (np.ones((3, 2)), np.ones((3, 0)), "Y has no columns"),
])
def test_bad_arguments(A, Y, msg):
    with pytest.raises(ValidationError, match=msg):
        solve(A, Y)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_every_registered_solver_agrees_with_direct(name):
    # Registry self-test: each solver, on a moderately conditioned problem, reaches the
    # direct solver's relative residual within 1.5x.
    p = make_lstsq_problem(400, 30, cond=1e4, n_rhs=2, noise=0.05, seed=5)
    A = da.from_array(p["A"], chunks=(100, 30))
    ref = solve(p["A"], p["Y"], method="direct", rcond=1e-12)
    # split-and-solve is one block Gauss-Seidel sweep, not a least-squares solver for an
    # arbitrary matrix; with one block it must be exact (its own tests cover the rest).
    opts = {"n_splits": 1} if name == "split" else {}
    r = solve(A, p["Y"], method=name, rcond=1e-12, **opts)
    assert r.relative_residual <= 1.5 * ref.relative_residual + 1e-12


@pytest.mark.parametrize("rcond", [1.0, 2.0, -1e-3])
def test_rcond_outside_zero_one_is_refused(rcond):
    # rcond >= 1 cuts every direction: gelsd read it as full rank, the Gram-based solvers
    # as rank 0; one meaning for all is a refusal
    with pytest.raises(ValidationError, match=r"rcond must be a number in \[0, 1\)"):
        solve(np.eye(3), np.ones(3), rcond=rcond)


@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("k", [-660, 530])
def test_residuals_are_reported_at_any_scale_of_y(name, k):
    """Y times 2^-660 or 2^530: every solver reports the relative residual and the residual
    norms of the unscaled problem, scaled (their squares underflowed to 0 and overflowed to
    NaN)."""
    p = make_lstsq_problem(300, 20, cond=1e3, n_rhs=2, noise=0.3, seed=7)
    opts = {"n_splits": 1} if name == "split" else {}
    ref = solve(p["A"], p["Y"], method=name, **opts)
    got = solve(p["A"], np.ldexp(p["Y"], k), method=name, **opts)
    assert got.relative_residual == pytest.approx(ref.relative_residual, rel=1e-9)
    np.testing.assert_allclose(np.ldexp(got.residual_norm, -k), ref.residual_norm, rtol=1e-9)


def test_normal_tiled_on_a_zero_matrix_gives_zero():
    r = solve(np.zeros((300, 20)), np.ones(300), method="normal-tiled")
    assert np.all(r.solution == 0) and r.relative_residual == pytest.approx(1.0)
