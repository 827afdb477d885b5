"""Checks for numpy and dask inputs; every message says what is wrong and how to fix it."""

from __future__ import annotations

import numbers

import dask.array as da
import numpy as np

from .exceptions import ChunkingError, DTypeError, ValidationError


def _describe(a) -> str:
    return f"shape {getattr(a, 'shape', None)}, dtype {getattr(a, 'dtype', None)}"


def check_X(X, *, name: str = "X", min_samples: int = 1, check_finite: bool = True):
    """Validate a 2-D numeric input; returns numpy float (float32 kept) or a dask array.

    Raises :class:`ValidationError` for None, wrong ndim, empty data, complex, non-numeric
    or NaN/inf values.
    """
    if X is None:
        raise ValidationError(f"{name} is None; pass a 2-D array of shape (n_samples, "
                              "n_features).")
    if hasattr(X, "tocsr") or type(X).__module__.startswith("scipy.sparse"):
        raise DTypeError(f"Sparse input is not supported for {name}: SWIM features are dense. "
                         "Pass a dense array (X.toarray()).")
    if not isinstance(X, da.Array):
        if hasattr(X, "__array__") or isinstance(X, list | tuple):
            try:
                X = np.asarray(X)
            except Exception as exc:  # noqa: BLE001 - ragged lists and the like
                raise ValidationError(f"{name} could not be turned into an array: {exc}") from None
        else:
            raise ValidationError(f"{name} must be an array, got {type(X).__name__}.")
    if isinstance(X, da.Array) and X.ndim >= 1 and any(np.isnan(c) for c in X.chunks[0]):
        raise ChunkingError(f"{name} is a dask array whose row chunks are unknown (the result "
                            "of boolean indexing or a filter); call X.compute_chunk_sizes() "
                            "first.")
    if X.ndim != 2:
        hint = (" Reshape your data with X.reshape(-1, 1) for a single feature or "
                "X.reshape(1, -1) for a single sample." if X.ndim == 1 else "")
        raise ValidationError(f"Expected 2D array for {name}, got {X.ndim}D array instead "
                              f"({_describe(X)}).{hint}")
    if X.shape[0] < min_samples:
        raise ValidationError(f"Found array with {X.shape[0]} sample(s) (shape={X.shape}) while "
                              f"a minimum of {min_samples} is required for {name}.")
    if X.shape[1] < 1:
        raise ValidationError(f"Found array with 0 feature(s) (shape={X.shape}) while a minimum "
                              f"of 1 is required for {name}.")
    dt = X.dtype
    if dt.kind == "c":
        raise ValidationError(f"Complex data not supported: {name} has dtype {dt}.")
    if dt.kind not in "biuf":
        if isinstance(X, da.Array):
            raise ValidationError(f"{name} has dtype {dt}; need a numeric dtype.")
        try:
            X = X.astype(np.float64)
        except TypeError as exc:
            raise DTypeError(f"{name} has dtype {dt} holding values that are not numbers: {exc}"
                             ) from None
        except ValueError as exc:
            raise ValidationError(f"{name} has dtype {dt} holding values that are not numbers: "
                                  f"{exc}") from None
    if dt.kind in "biu" or dt == np.float16:
        X = X.astype(np.float64)
    if check_finite:
        ok = da.isfinite(X).all().compute() if isinstance(X, da.Array) else np.isfinite(X).all()
        if not ok:
            raise ValidationError(f"Input {name} contains NaN or infinity; remove or impute "
                                  "those values first.")
    return X


def check_y(y, n_samples: int, *, name: str = "y", numeric: bool = True):
    """Validate targets: 1-D or 2-D, ``n_samples`` long, finite when numeric; returns numpy."""
    if y is None:
        raise ValidationError("This estimator requires y to be passed, but the target y is None.")
    if isinstance(y, da.Array):
        y = y.compute()
    try:
        y = np.asarray(y)
    except Exception as exc:  # noqa: BLE001
        raise ValidationError(f"{name} could not be turned into an array: {exc}") from None
    if y.ndim not in (1, 2):
        raise ValidationError(f"{name} must be 1-D or 2-D; got {y.ndim}-D ({_describe(y)}).")
    if y.shape[0] != n_samples:
        raise ValidationError(f"Found input variables with inconsistent numbers of samples: "
                              f"X has {n_samples} rows, {name} has {y.shape[0]}.")
    if numeric:
        if y.dtype.kind == "c":
            raise ValidationError(f"{name} has complex dtype {y.dtype}; not supported.")
        try:
            y = y.astype(np.float64)
        except (TypeError, ValueError):
            raise ValidationError(f"{name} has non-numeric values (dtype {y.dtype}); "
                                  "regression targets must be numbers.") from None
        if not np.isfinite(y).all():
            raise ValidationError(f"Input {name} contains NaN or infinity.")
    return y


def check_positive_int(value, name: str) -> int:
    """An integer >= 1, or a ValidationError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValidationError(f"{name} must be an integer >= 1; got {value!r}.")
    return int(value)


def check_nonnegative_int(value, name: str) -> int:
    """An integer >= 0, or a ValidationError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValidationError(f"{name} must be an integer >= 0; got {value!r}.")
    return int(value)


def check_hidden_layer_sizes(sizes) -> tuple[int, ...]:
    """``hidden_layer_sizes`` as a non-empty tuple of integers >= 1."""
    if isinstance(sizes, numbers.Integral) and not isinstance(sizes, bool):
        sizes = (sizes,)
    try:
        sizes = tuple(sizes)
    except TypeError:
        raise ValidationError(f"hidden_layer_sizes must be a sequence of integers, got "
                              f"{sizes!r}.") from None
    if not sizes:
        raise ValidationError("hidden_layer_sizes must name at least one layer, e.g. (1000,).")
    return tuple(check_positive_int(s, "hidden_layer_sizes (number of neurons M)") for s in sizes)


def check_nonnegative(value, name: str) -> float:
    """A finite float >= 0, or a ValidationError naming ``name``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValidationError(f"{name} must be a number >= 0; got {value!r}.") from None
    if not np.isfinite(v) or v < 0:
        raise ValidationError(f"{name} must be a finite number >= 0; got {value!r}.")
    return v


def feature_names(X) -> np.ndarray | None:
    """The column names of a DataFrame-like ``X`` when every one is a string (scikit-learn's
    rule for ``feature_names_in_``), as an object array; None otherwise."""
    cols = getattr(X, "columns", None)
    if cols is None or isinstance(X, da.Array):
        return None
    names = list(cols)
    if not names or not all(isinstance(c, str) for c in names):
        return None
    return np.asarray(names, dtype=object)


def check_feature_names(est, X) -> None:
    """Refuse ``X`` whose column names differ from those ``est`` was fitted with (a
    DataFrame with columns renamed or reordered would otherwise be read by position)."""
    fitted = getattr(est, "feature_names_in_", None)
    names = feature_names(X)
    if fitted is None or names is None:
        return
    if len(names) != len(fitted) or not np.array_equal(names, fitted):
        diff = [f"{a!r} (fit) vs {b!r}" for a, b in zip(fitted, names, strict=False) if a != b]
        raise ValidationError(
            f"The feature names differ from those seen in fit ({len(fitted)} columns; first "
            f"differences: {', '.join(diff[:3]) or 'the column count'}); pass the columns "
            "in the order of fit.")
