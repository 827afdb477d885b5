"""SWIMRegressor / SWIMClassifier: conventions, accuracy, errors, persistence, determinism."""

import os

import dask.array as da
import numpy as np
import pytest

from swimdist import SWIMClassifier, SWIMRegressor, load_model
from swimdist.datasets import sine
from swimdist.exceptions import NotFittedError, StoreError, SwimdistError, ValidationError


def test_scikit_learn_check_estimator():
    pytest.importorskip("sklearn")
    from sklearn.utils.estimator_checks import check_estimator

    # scikit-learn insists on its own NotFittedError class; swimdist raises its own
    # NotFittedError (also a ValueError and AttributeError) because it never imports sklearn.
    # test_unfitted_estimators_raise checks that behaviour instead.
    expected = {"check_estimators_unfitted": "swimdist raises swimdist.exceptions.NotFittedError"}
    for est in (SWIMRegressor(hidden_layer_sizes=(20,), solver="direct"),
                SWIMClassifier(hidden_layer_sizes=(20,), solver="direct")):
        with pytest.warns(UserWarning):  # "does not inherit from BaseEstimator"
            results = check_estimator(est, on_fail=None, expected_failed_checks=expected)
        failed = [r["check_name"] for r in results if r["status"] == "failed"]
        assert failed == [], failed
        assert len([r for r in results if r["status"] == "passed"]) > 40


@pytest.mark.parametrize("Est", [SWIMRegressor, SWIMClassifier])
def test_unfitted_estimators_raise(Est):
    with pytest.raises(NotFittedError, match="not fitted yet"):
        Est().predict(np.zeros((2, 2)))


def test_regressor_fits_sine_to_high_accuracy(sine_data):
    X, y, Xt, yt = sine_data
    m = SWIMRegressor(hidden_layer_sizes=(300,), solver="direct", random_state=0).fit(X, y)
    mae = np.abs(m.predict(Xt) - yt).mean()
    assert mae < 1e-5
    assert m.solve_result_.relative_residual < 1e-5
    assert m.coef_.shape == (300, 1) and m.intercept_.shape == (1,)
    assert m.score(Xt, yt) > 0.999999


def test_classifier_multiclass_and_binary(rng):
    X = rng.random((600, 2))
    y3 = np.digitize(X[:, 0] + 0.3 * np.sin(6 * X[:, 1]), [0.4, 0.7])
    c = SWIMClassifier(hidden_layer_sizes=(200,), solver="direct", rcond=1e-8,
                       random_state=1).fit(X, y3)
    assert c.decision_function(X).shape == (600, 3)
    assert c.score(X, y3) > 0.97
    yb = np.where(X[:, 0] > X[:, 1], "left", "right")
    b = SWIMClassifier(hidden_layer_sizes=(100,), solver="direct", random_state=1).fit(X, yb)
    assert list(b.classes_) == ["left", "right"]
    assert b.decision_function(X).shape == (600,)
    assert b.score(X, yb) > 0.97


def test_prediction_on_dask_input_is_lazy_and_equal(sine_data):
    X, y, Xt, yt = sine_data
    m = SWIMRegressor(hidden_layer_sizes=(50,), solver="direct", random_state=0).fit(X, y)
    lazy = m.predict(da.from_array(Xt, chunks=(100, 2)))
    assert isinstance(lazy, da.Array)
    np.testing.assert_allclose(lazy.compute(), m.predict(Xt), rtol=0, atol=1e-13)


def test_fit_on_dask_input_equals_numpy_input(sine_data):
    X, y, _, _ = sine_data
    kw = dict(hidden_layer_sizes=(60, 40), solver="direct", random_state=3, chunk_rows=128)
    a = SWIMRegressor(**kw).fit(X, y)
    b = SWIMRegressor(**kw).fit(da.from_array(X, chunks=(128, 2)), da.from_array(y))
    np.testing.assert_array_equal(a.coef_, b.coef_)


def test_float32_features(sine_data):
    X, y, Xt, yt = sine_data
    m = SWIMRegressor(hidden_layer_sizes=(100,), solver="direct", feature_dtype="float32",
                      random_state=0).fit(X, y)
    assert np.abs(m.predict(Xt) - yt).mean() < 1e-3


def test_save_load_round_trip_exact(tmp_path, rng):
    X = rng.random((300, 3))
    y = np.digitize(X[:, 0], [0.3, 0.6])
    c = SWIMClassifier(hidden_layer_sizes=(30, 20), solver="direct", random_state=4).fit(X, y)
    path = str(tmp_path / "m.npz")
    c.save(path)
    c2 = load_model(path)
    assert type(c2) is SWIMClassifier and c2.get_params() == c.get_params()
    np.testing.assert_array_equal(c2.decision_function(X), c.decision_function(X))
    np.testing.assert_array_equal(c2.classes_, c.classes_)
    r = SWIMRegressor(hidden_layer_sizes=(20,), solver="direct", random_state=0)
    r.fit(X, np.c_[X[:, 0], X[:, 1] ** 2])
    r.save(path)  # overwrite: atomic replace
    r2 = load_model(path)
    assert r2.predict(X).shape == (300, 2)
    np.testing.assert_array_equal(r2.predict(X), r.predict(X))
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []


def test_failed_save_leaves_previous_model_intact(tmp_path, rng, monkeypatch):
    X = rng.random((100, 2))
    m = SWIMRegressor(hidden_layer_sizes=(10,), solver="direct", random_state=0).fit(X, X[:, 0])
    path = str(tmp_path / "m.npz")
    m.save(path)
    before = open(path, "rb").read()

    def boom(*a, **k):
        raise OSError("No space left on device")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError, match="No space left"):
        m.save(path)
    assert open(path, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["m.npz"]


def test_load_model_refuses_foreign_and_corrupt_files(tmp_path):
    p = tmp_path / "x.npz"
    np.savez(p, a=np.arange(3))
    with pytest.raises(StoreError, match="not a swimdist model"):
        load_model(str(p))
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(StoreError, match="not a readable swimdist model"):
        load_model(str(tmp_path / "bad.npz"))
    with pytest.raises(StoreError, match="No model file"):
        load_model(str(tmp_path / "missing.npz"))
    obj = tmp_path / "obj.npz"
    np.savez(obj, a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(StoreError):
        load_model(str(obj))


BAD_INPUT = [
    # (X, y, estimator kwargs, expected message) -- one row per kind of bad input
    (np.array([[np.nan, 1.0], [1.0, 2.0], [0.0, 1.0]]), [0.0, 1.0, 2.0], {}, "NaN or infinity"),
    (np.array([[np.inf, 1.0], [1.0, 2.0], [0.0, 1.0]]), [0.0, 1.0, 2.0], {}, "NaN or infinity"),
    (np.ones((3, 2)), [0.0, np.nan, 1.0], {}, "y contains NaN"),
    (np.ones(3), [0.0, 1.0, 2.0], {}, "Expected 2D array"),
    (np.ones((3, 2, 2)), [0.0, 1.0, 2.0], {}, "Expected 2D array"),
    (np.ones((3, 2)), [0.0, 1.0], {}, "inconsistent numbers of samples"),
    (np.ones((0, 2)), [], {}, "0 sample"),
    (np.ones((3, 0)), [0.0, 1.0, 2.0], {}, "0 feature"),
    (np.ones((3, 2)), [0.0, 1.0, 2.0], {"hidden_layer_sizes": (0,)}, "integer >= 1"),
    (np.ones((3, 2)), [0.0, 1.0, 2.0], {"solver": "magic"}, "valid solvers are: .*direct"),
    (np.ones((3, 2)), [0.0, 1.0, 2.0], {"activation": "sigmoid"}, "valid activations are: tanh"),
    (np.ones((3, 2)), [0.0, 1.0, 2.0], {"sampler": "gauss"}, "valid samplers are: swim"),
    (np.ones((3, 2)), [0.0, 1.0, 2.0], {"rcond": -1}, "rcond must be"),
    (np.ones((3, 2)) + 1j, [0.0, 1.0, 2.0], {}, "Complex data not supported"),
]


@pytest.mark.parametrize("X, y, kw, msg", BAD_INPUT)
def test_bad_input_is_rejected_with_a_message(X, y, kw, msg):
    with pytest.raises(ValidationError, match=msg):
        SWIMRegressor(hidden_layer_sizes=kw.pop("hidden_layer_sizes", (5,)), solver=kw.pop(
            "solver", "direct"), **kw).fit(X, y)


def test_classifier_needs_two_classes_and_feature_count_is_checked(rng):
    X = rng.random((20, 3))
    with pytest.raises(ValidationError, match="at least 2 classes"):
        SWIMClassifier(hidden_layer_sizes=(5,), solver="direct").fit(X, np.zeros(20))
    c = SWIMClassifier(hidden_layer_sizes=(5,), solver="direct").fit(X, np.arange(20) % 2)
    with pytest.raises(ValidationError, match="X has 2 features, but SWIMClassifier is "
                                              "expecting 3 features"):
        c.predict(X[:, :2])


def test_foreign_store_path_is_refused_and_untouched(tmp_path, rng):
    d = tmp_path / "important"
    d.mkdir()
    (d / "thesis.tex").write_text("do not delete")
    X = rng.random((50, 2))
    with pytest.raises(StoreError, match="not a swimdist feature store"):
        SWIMRegressor(hidden_layer_sizes=(5,), solver="direct", store=str(d)).fit(X, X[:, 0])
    assert (d / "thesis.tex").read_text() == "do not delete"


def test_persistent_store_is_reused(tmp_path, rng):
    X = rng.random((200, 2))
    kw = dict(hidden_layer_sizes=(30,), solver="direct", random_state=0, chunk_rows=64,
              store=str(tmp_path / "feat"))
    a = SWIMRegressor(**kw).fit(X, X[:, 0] ** 2)
    assert a.fit_info_["blocks"]["written"] == 4
    b = SWIMRegressor(**kw).fit(X, X[:, 0] ** 2)
    assert b.fit_info_["blocks"] == {"blocks": 4, "written": 0, "reused": 4, "verified": 4}
    np.testing.assert_array_equal(a.coef_, b.coef_)


def test_same_model_on_threads_one_worker_and_two_workers(local_cluster_factory):
    X, y = sine(1200, alpha=3.0, seed=0)
    kw = dict(hidden_layer_sizes=(80, 60), solver="direct", random_state=7, chunk_rows=256)
    ref = SWIMRegressor(**kw).fit(X, y)  # dask's threaded scheduler
    models = []
    for n in (1, 2):
        client = local_cluster_factory(n_workers=n)
        with client.as_current():
            models.append(SWIMRegressor(**kw).fit(X, y))
        client.close()
    for m in models:
        for la, lb in zip(m.layers_, ref.layers_, strict=True):
            np.testing.assert_array_equal(la.weights, lb.weights)
        np.testing.assert_allclose(m.coef_, ref.coef_, rtol=0, atol=1e-10)
        np.testing.assert_allclose(m.intercept_, ref.intercept_, rtol=0, atol=1e-10)


@pytest.mark.parametrize("alpha", [1, pytest.param(5, marks=pytest.mark.slow),
                                   pytest.param(10, marks=pytest.mark.slow)])
def test_sine_parity_with_reference(alpha):
    sn = pytest.importorskip("swimnetworks")
    from sklearn.pipeline import Pipeline

    X, y = sine(5000, alpha=alpha, seed=0)
    Xt, yt = sine(2000, alpha=alpha, seed=1)
    ref = Pipeline([
        ("hidden", sn.Dense(layer_width=1000, activation="tanh", parameter_sampler="tanh",
                            random_seed=0)),
        ("linear", sn.Linear(regularization_scale=1e-10)),
    ]).fit(X, y[:, None])
    mae_ref = np.abs(ref.predict(Xt).ravel() - yt).mean()
    m = SWIMRegressor(hidden_layer_sizes=(1000,), solver="direct", rcond=1e-10,
                      random_state=0).fit(X, y)
    mae = np.abs(m.predict(Xt) - yt).mean()
    assert mae <= 2 * mae_ref, (mae, mae_ref)


@pytest.mark.slow
def test_mnist_parity_with_reference(mnist_path):
    sn = pytest.importorskip("swimnetworks")
    from sklearn.pipeline import Pipeline

    from swimdist.datasets import load_mnist

    X, y, Xt, yt = load_mnist(mnist_path)
    ref = Pipeline([
        ("hidden", sn.Dense(layer_width=1000, activation="tanh", parameter_sampler="tanh",
                            random_seed=0, is_classifier=True)),
        ("linear", sn.Linear(regularization_scale=1e-10, is_classifier=True)),
    ]).fit(X, y)
    err_ref = 100 * np.mean(ref.predict(Xt).ravel() != yt)
    m = SWIMClassifier(hidden_layer_sizes=(1000,), solver="direct", rcond=1e-10,
                       random_state=0).fit(X, y)
    err = 100 * np.mean(m.predict(Xt) != yt)
    assert abs(err - err_ref) <= 0.3, (err, err_ref)


def test_default_store_in_memory_or_temporary_by_budget(tmp_path, sine_data):
    """store=None keeps A in memory when it fits a quarter of the budget, otherwise writes a
    temporary Zarr store (removed after fit; ``swimdist.placement="store"`` rules out
    regenerating it); both give the same model."""
    import dask

    X, y, _, _ = sine_data
    kw = dict(hidden_layer_sizes=(60,), random_state=0, solver="direct")
    in_mem = SWIMRegressor(**kw).fit(X, y)
    assert in_mem.fit_info_["store"] == "memory" and "blocks" not in in_mem.fit_info_
    root = tmp_path / "stores"
    with dask.config.set({"swimdist.memory-budget": "64KB", "swimdist.store-root": str(root),
                          "swimdist.placement": "store"}):
        on_disk = SWIMRegressor(**kw).fit(X, y)
    assert on_disk.fit_info_["store"] is None
    assert on_disk.fit_info_["blocks"]["written"] >= 1
    assert list(root.iterdir()) == []  # the temporary store is gone
    np.testing.assert_allclose(on_disk.coef_, in_mem.coef_, rtol=0, atol=1e-12)
    np.testing.assert_allclose(on_disk.intercept_, in_mem.intercept_, rtol=0, atol=1e-12)


def test_workers_dying_beyond_recovery_is_a_clear_error():
    # distributed gives up on a task after every worker that ran it died: say so, and why
    from types import SimpleNamespace

    from distributed import KilledWorker

    from swimdist._dask import worker_loss_error
    from swimdist.exceptions import SwimdistError, WorkerLostError

    exc = KilledWorker("('forward-3', 0)", SimpleNamespace(address="tcp://10.0.0.7:4000"), 3)
    err = worker_loss_error(exc, resent=0, attempts=3)
    assert isinstance(err, WorkerLostError) and isinstance(err, SwimdistError)
    msg = str(err)
    assert "every worker that ran one of its tasks died (4 of them" in msg
    assert "tcp://10.0.0.7:4000" in msg and "memory" in msg and "chunk_rows" in msg
    # anything else is not this error
    assert worker_loss_error(ValueError("bad input"), resent=0, attempts=3) is None


@pytest.mark.parametrize("make, match", [
    (lambda X, y: SWIMRegressor(random_state=-1).fit(X, y), "random_state must be None"),
    (lambda X, y: SWIMRegressor(random_state=1.7).fit(X, y), "random_state must be None"),
    (lambda X, y: SWIMRegressor(rcond=2).fit(X, y), "rcond must be below 1"),
    (lambda X, y: SWIMRegressor(solver="lsrn", solver_options={"max_iter": "a"}).fit(X, y),
     "max_iter must be an integer"),
    (lambda X, y: SWIMRegressor(hidden_layer_sizes=(20,)).fit(
        da.from_array(X, chunks=100)[da.from_array(X, chunks=100)[:, 0] > -10], y),
     "compute_chunk_sizes"),
])
def test_bad_parameters_and_inputs_get_swimdist_errors(make, match):
    X, y = sine(300, seed=0)
    with pytest.raises(SwimdistError, match=match):
        make(X, y)


def test_model_files_refuse_directories_and_other_numpy_files(tmp_path):
    X, y = sine(200, seed=0)
    m = SWIMRegressor(hidden_layer_sizes=(20,), random_state=0).fit(X, y)
    with pytest.raises(StoreError, match="is a directory"):
        m.save(str(tmp_path))
    np.save(tmp_path / "a.npy", np.ones(3))
    (tmp_path / "t.txt").write_text("hello")
    for name in ("a.npy", "t.txt"):
        with pytest.raises(StoreError, match="not an .npz archive"):
            load_model(str(tmp_path / name))


def test_split_with_fewer_neurons_than_its_default_blocks():
    X, y = sine(200, seed=0)
    m = SWIMRegressor(hidden_layer_sizes=(2,), solver="split", random_state=0).fit(X, y)
    assert m.fit_info_["n_splits"] == 2


class _Frame:
    """The part of a DataFrame the estimators read: ``columns`` and ``__array__``."""

    def __init__(self, values, columns):
        self.values, self.columns = np.asarray(values), list(columns)

    def __array__(self, dtype=None, copy=None):
        return self.values if dtype is None else self.values.astype(dtype)

    @property
    def shape(self):
        return self.values.shape


def test_feature_names_are_kept_checked_and_saved(tmp_path):
    """Fitted on named columns, a model refuses the same data with columns renamed or
    reordered (it would read them by position), keeps the names through save/load, and
    plain arrays still predict."""
    X, y = sine(200, seed=0)
    X3 = np.column_stack([X, X[:, 0] ** 2])
    m = SWIMRegressor(hidden_layer_sizes=(20,), random_state=0).fit(
        _Frame(X3, ["a", "b", "c"][:X3.shape[1]]), y)
    names = ["a", "b", "c"][:X3.shape[1]]
    np.testing.assert_array_equal(m.feature_names_in_, names)
    ref = m.predict(X3)
    np.testing.assert_array_equal(m.predict(_Frame(X3, names)), ref)
    with pytest.raises(ValidationError, match="feature names differ"):
        m.predict(_Frame(X3[:, ::-1], names[::-1]))
    loaded = load_model(m.save(str(tmp_path / "m.npz")))
    np.testing.assert_array_equal(loaded.feature_names_in_, names)
    with pytest.raises(ValidationError, match="feature names differ"):
        loaded.predict(_Frame(X3, ["x"] * len(names)))
    assert not hasattr(SWIMRegressor(hidden_layer_sizes=(20,)).fit(X3, y), "feature_names_in_")
