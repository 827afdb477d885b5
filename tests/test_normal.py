"""solver="normal": one-pass Gram matrix, eigen cutoff / Cholesky, verification; tiling."""

from __future__ import annotations

import subprocess
import sys

import dask.array as da
import numpy as np
import pytest

from swimdist.exceptions import ValidationError
from swimdist.lstsq import SOLVERS, solve
from swimdist.lstsq.normal import gram, symmetrize, trusted_rcond
from swimdist.testing import assert_lstsq_close, make_lstsq_problem


def swim_features(X, y, width, seed=0, dtype="float64"):
    """A = [tanh(X W + b), 1] with SWIM-sampled (W, b), as numpy."""
    from swimdist.features import design_matrix
    from swimdist.sampling import sample_layers

    layers = sample_layers(X, y.reshape(len(y), -1), [width], seed=seed)
    return layers, design_matrix(X, layers, dtype=dtype).compute()


def test_registered():
    assert "normal" in SOLVERS


@pytest.mark.parametrize(
    "kw",
    [
        dict(cond=1e4, noise=0.1),  # well within the Gram matrix's resolution
        dict(cond=1e5, spectrum="linear", noise=0.3),  # residual mostly outside range(A)
        # exact zeros (rank 30 of 40): the Gram matrix puts them at ~sqrt(eps) sigma_max, so
        # only an rcond above that (trusted_rcond) removes them; verify=True handles 1e-10
        dict(cond=1e3, rank=30, noise=0.1, rcond=1e-6),
    ],
)
@pytest.mark.parametrize("chunked", [False, True], ids=["numpy", "dask"])
def test_matches_direct_when_well_conditioned(kw, chunked, global_random_seed):
    kw = dict(kw)
    rcond = kw.pop("rcond", 1e-10)
    p = make_lstsq_problem(300, 40, n_rhs=3, seed=global_random_seed, **kw)
    A = da.from_array(p["A"], chunks=(70, 40)) if chunked else p["A"]
    ref = solve(p["A"], p["Y"], method="direct", rcond=rcond)
    res = solve(A, p["Y"], method="normal", rcond=rcond)
    assert res.rank == ref.rank
    assert_lstsq_close(res, ref, rtol=1.0 + 1e-6)
    # cond^2 eps bounds the solution error of the normal equations
    scale = np.linalg.norm(ref.solution)
    assert np.linalg.norm(res.solution - ref.solution) <= 1e-5 * scale


def test_residual_from_gram_is_the_true_residual():
    p = make_lstsq_problem(500, 30, cond=100, n_rhs=2, noise=0.5, seed=3)
    res = SOLVERS["normal"](p["A"], p["Y"], rcond=1e-10, alpha=0.0)
    assert res.residual_norm is not None  # no cancellation: taken from the Gram matrix
    true = np.linalg.norm(p["A"] @ res.solution - p["Y"], axis=0)
    np.testing.assert_allclose(res.residual_norm, true, rtol=1e-8)


def test_consistent_system_leaves_residual_to_solve():
    # ||Y - AX|| ~ 0: the Gram formula cancels, so the solver leaves it to solve()'s pass
    p = make_lstsq_problem(200, 20, cond=10, seed=1)
    res = SOLVERS["normal"](p["A"], p["Y"], rcond=1e-10, alpha=0.0)
    assert res.residual_norm is None
    assert solve(p["A"], p["Y"], method="normal").relative_residual < 1e-12


@pytest.mark.parametrize("alpha", [1e-6, 1e-2])
def test_cholesky_ridge_matches_direct_ridge(alpha):
    p = make_lstsq_problem(300, 30, cond=1e3, n_rhs=2, noise=0.2, seed=0)
    ref = solve(p["A"], p["Y"], method="direct", alpha=alpha)
    res = solve(p["A"], p["Y"], method="normal", alpha=alpha)
    assert res.info["factor"] == "cholesky"
    np.testing.assert_allclose(res.solution, ref.solution, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(res.residual_norm, ref.residual_norm, rtol=1e-9)


def test_eigh_with_alpha_matches_direct_ridge():
    p = make_lstsq_problem(300, 30, cond=1e3, n_rhs=1, noise=0.2, seed=2)
    ref = solve(p["A"], p["Y"], method="direct", alpha=1e-4, rcond=1e-12)
    res = solve(p["A"], p["Y"], method="normal", alpha=1e-4, rcond=1e-12, factor="eigh")
    np.testing.assert_allclose(res.solution, ref.solution, rtol=1e-7, atol=1e-9)


def test_squares_the_condition_number_and_verify_repairs_it():
    # cond 1e10 with rcond 1e-12: sigma below ~1e-6 sigma_max drown in the Gram's rounding
    p = make_lstsq_problem(600, 60, cond=1e10, n_rhs=1, noise=1e-8, seed=4)
    ref = solve(p["A"], p["Y"], method="direct", rcond=1e-12)
    plain = solve(p["A"], p["Y"], method="normal", rcond=1e-12)
    # the directions the Gram matrix drops (rank 55 of 60) leave a residual several times
    # gelsd's; how many times depends on the BLAS's rounding (9.8x to over 10x seen)
    assert plain.rank < ref.rank
    assert plain.relative_residual > 5 * ref.relative_residual
    ver = solve(p["A"], p["Y"], method="normal", rcond=1e-12, verify=True)
    assert ver.converged
    assert ver.info["unresolved_dim"] > 0
    assert_lstsq_close(ver, ref, rtol=1.5)
    assert ver.rank == ref.rank


def test_verify_on_swim_sine_features(sine_data):
    X, y, Xt, yt = sine_data
    layers, A = swim_features(X, y, 40)
    from swimdist.features import design_matrix

    At = design_matrix(Xt, layers).compute()
    ref = solve(A, y, method="direct")
    ver = solve(da.from_array(A, chunks=(150, 41)), y, method="normal", verify=True)
    assert ver.converged
    assert_lstsq_close(ver, ref, rtol=1.5)
    mae = np.abs(At @ ver.solution - yt).mean()
    mae_ref = np.abs(At @ ref.solution - yt).mean()
    assert mae <= 2 * mae_ref
    # the verification pass measured the residual it reports
    true = np.linalg.norm(A @ ver.solution - y)
    assert ver.residual_norm[0] == pytest.approx(true, rel=1e-6)


@pytest.fixture(scope="module")
def smooth_sine():
    """A smooth regression with most unresolved directions below rcond (SWIM tanh, 601
    columns): the Gram matrix leaves 467 unresolved, of which Z keeps about 116."""
    from swimdist.datasets import sine

    X, y = sine(3000, alpha=1.0, seed=0)
    Xt, yt = sine(1000, alpha=1.0, seed=1)
    layers, A = swim_features(X, y, 600)
    from swimdist.features import design_matrix

    return A, y, design_matrix(Xt, layers).compute(), yt


@pytest.mark.parametrize("chunked", [False, True])
def test_sketch_narrows_the_unresolved_subspace(smooth_sine, chunked, monkeypatch):
    A, y, At, yt = smooth_sine
    ref = solve(A, y, method="direct", rcond=1e-10)
    Ain = da.from_array(A, chunks=(700, A.shape[1])) if chunked else A
    res = solve(Ain, y, method="normal", verify=True, rcond=1e-10)
    assert res.converged
    k, sketched = res.info["unresolved_dim"], res.info["unresolved_sketched"]
    assert sketched is not None and res.info["unresolved_kept"] <= sketched < k / 1.5
    # the certificate's bound on the directions left out is far inside accept_tol^2
    assert res.info["unresolved_rest"] < 1e-5
    assert_lstsq_close(res, ref, rtol=1.01)
    # the same model as forming all of Z
    monkeypatch.setattr("swimdist.lstsq.normal._narrow_unresolved", lambda *a, **k: None)
    full = solve(Ain, y, method="normal", verify=True, rcond=1e-10)
    assert full.converged and "unresolved_sketched" not in full.info
    assert res.relative_residual == pytest.approx(full.relative_residual, rel=1e-4)
    mae, mae_full = (np.abs(At @ r.solution - yt).mean() for r in (res, full))
    assert mae == pytest.approx(mae_full, rel=0.05)


def test_float32_storage_is_not_narrowed_below_its_resolution(smooth_sine):
    # float32 rounding puts every unresolved direction of Z above a 1e-10 cutoff: no sketch,
    # the full Z, and gelsd's residual on the same float32 matrix
    A, y, _, _ = smooth_sine
    A32 = A.astype(np.float32)
    ref = solve(A32.astype(np.float64), y, method="direct", rcond=1e-10)
    res = solve(A32, y, method="normal", verify=True, rcond=1e-10)
    assert res.info["unresolved_dim"] > 0 and "unresolved_sketched" not in res.info
    assert res.converged
    assert_lstsq_close(res, ref, rtol=1.01)


def test_a_narrowing_that_misses_falls_back_to_all_of_z(smooth_sine, monkeypatch):
    # a subspace far too small: the bound on what it leaves out fails, so Z is formed whole
    A, y, _, _ = smooth_sine
    ref = solve(A, y, method="direct", rcond=1e-10)
    monkeypatch.setattr("swimdist.lstsq.normal._narrow_unresolved",
                        lambda A, V0, lam1, **kw: np.eye(V0.shape[1], 8))
    res = solve(A, y, method="normal", verify=True, rcond=1e-10)
    assert res.info["unresolved_sketched"] is None
    assert res.info["unresolved_rest"] > 1e-4
    assert res.converged
    assert_lstsq_close(res, ref, rtol=1.01)


def test_verify_gives_up_on_large_unresolved_subspace():
    p = make_lstsq_problem(600, 60, cond=1e12, seed=0)
    res = solve(p["A"], p["Y"], method="normal", verify=True, max_unresolved=0.1)
    assert not res.converged
    assert "unresolved" in res.info["reason"]


def test_float32_storage_accumulates_in_float64():
    p = make_lstsq_problem(400, 30, cond=1e3, n_rhs=2, noise=0.1, seed=5)
    A32 = p["A"].astype(np.float32)
    res = solve(da.from_array(A32, chunks=(100, 30)), p["Y"], method="normal")
    ref = solve(A32.astype(np.float64), p["Y"], method="normal")
    np.testing.assert_allclose(res.solution, ref.solution, rtol=1e-7, atol=1e-10)


def test_exact_zero_singular_values_need_verify():
    p = make_lstsq_problem(300, 40, cond=1e3, rank=30, noise=0.1, n_rhs=2, seed=1)
    ref = solve(p["A"], p["Y"], method="direct")
    res = solve(p["A"], p["Y"], method="normal", verify=True)
    assert res.converged and res.rank == ref.rank == 30
    np.testing.assert_allclose(res.solution, ref.solution, rtol=1e-6, atol=1e-8)


def test_duplicate_columns_get_the_min_norm_split():
    # duplicated neurons: exactly repeated columns; the min-norm solution splits the weight
    rng = np.random.default_rng(0)
    B = np.tanh(rng.standard_normal((500, 20)))
    A = np.concatenate([B, B[:, :5]], axis=1)
    Y = rng.standard_normal((500, 2))
    ref = solve(A, Y, method="direct")
    res = solve(A, Y, method="normal", verify=True)
    assert res.converged and res.rank == ref.rank == 20
    np.testing.assert_allclose(res.solution, ref.solution, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("tile", [1, 7, 40, 100])
def test_gram_tiles_agree(tile):
    rng = np.random.default_rng(1)
    A = rng.standard_normal((90, 40))
    Y = rng.standard_normal((90, 3))
    G, b, yty = gram(da.from_array(A, chunks=(25, 40)), Y, tile=tile)
    G = symmetrize(G.copy(), tile=max(tile, 3))
    np.testing.assert_allclose(G, A.T @ A, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(b, A.T @ Y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(yty, (Y * Y).sum(axis=0), rtol=1e-12)


def test_trusted_rcond_grows_with_n():
    assert 1e-8 < trusted_rcond(100) < trusted_rcond(10_000) < 1e-5


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(factor="qr"), "Unknown factor 'qr'"),
        (dict(verify=True, alpha=1e-3), "verify=True needs alpha == 0"),
        (dict(tile=0), "tile must be a positive"),
    ],
)
def test_errors(kw, match):
    p = make_lstsq_problem(50, 5, seed=0)
    with pytest.raises(ValidationError, match=match):
        solve(p["A"], p["Y"], method="normal", **kw)


def test_cholesky_not_positive_definite():
    A = np.ones((20, 3))  # rank 1: A^T A + 0 I is singular
    with pytest.raises(ValidationError, match="not positive definite"):
        solve(A, np.ones(20), method="normal", factor="cholesky")


_SYRK_CHILD = """
import numpy as np
from swimdist.lstsq.normal import gram
rng = np.random.default_rng(0)
n = 16000
A = rng.standard_normal((64, n))
Y = rng.standard_normal((64, 1))
G, b, yty = gram(A, Y)  # tiled: no product wider than 8000 columns
for p, q in [(0, 0), (0, 8000), (8000, 8000), (15000, 15900)]:
    blk = G[p:p + 100, q:q + 100]
    want = np.dot(np.ascontiguousarray(A[:, p:p + 100].T), A[:, q:q + 100])
    assert np.allclose(blk, want, rtol=1e-12, atol=1e-10), (p, q)
assert np.allclose(b[:, 0], A.T @ Y[:, 0])
print("ok")
"""


@pytest.mark.slow
def test_gram_at_16000_columns_does_not_crash():
    # numpy's B.T @ B SYRK path segfaults in OpenBLAS 0.3.31 at n >= 16000; the tiled Gram
    # must not. Run in a child process so a crash fails this test instead of the session.
    out = subprocess.run(
        [sys.executable, "-c", _SYRK_CHILD], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr[-2000:]}"
    assert out.stdout.strip().endswith("ok")


@pytest.mark.parametrize("method", ["normal", "sketch-direct"])
def test_nonfinite_dask_input_is_refused(method):
    A = np.where(np.eye(60, 4) > 0, np.nan, 1.0)
    with pytest.raises(ValidationError, match="NaN or infinity"):
        solve(da.from_array(A, chunks=(20, 4)), np.ones(60), method=method)
