"""LSRN on row blocks: agreement with the direct solver, bounded iterations, reproducibility."""

from __future__ import annotations

import warnings

import dask.array as da
import numpy as np
import pytest

from swimdist.exceptions import ConvergenceWarning, ValidationError
from swimdist.lstsq import SOLVERS, solve
from swimdist.lstsq.lsqr import RowBlockOperator, chebyshev, lsqr
from swimdist.lstsq.lsrn import chebyshev_bounds
from swimdist.testing import assert_lstsq_close, make_lstsq_problem

# (sketch, iteration scheme); the Chebyshev bounds need more oversampling at these small n
SCHEMES = [
    ("gaussian", "lsqr"),
    ("gaussian", "chebyshev"),
    ("sparse-sign", "lsqr"),
    ("sparse-sign", "chebyshev"),
]


def _opts(sk, it):
    return {"sketch": sk, "lsrn_iterations": it, "gamma": 4.0 if it == "chebyshev" else 2.0}


def _as(A, kind, rows=400):
    return da.from_array(A, chunks=(rows, -1)) if kind == "dask" else A


def _swim_features(n=1000, width=100, alpha=5.0, seed=0):
    """A SWIM tanh feature matrix [tanh(X W + b), 1] of the sine problem (ill-conditioned)."""
    from swimdist.datasets import sine
    from swimdist.features import design_matrix
    from swimdist.sampling import sample_layers

    X, y = sine(n, alpha=alpha, seed=seed)
    layers = sample_layers(X, y[:, None], [width], activation="tanh", seed=seed)
    return np.asarray(design_matrix(X, layers).compute()), y[:, None]


def test_lsrn_is_registered():
    assert "lsrn" in SOLVERS


@pytest.mark.parametrize("kind", ["numpy", "dask"])
@pytest.mark.parametrize("sk, it", SCHEMES)
@pytest.mark.parametrize(
    "problem",
    [
        dict(cond=1e6, noise=1e-2),  # inconsistent: residual dominated by noise
        dict(cond=1e8, noise=0.0),  # consistent: residual at rounding level
        dict(cond=1e4, rank=40, noise=1e-3),  # exactly rank-deficient (20 zero singular values)
        dict(cond=1e14, noise=1e-6),  # beyond 1/rcond: the cutoff decides the subspace
    ],
    ids=["noisy", "consistent", "rank-deficient", "cut"],
)
def test_agrees_with_direct_on_known_spectra(kind, sk, it, problem):
    p = make_lstsq_problem(1500, 60, n_rhs=3, seed=2, **problem)
    ref = solve(p["A"], p["Y"], method="direct")
    res = solve(_as(p["A"], kind), p["Y"], method="lsrn", **_opts(sk, it))
    assert_lstsq_close(res, ref, rtol=1.5)
    assert res.converged
    assert res.rank == pytest.approx(ref.rank, abs=2)  # the sketch may cut at a neighbour


@pytest.mark.parametrize("kind", ["numpy", "dask"])
@pytest.mark.parametrize("sk, it", SCHEMES)
def test_agrees_with_direct_on_swim_tanh_features(kind, sk, it):
    A, Y = _swim_features()
    ref = solve(A, Y, method="direct")
    res = solve(_as(A, kind, rows=256), Y, method="lsrn", **_opts(sk, it))
    assert_lstsq_close(res, ref, rtol=1.5)
    assert res.relative_residual < 1e-3  # and it fits: not a trivially small bound


@pytest.mark.parametrize("sk", ["gaussian", "sparse-sign"])
def test_iterations_do_not_grow_with_the_condition_number(sk):
    its = []
    for cond in (1e4, 1e8, 1e12, 1e16):
        p = make_lstsq_problem(1500, 60, cond=cond, n_rhs=2, noise=1e-3, seed=3)
        res = solve(p["A"], p["Y"], method="lsrn", sketch=sk, tol=1e-12)
        assert res.converged
        its.append(res.iterations)
    # LSRN's point: A P has singular values in [1/(1+e), 1/(1-e)] whatever cond(A) is.
    # (Unpreconditioned LSQR needs ~cond iterations; here cond grows by 1e12.)
    # Sampling noise moves the count by a few iterations; a 1e12-fold growth of cond may not
    # move it by more than 20 %, and at cond = 1e16 it is no larger than at 1e4.
    assert max(its) <= 1.2 * its[0] and its[-1] <= its[0], its


def test_same_solution_from_one_and_two_worker_processes(local_cluster_factory):
    p = make_lstsq_problem(3000, 50, cond=1e6, n_rhs=4, noise=1e-2, seed=4)
    sols = []
    for n_workers in (1, 2):
        client = local_cluster_factory(n_workers=n_workers)
        assert len(client.scheduler_info()["workers"]) == n_workers
        A = da.from_array(p["A"], chunks=(500, -1))
        for it in ("lsqr", "chebyshev"):
            res = solve(A, p["Y"], method="lsrn", seed=11, lsrn_iterations=it, gamma=4.0)
            sols.append(res.solution)
        client.close()
    for one, two in zip(sols[:2], sols[2:], strict=True):
        np.testing.assert_allclose(two, one, rtol=0, atol=1e-10 * np.abs(one).max())


@pytest.mark.parametrize("persist", [True, False])
def test_task_graph_does_not_grow_across_iterations(persist):
    p = make_lstsq_problem(1200, 30, cond=1e6, n_rhs=2, noise=1e-2, seed=5)
    A = da.from_array(p["A"], chunks=(200, -1)) * 1.0  # a lazy graph, recomputed if not persisted
    res = solve(A, p["Y"], method="lsrn", persist=persist)
    sizes = res.info["graph_sizes"]
    assert len(sizes) == res.iterations + 1  # one pass to start, one per iteration
    assert res.iterations > 5
    assert len(set(sizes)) == 1, sizes


@pytest.mark.parametrize("it", ["lsqr", "chebyshev"])
def test_iteration_limit_warns_and_returns_the_best_iterate(it):
    p = make_lstsq_problem(1000, 40, cond=1e6, n_rhs=2, noise=1e-2, seed=6)
    with pytest.warns(ConvergenceWarning, match="iteration limit max_iter=2"):
        res = solve(p["A"], p["Y"], method="lsrn", lsrn_iterations=it, gamma=4.0, max_iter=2)
    assert not res.converged and res.iterations == 2
    assert res.info["stop_reason"] == "iteration limit"
    # never worse than the sketch-and-solve start
    assert res.relative_residual <= res.residual_history[0] * (1 + 1e-12)


def test_tikhonov_alpha_matches_direct():
    p = make_lstsq_problem(1500, 50, cond=1e8, n_rhs=2, noise=1e-2, seed=7)
    for alpha in (1e-6, 1e-2):
        ref = solve(p["A"], p["Y"], method="direct", alpha=alpha)
        res = solve(_as(p["A"], "dask"), p["Y"], method="lsrn", alpha=alpha)
        # the ridge solution is unique and well conditioned (cond <= 1/sqrt(alpha))
        np.testing.assert_allclose(
            res.solution, ref.solution, rtol=0, atol=1e-8 * np.abs(ref.solution).max()
        )


def test_right_hand_side_orthogonal_to_range_gives_zero():
    # known answer (b perpendicular to range(A)): x = 0, relative residual 1
    p = make_lstsq_problem(800, 20, cond=1e3, seed=8)
    A = p["A"]
    Q, _ = np.linalg.qr(A)
    Z = np.random.default_rng(0).standard_normal((800, 2))
    Y = Z - Q @ (Q.T @ Z)
    res = solve(A, Y, method="lsrn")
    # scale-aware: ||x|| <= tol-level * ||Y|| / sigma_min with sigma_min = 1e-3, tol = 1e-12
    assert np.linalg.norm(res.solution) < 1e-7 * np.linalg.norm(Y)
    assert res.relative_residual == pytest.approx(1.0, abs=1e-12)


def test_zero_right_hand_side_and_one_dimensional_y():
    p = make_lstsq_problem(500, 10, seed=9)
    res = solve(p["A"], np.zeros(500), method="lsrn")
    assert res.solution.shape == (10,) and not res.solution.any()
    res = solve(p["A"], p["Y"][:, 0], method="lsrn")
    np.testing.assert_allclose(res.solution, p["x"][:, 0], rtol=1e-8)


def test_result_carries_iterations_history_and_stage_timings():
    p = make_lstsq_problem(1000, 30, cond=1e6, n_rhs=2, noise=1e-2, seed=10)
    res = solve(_as(p["A"], "dask"), p["Y"], method="lsrn", sketch="sparse-sign")
    assert {"sketch", "svd", "iterate"} <= set(res.timings)
    assert len(res.residual_history) == res.iterations + 1
    # the recurrence's residual matches the residual solve() computes from A
    assert res.residual_history[-1] == pytest.approx(res.relative_residual, rel=1e-6)
    assert res.info["s"] == 60 and res.info["sketch"] == "sparse-sign"


def test_lsqr_and_chebyshev_without_preconditioner_on_a_well_conditioned_matrix():
    # The iterations alone (P = I, zero start) against lstsq; singular values in [0.5, 1]
    p = make_lstsq_problem(600, 20, cond=2.0, n_rhs=3, noise=0.1, seed=11)
    x = np.linalg.lstsq(p["A"], p["Y"], rcond=None)[0]
    op = RowBlockOperator(da.from_array(p["A"], chunks=(150, -1)))
    out = lsqr(op, p["Y"], tol=1e-14, max_iter=100)
    np.testing.assert_allclose(out.z, x, rtol=1e-10)
    out = chebyshev(op, p["Y"], sigma_bounds=(0.5, 1.0), tol=1e-14, max_iter=200)
    np.testing.assert_allclose(out.z, x, rtol=1e-10)


def test_chebyshev_detects_wrong_bounds():
    p = make_lstsq_problem(600, 20, cond=10.0, noise=0.1, seed=12)  # sigma in [0.1, 1]
    with pytest.warns(ConvergenceWarning, match="diverged"):
        out = chebyshev(p["A"], p["Y"], sigma_bounds=(0.01, 0.3), max_iter=200)
    assert out.stop_reason == "diverged"


def test_chebyshev_bounds_hold_for_both_sketches(rng):
    # sigma(A P) must lie inside the bounds for the Gaussian (proved) and the sparse sign
    # (heuristic) at the default gamma = 2
    from swimdist.lstsq.sketch import sketch

    n = 200
    A = make_lstsq_problem(3000, n, cond=1e10, seed=13)["A"]
    lo, hi = chebyshev_bounds(n, 2 * n)
    for kind in ("gaussian", "sparse-sign"):
        SA, _ = sketch(A, s=2 * n, kind=kind, seed=1)
        _, sig, Vt = np.linalg.svd(SA, full_matrices=False)
        sv = np.linalg.svd(A @ (Vt.T / sig), compute_uv=False)
        assert lo <= sv.min() and sv.max() <= hi, (kind, sv.min(), sv.max(), lo, hi)


@pytest.mark.parametrize("persist", [True, False])  # False: every pass reads the Zarr store
def test_regressor_with_lsrn_matches_direct(sine_data, persist):
    from swimdist.estimators import SWIMRegressor

    X, y, Xt, yt = sine_data
    maes = {}
    for solver in ("direct", "lsrn"):
        opts = {"persist": persist} if solver == "lsrn" else None
        model = SWIMRegressor(
            hidden_layer_sizes=(60,), solver=solver, random_state=0, solver_options=opts
        )
        model.fit(X, y)
        maes[solver] = np.abs(model.predict(Xt) - yt).mean()
    assert maes["lsrn"] <= 1.5 * maes["direct"] + 1e-12


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"sketch": "srht"}, "valid sketches are: gaussian, sparse-sign"),
        ({"lsrn_iterations": "cg"}, "valid: lsqr, chebyshev"),
        ({"gamma": 0.5}, "gamma must be"),
        ({"lsrn_iterations": "chebyshev"}, r"Use gamma >= \d"),  # n=30, s=60: no bounds
        ({"tol": 2.0}, "tol must be"),
        ({"max_iter": -1}, "max_iter must be"),
    ],
)
def test_invalid_options(kw, match):
    p = make_lstsq_problem(200, 30, seed=0)
    with pytest.raises(ValidationError, match=match):
        solve(p["A"], p["Y"], method="lsrn", **kw)


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [1, 5, 10])
def test_sine_5000_by_1000_matches_direct(alpha):
    # The seed report's problem: residual and test MAE within 1.5x of gelsd's.
    from swimdist.datasets import sine
    from swimdist.features import design_matrix
    from swimdist.sampling import sample_layers

    X, y = sine(5000, alpha=alpha, seed=0)
    Xt, yt = sine(2000, alpha=alpha, seed=1)
    layers = sample_layers(X, y[:, None], [1000], activation="tanh", seed=0)
    A = design_matrix(X, layers).compute()
    At = design_matrix(Xt, layers).compute()
    ref = solve(A, y, method="direct")
    ref_mae = np.abs(At @ ref.solution - yt).mean()
    for sk, it in SCHEMES:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            res = solve(_as(A, "dask", rows=1000), y, method="lsrn", sketch=sk, lsrn_iterations=it)
        assert_lstsq_close(res, ref, rtol=1.5)
        assert np.abs(At @ res.solution - yt).mean() <= 1.5 * ref_mae


def test_lsqr_checkpoint_warm_starts_a_resumed_solve(tmp_path):
    import warnings

    from swimdist.design import DesignMatrix
    from swimdist.store import SolveCheckpoint
    from swimdist.testing import make_lstsq_problem

    p = make_lstsq_problem(3000, 120, cond=1e8, n_rhs=2, noise=0.01, seed=11)
    kw = dict(method="lsrn", sketch="sparse-sign", rcond=1e-12, tol=1e-12)
    ref = solve(p["A"], p["Y"], **kw)
    ck = SolveCheckpoint(str(tmp_path / "ck"), "job")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "interrupted" run stops at its iteration limit
        solve(DesignMatrix(p["A"], checkpoint=ck), p["Y"], checkpoint_every=4, max_iter=9,
              **kw)
    again = solve(DesignMatrix(p["A"], checkpoint=SolveCheckpoint(str(tmp_path / "ck"), "job")),
                  p["Y"], **kw)
    assert again.info["resumed_at"] == 8
    assert again.iterations < ref.iterations
    assert again.relative_residual <= (1 + 1e-9) * ref.relative_residual
    np.testing.assert_allclose(p["A"] @ again.solution, p["A"] @ ref.solution, rtol=0,
                               atol=1e-8 * np.abs(p["Y"]).max())


def test_bad_checkpoint_interval_is_rejected():
    with pytest.raises(ValidationError, match="checkpoint_every must be an integer >= 1"):
        solve(np.eye(6), np.ones(6), method="lsrn", checkpoint_every=0)
