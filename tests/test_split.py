"""Split-and-solve (block Gauss-Seidel over ordered column blocks) against the direct solver."""

from __future__ import annotations

import functools

import dask.array as da
import numpy as np
import pytest

from swimdist import SWIMRegressor, load_model, solve
from swimdist.design import DesignMatrix
from swimdist.exceptions import ValidationError
from swimdist.features import hidden_features
from swimdist.lstsq import SOLVERS
from swimdist.lstsq.split import SPLIT_ORDERS, neuron_order
from swimdist.sampling import sample_layers
from swimdist.testing import make_lstsq_problem

EPS = np.finfo(np.float64).eps


def _problem(seed=0, n_rows=240, n_cols=36, cond=1e4, n_rhs=2, noise=0.1):
    return make_lstsq_problem(n_rows, n_cols, cond=cond, n_rhs=n_rhs, noise=noise, seed=seed)


def _as(kind, A, rows=64):
    return A if kind == "numpy" else da.from_array(A, chunks=(rows, A.shape[1]))


def _blockwise_orthogonal(rng, n_rows, sizes, n_rhs=2):
    """A whose column blocks (of ``sizes``) are mutually orthogonal, each block ill-scaled."""
    Q, _ = np.linalg.qr(rng.standard_normal((n_rows, sum(sizes))))
    blocks, start = [], 0
    for size in sizes:
        S = rng.standard_normal((size, size)) @ np.diag(np.logspace(0, -3, size))
        blocks.append(Q[:, start:start + size] @ S)
        start += size
    return np.hstack(blocks), rng.standard_normal((n_rows, n_rhs))


# ---------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("kind", ["numpy", "dask"])
def test_one_block_equals_direct(kind, global_random_seed):
    p = _problem(global_random_seed)
    A = _as(kind, p["A"])
    ref = solve(p["A"], p["Y"], method="direct", rcond=1e-10)
    # "ordered": the very same matrix goes to gelsd, so the same solution to rounding.
    one = solve(A, p["Y"], method="split", n_splits=1, split_order="ordered")
    np.testing.assert_allclose(one.solution, ref.solution, rtol=1e-10, atol=1e-12)
    assert one.relative_residual == pytest.approx(ref.relative_residual, rel=1e-10)
    # Another order permutes the columns: the same solution up to cond(A) * eps.
    perm = solve(A, p["Y"], method="split", n_splits=1, split_order="norm")
    scale = np.abs(ref.solution).max()
    np.testing.assert_allclose(perm.solution, ref.solution, atol=1e4 * 1e4 * EPS * scale)
    assert perm.info["blocks"] == [p["A"].shape[1]]


def test_one_block_with_intercept_equals_direct():
    rng = np.random.default_rng(3)
    H = np.tanh(rng.standard_normal((200, 20)) @ rng.standard_normal((20, 30)))
    A = np.c_[H, np.ones(200)]
    Y = rng.standard_normal((200, 1))
    ref = solve(A, Y, method="direct")
    one = solve(DesignMatrix(A, bias=True), Y, method="split", n_splits=1,
                split_order="ordered")
    np.testing.assert_allclose(one.solution, ref.solution, rtol=1e-9, atol=1e-11)
    assert one.info["bias"] == "every block"


@pytest.mark.parametrize("kind", ["numpy", "dask"])
@pytest.mark.parametrize("sizes", [(10, 10, 10), (11, 10, 10), (2, 1)])  # as array_split makes
def test_orthogonal_blocks_one_sweep_is_exact(kind, sizes, global_random_seed):
    rng = np.random.default_rng(global_random_seed)
    A, Y = _blockwise_orthogonal(rng, 150, sizes)
    assert [len(g) for g in np.array_split(np.arange(sum(sizes)), len(sizes))] == list(sizes)
    # Shuffle the columns and hand the solver the order that regroups them into the blocks:
    # also checks that the solution comes back in A's column order.
    shuffle = rng.permutation(A.shape[1])
    As = A[:, shuffle]
    order = np.argsort(shuffle)
    ref = solve(As, Y, method="direct")
    res = solve(_as(kind, As), Y, method="split", n_splits=len(sizes), split_order=order)
    assert res.iterations == 1
    # Blocks have cond <= ~1e3 (their scaling); the solutions agree to cond^2 * eps.
    x_scale = np.abs(ref.solution).max()
    np.testing.assert_allclose(res.solution, ref.solution, atol=1e3 * 1e3 * EPS * x_scale)
    assert res.relative_residual == pytest.approx(ref.relative_residual, rel=1e-10)


def test_non_orthogonal_blocks_one_sweep_is_not_exact():
    # The counterpart of the test above: correlated blocks need more than one sweep.
    p = _problem(1, cond=1e3, noise=0.2)
    ref = solve(p["A"], p["Y"], method="direct")
    one = solve(p["A"], p["Y"], method="split", n_splits=4, split_order="ordered")
    assert one.relative_residual > ref.relative_residual * (1 + 1e-3)


# ---------------------------------------------------------------------------- sweeps
@pytest.mark.parametrize("order", SPLIT_ORDERS)
def test_more_sweeps_never_increase_the_residual(order, global_random_seed):
    p = _problem(global_random_seed, cond=1e3, noise=0.2)
    ref = solve(p["A"], p["Y"], method="direct")
    finals = []
    for sweeps in (1, 2, 4, 8, 30):
        res = solve(p["A"], p["Y"], method="split", n_splits=4, split_order=order,
                    split_sweeps=sweeps, sweep_tol=0.0, seed=global_random_seed)
        h = np.asarray(res.residual_history)
        assert len(h) == 4 * res.iterations
        # Block by block, within and across sweeps (rounding slack only).
        assert np.all(np.diff(h) <= 1e-12 * h[:-1])
        finals.append(res.relative_residual)
        assert res.relative_residual >= ref.relative_residual * (1 - 1e-10)
    assert np.all(np.diff(finals) <= 1e-12 * np.asarray(finals[:-1]))


def test_sweeps_converge_to_the_least_squares_residual():
    # Block Gauss-Seidel converges at a rate set by the angles between the blocks' ranges:
    # quickly for a well-conditioned A (slowly for the ill-conditioned one above).
    p = _problem(0, cond=10.0, noise=0.2)
    ref = solve(p["A"], p["Y"], method="direct")
    res = solve(p["A"], p["Y"], method="split", n_splits=4, split_sweeps=30, sweep_tol=0.0)
    assert res.relative_residual <= ref.relative_residual * (1 + 1e-3)
    one = solve(p["A"], p["Y"], method="split", n_splits=4)
    assert one.relative_residual > res.relative_residual


def test_sweeps_stop_when_the_residual_stops_improving():
    rng = np.random.default_rng(0)
    A, Y = _blockwise_orthogonal(rng, 120, (8, 8, 8))
    res = solve(A, Y, method="split", n_splits=3, split_order="ordered", split_sweeps=10)
    # Orthogonal blocks: sweep 2 cannot improve on sweep 1, so it stops there.
    assert res.iterations == 2
    assert res.info["stop_reason"] in ("converged", "no_improvement")
    assert res.converged
    assert len(res.info["block_residuals"]) == 2


# ---------------------------------------------------------------------------- orders
def test_orders_are_permutations_and_sort_by_norm():
    norms = np.array([3.0, 1.0, 2.0, 1.0, 0.5])
    np.testing.assert_array_equal(neuron_order(5, "norm", norms=norms), [4, 1, 3, 2, 0])
    np.testing.assert_array_equal(neuron_order(5, "norm-desc", norms=norms), [0, 2, 1, 3, 4])
    np.testing.assert_array_equal(neuron_order(5, "ordered"), np.arange(5))
    r = neuron_order(5, "random", seed=7)
    np.testing.assert_array_equal(np.sort(r), np.arange(5))
    np.testing.assert_array_equal(r, neuron_order(5, "random", seed=7))


def test_norm_order_without_norms_uses_column_norms():
    p = _problem(0)
    res = solve(p["A"], p["Y"], method="split", n_splits=3, split_order="norm")
    np.testing.assert_array_equal(
        res.info["neuron_order"], np.argsort(np.linalg.norm(p["A"], axis=0), kind="stable"))


def test_lazy_and_numpy_paths_agree():
    p = _problem(2)
    kw = {"n_splits": 3, "split_order": "random", "split_sweeps": 3, "seed": 5}
    a = solve(p["A"], p["Y"], method="split", **kw)
    b = solve(_as("dask", p["A"], rows=50), p["Y"], method="split", **kw)
    np.testing.assert_allclose(b.solution, a.solution, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(b.residual_history, a.residual_history, rtol=1e-9)


@pytest.mark.skipif("lsrn" not in SOLVERS, reason="lsrn solver not registered")
def test_lsrn_as_sub_solver_matches_direct_sub_solver():
    p = _problem(0, n_rows=400, n_cols=40, cond=1e3)
    kw = {"n_splits": 2, "split_order": "ordered"}
    ref = solve(p["A"], p["Y"], method="split", sub_solver="direct", **kw)
    res = solve(_as("dask", p["A"], rows=100), p["Y"], method="split", sub_solver="lsrn",
                sub_options={"gamma": 3.0}, **kw)  # an option for the sub-solver
    assert res.info["sub_solver"] == "lsrn"
    assert res.relative_residual <= ref.relative_residual * (1 + 1e-6)


# ---------------------------------------------------------------------------- block features
def _sine_features(n=300, width=24, seed=0, rows=64):
    rng = np.random.default_rng(seed)
    X = rng.uniform(0, 1, (n, 2))
    Y = np.sin(2 * X.sum(axis=1))[:, None]
    layers = sample_layers(X, Y, [width], seed=seed)
    Xd = da.from_array(X, chunks=(rows, 2))
    return Xd, Y, layers


def test_block_features_builds_one_block_at_a_time():
    Xd, Y, layers = _sine_features()
    width = layers[-1].width
    A = hidden_features(Xd, layers, add_bias=True)  # lazy: only its shape and chunks are used
    seen = []

    def block_features(cols):
        seen.append(np.array(cols))
        return hidden_features(Xd, layers, columns=cols)

    norms = np.linalg.norm(layers[-1].weights, axis=0)
    lazy = DesignMatrix(A, bias=True, column_norms=norms, block_builder=block_features)
    res = solve(lazy, Y, method="split", n_splits=4, split_sweeps=2, sweep_tol=0.0)
    assert [len(c) for c in seen] == [6] * 8  # 4 blocks x 2 sweeps, never the full width
    np.testing.assert_array_equal(np.concatenate(seen[:4]), res.info["neuron_order"])
    # The same answer as slicing the materialized matrix.
    Am = A.compute()
    ref = solve(DesignMatrix(Am, bias=True, column_norms=norms), Y, method="split",
                n_splits=4, split_sweeps=2, sweep_tol=0.0)
    np.testing.assert_allclose(res.solution, ref.solution, rtol=1e-9, atol=1e-12)
    assert res.solution.shape == (width + 1, 1)


# ---------------------------------------------------------------------------- estimator
def test_regressor_split_on_sine(sine_data, tmp_path):
    X, y, Xt, yt = sine_data
    common = {"hidden_layer_sizes": (80,), "random_state": 0}
    full = SWIMRegressor(solver="direct", **common).fit(X, y)
    one = SWIMRegressor(solver="split", solver_options={"n_splits": 1}, **common).fit(X, y)
    # One block is the full solve (columns permuted: agreement to cond(A) * eps).
    np.testing.assert_allclose(one.predict(Xt), full.predict(Xt), atol=1e-6)
    opts = {"n_splits": 4, "split_sweeps": 3}
    est = SWIMRegressor(solver="split", solver_options=opts, **common).fit(X, y)
    # The estimator's pipeline gives what solve() gives on the materialized design matrix.
    layer = est.layers_[0]
    A = np.c_[layer.apply(X), np.ones(len(X))]
    ref = solve(DesignMatrix(A, bias=True, column_norms=np.linalg.norm(layer.weights, axis=0)),
                y, method="split", seed=0, **opts)
    np.testing.assert_allclose(est.coef_[:, 0], ref.solution[:-1], rtol=1e-8, atol=1e-10)
    assert est.fit_info_["relative_residual"] == pytest.approx(ref.relative_residual, rel=1e-8)
    assert np.abs(est.predict(Xt) - yt).mean() < 1e-2
    order = est.neuron_order_
    norms = np.linalg.norm(est.layers_[0].weights, axis=0)
    assert np.all(np.diff(norms[order]) >= 0)  # ascending weight norms
    assert est.fit_info_["split_order"] == "norm" and est.fit_info_["n_splits"] == 4
    # The coefficients line up with the layer's columns: prediction = features @ coef.
    H = est.layers_[0].apply(Xt)
    np.testing.assert_allclose(est.predict(Xt), H @ est.coef_[:, 0] + est.intercept_[0],
                               rtol=1e-12, atol=1e-12)
    path = est.save(str(tmp_path / "m.npz"))
    back = load_model(path)
    np.testing.assert_array_equal(back.neuron_order_, order)
    np.testing.assert_array_equal(back.fit_info_["neuron_order"], order)
    np.testing.assert_allclose(back.predict(Xt), est.predict(Xt), rtol=0, atol=0)
    # Refitting with another solver drops the order.
    est.set_params(solver="direct", solver_options=None).fit(X, y)
    assert not hasattr(est, "neuron_order_")


@pytest.mark.slow  # starts two LocalClusters of worker processes (~8 s)
def test_same_model_from_one_and_two_worker_processes(sine_data):
    from distributed import Client, LocalCluster

    X, y, Xt, _ = sine_data
    preds, orders = [], []
    for n_workers in (1, 2):
        with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                          dashboard_address=None, host="127.0.0.1", memory_limit="1GB") as c, \
                Client(c):
            est = SWIMRegressor(hidden_layer_sizes=(60,), random_state=3, chunk_rows=128,
                                solver="split",
                                solver_options={"n_splits": 3, "split_sweeps": 2}).fit(X, y)
            preds.append(est.predict(Xt))
            orders.append(est.neuron_order_)
    np.testing.assert_array_equal(orders[0], orders[1])
    np.testing.assert_allclose(preds[0], preds[1], rtol=1e-12, atol=1e-13)


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kw, match", [
    ({"split_order": "sorted"}, "Unknown split_order 'sorted'"),            # bad name
    ({"split_order": np.array([0, 0, 1])}, "permutation of the 36"),        # bad array
    ({"n_splits": 0}, "n_splits must be a positive integer"),
    ({"n_splits": 37}, "n_splits=37 exceeds the 36 neuron columns"),
    ({"split_sweeps": 0}, "split_sweeps must be a positive integer"),
    ({"sweep_tol": -1.0}, "sweep_tol must be"),
    ({"sub_solver": "split"}, "sub_solver cannot be 'split'"),
    ({"sub_solver": "nope"}, "Unknown solver 'nope'"),
    ({"sub_options": {"tolx": 1}}, "Unknown option 'tolx' for solver 'direct'"),
    ({"sub_options": [1]}, "sub_options must be a dict"),
    ({"column_norms": np.ones(3)}, "Unknown option 'column_norms' for solver 'split'"),
])
def test_invalid_options(kw, match):
    p = _problem(0)
    with pytest.raises(ValidationError, match=match):
        solve(p["A"], p["Y"], method="split", **kw)


def test_column_norms_of_the_wrong_shape():
    p = _problem(0)
    with pytest.raises(ValidationError, match=r"needs column_norms of shape \(36,\)"):
        solve(DesignMatrix(p["A"], column_norms=np.ones(3)), p["Y"], method="split")


def test_block_features_needs_norms_and_lazy_a():
    Xd, Y, layers = _sine_features()
    A = hidden_features(Xd, layers, add_bias=True)

    def bf(cols):
        return hidden_features(Xd, layers, columns=cols)

    with pytest.raises(ValidationError, match="needs the design matrix's column_norms"):
        solve(DesignMatrix(A, bias=True, block_builder=bf), Y, method="split")
    with pytest.raises(ValidationError, match="a block builder needs A as a"):
        solve(DesignMatrix(A.compute(), bias=True, block_builder=bf), Y, method="split",
              split_order="ordered")


@pytest.mark.parametrize("sweeps", [1, 2])
def test_interrupted_split_resumes_from_its_solved_blocks(tmp_path, monkeypatch, sweeps):
    import swimdist.lstsq as lstsq
    from swimdist.store import SolveCheckpoint
    from swimdist.testing import make_lstsq_problem

    p = make_lstsq_problem(600, 41, cond=1e3, n_rhs=2, noise=0.05, seed=7)
    kw = dict(method="split", n_splits=4, split_order="ordered", split_sweeps=sweeps,
              sweep_tol=0.0)
    ref = solve(DesignMatrix(p["A"], bias=True), p["Y"], **kw)

    def with_checkpoint():
        ck = SolveCheckpoint(str(tmp_path / "ck"), "job")
        return DesignMatrix(p["A"], bias=True, checkpoint=ck)

    direct = lstsq.get_solver("direct")
    calls = []
    fail_at = 3 if sweeps == 1 else 6  # the process "dies" in this block solve

    @functools.wraps(direct)  # the registry reads the solver's options from its signature
    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == fail_at:
            raise KeyboardInterrupt
        return direct(*args, **kwargs)

    monkeypatch.setitem(lstsq.SOLVERS, "direct", failing)
    with pytest.raises(KeyboardInterrupt):
        solve(with_checkpoint(), p["Y"], **kw)
    monkeypatch.setitem(lstsq.SOLVERS, "direct", direct)
    calls.clear()
    counted = []

    @functools.wraps(direct)
    def counting(*args, **kwargs):
        counted.append(1)
        return direct(*args, **kwargs)

    monkeypatch.setitem(lstsq.SOLVERS, "direct", counting)
    again = solve(with_checkpoint(), p["Y"], **kw)
    done = fail_at - 1
    assert again.info["resumed_after_blocks"] == done
    assert len(counted) == 4 * sweeps - done  # solved blocks are not solved (or built) again
    np.testing.assert_array_equal(again.solution, ref.solution)
    assert again.residual_history == ref.residual_history
    assert again.info["block_residuals"] == ref.info["block_residuals"]


def test_estimator_split_with_a_store_path_checkpoints_and_cleans_up(tmp_path, monkeypatch):
    import swimdist.lstsq.split as split_mod
    from swimdist.datasets import sine

    seen = []
    orig = split_mod.solve_split

    @functools.wraps(orig)
    def spy(A, *args, **kwargs):
        seen.append(A.checkpoint)
        return orig(A, *args, **kwargs)

    monkeypatch.setitem(SOLVERS, "split", spy)
    X, y = sine(400, seed=0)
    path = tmp_path / "job"
    m = SWIMRegressor(hidden_layer_sizes=(40,), solver="split", random_state=0, store=str(path),
                      solver_options={"n_splits": 3}).fit(X, y)
    assert seen and seen[0] is not None and seen[0].path == str(tmp_path / "job.solve")
    assert not (tmp_path / "job.solve").exists() and not (tmp_path / "job.lock").exists()
    ref = SWIMRegressor(hidden_layer_sizes=(40,), solver="split", random_state=0,
                        solver_options={"n_splits": 3}).fit(X, y)
    np.testing.assert_array_equal(m.coef_, ref.coef_)
