"""Model selection: prefix-consistent sampling, the (width, alpha) path against separate fits,
cross-validation scores against a hand computation, persistence, scikit-learn conventions."""

import numpy as np
import pytest

from swimdist import (
    SWIMClassifier,
    SWIMClassifierCV,
    SWIMRegressor,
    SWIMRegressorCV,
    load_model,
)
from swimdist.exceptions import ValidationError
from swimdist.features import forward
from swimdist.sampling import sample_layers, smallest_keys
from swimdist.selection import GramPath, parse_grid


# --------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("replace", [True, False], ids=["replace", "distinct"])
@pytest.mark.parametrize("sampler", ["swim", "uniform"])
@pytest.mark.parametrize("classification", [False, True])
def test_sampling_is_prefix_consistent(replace, sampler, classification, global_random_seed):
    rng = np.random.default_rng(global_random_seed)
    X = rng.random((500, 4))
    Y = ((X[:, :1] > 0.5).astype(float) if classification
         else np.sin(X @ np.arange(1.0, 5.0))[:, None])
    wide = sample_layers(X, Y, (5, 200), sampler=sampler, replace=replace,
                         classification=classification, seed=global_random_seed)
    for m in (1, 37, 120, 199):
        narrow = sample_layers(X, Y, (5, m), sampler=sampler, replace=replace,
                               classification=classification, seed=global_random_seed)
        np.testing.assert_array_equal(narrow[0].weights, wide[0].weights)  # other layers
        np.testing.assert_array_equal(narrow[1].idx_from, wide[1].idx_from[:m])
        np.testing.assert_array_equal(narrow[1].idx_to, wide[1].idx_to[:m])
        np.testing.assert_array_equal(narrow[1].weights, wide[1].weights[:, :m])
        np.testing.assert_array_equal(narrow[1].biases, wide[1].biases[:m])
    if not replace:
        pairs = wide[1].idx_from * 500 + wide[1].idx_to
        assert np.unique(pairs).size == pairs.size


def test_numpy_distinct_stream_is_kept_and_is_not_prefix_consistent(rng):
    X = rng.random((300, 3))
    Y = np.sin(X.sum(axis=1))[:, None]
    old = [sample_layers(X, Y, (m,), replace=False, seed=4, distinct_stream="numpy")[0]
           for m in (60, 250)]
    # the stream of earlier releases: numpy's choice(replace=False), redrawn in rounds
    assert not np.array_equal(old[0].idx_from, old[1].idx_from[:60])
    new = sample_layers(X, Y, (60,), replace=False, seed=4)[0]
    assert not np.array_equal(new.idx_from, old[0].idx_from)
    with pytest.raises(ValidationError, match="distinct_stream"):
        sample_layers(X, Y, (5,), replace=False, distinct_stream="other")


def test_smallest_keys_draws_successive_sampling_without_replacement():
    # P(first = k) = p_k; P(second = j | first = k) = p_j / (1 - p_k)
    p = np.array([0.5, 0.3, 0.15, 0.05, 0.0])
    rng = np.random.default_rng(0)
    draws = np.array([smallest_keys(p, 2, rng) for _ in range(20000)])
    first = np.bincount(draws[:, 0], minlength=5) / len(draws)
    np.testing.assert_allclose(first, p, atol=0.012)  # 4 sigma of a 0.5 share: 0.014
    second = np.bincount(draws[draws[:, 0] == 0, 1], minlength=5) / (draws[:, 0] == 0).sum()
    np.testing.assert_allclose(second, [0, 0.6, 0.3, 0.1, 0], atol=0.02)
    assert not np.any(draws == 4)  # zero probability: never drawn
    assert np.all(draws[:, 0] != draws[:, 1])


# --------------------------------------------------------------------------- the path
@pytest.fixture(scope="module")
def mnist3000():
    from conftest import mnist_dir

    from swimdist.datasets import load_mnist

    d = mnist_dir()
    if d is None:
        pytest.skip("MNIST IDX files not available (set SWIMDIST_DATA_DIR)")
    X, y, Xt, _ = load_mnist(d)
    return X[:3000], y[:3000], Xt[:1000]


@pytest.fixture(scope="module")
def mnist_path_model(mnist3000):
    X, y, _ = mnist3000
    return SWIMClassifierCV(hidden_layer_sizes=(400,), widths=[100, 250, 400],
                            alphas=[0.0, 1e-6, 1e-2], random_state=0).fit(X, y)


@pytest.mark.parametrize("width, alpha", [
    (100, 1e-6), (400, 1e-6),   # barely damped: Cholesky of a matrix with cond ~1e12
    (250, 1e-2), (400, 1e-2),   # damped
    (100, 0.0), (400, 0.0),     # rank cutoff (26 duplicate neurons at 400)
])
def test_every_path_model_equals_a_separate_fit_on_mnist(mnist3000, mnist_path_model,
                                                        width, alpha):
    X, y, Xt = mnist3000
    cv = mnist_path_model
    assert cv.path_is_exact_
    sep = SWIMClassifier(hidden_layer_sizes=(width,), alpha=alpha, solver="normal",
                         random_state=0).fit(X, y)
    d_sep = sep.decision_function(Xt)
    d_path = cv.decision_function_at(Xt, width=width, alpha=alpha)
    np.testing.assert_allclose(d_path, d_sep, rtol=0, atol=1e-5)
    # the same neurons, not just the same outputs
    np.testing.assert_array_equal(cv.model_at(width=width, alpha=alpha).layers_[0].weights,
                                  sep.layers_[0].weights)


def test_alpha_zero_path_equals_the_certified_auto_fit(mnist3000, mnist_path_model):
    X, y, Xt = mnist3000
    sep = SWIMClassifier(hidden_layer_sizes=(250,), random_state=0, solver="auto").fit(X, y)
    assert sep.solve_result_.converged  # the certificate accepts
    d = mnist_path_model.decision_function_at(Xt, width=250, alpha=0.0)
    np.testing.assert_allclose(d, sep.decision_function(Xt), rtol=0, atol=1e-5)


def test_path_results_and_best_model(mnist3000, mnist_path_model):
    X, y, Xt = mnist3000
    cv = mnist_path_model
    res = cv.cv_results_
    assert list(res["width"]) == [100] * 3 + [250] * 3 + [400] * 3
    assert list(res["alpha"]) == [0.0, 1e-6, 1e-2] * 3
    assert np.all((res["validation_score"] > 0.7) & (res["validation_score"] <= 1))
    np.testing.assert_allclose(res["validation_error"], 1 - res["validation_score"])
    best = int(np.argmax(res["validation_score"]))
    assert res["validation_score"][cv.best_index_] == res["validation_score"][best]
    assert (cv.best_width_, cv.best_alpha_) == (res["width"][cv.best_index_],
                                                res["alpha"][cv.best_index_])
    assert type(cv.best_estimator_) is SWIMClassifier
    np.testing.assert_array_equal(cv.predict(Xt), cv.best_estimator_.predict(Xt))
    np.testing.assert_allclose(cv.decision_function(Xt),
                               cv.decision_function_at(Xt, width=cv.best_width_,
                                                       alpha=cv.best_alpha_))
    # alpha = 0 keeps the directions above the cutoff: the duplicates are merged first
    assert res["rank"][res["alpha"] == 0].tolist() == [
        cv.model_at(width=m, alpha=0.0).fit_info_["rank"] for m in (100, 250, 400)]


def test_best_estimator_saves_and_loads(tmp_path, mnist3000, mnist_path_model):
    _, _, Xt = mnist3000
    cv = mnist_path_model
    path = cv.best_estimator_.save(str(tmp_path / "best.npz"))
    loaded = load_model(path)
    assert type(loaded) is SWIMClassifier
    assert loaded.hidden_layer_sizes == (cv.best_width_,)
    assert loaded.alpha == cv.best_alpha_
    np.testing.assert_array_equal(loaded.decision_function(Xt), cv.decision_function(Xt))
    np.testing.assert_array_equal(load_model(cv.save(str(tmp_path / "cv.npz"))).predict(Xt),
                                  cv.predict(Xt))


@pytest.mark.parametrize("replace", [True, False], ids=["replace", "distinct"])
def test_regressor_path_equals_separate_fits_multi_output(replace):
    from swimdist.datasets import sine

    X, y1 = sine(800, alpha=2.0, seed=0)
    y = np.column_stack([y1, np.cos(X.sum(axis=1))])
    Xt, _ = sine(200, alpha=2.0, seed=1)
    cv = SWIMRegressorCV(hidden_layer_sizes=(10, 120), widths="40:120:40", alphas="0,1e-3",
                         replace=replace, cv=3, random_state=3).fit(X, y)
    assert cv.predict(Xt).shape == (200, 2)
    for m in (40, 120):
        for a in (0.0, 1e-3):
            sep = SWIMRegressor(hidden_layer_sizes=(10, m), alpha=a, solver="normal",
                                replace=replace, random_state=3).fit(X, y)
            np.testing.assert_allclose(cv.predict_at(Xt, width=m, alpha=a), sep.predict(Xt),
                                       rtol=0, atol=1e-6)
    res = cv.cv_results_
    splits = np.array([res[f"split{k}_validation_score"] for k in range(3)])
    assert np.all(splits > 0.9) and np.all(res["validation_score"] > 0.9)


def test_regressor_scores_folds_of_one_row():
    """Leave-one-out (``cv=N``): each fold's R^2 is undefined, and the score is the R^2 of
    all N held-out predictions together, so the choice follows the validation error (a
    mean of per-fold R^2 was 0 everywhere, and the tie-break chose the narrowest width at
    the largest alpha)."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 3))
    y = np.sin(X[:, 0]) + X[:, 1]
    cv = SWIMRegressorCV(hidden_layer_sizes=(40,), widths=[5, 20, 40], alphas=[0, 1e-4, 10],
                         cv=60, random_state=0).fit(X, y)
    res = cv.cv_results_
    np.testing.assert_allclose(1 - res["validation_score"],
                               res["validation_mse"] * len(y) / ((y - y.mean()) ** 2).sum())
    assert cv.best_index_ == int(np.argmin(res["validation_mse"]))
    assert cv.best_width_ > 5 and cv.best_alpha_ < 10
    assert np.isnan(res["split0_validation_score"]).all()


def test_validation_score_is_the_held_out_accuracy_of_a_fit_on_the_other_rows(rng):
    # the selection model of each point: ridge on the training rows, scored on the others
    X = rng.normal(size=(600, 4))
    y = (X[:, 0] * X[:, 1] + 0.3 * X[:, 2] > 0).astype(int)
    cv = SWIMClassifierCV(hidden_layer_sizes=(80,), widths=[30, 80], alphas=[1e-3, 1.0],
                          validation_fraction=0.25, random_state=7).fit(X, y)
    groups, _ = cv._groups(600, cv.seed_)
    fit_rows, val_rows = groups == 0, groups == 1
    assert val_rows.sum() == 150
    Y = 2.0 * y - 1.0
    for k, (m, a) in enumerate(zip(cv.cv_results_["width"], cv.cv_results_["alpha"],
                                   strict=True)):
        layer = cv.layers_[0].columns(slice(0, m))
        A = np.column_stack([forward(X, [layer]), np.ones(600)])
        Af = A[fit_rows]
        c = np.linalg.solve(Af.T @ Af + a * np.eye(m + 1), Af.T @ Y[fit_rows])
        acc = np.mean((A[val_rows] @ c > 0) == (y[val_rows] == 1))
        assert cv.cv_results_["validation_score"][k] == pytest.approx(acc, abs=1e-12)


@pytest.mark.parametrize("dependent", [False, True], ids=["full-rank", "cut"])
def test_gram_path_ridge_prefix_equals_merged_ridge(rng, dependent):
    # duplicates as separate columns (nested Cholesky) = merged column scaled by sqrt(m)
    H = rng.normal(size=(50, 6))
    if dependent:  # a direction below the cutoff: alpha = 0 needs the eigendecomposition
        H[:, 4] = H[:, 0] - H[:, 2] + 1e-10 * rng.normal(size=50)
    inverse = np.array([0, 1, 0, 2, 3, 1, 4, 5, 0])  # 9 neurons, 6 distinct
    A = np.column_stack([H, np.ones(50)])
    Y = rng.normal(size=(50, 2))
    path = GramPath(A.T @ A, A.T @ Y, inverse, rcond=1e-12)
    for m in (1, 3, 6, 9):
        for a in (1e-3, 0.5):
            full = np.column_stack([np.ones(50), H[:, inverse[:m]]])
            x = np.linalg.solve(full.T @ full + a * np.eye(m + 1), full.T @ Y)
            coef, b0, _ = path.solve(m, a)
            np.testing.assert_allclose(coef, x[1:], atol=1e-10)
            np.testing.assert_allclose(b0, x[0], atol=1e-10)
        # alpha = 0: the minimum-norm least-squares solution (lstsq over the duplicates)
        coef, b0, info = path.solve(m, 0.0)
        x = np.linalg.lstsq(np.column_stack([H[:, inverse[:m]], np.ones(50)]), Y,
                            rcond=info["cutoff"])[0]
        np.testing.assert_allclose(coef, x[:-1], atol=1e-8)
        np.testing.assert_allclose(b0, x[-1], atol=1e-8)
        cut = dependent and m > 6  # neuron 6 (column 4) is the first to enter at m = 7
        assert info["factor"] == ("eigh" if cut else "cholesky")
        assert info["rank"] == path.distinct_in(m) + 1 - cut


# --------------------------------------------------------------------------- conventions
def test_scikit_learn_check_estimator_on_the_cv_estimators():
    pytest.importorskip("sklearn")
    from sklearn.utils.estimator_checks import check_estimator

    expected = {"check_estimators_unfitted": "swimdist raises swimdist.exceptions.NotFittedError"}
    for est in (SWIMRegressorCV(hidden_layer_sizes=(20,), widths=[10, 20], alphas=[0, 1e-3]),
                SWIMClassifierCV(hidden_layer_sizes=(20,), widths=[10, 20], alphas=[0, 1e-3])):
        with pytest.warns(UserWarning):  # "does not inherit from BaseEstimator"
            results = check_estimator(est, on_fail=None, expected_failed_checks=expected)
        failed = [(r["check_name"], str(r["exception"])) for r in results
                  if r["status"] == "failed"]
        assert failed == [], failed
        assert len([r for r in results if r["status"] == "passed"]) > 40


@pytest.mark.parametrize("kw, msg", [
    ({"widths": [500]}, "at most the last hidden layer"),
    ({"widths": [0]}, "widths"),
    ({"alphas": [-1.0]}, "alphas"),
    ({"alphas": []}, "alphas is empty"),
    ({"cv": 1}, "cv must be"),
    ({"validation_fraction": 1.0}, "validation_fraction"),
    ({"widths": "1:x:2"}, "Cannot read the grid"),
])
def test_bad_grids_are_rejected_with_a_message(kw, msg, rng):
    X, y = rng.random((40, 3)), rng.integers(0, 2, 40)
    with pytest.raises(ValidationError, match=msg):
        SWIMClassifierCV(hidden_layer_sizes=(50,), **kw).fit(X, y)


def test_model_at_checks_the_point(rng):
    X, y = rng.random((60, 3)), rng.integers(0, 3, 60)
    cv = SWIMClassifierCV(hidden_layer_sizes=(30,), widths=[10, 30], random_state=0).fit(X, y)
    with pytest.raises(ValidationError, match=r"width must be an integer in \[1, 30\]"):
        cv.decision_function_at(X, width=31, alpha=0.0)
    # any prefix width and any alpha, not only the grid's
    assert cv.decision_function_at(X, width=17, alpha=0.3).shape == (60, 3)


def test_parse_grid():
    assert parse_grid("1000:5000:1000", integer=True) == [1000, 2000, 3000, 4000, 5000]
    assert parse_grid("0,1e-6, 1e-4") == [0.0, 1e-6, 1e-4]
    with pytest.raises(ValidationError, match="integers"):
        parse_grid("1.5,2", integer=True)


# --------------------------------------------------------------------------- command line
def test_cli_select_writes_selection_json_and_the_best_model(tmp_path):
    import json

    from click.testing import CliRunner

    from swimdist.cli import main
    from swimdist.datasets import sine

    out = tmp_path / "out"
    r = CliRunner().invoke(main, [
        "train", "--dataset", "sine", "--n-train", "600", "--n-test", "100", "--hidden", "90",
        "--select", "widths=30:90:30", "--select", "alphas=0,1e-4", "--select", "cv=3",
        "--n-workers", "1", "--threads-per-worker", "1", "-o", str(out)])
    assert r.exit_code == 0, r.output
    sel = json.loads((out / "selection.json").read_text())
    assert sel["widths"] == [30, 60, 90] and sel["alphas"] == [0.0, 1e-4]
    res = sel["cv_results"]
    assert res["width"] == [30, 30, 60, 60, 90, 90]
    k = int(np.argmax(res["validation_score"]))
    assert (sel["best_width"], sel["best_alpha"]) == (res["width"][k], res["alpha"][k])
    m = load_model(str(out / "model.npz"))
    assert type(m) is SWIMRegressor and m.hidden_layer_sizes == (sel["best_width"],)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["selection"]["best_width"] == sel["best_width"]
    # the saved model is the path's: a separate fit at that point gives the same predictions
    X, y = sine(600, alpha=1.0, seed=0)
    Xt, _ = sine(100, alpha=1.0, seed=1)
    sep = SWIMRegressor(hidden_layer_sizes=(sel["best_width"],), alpha=sel["best_alpha"],
                        solver="normal", random_state=0).fit(X, y)
    np.testing.assert_allclose(m.predict(Xt), sep.predict(Xt), rtol=0, atol=1e-6)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "selection.png skipped" in r.output
    else:
        assert (out / "selection.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_path_on_two_workers_and_from_a_feature_store_equals_threads(local_cluster_factory,
                                                                     tmp_path, rng):
    # the Gram and validation passes run on the workers over the feature blocks
    X = rng.normal(size=(900, 5))
    y = (np.sin(X[:, 0]) + X[:, 1] * X[:, 2] > 0).astype(int)
    kw = dict(hidden_layer_sizes=(60,), widths=[20, 60], alphas=[0.0, 1e-3], cv=3,
              random_state=5, chunk_rows=200)
    ref = SWIMClassifierCV(**kw).fit(X, y)
    local_cluster_factory(n_workers=2)
    dist = SWIMClassifierCV(**kw).fit(X, y)
    stored = SWIMClassifierCV(store=str(tmp_path / "features.zarr"), **kw).fit(X, y)
    for other in (dist, stored):
        np.testing.assert_array_equal(other.cv_results_["validation_score"],
                                      ref.cv_results_["validation_score"])
        np.testing.assert_allclose(other.decision_function_at(X, width=20, alpha=1e-3),
                                   ref.decision_function_at(X, width=20, alpha=1e-3),
                                   rtol=0, atol=1e-10)
    assert stored.fit_info_["placement"] == "store"


@pytest.mark.parametrize("select, msg", [
    ({"widths": "10:x"}, "select.widths"),
    ({"widths": []}, "non-empty"),
    ({"widths": [10, 0]}, "integers >= 1"),
    ({"alphas": [-1]}, "numbers >= 0"),
    ({"alphas": "0", "cv": 1}, "select.cv"),
    ({"alphas": "0", "validation_fraction": 1.5}, "validation_fraction"),
])
def test_job_spec_select_section(select, msg):
    from swimdist.exceptions import JobSpecError
    from swimdist.service import load_spec

    spec = load_spec(None, {"model": {"hidden_layer_sizes": [50, 300]},
                            "select": {"widths": "100:400:100", "alphas": "0,1e-4"}})
    assert spec["select"]["widths"] == [100, 200, 300, 400]
    assert spec["select"]["alphas"] == [0.0, 1e-4]
    assert spec["model"]["hidden_layer_sizes"] == [50, 400]  # the widest is the layer
    with pytest.raises(JobSpecError, match=msg):
        load_spec(None, {"select": select})


def test_selection_png_is_skipped_with_a_message_without_matplotlib(tmp_path, monkeypatch,
                                                                    caplog, rng):
    import sys

    from swimdist.selection import plot_selection, selection_report

    X, y = rng.random((80, 3)), rng.integers(0, 2, 80)
    cv = SWIMClassifierCV(hidden_layer_sizes=(20,), widths=[10, 20], alphas=[0, 1e-2],
                          random_state=0).fit(X, y)
    report = selection_report(cv)
    assert report["cv_results"]["width"] == [10, 10, 20, 20]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    path = str(tmp_path / "selection.png")
    with caplog.at_level("WARNING", logger="swimdist.selection"):
        assert plot_selection(report, path) is None
    assert "matplotlib not installed" in caplog.text and "selection.png skipped" in caplog.text
    assert not (tmp_path / "selection.png").exists()
