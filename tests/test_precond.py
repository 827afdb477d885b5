"""solver="sketch-direct": sketch preconditioner, one Gram pass of A P, exact cutoff, refinement."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from swimdist.exceptions import ValidationError
from swimdist.lstsq import SOLVERS, solve
from swimdist.testing import assert_lstsq_close, make_lstsq_problem


def test_registered():
    assert "sketch-direct" in SOLVERS


@pytest.mark.parametrize(
    "kw",
    [
        dict(cond=1e12, noise=1e-6),  # far beyond the normal equations (cond^2 >> 1/eps)
        dict(cond=1e8, spectrum="linear", noise=0.1),
        dict(cond=1e3, rank=25, noise=0.1),  # exact zeros: rank 25 of 40
        dict(cond=1e14, spectrum="cluster"),  # one tiny singular value, consistent system
    ],
)
@pytest.mark.parametrize("chunked", [False, True], ids=["numpy", "dask"])
def test_matches_direct(kw, chunked, global_random_seed):
    p = make_lstsq_problem(400, 40, n_rhs=2, seed=global_random_seed, **kw)
    A = da.from_array(p["A"], chunks=(90, 40)) if chunked else p["A"]
    ref = solve(p["A"], p["Y"], method="direct")
    res = solve(A, p["Y"], method="sketch-direct", seed=global_random_seed)
    assert res.converged
    # the exact truncation reproduces gelsd's cutoff, so the ranks agree
    assert res.rank == ref.rank
    assert_lstsq_close(res, ref, rtol=1.5)
    assert res.info["cond_C"] < 50  # A P is well conditioned whatever cond(A) is


@pytest.mark.parametrize("margin", [10, 100, 1e4])
def test_rcond_cutoff_min_norm_solution(margin):
    # singular values 1 .. 1e-12 with rcond 1e-6. The sketch's kept subspace holds A's kept
    # one up to an angle of about 1 / margin (directions just below the sketch's cutoff leak
    # in), so the minimum-norm solution agrees to about that, the fitted values far better.
    p = make_lstsq_problem(500, 30, cond=1e12, n_rhs=1, noise=0.05, seed=7)
    ref = solve(p["A"], p["Y"], method="direct", rcond=1e-6)
    res = solve(p["A"], p["Y"], method="sketch-direct", rcond=1e-6, margin=margin)
    assert res.rank == ref.rank
    dx = np.linalg.norm(res.solution - ref.solution) / np.linalg.norm(ref.solution)
    assert dx < 0.1 / margin
    fit = p["A"] @ (res.solution - ref.solution)
    assert np.linalg.norm(fit) < 1e-8 * np.linalg.norm(p["A"] @ ref.solution)


def test_sketch_truncation_is_close_but_not_exact():
    p = make_lstsq_problem(500, 40, cond=1e12, n_rhs=1, noise=1e-3, seed=2)
    ref = solve(p["A"], p["Y"], method="direct")
    res = solve(p["A"], p["Y"], method="sketch-direct", truncation="sketch")
    assert res.info["truncation"] == "sketch"
    assert_lstsq_close(res, ref, rtol=1.5)


def test_swim_sine_features_gelsd_accuracy(sine_data):
    from swimdist.features import design_matrix
    from swimdist.sampling import sample_layers

    X, y, Xt, yt = sine_data
    layers = sample_layers(X, y[:, None], [50], seed=0)
    A = design_matrix(X, layers).compute()
    At = design_matrix(Xt, layers).compute()
    ref = solve(A, y, method="direct")
    res = solve(da.from_array(A, chunks=(128, 51)), y, method="sketch-direct")
    assert res.converged and res.rank == ref.rank
    assert_lstsq_close(res, ref, rtol=1.5)
    mae = np.abs(At @ res.solution - yt).mean()
    assert mae <= 2 * np.abs(At @ ref.solution - yt).mean()
    # the refinement pass measured the residual it reports
    assert res.residual_norm[0] == pytest.approx(np.linalg.norm(A @ res.solution - y), rel=1e-6)


def test_rhs_orthogonal_to_range_gives_zero():
    p = make_lstsq_problem(300, 20, cond=1e3, seed=3)
    Q, _ = np.linalg.qr(p["A"])
    Y = np.random.default_rng(0).standard_normal((300, 1))
    Y -= Q @ (Q.T @ Y)  # Y perpendicular to range(A): the answer is X = 0
    res = solve(p["A"], Y, method="sketch-direct")
    # forward error of least squares: cond^2 eps ||r|| / ||A|| = 2e-10 ||Y||
    assert np.linalg.norm(res.solution) < 1e-8 * np.linalg.norm(Y)
    assert res.relative_residual == pytest.approx(1.0, abs=1e-10)


@pytest.mark.parametrize("alpha", [1e-8, 1e-3])
def test_ridge_matches_direct(alpha):
    p = make_lstsq_problem(400, 30, cond=1e6, n_rhs=2, noise=0.1, seed=1)
    ref = solve(p["A"], p["Y"], method="direct", alpha=alpha)
    res = solve(p["A"], p["Y"], method="sketch-direct", alpha=alpha)
    np.testing.assert_allclose(res.solution, ref.solution, rtol=1e-5, atol=1e-7)


def test_gaussian_sketch_and_float32_storage():
    p = make_lstsq_problem(400, 30, cond=1e8, n_rhs=1, noise=1e-4, seed=4)
    A32 = p["A"].astype(np.float32)
    ref = solve(A32.astype(np.float64), p["Y"], method="direct")
    res = solve(
        da.from_array(A32, chunks=(100, 30)), p["Y"], method="sketch-direct", sketch="gaussian"
    )
    assert res.info["sketch"] == "gaussian"
    assert_lstsq_close(res, ref, rtol=1.5)


def test_same_seed_same_solution_whatever_the_chunking():
    # cond 1e4: the solutions agree to about cond^2 eps (rounding follows the chunking)
    p = make_lstsq_problem(600, 30, cond=1e4, n_rhs=1, noise=1e-3, seed=6)
    a = solve(da.from_array(p["A"], chunks=(600, 30)), p["Y"], method="sketch-direct", seed=3)
    b = solve(da.from_array(p["A"], chunks=(97, 30)), p["Y"], method="sketch-direct", seed=3)
    assert a.rank == b.rank
    assert a.info["sketch_rank"] == b.info["sketch_rank"]
    np.testing.assert_allclose(a.solution, b.solution, rtol=1e-7, atol=1e-9)


def test_acceptance_rule():
    from swimdist.lstsq.normal import accept_gain

    kw = dict(sigma_max=1.0, xnorm=1.0, ynorm=1.0, n=100)
    # the residual could still shrink by 10 %: rejected at tol 1e-2, accepted at 0.2
    assert accept_gain(1e-2, 1.0, tol=1e-2, **kw) == (pytest.approx(0.1), False)
    assert accept_gain(1e-2, 1.0, tol=0.2, **kw)[1]
    # a consistent system: rr ~ 0, the possible gain is at the rounding level -> accepted
    assert accept_gain(1e-30, 1e-30, tol=1e-2, **kw)[1]


def test_distributed_cluster(local_cluster_factory):
    client = local_cluster_factory(n_workers=1, threads_per_worker=1)
    assert client.scheduler_info()["workers"]
    p = make_lstsq_problem(400, 30, cond=1e10, n_rhs=2, noise=1e-3, seed=8)
    ref = solve(p["A"], p["Y"], method="direct")
    res = solve(da.from_array(p["A"], chunks=(100, 30)), p["Y"], method="sketch-direct")
    assert_lstsq_close(res, ref, rtol=1.5)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(truncation="qr"), "Unknown truncation 'qr'"),
        (dict(sketch="srht"), "Unknown sketch 'srht'"),
        (dict(margin=0.5), "margin must be a finite number >= 1"),
        (dict(gamma=0.5), "gamma must be a finite number >= 1"),
    ],
)
def test_errors(kw, match):
    p = make_lstsq_problem(50, 5, seed=0)
    with pytest.raises(ValidationError, match=match):
        solve(p["A"], p["Y"], method="sketch-direct", **kw)
