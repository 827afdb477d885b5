"""Exact duplicate merging: one column per set of identical neurons, the same model."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as sla

from swimdist import SWIMClassifier, SWIMRegressor, load_model
from swimdist.datasets import sine
from swimdist.features import forward
from swimdist.sampling import Layer, merge_duplicates


def _layer_with_copies(rng, d: int, distinct: int, width: int, activation: str = "tanh"):
    W = rng.normal(size=(d, distinct))
    b = rng.normal(size=distinct)
    pick = rng.integers(0, distinct, size=width)
    return Layer(W[:, pick], b[pick], activation), pick


def _gelsd(A, Y, rcond, alpha=0.0):
    if alpha:
        n = A.shape[1]
        A = np.vstack([A, np.sqrt(alpha) * np.eye(n)])
        Y = np.vstack([Y, np.zeros((n, Y.shape[1]))])
    return sla.lstsq(A, Y, cond=rcond, lapack_driver="gelsd")[0]


@pytest.mark.parametrize("seed", range(6))
def test_merged_solution_is_the_minimum_norm_solution_over_all_columns(seed):
    rng = np.random.default_rng(seed)
    N = int(rng.integers(20, 400))
    d = int(rng.integers(1, 6))
    distinct = int(rng.integers(2, 60))
    width = int(rng.integers(distinct, 3 * distinct + 2))
    K = int(rng.choice([1, 3]))
    layer, pick = _layer_with_copies(rng, d, distinct, width,
                                     activation=str(rng.choice(["tanh", "relu"])))
    X = rng.normal(size=(N, d))
    Y = rng.normal(size=(N, K))
    merged, m = merge_duplicates(layer)
    assert merged.width == len(np.unique(pick))
    assert m.merged == width - merged.width
    assert m.counts.sum() == width
    A = forward(X, [layer])
    Am = forward(X, [merged])
    # A = Am E with E's rows orthonormal: the same singular values
    sv, svm = sla.svdvals(A), sla.svdvals(Am)
    np.testing.assert_allclose(sv[:svm.size], svm, rtol=1e-10, atol=1e-12 * sv[0])
    assert np.all(sv[svm.size:] <= 1e-10 * sv[0])
    for alpha in (0.0, 1e-3):
        full = _gelsd(A, Y, 1e-10, alpha)
        z = _gelsd(Am, Y, 1e-10, alpha)
        x = m.expand(z)
        scale = max(1.0, np.abs(full).max())
        np.testing.assert_allclose(x, full, rtol=0, atol=1e-7 * scale)
        np.testing.assert_allclose(A @ x, A @ full, rtol=0, atol=1e-9 * np.abs(Y).max() * N)


def test_merge_keeps_first_occurrence_order_and_distinct_layers_untouched(rng):
    layer, pick = _layer_with_copies(rng, 3, 5, 40)
    merged, m = merge_duplicates(layer)
    firsts = [int(np.flatnonzero(pick == u)[0]) for u in dict.fromkeys(pick.tolist())]
    np.testing.assert_array_equal(merged.weights, layer.weights[:, firsts])
    np.testing.assert_array_equal(m.inverse[firsts], np.arange(merged.width))
    distinct = Layer(rng.normal(size=(3, 7)), rng.normal(size=7), "tanh")
    same, m2 = merge_duplicates(distinct)
    assert m2.merged == 0 and same.scale is not None
    np.testing.assert_array_equal(same.scale, np.ones(7))


@pytest.mark.parametrize("solver", ["direct", "auto", "sketch-direct"])
def test_regressor_with_merging_equals_the_unmerged_fit(solver):
    X, y = sine(1500, alpha=5.0, seed=0)
    Xt, _ = sine(500, alpha=5.0, seed=1)
    kw = dict(hidden_layer_sizes=(1200,), solver=solver, random_state=0)
    a = SWIMRegressor(**kw).fit(X, y)
    b = SWIMRegressor(merge_duplicates=False, **kw).fit(X, y)
    assert a.fit_info_["merged_columns"] > 100  # sine at this width repeats many neurons
    assert b.fit_info_["merged_columns"] == 0
    assert a.coef_.shape == b.coef_.shape == (1200, 1)
    # direct: the same minimum-norm model up to rounding; the certified solvers: the same
    # within their acceptance bound
    atol = 1e-8 if solver == "direct" else 1e-6
    np.testing.assert_allclose(a.predict(Xt), b.predict(Xt), rtol=0, atol=atol)
    # the model over the original neurons is the minimum-norm one: equal coefficients on
    # identical neurons
    keys = np.concatenate([a.layers_[0].weights.T, a.layers_[0].biases[:, None]], axis=1)
    _, inv = np.unique(keys, axis=0, return_inverse=True)
    inv = inv.ravel()
    for u in np.unique(inv)[:50]:
        c = a.coef_[inv == u, 0]
        np.testing.assert_allclose(c, c[0], rtol=1e-12, atol=0)


def test_classifier_merging_same_predictions_and_save_load(tmp_path, rng):
    X = rng.normal(size=(800, 4))
    y = (X[:, 0] + X[:, 1] ** 2 > 0.5).astype(int) + (X[:, 2] > 1)
    kw = dict(hidden_layer_sizes=(1000,), solver="direct", random_state=1)
    a = SWIMClassifier(**kw).fit(X, y)
    b = SWIMClassifier(merge_duplicates=False, **kw).fit(X, y)
    assert a.fit_info_["merged_columns"] > 0
    np.testing.assert_allclose(a.decision_function(X), b.decision_function(X), atol=1e-8)
    path = a.save(str(tmp_path / "m.npz"))
    c = load_model(path)
    np.testing.assert_array_equal(c.decision_function(X), a.decision_function(X))
    assert c.merge_duplicates == "auto"


def test_distinct_sampling_merges_nothing_by_default():
    X, y = sine(500, alpha=2.0, seed=0)
    m = SWIMRegressor(hidden_layer_sizes=(200,), replace=False, random_state=0).fit(X, y)
    assert m.fit_info_["merged_columns"] == 0
    with pytest.raises(Exception, match="merge_duplicates"):
        SWIMRegressor(merge_duplicates="yes").fit(X, y)


@pytest.mark.parametrize("method", ["direct", "auto", "normal", "sketch-direct", "lsrn"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_zero_and_constant_columns_merge_exactly(method, seed):
    """Zero and constant columns (dead relu neurons, saturated ones, the bias) become one
    column: the same minimum-norm solution as gelsd over the original columns."""
    from swimdist.lstsq import solve, solver_options

    rng = np.random.default_rng(seed)
    N, n = 600, 30
    A = np.tanh(rng.standard_normal((N, 4)) @ rng.standard_normal((4, n)))
    cols = rng.choice(n, 6, replace=False)
    A[:, cols[:2]] = 0.0                               # dead
    A[:, cols[2:5]] = rng.uniform(-1, 1, 3)            # constant on the data
    A[:, cols[5]] = 1.0                                 # a bias
    Y = rng.standard_normal((N, 2))
    ref = np.linalg.lstsq(A, Y, rcond=1e-10)[0]
    opts = {"seed": 0} if "seed" in solver_options(method) else {}
    res = solve(A, Y, method=method, **opts)
    assert res.info["merged_columns"] == 5
    tol = 1e-8 if method in ("direct", "auto", "sketch-direct") else 1e-5
    np.testing.assert_allclose(A @ res.solution, A @ ref, atol=tol * np.abs(A @ ref).max())
    np.testing.assert_allclose(res.solution, ref, atol=tol * max(1.0, np.abs(ref).max()))
    assert np.all(res.solution[cols[:2]] == 0)


def test_constant_merge_keeps_the_ridge_solution():
    from swimdist.lstsq import solve

    rng = np.random.default_rng(3)
    A = rng.standard_normal((300, 12))
    A[:, 3], A[:, 7], A[:, 9] = 2.0, -0.5, 0.0
    Y = rng.standard_normal((300, 1))
    alpha = 0.3
    ref = np.linalg.solve(A.T @ A + alpha * np.eye(12), A.T @ Y)
    res = solve(A, Y, method="direct", alpha=alpha)
    assert res.info["merged_columns"] == 2
    np.testing.assert_allclose(res.solution, ref, rtol=1e-10, atol=1e-12)
