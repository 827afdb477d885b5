"""Model files: arrays and JSON metadata in one .npz, written atomically, read without pickle.

A model file holds the estimator's arrays (``W<i>``, ``b<i>``, ``coef``, ``intercept``,
``classes`` ...) and, as the uint8 array ``__meta__``, JSON metadata: ``format``
(``MODEL_FORMAT``), ``version`` (``MODEL_VERSION``), the estimator's name and parameters.
"""

from __future__ import annotations

import io
import json

import numpy as np

from ._io import is_url, local_path, write_atomic
from .activations import get_activation
from .exceptions import StoreError, ValidationError

__all__ = ["MODEL_FORMAT", "MODEL_VERSION", "check_model_file", "load_arrays", "save_arrays"]

MODEL_FORMAT = "swimdist.model"
MODEL_VERSION = 1


def save_arrays(path: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write arrays and JSON metadata as one .npz file, atomically (never half-written).

    Parameters
    ----------
    path : str
        Local path or fsspec URL (see :func:`swimdist._io.write_atomic`).
    arrays : dict of str to numpy.ndarray
        Plain numeric or string arrays (object arrays are refused: they would need pickle).
    meta : dict
        JSON-serialisable metadata.
    """
    payload = dict(arrays)
    for k, v in payload.items():
        if np.asarray(v).dtype == object:
            raise ValidationError(f"Model array {k!r} has dtype object; models hold plain "
                                  "numeric or string arrays only.")
    payload["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    write_atomic(str(path), lambda f: np.savez(f, **payload))


def load_arrays(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """Read a file written by :func:`save_arrays`; never unpickles anything.

    Parameters
    ----------
    path : str
        Local path or fsspec URL.

    Returns
    -------
    arrays : dict of str to numpy.ndarray
    meta : dict

    Raises
    ------
    StoreError
        No file, not a swimdist model file, or one of a newer format version.
    """
    try:
        if is_url(path):
            import fsspec

            with fsspec.open(path, "rb") as f:
                data = f.read()
            npz = np.load(io.BytesIO(data), allow_pickle=False)
        else:
            npz = np.load(local_path(path), allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):  # a .npy file, or a pickle numpy
            raise StoreError(f"{path!r} is not a swimdist model file (not an .npz archive).")
        with npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise StoreError(f"No model file at {path!r}.") from None
    except StoreError:
        raise
    except Exception as exc:  # noqa: BLE001 - numpy/zipfile raise many types on bad files
        # numpy's own message about unknown content suggests allow_pickle: not for a model
        why = "not an .npz archive" if "pickle" in str(exc) else str(exc)
        raise StoreError(f"{path!r} is not a readable swimdist model file ({why}).") from None
    try:
        meta = json.loads(arrays.pop("__meta__").tobytes().decode())
    except Exception:  # noqa: BLE001
        raise StoreError(f"{path!r} is not a swimdist model file (no metadata).") from None
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        raise StoreError(f"{path!r} is not a swimdist model file.")
    if isinstance(meta.get("version"), bool) or not isinstance(meta.get("version"), int):
        raise StoreError(f"Model {path!r} has no valid format version ({meta.get('version')!r}).")
    if meta["version"] > MODEL_VERSION:
        raise StoreError(f"Model {path!r} has format version {meta.get('version')}, newer than "
                         f"this swimdist understands ({MODEL_VERSION}); upgrade swimdist.")
    return arrays, meta


def check_model_file(path: str, arrays: dict, meta: dict) -> None:
    """Refuse a model file whose metadata or arrays do not fit together, naming what is wrong
    (a damaged or hand-edited file must not fail later, deep inside ``predict``).

    Parameters
    ----------
    path : str
        The file (for messages).
    arrays, meta : dict
        What :func:`load_arrays` read from it.

    Raises
    ------
    StoreError
        Something is missing, of the wrong type or shape, or not finite.
    """

    def bad(what: str) -> StoreError:
        return StoreError(f"Model file {path!r} is damaged or inconsistent: {what}.")

    def integer(key: str, low: int) -> int:
        v = meta.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise bad(f"{key!r} must be an integer >= {low}, not {v!r}")
        return v

    if not isinstance(meta.get("estimator"), str):
        raise bad(f"'estimator' must be a name, not {meta.get('estimator')!r}")
    params = meta.get("params")
    if not isinstance(params, dict) or not isinstance(params.get("hidden_layer_sizes"), list):
        raise bad("'params' must be a mapping with 'hidden_layer_sizes'")
    if not isinstance(meta.get("fit_info", {}), dict):
        raise bad("'fit_info' must be a mapping")
    acts = meta.get("activations")
    if not isinstance(acts, list) or not acts or not all(isinstance(a, str) for a in acts):
        raise bad(f"'activations' must be a non-empty list of names, not {acts!r}")
    for a in acts:
        try:
            get_activation(a)
        except ValidationError as exc:
            raise bad(str(exc).rstrip(".")) from None
    width = integer("n_features_in", 1)
    integer("seed", 0)
    if meta.get("y_ndim", 1) not in (1, 2):
        raise bad(f"'y_ndim' must be 1 or 2, not {meta.get('y_ndim')!r}")
    for i in range(len(acts)):
        W, b = arrays.get(f"W{i}"), arrays.get(f"b{i}")
        if W is None or b is None:
            raise bad(f"layer {i} has no array {'W' if W is None else 'b'}{i}")
        if W.dtype.kind != "f" or b.dtype.kind != "f" or W.ndim != 2 or W.shape[0] != width \
                or b.shape != (W.shape[1],) or not (np.isfinite(W).all() and np.isfinite(b).all()):
            raise bad(f"layer {i} has weights {W.dtype}{W.shape} and biases {b.dtype}{b.shape}; "
                      f"expected finite floats of shapes ({width}, M) and (M,)")
        width = W.shape[1]
    coef, intercept = arrays.get("coef"), arrays.get("intercept")
    if coef is None or intercept is None:
        raise bad(f"it has no array {'coef' if coef is None else 'intercept'}")
    K = coef.shape[1] if coef.ndim == 2 else 1
    if coef.dtype.kind != "f" or intercept.dtype.kind != "f" or coef.ndim not in (1, 2) \
            or coef.shape[0] != width or intercept.shape != (K,) \
            or not (np.isfinite(coef).all() and np.isfinite(intercept).all()):
        raise bad(f"output weights {coef.dtype}{coef.shape} and intercept {intercept.dtype}"
                  f"{intercept.shape} do not match the last layer's {width} neurons")
    if meta["estimator"] == "SWIMClassifier":
        classes = arrays.get("classes")
        if classes is None or classes.ndim != 1 or len(classes) < 2 \
                or K != (1 if len(classes) == 2 else len(classes)):
            raise bad(f"a classifier needs 1-D 'classes' matching its {K} output(s); got "
                      f"{None if classes is None else classes.shape}")
