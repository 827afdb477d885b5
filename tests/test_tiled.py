"""normal-tiled: panelled Gram from the feature store, Cholesky on panels, block CG."""

import dask.array as da
import numpy as np
import pytest

from swimdist import SWIMClassifier, solve
from swimdist.design import DesignMatrix
from swimdist.exceptions import ValidationError
from swimdist.testing import make_lstsq_problem

CASES = [
    # (tile, gram dtype): tiles smaller than, equal to, larger than n
    (7, "float64"),
    (50, "float64"),
    (500, "float32"),  # float32 panel products, CG back to float64 accuracy
]


@pytest.mark.parametrize("tile, dtype", CASES)
def test_matches_direct_on_known_spectrum(tile, dtype):
    p = make_lstsq_problem(2000, 60, cond=1e4, n_rhs=3, noise=0.1, seed=0)
    ref = solve(p["A"], p["Y"], rcond=1e-12)
    # tol 1e-7: the normal equations' residual is attainable to about cond^2 eps = 1e-8
    r = solve(p["A"], p["Y"], method="normal-tiled", rcond=1e-12, tile=tile, gram_dtype=dtype,
              cg_tol=1e-7)
    assert r.converged and r.info["cg_converged"]
    assert r.relative_residual <= 1.00001 * ref.relative_residual
    if dtype == "float32":
        return  # CG on A^T A resolves x itself only to about cond^2 x tol
    # cond 1e4 with a residual: the normal equations' error is about cond^2 eps |r|/|A x|
    # ~ 1e-8 x 0.1 relative, amplified by cond along the smallest directions: <= 1e-4
    np.testing.assert_allclose(r.solution, p["x"], rtol=0, atol=1e-4)


def test_cg_recovers_what_the_float32_preconditioner_damps():
    # cond 1e5: the float32 preconditioner's ridge (1e-4 trace/n) damps the smallest
    # directions; CG on the float64 operator brings them back.
    p = make_lstsq_problem(3000, 80, cond=1e5, n_rhs=2, noise=0.1, seed=1)
    ref = solve(p["A"], p["Y"], rcond=1e-12)
    r0 = solve(p["A"], p["Y"], method="normal-tiled", gram_dtype="float32", max_iter=0)
    r = solve(p["A"], p["Y"], method="normal-tiled", gram_dtype="float32", cg_tol=1e-10,
              max_iter=200)
    assert r.iterations > 1 and r.info["cg_converged"]

    def fit_gap(res):  # |A (x - x_ref)| / |Y|: how far the fit is from the least-squares fit
        return np.linalg.norm(p["A"] @ (res.solution - ref.solution)) / np.linalg.norm(p["Y"])

    assert fit_gap(r0) > 1e-5  # damped by the preconditioner's ridge
    assert fit_gap(r) < 1e-3 * fit_gap(r0)
    assert r.relative_residual <= (1 + 1e-9) * ref.relative_residual
    # the history falls: CG, not a stalled refinement
    assert r.residual_history[-1] < 1e-3 * r.residual_history[0]


def test_iteration_limit_warns():
    from swimdist.exceptions import ConvergenceWarning

    p = make_lstsq_problem(1000, 40, cond=1e6, n_rhs=1, seed=3)
    with pytest.warns(ConvergenceWarning, match="CG stopped after 1 steps"):
        r = solve(p["A"], p["Y"], method="normal-tiled", gram_dtype="float32", max_iter=1,
                  cg_tol=1e-14)
    assert not r.converged and r.iterations == 1


def test_checkpoint_resume_gives_the_same_solution(tmp_path):
    from swimdist.store import SolveCheckpoint

    p = make_lstsq_problem(1500, 70, cond=1e5, n_rhs=3, seed=4)
    # tol 0: every solve runs its 25 steps (and warns that it stopped there)
    kw = dict(method="normal-tiled", gram_dtype="float32", tile=20, cg_tol=0.0, max_iter=25)
    ck = SolveCheckpoint(str(tmp_path / "ck"), "job-1")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = solve(p["A"], p["Y"], **kw)
        # "interrupted" after 10 steps: its state at step 10 is on disk
        solve(DesignMatrix(p["A"], checkpoint=ck), p["Y"], checkpoint_every=5,
              **{**kw, "max_iter": 10})
        assert sorted(f.name for f in (tmp_path / "ck").iterdir()) == [
            "checkpoint.json", "panel-0.npy", "panel-1.npy", "panel-2.npy", "panel-3.npy",
            "pcg.npz"]
        again = solve(DesignMatrix(p["A"], checkpoint=SolveCheckpoint(str(tmp_path / "ck"),
                                                                      "job-1")), p["Y"], **kw)
    assert again.info["panels_reused"] == 4
    np.testing.assert_array_equal(again.solution, ref.solution)
    # another job's checkpoint is discarded, not mixed in
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = solve(DesignMatrix(p["A"], checkpoint=SolveCheckpoint(str(tmp_path / "ck"),
                                                                      "job-2")), 2 * p["Y"], **kw)
    assert other.info["panels_reused"] == 0
    np.testing.assert_allclose(other.solution, 2 * ref.solution, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("order", ["F", "C"])
def test_panel_cholesky_solves(order):
    """Fortran-ordered panels (the solver's own: factored in place) and C-ordered ones
    (views of a square, as blocked_cholesky has them) give the same factor."""
    import scipy.linalg as sla

    from swimdist.lstsq.tiled import PanelCholesky, _tiles

    rng = np.random.default_rng(5)
    B = rng.standard_normal((400, 90))
    G = B.T @ B
    tiles = _tiles(90, 25)
    panels = [G[a:b, a:].copy(order=order) for a, b in tiles]
    chol = PanelCholesky(panels, tiles).factor(column_block=30)
    assert all(P.flags.f_contiguous == (order == "F") for P in chol.panels)
    R = sla.cholesky(G, lower=False)
    for (a, b), P in zip(tiles, chol.panels, strict=True):
        np.testing.assert_allclose(np.triu(P), R[a:b, a:], rtol=1e-10, atol=1e-10)
    X = rng.standard_normal((90, 3))
    np.testing.assert_allclose(chol.solve(G @ X), X, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_gram_panels_are_the_upper_row_panels_of_the_gram_matrix(dtype):
    """A panel task (SYRK on its diagonal tile, mirrored; GEMM on the rest) gives the rows
    ``[p0, p1)`` of ``B^T B`` from column ``p0`` on, ``B = [H, 1, Y]``, for tiles that cut
    through the bias and target columns, and row blocks that do not divide N."""
    from swimdist.lstsq.tiled import _panel_task, _tiles

    rng = np.random.default_rng(11)
    N, nf, K = 1003, 57, 3
    H, Y = rng.standard_normal((N, nf)), rng.standard_normal((N, K))
    B = np.hstack([H, np.ones((N, 1)), Y])
    G, width = B.T @ B, nf + 1 + K
    tol = 1e-5 if dtype == "float32" else 1e-13
    for tile in (7, 20, width):
        for p0, p1 in _tiles(width, tile):
            P = _panel_task(H, Y, nf, 1, N, 100, (p0, p1), width, dtype)
            assert P.shape == (p1 - p0, width - p0) and P.flags.f_contiguous
            assert np.abs(P - G[p0:p1, p0:]).max() <= tol * np.abs(G).max()
            np.testing.assert_array_equal(P[:, :p1 - p0], P[:, :p1 - p0].T)


def test_dask_input_without_store_streams_row_blocks():
    p = make_lstsq_problem(600, 40, cond=1e3, n_rhs=2, noise=0.1, seed=2)
    ref = solve(p["A"], p["Y"], method="normal-tiled", tile=9)
    r = solve(da.from_array(p["A"], chunks=(128, 40)), p["Y"], method="normal-tiled", tile=9)
    np.testing.assert_allclose(r.solution, ref.solution, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("tile", [9000, 0, "abc", 2.5])
def test_bad_tile(tile):
    with pytest.raises(ValidationError, match="tile must be an integer"):
        solve(np.eye(3), np.ones(3), method="normal-tiled", tile=tile)


@pytest.mark.parametrize("store_format", ["zarr", "npy"])
def test_estimator_streams_tiles_from_the_store(store_format, tmp_path, rng,
                                                local_cluster_factory):
    import dask

    X = rng.random((900, 4))
    y = np.digitize(X[:, 0] + np.sin(4 * X[:, 1]), [0.5, 1.0, 1.5])
    kw = dict(hidden_layer_sizes=(70,), random_state=0, chunk_rows=200, rcond=1e-10)
    ref = SWIMClassifier(solver="direct", **kw).fit(X, y)
    client = local_cluster_factory(n_workers=2)
    with client.as_current(), dask.config.set({"swimdist.store-format": store_format}):
        m = SWIMClassifier(solver="normal-tiled", store=str(tmp_path / "s"),
                           solver_options={"tile": 16}, **kw).fit(X, y)
    assert m.fit_info_["panels"] == 5  # 71 + 1 + 3 columns in 5 tiles
    assert m.solve_result_.relative_residual <= 1.01 * ref.solve_result_.relative_residual
    assert np.mean(m.predict(X) == ref.predict(X)) > 0.99


def test_blocked_cholesky_matches_lapack():
    import scipy.linalg as sla

    from swimdist.lstsq.tiled import blocked_cholesky

    rng = np.random.default_rng(0)
    B = rng.standard_normal((900, 350))
    G = B.T @ B
    R = blocked_cholesky(G.copy(), block=64)
    np.testing.assert_allclose(np.triu(R), sla.cholesky(G), rtol=0, atol=1e-12 * np.abs(G).max())
    G[3, 3] = -1.0
    with pytest.raises(np.linalg.LinAlgError, match="not positive definite"):
        blocked_cholesky(G, block=64)


@pytest.mark.slow
def test_blocked_cholesky_at_16500_columns_does_not_crash():
    # LAPACK's potrf on a 20 001-wide Gram matrix segfaulted in OpenBLAS 0.3.31's threaded
    # SYRK; the blocked version never hands BLAS more than 2 * block columns.
    from swimdist.lstsq.tiled import blocked_cholesky

    n = 16500
    rng = np.random.default_rng(1)
    G = np.eye(n) * n
    G[:, :50] += rng.standard_normal((n, 50))
    G = (G + G.T) / 2
    x = rng.standard_normal(n)
    import scipy.linalg as sla

    R = blocked_cholesky(G.copy())
    np.testing.assert_allclose(sla.cho_solve((R, False), G @ x), x, rtol=1e-8)


@pytest.mark.parametrize("kw, msg", [
    ({"max_iter": -1}, "max_iter must be an integer >= 0"),
    ({"max_iter": 2.5}, "max_iter must be an integer"),
    ({"cg_tol": -1.0}, "cg_tol must be a finite number >= 0"),
    ({"cg_tol": float("nan")}, "cg_tol must be a finite number >= 0"),
    ({"tol": 1e-6}, "Unknown option 'tol' for solver 'normal-tiled'"),
    ({"checkpoint_every": 0}, "checkpoint_every must be an integer >= 1"),
    ({"ridge": -1e-3}, "ridge must be a finite number >= 0"),
    ({"precond_ridge": float("inf")}, "precond_ridge must be a finite number >= 0"),
])
def test_bad_options_are_rejected(kw, msg):
    with pytest.raises(ValidationError, match=msg):
        solve(np.eye(4), np.ones(4), method="normal-tiled", **kw)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_default_stop_reaches_the_direct_residual_on_a_square_system(dtype):
    # well conditioned and consistent: the direct answer has residual ~1e-14; the error
    # estimate keeps CG going until the objective left is at the products' rounding
    rng = np.random.default_rng(7)
    A = rng.standard_normal((35, 35)) + 6 * np.eye(35)
    Y = rng.standard_normal((35, 2))
    ref = solve(A, Y, method="direct")
    r = solve(A, Y, method="normal-tiled", gram_dtype=dtype, tile=10)
    assert r.converged and r.info["stop"] == "accept_tol"
    assert np.linalg.norm(r.residual_norm) <= 1e-10 * np.linalg.norm(Y)
    np.testing.assert_allclose(r.solution, ref.solution, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_stop_certifies_the_ridge_optimum(seed):
    p = make_lstsq_problem(2500, 50, cond=1e4, n_rhs=2, noise=0.1, seed=seed)
    ref = solve(p["A"], p["Y"], method="direct", rcond=1e-12)
    r = solve(p["A"], p["Y"], method="normal-tiled", gram_dtype="float32", tile=16)
    assert r.converged
    # within accept_tol^2 / 2 = 5e-5 of the optimum (plus the tiny ridge's bias)
    assert r.relative_residual <= (1 + 1e-4) * ref.relative_residual


def test_ridge_follows_the_rcond_cutoff():
    # singular values 1 .. 1e-8: rcond 1e-4 must damp those below 1e-4 sigma_max (a ridge
    # of (rcond sigma_max)^2), not those below sqrt(rcond) sigma_rms
    rng = np.random.default_rng(5)
    N, n = 1500, 40
    U, _ = np.linalg.qr(rng.standard_normal((N, n)))
    V, _ = np.linalg.qr(rng.standard_normal((n, n)))
    s = np.logspace(0, -8, n)
    A = (U * s) @ V.T
    Y = rng.standard_normal((N, 1))
    r = solve(A, Y, method="normal-tiled", rcond=1e-4, tile=8)
    assert r.info["ridge"] == pytest.approx((1e-4 * s[0]) ** 2, rel=1e-2)
    # the kept directions (s >= 1e-3) are fitted as gelsd fits them
    keep = s >= 1e-3
    c = V.T @ r.solution
    c_ref = (U.T @ Y) / s[:, None]
    np.testing.assert_allclose(c[keep], c_ref[keep], rtol=1e-2)
    # the damped ones (s <= 1e-5) hardly move
    assert np.all(np.abs(c[s <= 1e-5]) <= 0.1 * np.abs(c_ref[s <= 1e-5]))


@pytest.mark.parametrize("rank", [20, 60])
def test_nystrom_preconditioned_cg_reaches_the_ridge_optimum(rank):
    # never forms the Gram matrix: one sketch pass, then CG with the Nystrom preconditioner
    p = make_lstsq_problem(2000, 60, cond=1e4, n_rhs=2, noise=0.05, seed=4)
    A, Y, alpha = p["A"], p["Y"], 1e-6
    n = A.shape[1]
    ref = np.linalg.solve(A.T @ A + alpha * np.eye(n), A.T @ Y)
    r = solve(A, Y, method="normal-tiled", preconditioner="nystrom", rank=rank, alpha=alpha,
              cg_tol=1e-10, max_iter=300)
    assert r.info["preconditioner"] == "nystrom" and r.info["rank"] == rank
    assert r.info["cg_converged"]

    def objective(x):
        return np.sum((Y - A @ x) ** 2) + alpha * np.sum(x**2)

    assert objective(r.solution) <= (1 + 1e-8) * objective(ref)
    np.testing.assert_allclose(A @ r.solution, A @ ref, atol=1e-6 * np.abs(A @ ref).max())


def test_nystrom_rank_covering_the_spectrum_needs_few_steps():
    p = make_lstsq_problem(1500, 40, cond=1e6, n_rhs=1, seed=5)
    few = solve(p["A"], p["Y"], method="normal-tiled", preconditioner="nystrom", rank=40,
                alpha=1e-8, cg_tol=1e-8, max_iter=200)
    low = solve(p["A"], p["Y"], method="normal-tiled", preconditioner="nystrom", rank=5,
                alpha=1e-8, cg_tol=1e-8, max_iter=200)
    assert few.info["cg_converged"] and few.iterations < low.iterations


def test_fast_pass_kernels_agree_with_dense_products():
    from swimdist.lstsq.tiled import _ne_pass, _residual_pass, _sketch_pass

    rng = np.random.default_rng(6)
    for dtype in (np.float32, np.float64):
        a = rng.standard_normal((333, 57)).astype(dtype)
        b = np.c_[a.astype(np.float64), np.ones(333)]
        P, y = rng.standard_normal((58, 3)), rng.standard_normal((333, 3))
        np.testing.assert_allclose(_ne_pass(a, P, 1).reshape(58, 3), b.T @ (b @ P),
                                   rtol=1e-12, atol=1e-9)
        out = _residual_pass(a, y, P, 1)
        res = y - b @ P
        np.testing.assert_allclose(out[:58 * 3].reshape(58, 3), b.T @ res, rtol=1e-12,
                                   atol=1e-9)
        np.testing.assert_allclose(out[58 * 3:], np.sum(res**2, axis=0), rtol=1e-12)
        om = rng.standard_normal((58, 4))
        sk = _sketch_pass(a, om, 1)
        tol = 1e-4 if dtype == np.float32 else 1e-12  # float32 products for a float32 block
        np.testing.assert_allclose(sk[:-1].reshape(58, 4), b.T @ (b @ om), rtol=tol,
                                   atol=tol * np.abs(b.T @ (b @ om)).max())
        np.testing.assert_allclose(sk[-1], np.sum(b**2), rtol=1e-5)


# ------------------------------------------------------------------ the accuracy stop
@pytest.mark.parametrize("dtype, bias", [(np.float32, 1), (np.float64, 0), (np.float32, 0)])
def test_ne_pass_counts_the_iterates_wrong_decisions(dtype, bias):
    from swimdist.lstsq.tiled import _ne_errors_pass, _ne_pass

    rng = np.random.default_rng(7)
    a = rng.standard_normal((20000, 57)).astype(dtype)  # more rows than one cached piece
    b = np.c_[a.astype(np.float64), np.ones(20000)] if bias else a.astype(np.float64)
    n, K = b.shape[1], 4
    P = rng.standard_normal((n, 2 * K))
    score = b @ P[:, K:]
    Y = np.eye(K)[rng.integers(0, K, 20000)]
    Ypm = np.where(rng.random((20000, K)) < 0.5, -1.0, 1.0)  # multi-label +-1
    for y, rule, want in ((Y, "argmax", np.count_nonzero(score.argmax(1) != Y.argmax(1))),
                          (Ypm, 0.0, np.count_nonzero((score > 0) != (Ypm > 0)))):
        out = _ne_errors_pass(a, y, P, bias, rule)
        assert out[-1] == want
        np.testing.assert_allclose(out[:-1].reshape(n, K), b.T @ (b @ P[:, :K]), rtol=1e-10,
                                   atol=1e-8)
    np.testing.assert_allclose(_ne_pass(a, P[:, :K], bias).reshape(n, K),
                               b.T @ (b @ P[:, :K]), rtol=1e-10, atol=1e-8)


@pytest.mark.parametrize("Y, rule", [
    (np.eye(3)[[0, 1, 2, 1]], ("argmax", 4)),  # one-hot
    (2 * np.eye(3)[[0, 1, 2, 1]] - 1, ("argmax", 4)),  # +-1, one +1 per row
    (np.array([[1, 1], [0, 1], [0, 0]]), (0.5, 6)),  # multi-label
    (np.array([[1.0], [-1.0], [1.0]]), (0.0, 3)),  # one +-1 column
    (np.array([[0.5], [1.0]]), None),  # regression
])
def test_decision_rule(Y, rule):
    from swimdist.lstsq._common import decision_rule

    assert decision_rule(Y) == rule


def _classes(seed, N=4000, n=400, K=6):
    """Tanh features of low-dimensional inputs (numerically rank-deficient, as SWIM's
    are), labels from a noisy linear score of them, and a held-out part."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N + 2000, 8))
    A = np.tanh(X @ rng.standard_normal((8, n)) + rng.standard_normal(n))
    s = A @ rng.standard_normal((n, K))
    lab = (s + 0.3 * s.std() * rng.standard_normal(s.shape)).argmax(1)
    return A[:N], np.eye(K)[lab[:N]], A[N:], lab[N:]


@pytest.mark.parametrize("seed", range(4))
def test_accuracy_stop_ends_at_the_converged_error(seed):
    """On a family of ill-conditioned classification problems with a loose float32
    preconditioner (the objective stop takes 18-31 steps), the accuracy stop ends sooner,
    at the training and held-out error of the converged ridge solution to 0.5 points
    (ten of the 2000 held-out rows)."""
    import warnings

    from swimdist.exceptions import ConvergenceWarning

    A, Y, At, lab = _classes(seed)
    opts = dict(gram_dtype="float32", precond_ridge=1.0, max_iter=60)  # CG takes steps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ref = solve(A, Y, method="normal-tiled", max_iter=400, gram_dtype="float32",
                    accept_tol=1e-4)
        obj = solve(A, Y, method="normal-tiled", **opts)
        acc = solve(A, Y, method="normal-tiled", stop="accuracy", **opts)
        first = solve(A, Y, method="normal-tiled", gram_dtype="float32", precond_ridge=1.0,
                      max_iter=0)
    assert acc.converged and acc.info["stop"] == "accuracy"
    assert acc.iterations < obj.iterations
    errs = acc.info["train_errors"]  # of x_0 .. x_{k-1}, counted inside the passes
    ytr = Y.argmax(1)
    assert len(errs) == acc.iterations
    assert errs[0] == pytest.approx(np.mean((A @ first.solution).argmax(1) != ytr))
    for M, lab_ in ((A, ytr), (At, lab)):
        e = [np.mean((M @ r.solution).argmax(1) != lab_) for r in (acc, ref)]
        assert abs(e[0] - e[1]) <= 0.005, e


def test_accuracy_stop_needs_class_indicators():
    p = make_lstsq_problem(300, 10, n_rhs=2, seed=0)
    with pytest.raises(ValidationError, match="class-indicator"):
        solve(p["A"], p["Y"], method="normal-tiled", stop="accuracy")
    with pytest.raises(ValidationError, match="stop must be"):
        solve(p["A"], p["Y"], method="normal-tiled", stop="soon")


def test_classifier_with_the_accuracy_stop_streams_from_a_store(tmp_path, rng,
                                                                local_cluster_factory):
    """Through the estimator on a 2-worker cluster, from the feature store: the store
    passes count the training errors too, and the fit classifies held-out rows as the
    objective stop's does."""
    local_cluster_factory(n_workers=2)
    X = rng.standard_normal((3000, 6))
    y = (np.sin(2 * X[:, 0]) + X[:, 1] * X[:, 2] > 0).astype(int) + (X[:, 3] > 1)
    fits = {}
    for stop in ("accuracy", "objective"):
        est = SWIMClassifier(hidden_layer_sizes=(200,), solver="normal-tiled",
                             solver_options={"stop": stop, "tile": 64,
                                             "gram_dtype": "float32"},
                             random_state=0, store=str(tmp_path / stop), chunk_rows=500)
        fits[stop] = est.fit(X[:2500], y[:2500])
    errs = fits["accuracy"].fit_info_["train_errors"]  # counted in the store passes
    assert errs and errs[-1] == pytest.approx(
        np.mean(fits["accuracy"].predict(X[:2500]) != y[:2500]), abs=0.01)
    assert "train_errors" not in fits["objective"].fit_info_
    agree = np.mean(fits["accuracy"].predict(X[2500:]) == fits["objective"].predict(X[2500:]))
    assert agree >= 0.99
