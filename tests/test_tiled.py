"""normal-tiled: column-tiled Gram from the feature store, Cholesky, refinement passes."""

import dask.array as da
import numpy as np
import pytest

from swimdist import SWIMClassifier, solve
from swimdist.exceptions import ValidationError
from swimdist.testing import make_lstsq_problem

CASES = [
    # (tile, gram dtype, refinement passes): tiles smaller than, equal to, larger than n
    (7, "float64", 0),  # many tiles, no refinement: plain normal equations
    (50, "float64", 2),
    (500, "float32", 2),  # float32 tile products, refined back to float64 accuracy
]


@pytest.mark.parametrize("tile, dtype, refine", CASES)
def test_matches_direct_on_known_spectrum(tile, dtype, refine):
    p = make_lstsq_problem(2000, 60, cond=1e4, n_rhs=3, noise=0.1, seed=0)
    ref = solve(p["A"], p["Y"], rcond=1e-12)
    r = solve(p["A"], p["Y"], method="normal-tiled", rcond=1e-12, tile=tile, gram_dtype=dtype,
              refine=refine)
    if dtype == "float32":
        # float32 tiles need a ridge of 1e-4 trace/n: directions below it stay damped
        assert r.relative_residual <= 1.001 * ref.relative_residual
        return
    assert r.relative_residual <= 1.00001 * ref.relative_residual
    # cond 1e4 with a residual: the normal equations' error is about cond^2 eps |r|/|A x|
    # ~ 1e-8 x 0.1 relative, amplified by cond along the smallest directions: <= 1e-4
    np.testing.assert_allclose(r.solution, p["x"], rtol=0, atol=1e-4)


def test_float32_tiles_without_refinement_are_less_accurate():
    p = make_lstsq_problem(2000, 60, cond=1e4, n_rhs=1, seed=1)
    r0 = solve(p["A"], p["Y"], method="normal-tiled", gram_dtype="float32", refine=0)
    r2 = solve(p["A"], p["Y"], method="normal-tiled", gram_dtype="float32", refine=3)
    assert r2.relative_residual < r0.relative_residual / 2


def test_dask_input_without_store_streams_row_blocks():
    p = make_lstsq_problem(600, 40, cond=1e3, n_rhs=2, noise=0.1, seed=2)
    ref = solve(p["A"], p["Y"], method="normal-tiled", tile=9)
    r = solve(da.from_array(p["A"], chunks=(128, 40)), p["Y"], method="normal-tiled", tile=9)
    np.testing.assert_allclose(r.solution, ref.solution, rtol=1e-9, atol=1e-12)


def test_bad_tile():
    with pytest.raises(ValidationError, match="tile must be between"):
        solve(np.eye(3), np.ones(3), method="normal-tiled", tile=9000)


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
    assert m.fit_info_["tile_pairs"] == 15  # 71 + 1 + 3 columns in 5 tiles
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
