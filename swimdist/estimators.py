"""SWIMRegressor and SWIMClassifier, in scikit-learn's conventions without importing it.

``fit`` runs the three stages of a sampled network on whatever Dask scheduler is active
(a ``distributed.Client`` if one exists, else dask's threaded scheduler):

1. sample the hidden layers from data pairs (:mod:`swimdist.sampling`);
2. build the features ``A = [sigma(Phi(X) W + b), 1]`` block by block on the workers: kept
   in memory, written to a Zarr store, or generated again from ``X`` for every pass of the
   solver, whichever the measured rates predict cheaper (:mod:`swimdist.design`,
   :mod:`swimdist.features`, :mod:`swimdist.store`);
3. solve ``min ||A C - Y||`` with the chosen solver (:func:`swimdist.solve`).
"""

from __future__ import annotations

import inspect
import logging
import numbers
import time
import warnings

import dask.array as da
import numpy as np

from . import config, progress
from ._dask import broadcast, lost_client_data, worker_loss_error
from .activations import get_activation
from .design import build_design
from .exceptions import DataConversionWarning, NotFittedError, ValidationError
from .features import forward
from .inputs import file_backed
from .lstsq import check_options, get_solver, solve, solver_options
from .lstsq.costs import solver_passes
from .models import MODEL_FORMAT, MODEL_VERSION, check_model_file, load_arrays, save_arrays
from .sampling import SAMPLERS, Layer, merge_duplicates, sample_layers
from .validation import (
    check_feature_names,
    check_hidden_layer_sizes,
    check_nonnegative,
    check_positive_int,
    check_X,
    check_y,
    feature_names,
)

logger = logging.getLogger("swimdist.estimators")

FEATURE_DTYPES = ("float64", "float32")


def _forward_numpy(X: np.ndarray, layers: list[Layer], coef, intercept, rows: int = 8192):
    """Output-layer values of in-memory ``X``, ``rows`` at a time (the one forward pass,
    :func:`swimdist.features.forward`)."""
    out = np.empty((X.shape[0], coef.shape[1]))
    if X.shape[0] <= rows:  # one piece: nothing to watch
        out[:] = forward(X, layers) @ coef + intercept
        return out
    with progress.stage("predict", total=X.shape[0], unit="rows") as st:
        for r in range(0, X.shape[0], rows):
            out[r:r + rows] = forward(X[r:r + rows], layers) @ coef + intercept
            st.update(min(rows, X.shape[0] - r))
    return out


def _passes(solver: str, options: dict, n: int) -> int | None:
    """Passes over ``A`` the solver makes (:func:`~swimdist.lstsq.costs.solver_passes`), or
    None when it needs ``A`` stored: also ``auto`` where the normal equations' reductions
    would not fit, so that it may stream row panels from a store (``normal-tiled``)."""
    passes = solver_passes(solver, options)
    if solver == "auto":
        from ._dask import available_memory, client_memory, worker_memory
        from .lstsq.auto import gram_partials_bytes

        _, limit, _ = worker_memory()
        room = client_memory() or available_memory()
        if limit:
            room = min(room, 0.5 * limit)
        if gram_partials_bytes(n) > room:
            return None
    return passes


class _SWIMBase:
    """Shared parameters, fitting stages and persistence of the SWIM estimators."""

    _task = "regression"

    def __init__(self, *, hidden_layer_sizes=(100,), activation="tanh", sampler="swim",
                 solver="auto", rcond=1e-10, alpha=0.0, random_state=None, chunk_rows=None,
                 store=None, feature_dtype="float64", replace=True, merge_duplicates="auto",
                 solver_options=None, verbose=0, progress_callback=None):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.sampler = sampler
        self.solver = solver
        self.rcond = rcond
        self.alpha = alpha
        self.random_state = random_state
        self.chunk_rows = chunk_rows
        self.store = store
        self.feature_dtype = feature_dtype
        self.replace = replace
        self.merge_duplicates = merge_duplicates
        self.solver_options = solver_options
        self.verbose = verbose
        self.progress_callback = progress_callback

    # ------------------------------------------------------------------ sklearn protocol
    @classmethod
    def _get_param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return sorted(p.name for p in sig.parameters.values() if p.kind == p.KEYWORD_ONLY)

    def get_params(self, deep: bool = True) -> dict:
        """Constructor parameters, as scikit-learn's ``get_params``."""
        return {k: getattr(self, k) for k in self._get_param_names()}

    def set_params(self, **params):
        """Set constructor parameters, as scikit-learn's ``set_params``."""
        valid = self._get_param_names()
        for k, v in params.items():
            if k not in valid:
                raise ValidationError(f"Invalid parameter {k!r} for {type(self).__name__}; "
                                      f"valid parameters are: {', '.join(valid)}.")
            setattr(self, k, v)
        return self

    def __repr__(self) -> str:
        defaults = {p.name: p.default for p in inspect.signature(type(self).__init__)
                    .parameters.values() if p.kind == p.KEYWORD_ONLY}
        changed = []
        for k, v in self.get_params().items():
            d = defaults[k]
            if isinstance(v, np.ndarray) or isinstance(d, np.ndarray) or v != d:
                changed.append(f"{k}={v!r}")
        return f"{type(self).__name__}({', '.join(changed)})"

    def __sklearn_tags__(self):
        # Only scikit-learn calls this hook, so scikit-learn is importable whenever it runs;
        # swimdist itself never imports it.
        from sklearn.utils import ClassifierTags, RegressorTags, Tags, TargetTags

        clf = self._task == "classification"
        return Tags(
            estimator_type="classifier" if clf else "regressor",
            target_tags=TargetTags(required=True, multi_output=not clf,
                                   single_output=True),
            transformer_tags=None,
            regressor_tags=None if clf else RegressorTags(),
            classifier_tags=ClassifierTags(multi_class=True) if clf else None,
        )

    # ------------------------------------------------------------------ fitting
    def _check_params(self) -> dict:
        sizes = check_hidden_layer_sizes(self.hidden_layer_sizes)
        get_activation(self.activation)
        if self.sampler not in SAMPLERS:
            raise ValidationError(f"Unknown sampler {self.sampler!r}; valid samplers are: "
                                  f"{', '.join(SAMPLERS)}.")
        get_solver(self.solver)
        if self.feature_dtype not in FEATURE_DTYPES:
            raise ValidationError(f"feature_dtype must be one of {FEATURE_DTYPES}; got "
                                  f"{self.feature_dtype!r}.")
        if self.chunk_rows is not None:
            check_positive_int(self.chunk_rows, "chunk_rows")
        if self.merge_duplicates not in ("auto", True, False):
            raise ValidationError(f"merge_duplicates must be 'auto', True or False; got "
                                  f"{self.merge_duplicates!r}.")
        opts = self.solver_options or {}
        if not isinstance(opts, dict):
            raise ValidationError(f"solver_options must be a dict; got {type(opts).__name__}.")
        check_options(self.solver, opts)
        if not isinstance(self.verbose, int | np.integer) or self.verbose < 0:
            raise ValidationError(f"verbose must be an integer >= 0; got {self.verbose!r}.")
        if self.progress_callback is not None and not callable(self.progress_callback):
            raise ValidationError(f"progress_callback must be callable or None; got "
                                  f"{type(self.progress_callback).__name__}.")
        if self.random_state is None:
            seed = int(np.random.SeedSequence().generate_state(1)[0])
        elif isinstance(self.random_state, np.random.RandomState):
            seed = int(self.random_state.randint(0, 2**31 - 1))
        elif isinstance(self.random_state, np.random.Generator):
            seed = int(self.random_state.integers(0, 2**31 - 1))
        else:
            rs = self.random_state
            if isinstance(rs, bool) or not isinstance(rs, numbers.Integral) or rs < 0:
                raise ValidationError(f"random_state must be None, an integer >= 0 or a numpy "
                                      f"generator; got {rs!r}.")
            seed = int(rs)
        rcond = check_nonnegative(self.rcond, "rcond")
        if rcond >= 1:
            raise ValidationError(f"rcond must be below 1 (singular values below rcond * "
                                  f"sigma_max count as zero); got {self.rcond!r}.")
        return {"sizes": sizes, "rcond": rcond,
                "alpha": check_nonnegative(self.alpha, "alpha"), "seed": seed,
                "options": ({"seed": seed} if "seed" in solver_options(self.solver) else {})
                | dict(opts)}

    def _targets(self, y, n: int):
        """(Y for the solver (N, K), labels/targets for sampling (N, K'))."""
        raise NotImplementedError

    def fit(self, X, y):
        """Sample the hidden layers, build the features on the workers, solve the output layer.

        Parameters
        ----------
        X : array_like or dask array, shape (N, d)
        y : array_like, shape (N,) or (N, K)

        Returns
        -------
        self
        """
        p = self._check_params()
        with self._progress():
            return self._fit(X, y, p)

    def _progress(self):
        """The progress sinks this estimator asked for (:mod:`swimdist.progress`)."""
        return progress.report(int(getattr(self, "verbose", 0)),
                               getattr(self, "progress_callback", None))

    def _fit(self, X, y, p: dict):
        t0 = time.perf_counter()
        # A memory-mapped .npy file is read by the workers, a row block each, like Zarr
        # and HDF5 inputs: the client never pages it in.
        mapped = file_backed(X)
        names = feature_names(X)
        X = check_X(X if mapped is None else mapped, min_samples=2)
        Y, Ysample = self._targets(y, X.shape[0])
        self.n_features_in_ = X.shape[1]
        if names is not None:
            self.feature_names_in_ = names
        elif hasattr(self, "feature_names_in_"):
            del self.feature_names_in_
        self.seed_ = p["seed"]

        layers = sample_layers(
            X, Ysample, p["sizes"], activation=self.activation, sampler=self.sampler,
            classification=self._task == "classification", seed=p["seed"],
            replace=self.replace,
        )
        merge = self.merge_duplicates if self.merge_duplicates != "auto" else self.replace
        solve_layers, merged = layers, None
        if merge:
            last, merged = merge_duplicates(layers[-1])
            if merged.merged:
                solve_layers = [*layers[:-1], last]
                logger.info("fit: %d identical neurons merged into %d columns", merged.merged,
                            last.width)
            else:
                merged = None
        t1 = time.perf_counter()
        resent = 0
        while True:
            try:
                with build_design(X, solve_layers, store=self.store, dtype=self.feature_dtype,
                                  chunk_rows=self.chunk_rows, lazy=self.solver == "split",
                                  passes=_passes(self.solver, p["options"],
                                                 solve_layers[-1].width + 1)) as A:
                    t2 = time.perf_counter()
                    res = solve(A, Y, method=self.solver, rcond=p["rcond"], alpha=p["alpha"],
                                **p["options"])
                    A.solved()
                break
            except Exception as exc:
                # A worker died with the only copy of data sent from here (X's blocks, the
                # layers, Y): send it again and redo what depended on it. Every block is a
                # function of its seed, a store's verified blocks and a solve checkpoint
                # are reused, so the model is the undisturbed one.
                # re-sends used up (or a task every worker died under): a clear error
                lost = worker_loss_error(exc, resent, int(config.get("resend-attempts")))
                if lost is not None:
                    raise lost from exc
                if not lost_client_data(exc):
                    raise
                resent += 1
                logger.warning("fit: a worker was lost with data sent from the client (%s); "
                               "sending it again (%d of at most %d)", exc, resent,
                               config.get("resend-attempts"))
        persistent = self.store not in (None, "memory")
        info = {"store": str(self.store) if persistent else
                ("memory" if A.placement == "memory" else None), "placement": A.placement,
                "placement_reason": A.placement_reason, "resent": resent}
        if A.placement_costs:
            info["placement_seconds"] = {k: A.placement_costs[k]
                                         for k in ("store", "regenerate")}
        if A.build_info:
            info["blocks"] = A.build_info
        M = layers[-1].width
        t3 = time.perf_counter()
        sol = np.asarray(res.solution, dtype=np.float64)
        self.layers_ = layers
        self.coef_ = sol[:-1] if merged is None else merged.expand(sol[:-1])
        self.intercept_ = sol[-1]
        self.solve_result_ = res
        # identical neurons merged here, constant or zero columns by solve (in-memory A)
        info["merged_columns"] = ((0 if merged is None else merged.merged)
                                  + int(res.info.get("merged_columns", 0)))
        if "neuron_order" in res.info:  # split-and-solve: the solution is in column order
            order = np.asarray(res.info["neuron_order"])
            if merged is not None:  # merged columns -> the original neurons, in that order
                position = np.empty_like(order)
                position[order] = np.arange(order.size)
                order = np.argsort(position[merged.inverse], kind="stable")
            self.neuron_order_ = order
        elif hasattr(self, "neuron_order_"):
            del self.neuron_order_
        self.timings_ = {"sample": t1 - t0, "features": t2 - t1, "solve": t3 - t2,
                         "total": t3 - t0}
        self.fit_info_ = {**info, "solver": res.method, "rank": res.rank,
                          "relative_residual": res.relative_residual,
                          "iterations": res.iterations, **res.info}
        if "neuron_order" in self.fit_info_:
            self.fit_info_["neuron_order"] = self.neuron_order_
        logger.info("fit %s: M=%d, solver %s, rank %s, relative residual %.3e, %.2fs",
                    type(self).__name__, M, res.method, res.rank, res.relative_residual,
                    t3 - t0)
        return self

    # ------------------------------------------------------------------ prediction
    def _check_fitted(self):
        if not hasattr(self, "coef_"):
            raise NotFittedError(f"This {type(self).__name__} instance is not fitted yet. Call "
                                 "'fit' with appropriate arguments before using this estimator.")

    def _raw_output(self, X):
        """Output-layer values (N, K): numpy for numpy input, lazy dask for dask input."""
        self._check_fitted()
        check_feature_names(self, X)
        X = check_X(X, check_finite=not isinstance(X, da.Array))
        if X.shape[1] != self.n_features_in_:
            raise ValidationError(f"X has {X.shape[1]} features, but {type(self).__name__} is "
                                  f"expecting {self.n_features_in_} features as input.")
        coef = self.coef_.reshape(self.coef_.shape[0], -1)
        intercept = np.atleast_1d(self.intercept_)
        if isinstance(X, da.Array):
            if len(X.chunks[1]) != 1:
                X = X.rechunk({1: -1})
            # sent to the workers once, not embedded in the graph (wide layers are tens of
            # MB: distributed warns about such graphs)
            params = broadcast((self.layers_, coef, intercept))

            def block(x, prm):
                return _forward_numpy(x, *prm)

            return X.map_blocks(block, params, chunks=(X.chunks[0], (coef.shape[1],)),
                                dtype=np.float64, meta=np.empty((0, 0)))
        with self._progress():
            return _forward_numpy(X, self.layers_, coef, intercept)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str) -> str:
        """Write the fitted model to ``path`` (one .npz file of arrays + JSON), atomically."""
        self._check_fitted()
        arrays = {"coef": self.coef_, "intercept": np.atleast_1d(self.intercept_)}
        if hasattr(self, "neuron_order_"):
            arrays["neuron_order"] = self.neuron_order_
        for i, layer in enumerate(self.layers_):
            arrays[f"W{i}"] = layer.weights
            arrays[f"b{i}"] = layer.biases
        if hasattr(self, "feature_names_in_"):
            arrays["feature_names_in"] = np.asarray(self.feature_names_in_, dtype=str)
        if hasattr(self, "classes_"):
            classes = np.asarray(self.classes_)
            if classes.dtype == object:
                classes = classes.astype(str)
            arrays["classes"] = classes
        params = self.get_params()
        params["hidden_layer_sizes"] = list(check_hidden_layer_sizes(params["hidden_layer_sizes"]))
        if params["random_state"] is not None and not isinstance(params["random_state"], int):
            params["random_state"] = self.seed_
        params["progress_callback"] = None  # a function: not part of the model's data
        meta = {
            "format": MODEL_FORMAT, "version": MODEL_VERSION,
            "estimator": type(self).__name__, "params": params,
            "activations": [layer.activation for layer in self.layers_],
            "n_features_in": int(self.n_features_in_), "seed": int(self.seed_),
            "y_ndim": int(getattr(self, "_y_ndim", 1)),
            "fit_info": {k: v for k, v in self.fit_info_.items()
                         if isinstance(v, str | int | float | bool | type(None))},
        }
        save_arrays(str(path), arrays, meta)
        return str(path)


class SWIMRegressor(_SWIMBase):
    """A sampled (SWIM) fully connected network for regression.

    Parameters
    ----------
    hidden_layer_sizes : tuple of int, default (100,)
        Neurons per hidden layer.
    activation : {"tanh", "relu"}
    sampler : {"swim", "uniform", "random"}
        "swim" draws pairs with probability proportional to |dy|/|dx|; "uniform" draws
        pairs uniformly; "random" draws Gaussian weights and uniform biases (ELM baseline).
    solver : str
        A key of :data:`swimdist.lstsq.SOLVERS` ("auto" chooses).
    rcond : float
        Relative singular-value cutoff of the output-layer least-squares solve.
    alpha : float
        Tikhonov damping of the output layer (0: none).
    random_state : int or None
    chunk_rows : int or None
        Rows per feature block (default from ``swimdist.chunk-rows`` and the block budget).
    store : None, "memory", or a path / fsspec URL
        Where the feature matrix lives. None: in memory (the workers' memory on a cluster)
        when it takes at most a quarter of the memory budget (``swimdist.memory-budget``,
        else the workers' limits, else the available memory); otherwise either generated
        again from ``X`` on the workers for every pass of the solver (nothing stored: the
        normal equations then need one pass over ``X``) or written to a temporary local
        Zarr store deleted after ``fit``, whichever the machine's measured compute and disk
        rates predict cheaper for this ``d``, ``M`` and solver (``fit_info_["placement"]``,
        ``["placement_reason"]``, ``["placement_seconds"]``; logged on ``swimdist``).
        "memory": always in memory. A path or URL keeps a resumable store there (see
        :mod:`swimdist.store`).
    feature_dtype : {"float64", "float32"}
    replace : bool
        Draw neuron pairs with replacement (the reference) or distinct pairs.
    merge_duplicates : {"auto", True, False}
        Solve with one column per set of identical neurons, scaled by ``sqrt(m)`` for ``m``
        copies, and split its weight back as ``z / sqrt(m)``: exactly the minimum-norm
        model over all the neurons (the same singular values, so the same ``rcond``
        cutoff), with fewer columns for every solver (:func:`swimdist.sampling.
        merge_duplicates`). "auto": when ``replace`` is True (wide layers drawn with
        replacement repeat neurons). ``fit_info_["merged_columns"]`` counts the merged.
    solver_options : dict or None
        Extra keyword arguments for the solver (e.g. ``{"tol": 1e-10}``).
    verbose : int, default 0
        0: silent. >= 1: the progress of each long stage (sampling, feature blocks, Gram
        panels, iterations with their residual, prediction of large inputs) as a bar per
        stage on a terminal, or as lines on the ``swimdist.progress`` logger elsewhere
        (:mod:`swimdist.progress`; ``swimdist.progress`` in the settings does the same for
        every fit).
    progress_callback : callable or None
        Called with every :class:`swimdist.progress.Event` (stage, done, total, rate, eta,
        residual, target) during ``fit`` and ``predict``, whatever ``verbose`` says.
    """

    _task = "regression"

    def _targets(self, y, n):
        y = check_y(y, n)
        self._y_ndim = y.ndim
        Y = y.reshape(n, -1)
        return Y, Y

    def predict(self, X):
        """Predicted targets, shape (N,) or (N, K); lazy for dask input."""
        out = self._raw_output(X)
        return out[:, 0] if getattr(self, "_y_ndim", 1) == 1 else out

    def score(self, X, y) -> float:
        """Coefficient of determination R^2 of the prediction."""
        pred = np.asarray(self.predict(X))
        y = check_y(y, pred.shape[0]).reshape(pred.shape)
        ss_res = np.sum((y - pred) ** 2, axis=0)
        ss_tot = np.sum((y - y.mean(axis=0)) ** 2, axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            r2 = np.where(ss_tot > 0, 1 - ss_res / ss_tot, np.where(ss_res == 0, 1.0, 0.0))
        return float(np.mean(r2))


class SWIMClassifier(_SWIMBase):
    """A sampled (SWIM) fully connected network for classification.

    Same parameters as :class:`SWIMRegressor`. Two classes are fitted with one output of
    targets -1/+1 (like ``RidgeClassifier``); more classes with one-hot targets. Pairs are
    sampled with "gradient" 1 where their labels differ.
    """

    _task = "classification"

    def _targets(self, y, n):
        y = check_y(y, n, numeric=False)
        if y.ndim == 2:
            if y.shape[1] != 1:
                raise ValidationError(f"SWIMClassifier takes 1-D class labels; got y of shape "
                                      f"{y.shape}.")
            warnings.warn("A column-vector y was passed when a 1d array was expected; it was "
                          "raveled to shape (n_samples,).", DataConversionWarning, stacklevel=3)
            y = y[:, 0]
        if y.dtype.kind == "f" and np.isfinite(y).all() and np.any(y != np.round(y)):
            raise ValidationError("Unknown label type: 'continuous'. SWIMClassifier needs class "
                                  "labels; use SWIMRegressor for continuous targets.")
        if y.dtype.kind == "f" and not np.isfinite(y).all():
            raise ValidationError("Input y contains NaN or infinity.")
        if y.dtype.kind == "c":
            raise ValidationError(f"y has complex dtype {y.dtype}; class labels must be "
                                  "numbers or strings.")
        try:
            classes, idx = np.unique(y, return_inverse=True)
        except TypeError:
            raise ValidationError("y mixes label types that cannot be ordered (e.g. str and "
                                  "int); use one type.") from None
        if len(classes) < 2:
            raise ValidationError(f"SWIMClassifier needs samples of at least 2 classes; only "
                                  f"one class ({classes[0]!r}) is present.")
        self.classes_ = classes
        K = len(classes)
        if K == 2:
            Y = (2.0 * idx - 1.0)[:, None]
        else:
            Y = np.zeros((n, K))
            Y[np.arange(n), idx] = 1.0
        return Y, idx[:, None]

    def decision_function(self, X):
        """Class scores: shape (N,) for two classes (positive: ``classes_[1]``), else (N, K)."""
        out = self._raw_output(X)
        return out[:, 0] if len(self.classes_) == 2 else out

    def predict(self, X):
        """Predicted class labels; lazy for dask input."""
        scores = self.decision_function(X)
        if len(self.classes_) == 2:
            idx = (scores > 0).astype(np.intp)
        else:
            idx = scores.argmax(axis=1)
        if isinstance(idx, da.Array):
            return idx.map_blocks(lambda i: self.classes_[i], dtype=self.classes_.dtype)
        return self.classes_[idx]

    def score(self, X, y) -> float:
        """Mean accuracy."""
        pred = np.asarray(self.predict(X))
        y = check_y(y, pred.shape[0], numeric=False).reshape(pred.shape)
        return float(np.mean(pred == y))


ESTIMATORS = {"SWIMRegressor": SWIMRegressor, "SWIMClassifier": SWIMClassifier}


def load_model(path: str):
    """Load a model saved by ``save``; data only (arrays + JSON), nothing is unpickled."""
    arrays, meta = load_arrays(str(path))
    check_model_file(str(path), arrays, meta)
    cls = ESTIMATORS.get(meta.get("estimator"))
    if cls is None:
        from .exceptions import StoreError

        raise StoreError(f"{path!r} holds an unknown estimator {meta.get('estimator')!r}.")
    params = dict(meta["params"])
    params["hidden_layer_sizes"] = tuple(params["hidden_layer_sizes"])
    valid = set(cls._get_param_names())
    est = cls(**{k: v for k, v in params.items() if k in valid})
    try:
        n_layers = len(meta["activations"])
        est.layers_ = [Layer(arrays[f"W{i}"], arrays[f"b{i}"], meta["activations"][i])
                       for i in range(n_layers)]
        est.coef_ = arrays["coef"]
        est.intercept_ = arrays["intercept"]
        if "classes" in arrays:
            est.classes_ = arrays["classes"]
        if "feature_names_in" in arrays:
            est.feature_names_in_ = arrays["feature_names_in"].astype(object)
    except KeyError as exc:
        from .exceptions import StoreError

        raise StoreError(f"Model file {path!r} is incomplete: missing array {exc}.") from None
    est.n_features_in_ = int(meta["n_features_in"])
    est.seed_ = int(meta["seed"])
    est._y_ndim = int(meta.get("y_ndim", 1))
    est.fit_info_ = dict(meta.get("fit_info", {}))
    if "neuron_order" in arrays:
        est.neuron_order_ = arrays["neuron_order"]
        est.fit_info_["neuron_order"] = est.neuron_order_
    return est

