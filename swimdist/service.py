"""A training job: spec -> validate -> fit on a Client -> artifacts + status.

A job spec is a YAML mapping (see ``DEFAULT_SPEC``); values come, in increasing priority,
from the defaults, the spec file, ``DASK_SWIMDIST__JOB__<SECTION>__<KEY>`` environment
variables (dask.config key ``swimdist.job``) and explicit overrides (command-line flags).
While the job runs it keeps ``<output>/status.json`` up to date (phase, progress, metrics,
error); the model goes to ``<output>/model.npz`` and the metrics to ``metrics.json``.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import logging
import os
import re
import time
from collections.abc import Callable
from typing import Any

import dask.config
import numpy as np
import yaml

from . import config, datasets
from ._io import is_url, write_text_atomic
from .exceptions import JobSpecError, SchedulerError, SwimdistError, ValidationError
from .inputs import holds_one_array, load_array

logger = logging.getLogger("swimdist.service")


class _SpecLoader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats without a dot, such as ``1e-08``.

    PyYAML follows YAML 1.1, where ``1e-08`` is a string; Helm's ``toYaml`` (the chart's
    job-spec ConfigMap) and many editors write small floats exactly that way.
    """


_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)

DEFAULT_SPEC: dict[str, Any] = {
    "version": 1,
    "data": {
        "dataset": "sine",  # sine | mnist | file
        "n_train": 5000,  # sine
        "n_test": 1000,  # sine
        "sine_alpha": 1.0,  # sine: f(x, y) = sin(sine_alpha (x + y))
        "data_dir": None,  # mnist
        "download": False,  # mnist: download missing files (sha256-checked)
        "path": None,  # file: .npy/.npz/.h5/.zarr (training data)
        "x_key": "X",
        "y_key": "y",
        "test_path": None,  # file: optional held-out data (same keys)
        "task": None,  # file: regression | classification
    },
    "model": {
        "hidden_layer_sizes": [1000],
        "activation": "tanh",
        "sampler": "swim",
        "solver": "auto",
        "rcond": 1e-10,
        "alpha": 0.0,
        "random_state": 0,
        "chunk_rows": None,
        "feature_dtype": "float64",
        "replace": True,
        "solver_options": {},
    },
    # model selection: widths of the last hidden layer and alphas to choose from (either set:
    # one pass fits the whole path, writes selection.json and selection.png)
    "select": {
        "widths": None,  # list or "start:stop:step" (stop included); the widest is the layer
        "alphas": None,  # list or "0,1e-6,1e-4"; default [model.alpha]
        "validation_fraction": 0.1,  # rows held out to choose (cv: null)
        "cv": None,  # folds of k-fold cross-validation instead
    },
    "store": None,
    "store_format": "zarr",  # zarr | npy (memory-mapped, local directories only)
    "output": "swimdist-output",
    "cluster": {
        "scheduler": None,
        "n_workers": None,
        "threads_per_worker": None,
        "memory_limit": None,
        "tls_ca_file": None,  # TLS (tls:// addresses): CA, client certificate and key
        "tls_cert": None,
        "tls_key": None,
    },
}

_TYPES: dict[str, tuple] = {
    "version": (int,),
    "data.dataset": (str,), "data.n_train": (int,), "data.n_test": (int,),
    "data.sine_alpha": (int, float), "data.data_dir": (str, type(None)),
    "data.download": (bool,), "data.path": (str, type(None)), "data.x_key": (str,),
    "data.y_key": (str,), "data.test_path": (str, type(None)), "data.task": (str, type(None)),
    "model.hidden_layer_sizes": (list, int), "model.activation": (str,), "model.sampler": (str,),
    "model.solver": (str,), "model.rcond": (int, float), "model.alpha": (int, float),
    "model.random_state": (int, type(None)), "model.chunk_rows": (int, type(None)),
    "model.feature_dtype": (str,), "model.replace": (bool,), "model.solver_options": (dict,),
    "select.widths": (list, str, int, type(None)),
    "select.alphas": (list, str, int, float, type(None)),
    "select.validation_fraction": (int, float), "select.cv": (int, type(None)),
    "store": (str, type(None)), "store_format": (str,), "output": (str,),
    "cluster.tls_ca_file": (str, type(None)), "cluster.tls_cert": (str, type(None)),
    "cluster.tls_key": (str, type(None)),
    "cluster.scheduler": (str, type(None)), "cluster.n_workers": (int, type(None)),
    "cluster.threads_per_worker": (int, type(None)), "cluster.memory_limit": (str, int, type(None)),
}


def _merge(base: dict, over: dict, prefix: str = "") -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        key = f"{prefix}{k}"
        if k not in base:
            valid = ", ".join(f"{prefix}{x}" for x in base)
            raise JobSpecError(f"Unknown job-spec key {key!r}; valid keys here: {valid}.")
        if isinstance(base[k], dict) and key != "model.solver_options":
            if not isinstance(v, dict):
                raise JobSpecError(f"Job-spec key {key!r} must be a mapping; got {v!r}.")
            out[k] = _merge(base[k], v, f"{key}.")
        else:
            out[k] = v
    return out


def _check_types(spec: dict, prefix: str = "") -> None:
    for k, v in spec.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key != "model.solver_options" and key not in _TYPES:
            _check_types(v, f"{key}.")
            continue
        types = _TYPES.get(key)
        if types and not (isinstance(v, types) and not (isinstance(v, bool) and bool not in types
                                                       and int in types)):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise JobSpecError(f"Job-spec key {key!r} must be {names}; got {v!r}.")


def load_spec(path: str | None = None, overrides: dict | None = None) -> dict:
    """Build and validate a job spec from defaults, a YAML file, the environment, overrides.

    Raises :class:`JobSpecError` naming the offending key.
    """
    spec = copy.deepcopy(DEFAULT_SPEC)
    if path:
        try:
            with open(path) as f:
                data = yaml.load(f, Loader=_SpecLoader)
        except FileNotFoundError:
            raise JobSpecError(f"Job spec file {path!r} does not exist.") from None
        except yaml.YAMLError as exc:
            raise JobSpecError(f"Job spec {path!r} is not valid YAML: {exc}") from None
        except UnicodeDecodeError:
            raise JobSpecError(f"Job spec {path!r} is not a text file (not UTF-8).") from None
        except IsADirectoryError:
            raise JobSpecError(f"Job spec {path!r} is a directory, not a YAML file.") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise JobSpecError(f"Job spec {path!r} must be a YAML mapping, got "
                               f"{type(data).__name__}.")
        spec = _merge(spec, data)
    env = config.get("job") or {}
    if env:
        spec = _merge(spec, _normalize_env(env))
    if overrides:
        spec = _merge(spec, overrides)
    validate_spec(spec)
    return spec


def _normalize_env(d: dict) -> dict:
    """dask.config turns ``DASK_SWIMDIST__JOB__MODEL__N_SPLITS`` keys into lower case and
    may write ``-`` for ``_``; map them back to spec keys."""
    out = {}
    for k, v in d.items():
        k = str(k).replace("-", "_")
        out[k] = _normalize_env(v) if isinstance(v, dict) else v
    return out


def validate_spec(spec: dict) -> None:
    """Check types and values of a merged spec; messages name the key."""
    from .activations import ACTIVATIONS
    from .lstsq import SOLVERS, check_options
    from .sampling import SAMPLERS

    _check_types(spec)
    if spec["version"] != 1:
        raise JobSpecError(f"Job-spec 'version' {spec['version']} is not supported (use 1).")
    d, m = spec["data"], spec["model"]
    if d["dataset"] not in ("sine", "mnist", "file"):
        raise JobSpecError(f"data.dataset must be sine, mnist or file; got {d['dataset']!r}.")
    if d["dataset"] != "file" and (d["path"] or d["test_path"]):
        raise JobSpecError(f"data.path and data.test_path (--input, --test-input) are read "
                           f"with data.dataset 'file' only; the dataset is "
                           f"{d['dataset']!r}.")
    if d["dataset"] == "file":
        if not d["path"]:
            raise JobSpecError("data.path is required when data.dataset is 'file'.")
        if d["task"] not in ("regression", "classification"):
            raise JobSpecError("data.task must be 'regression' or 'classification' for files.")
    for key in ("n_train", "n_test"):
        if d[key] < (2 if key == "n_train" else 0):
            raise JobSpecError(f"data.{key} must be >= {2 if key == 'n_train' else 0}; "
                               f"got {d[key]}.")
    sizes = m["hidden_layer_sizes"]
    sizes = [sizes] if isinstance(sizes, int) else sizes
    if not sizes or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1
                            for s in sizes):
        raise JobSpecError(f"model.hidden_layer_sizes must be a list of integers >= 1; got "
                           f"{m['hidden_layer_sizes']!r}.")
    m["hidden_layer_sizes"] = list(sizes)
    for key, valid in (("activation", ACTIVATIONS), ("sampler", SAMPLERS), ("solver", SOLVERS)):
        if m[key] not in valid:
            raise JobSpecError(f"model.{key} {m[key]!r} is unknown; valid: "
                               f"{', '.join(sorted(valid))}.")
    opts = m.get("solver_options") or {}
    if not isinstance(opts, dict):
        raise JobSpecError(f"model.solver_options must be a mapping; got {opts!r}.")
    try:
        check_options(m["solver"], opts)
    except ValidationError as exc:
        raise JobSpecError(f"model.solver_options: {exc}") from None
    root = config.get("output-root")
    if root:
        for key in ("output", "store"):
            if spec[key] is not None:
                spec[key] = confine(spec[key], root, key)
        top = root.rstrip("/") if is_url(root) else os.path.realpath(root)
        if spec["store"] is not None and spec["store"].rstrip("/") == top:
            raise JobSpecError(f"store {spec['store']!r} is the output root itself; use a "
                               "directory inside it (the store's lock file goes beside it).")
    if spec["store_format"] not in ("zarr", "npy"):
        raise JobSpecError(f"store_format must be zarr or npy; got {spec['store_format']!r}.")
    c = spec["cluster"]
    tls = [c["tls_ca_file"], c["tls_cert"], c["tls_key"]]
    if any(tls) and not all(tls):
        raise JobSpecError("cluster.tls_ca_file, cluster.tls_cert and cluster.tls_key go "
                           "together: give all three or none.")
    if any(tls):
        from .cluster import scheduler_address

        if not scheduler_address(c["scheduler"]):
            raise JobSpecError("cluster.tls_* files are for a tls:// scheduler "
                               "(cluster.scheduler, --scheduler); the embedded cluster does "
                               "not use them.")
    if m["feature_dtype"] not in ("float64", "float32"):
        raise JobSpecError(f"model.feature_dtype must be float64 or float32; got "
                           f"{m['feature_dtype']!r}.")
    _validate_select(spec)
    for key in ("rcond", "alpha"):
        try:
            value = float(m[key])
        except OverflowError:  # an integer beyond the float range
            value = float("inf")
        if not np.isfinite(value) or value < 0:
            raise JobSpecError(f"model.{key} must be a finite number >= 0; got {m[key]!r}.")


def selecting(spec: dict) -> bool:
    """Whether the job fits a model-selection path (``select.widths`` or ``select.alphas``)."""
    sel = spec["select"]
    return sel["widths"] is not None or sel["alphas"] is not None


def _validate_select(spec: dict) -> None:
    """Read ``select`` grids into lists; the widest width becomes the last hidden layer."""
    from .selection import parse_grid

    sel = spec["select"]
    default = DEFAULT_SPEC["select"]["validation_fraction"]
    if not selecting(spec):
        if sel["cv"] is not None or sel["validation_fraction"] != default:
            raise JobSpecError("select.cv and select.validation_fraction say how a model "
                               "selection validates; give select.widths or select.alphas "
                               "(--select widths=... / alphas=...) to select, or drop them.")
        return
    if sel["cv"] is not None and sel["validation_fraction"] != default:
        raise JobSpecError("select.cv and select.validation_fraction are two ways to validate; "
                           "give one of them.")
    try:
        for key, integer in (("widths", True), ("alphas", False)):
            v = sel[key]
            if isinstance(v, str):
                sel[key] = parse_grid(v, integer=integer)
            elif isinstance(v, int | float) and not isinstance(v, bool):
                sel[key] = [v]
    except ValidationError as exc:
        raise JobSpecError(f"select.{key}: {exc}") from None
    for key in ("widths", "alphas"):
        if sel[key] is not None and (not isinstance(sel[key], list) or not sel[key]):
            raise JobSpecError(f"select.{key} must be a non-empty list or grid; got "
                               f"{sel[key]!r}.")
    if sel["widths"] is not None:
        if not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1
                   for w in sel["widths"]):
            raise JobSpecError(f"select.widths must be integers >= 1; got {sel['widths']!r}.")
        spec["model"]["hidden_layer_sizes"][-1] = max(sel["widths"])
    if sel["alphas"] is not None and not all(
            isinstance(a, int | float) and not isinstance(a, bool) and np.isfinite(a)
            and a >= 0 for a in sel["alphas"]):
        raise JobSpecError(f"select.alphas must be numbers >= 0; got {sel['alphas']!r}.")
    f = sel["validation_fraction"]
    if sel["cv"] is None and not 0 < f < 1:
        raise JobSpecError(f"select.validation_fraction must be in (0, 1); got {f!r}.")
    if sel["cv"] is not None and sel["cv"] < 2:
        raise JobSpecError(f"select.cv must be an integer >= 2 or null; got {sel['cv']!r}.")


def confine(path: str, root: str, key: str) -> str:
    """``path`` resolved under ``root`` (relative paths are taken relative to it); refuses a
    path that leaves ``root`` (``..``, absolute paths elsewhere, symlinks out, URLs)."""
    if is_url(path) or is_url(root):
        if is_url(path) and is_url(root) and (
                path.rstrip("/") + "/").startswith(root.rstrip("/") + "/"):
            if "/../" in path + "/" or "/./" in path:
                raise JobSpecError(f"{key} {path!r} must not contain '..' or '.' segments.")
            return path
        raise JobSpecError(f"{key} {path!r} is outside the output root {root!r}.")
    real_root = os.path.realpath(root)
    full = os.path.realpath(os.path.join(real_root, path))
    if os.path.commonpath([full, real_root]) != real_root:
        raise JobSpecError(f"{key} {path!r} is outside the output root {root!r}; paths in a "
                           "job spec must stay inside it.")
    return full


# --------------------------------------------------------------------------- artifacts
def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name if is_url(base) else os.path.join(base, name)


def write_json(path: str, obj: dict) -> None:
    """Write JSON atomically (:func:`swimdist._io.write_atomic`: local paths and URLs)."""
    write_text_atomic(path, json.dumps(obj, indent=2, default=_json_default))


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


class StatusRecord:
    """``status.json`` next to a job's output: phase, progress, metrics, error.

    While the job runs, a heartbeat thread rewrites it every ``HEARTBEAT`` seconds
    (``updated``), and it names the process (``pid``, its start time, ``host``), so that
    :func:`read_status` can tell a running job from one whose process is gone.

    It is a sink of :mod:`swimdist.progress`: ``stage`` holds the latest event of the
    running stage (name, done/total, unit, rate, eta, residual, target; written at most
    once a second, and by every heartbeat), ``residual`` the last residual any iteration
    reported (value, target, stage), and ``stages`` the stages finished so far with their
    durations.
    """

    PHASES = ("starting", "connecting", "loading", "fitting", "evaluating", "saving", "done")
    #: Seconds between heartbeats; a job on another host silent for 6 of them reads as
    #: interrupted.
    HEARTBEAT = 5.0
    #: Finished stages kept in ``stages`` (the latest).
    MAX_STAGES = 50

    def __init__(self, output: str):
        import socket
        import threading

        self.path = _join(output, "status.json")
        now = _now()
        self.data: dict[str, Any] = {"phase": "starting", "progress": 0.0, "metrics": {},
                                     "error": None, "model": None, "started": now,
                                     "updated": now, "pid": os.getpid(),
                                     "pid_started": _process_start(os.getpid()),
                                     "host": socket.gethostname()}
        self._lock = threading.Lock()
        self._written = self._event_time = 0.0
        self.write()
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True,
                                      name="swimdist-status-heartbeat")
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.HEARTBEAT):
            with contextlib.suppress(Exception):  # best effort: the job goes on regardless
                self._age_stage()
                self.update()

    def _age_stage(self) -> None:
        """Bring the running stage's rate and ETA to now: with nothing done since its last
        event, the same work has taken longer (``eta`` and ``elapsed`` grow in proportion,
        whether the ETA comes from counts or from work)."""
        with self._lock:
            ev = self.data.get("stage")
            if not ev or ev.get("finished") or not ev.get("elapsed"):
                return
            elapsed = ev["elapsed"] + time.monotonic() - self._event_time
            grow = elapsed / ev["elapsed"]
            self.data["stage"] = {**ev, "elapsed": round(elapsed, 3),
                                  "rate": None if ev["rate"] is None
                                  else round(ev["rate"] / grow, 3),
                                  "eta": None if ev["eta"] is None
                                  else round(ev["eta"] * grow, 3)}
            self._event_time = time.monotonic()

    def update(self, **kw) -> None:
        with self._lock:
            self.data.update(kw)
            if "phase" in kw and kw["phase"] in self.PHASES:
                self.data.setdefault("progress", 0.0)
                self.data["progress"] = max(self.data["progress"],
                                            self.PHASES.index(kw["phase"])
                                            / (len(self.PHASES) - 1))
            self.data["updated"] = _now()
            self.write()

    def progress(self, event) -> None:
        """Record a :class:`swimdist.progress.Event`: kept at once, written at most once a
        second (a stage's start and end at once); the heartbeat writes the rest."""
        ev = event.as_dict()
        with self._lock:
            self.data["stage"] = ev
            self._event_time = time.monotonic()
            if ev["residual"] is not None:
                self.data["residual"] = {"value": ev["residual"], "target": ev["target"],
                                         "stage": ev["stage"]}
            if ev["finished"]:
                done = self.data.setdefault("stages", [])
                done.append({"name": ev["stage"], "seconds": ev["elapsed"], "done": ev["done"],
                             "total": ev["total"], "residual": ev["residual"]})
                del done[:-self.MAX_STAGES]
            now = time.monotonic()
            if ev["finished"] or ev["done"] == 0 or now - self._written >= 1.0:
                self.data["updated"] = _now()
                self.write()

    def close(self) -> None:
        """Stop the heartbeat (the record stays as last written)."""
        self._stop.set()
        if self._beat.is_alive():
            self._beat.join(timeout=2 * self.HEARTBEAT)

    def write(self) -> None:
        self._written = time.monotonic()
        write_json(self.path, self.data)


def _process_start(pid: int) -> float | None:
    """Start time of process ``pid`` (None if there is none): with the pid it names one
    process, even after the pid is reused."""
    import psutil

    try:
        return round(psutil.Process(pid).create_time(), 2)
    except (psutil.Error, OSError):
        return None


def read_status(output: str) -> dict:
    """A job's ``status.json`` with ``state``: running, done, failed or interrupted.

    A job stopped by Ctrl-C or a termination signal records itself as *interrupted*; one that
    is neither done nor failed nor that is interrupted too when its process is gone: on this
    host, no process with its pid and start time; on another, no heartbeat for six
    heartbeat periods. Raises ``StoreError`` when there is no readable status record.
    """
    import socket

    from .exceptions import StoreError

    path = _join(output, "status.json")
    try:
        if is_url(path):
            import fsspec

            with fsspec.open(path, "r") as f:
                data = json.load(f)
        else:
            with open(path) as f:
                data = json.load(f)
    except FileNotFoundError:
        raise StoreError(f"No job status at {output!r} (no status.json); is it a job's "
                         "output directory?") from None
    except (OSError, ValueError) as exc:
        raise StoreError(f"The job status {path!r} is unreadable ({exc}).") from None
    if not isinstance(data, dict) or "phase" not in data:
        raise StoreError(f"{path!r} is not a swimdist job status.")
    phase = data["phase"]
    if phase in ("done", "failed", "interrupted"):
        data["state"] = phase
        return data
    data["state"] = "running"
    if data.get("host") == socket.gethostname() and isinstance(data.get("pid"), int):
        started = _process_start(data["pid"])
        if started is None or (data.get("pid_started") is not None
                               and abs(started - float(data["pid_started"])) > 1.0):
            data["state"] = "interrupted"
            data["reason"] = f"its process (pid {data['pid']}) is gone"
        return data
    try:
        updated = datetime.datetime.fromisoformat(data["updated"])
        age = (datetime.datetime.now(datetime.timezone.utc) - updated).total_seconds()
    except (KeyError, TypeError, ValueError):
        age = float("inf")
    if age > 6 * StatusRecord.HEARTBEAT:
        data["state"] = "interrupted"
        data["reason"] = f"no heartbeat for {age:.0f} s"
    return data


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- the job
def load_data(data: dict, *, seed: int = 0):
    """``(X, y, X_test, y_test, task)`` for a spec's ``data`` section (test may be None)."""
    ds = data["dataset"]
    if ds == "sine":
        X, y = datasets.sine(data["n_train"], alpha=data["sine_alpha"], seed=seed)
        Xt, yt = (datasets.sine(data["n_test"], alpha=data["sine_alpha"], seed=seed + 1)
                  if data["n_test"] else (None, None))
        return X, y, Xt, yt, "regression"
    if ds == "mnist":
        X, y, Xt, yt = datasets.load_mnist(data["data_dir"], download=data["download"])
        return X, y, Xt, yt, "classification"
    for what in ("path", "test_path"):
        if data[what] and holds_one_array(data[what]):
            raise ValidationError(
                f"{data[what]!r} holds a single array, and training needs two (inputs and "
                f"targets); put them into one .npz, HDF5 file or Zarr group as "
                f"{data['x_key']!r} and {data['y_key']!r}.")
    X = load_array(data["path"], data["x_key"])
    y = np.asarray(load_array(data["path"], data["y_key"]))
    Xt = yt = None
    if data["test_path"]:
        Xt = load_array(data["test_path"], data["x_key"])
        yt = np.asarray(load_array(data["test_path"], data["y_key"]))
    return X, y, Xt, yt, data["task"]


def make_estimator(model: dict, task: str, store: str | None, select: dict | None = None):
    """The estimator a spec's ``model`` section describes; with a ``select`` section that
    sets widths or alphas, the CV estimator that chooses among them."""
    from .estimators import SWIMClassifier, SWIMRegressor

    kw = dict(model)
    kw["hidden_layer_sizes"] = tuple(kw["hidden_layer_sizes"])
    if select is not None and (select["widths"] is not None or select["alphas"] is not None):
        from .selection import SWIMClassifierCV, SWIMRegressorCV

        cls = SWIMClassifierCV if task == "classification" else SWIMRegressorCV
        alpha = kw.pop("alpha")
        for key in ("solver", "solver_options"):  # the path solves from its Gram matrix
            if kw.pop(key, None) not in (None, "auto", {}):
                logger.warning("select: model.%s is not used; every point of the path is "
                               "solved from one Gram matrix", key)
        return cls(store=store, widths=select["widths"],
                   alphas=select["alphas"] if select["alphas"] is not None else [alpha],
                   validation_fraction=select["validation_fraction"], cv=select["cv"], **kw)
    cls = SWIMClassifier if task == "classification" else SWIMRegressor
    return cls(store=store, **kw)


def evaluate(est, X, y, task: str) -> dict:
    """Metrics of a fitted estimator on ``(X, y)``; ``task`` must be the estimator's own,
    and ``y`` must fit its predictions (one target per row and output; for a classifier,
    labels among its classes)."""
    own = "classification" if hasattr(est, "classes_") else "regression"
    if task != own:
        raise ValidationError(f"The model is a {type(est).__name__}; it cannot be evaluated as "
                              f"{task} (use --task {own}, or no --task).")
    pred = np.asarray(est.predict(X))
    y = np.asarray(y)
    if y.size != pred.size:
        raise ValidationError(f"The targets have shape {y.shape}, and the model predicts "
                              f"{pred.shape} for these inputs.")
    if task == "classification":
        unknown = np.setdiff1d(np.unique(y), np.asarray(est.classes_))
        if unknown.size:
            raise ValidationError(f"The labels include {unknown.size} value(s) the model has "
                                  f"no class for (e.g. {unknown[0]!r}); its classes are "
                                  f"{np.asarray(est.classes_)[:10].tolist()}.")
        return {"error_pct": float(100.0 * np.mean(pred != y.reshape(pred.shape))),
                "n": int(len(y))}
    err = pred - y.reshape(pred.shape)
    return {"mae": float(np.mean(np.abs(err))), "rmse": float(np.sqrt(np.mean(err**2))),
            "n": int(len(y))}


def run_job(spec: dict, *, performance_report: str | None = None, progress: bool = False,
            on_connect: Callable[[Any], None] | None = None) -> dict:
    """Run a validated job spec end to end; returns the metrics dict.

    The status record says ``done`` only after the model and metrics are written; on any
    failure it says ``failed`` with the error, and the exception propagates. Every stage's
    progress goes to the status record (:mod:`swimdist.progress`); with ``progress`` also to
    a bar per stage (terminal) or log lines. ``on_connect(client)`` runs once the client is
    connected (the command line prints the dashboard link there).
    """
    from . import progress as _progress

    out = spec["output"]
    if not is_url(out):
        _check_output(out)
    status = StatusRecord(out)
    with _progress.report(int(progress), status=status):
        return _run_job(spec, status, performance_report, on_connect)


def _check_output(out: str) -> None:
    """Create the output directory, or refuse it before anything runs (a file, a place that
    cannot be written, a directory where the model or the status record goes)."""
    from .exceptions import StoreError

    if os.path.exists(out) and not os.path.isdir(out):
        raise StoreError(f"The output {out!r} is a file; give a directory (it is created).")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"Cannot create the output directory {out!r}: "
                         f"{exc.strerror or exc}.") from None
    for name in ("model.npz", "metrics.json", "status.json"):
        if os.path.isdir(os.path.join(out, name)):
            raise StoreError(f"{os.path.join(out, name)!r} is a directory; the job writes a "
                             "file there. Remove it or choose another output.")
    if not os.access(out, os.W_OK | os.X_OK):
        raise StoreError(f"The output directory {out!r} is not writable.")


def _run_job(spec: dict, status: StatusRecord, performance_report: str | None,
             on_connect) -> dict:
    from .cluster import connect, local_cluster_kwargs, plan_memory, scheduler_address

    out = spec["output"]
    client = cluster = None
    t0 = time.perf_counter()
    try:
        status.update(phase="connecting")
        c = spec["cluster"]
        security = None
        if c["tls_ca_file"]:
            from .cluster import tls_security

            security = tls_security(c["tls_ca_file"], c["tls_cert"], c["tls_key"])
        seed = int(spec["model"]["random_state"] or 0)
        plan = data = None
        if c["memory_limit"] and not scheduler_address(c["scheduler"]):
            # One budget for every process: the client's share is what it holds once the
            # data are loaded, so they are loaded before the workers' limits are set.
            status.update(phase="loading")
            data = load_data(spec["data"], seed=seed)
            workers = local_cluster_kwargs(n_workers=c["n_workers"],
                                           threads_per_worker=c["threads_per_worker"])
            plan = plan_memory(c["memory_limit"], workers["n_workers"],
                               int(spec["model"]["hidden_layer_sizes"][-1]) + 1)
            logger.info("%s", plan.describe())
        client, cluster = connect(c["scheduler"], n_workers=c["n_workers"],
                                  threads_per_worker=c["threads_per_worker"],
                                  memory_limit=(plan.worker_limit * plan.n_workers if plan
                                                else c["memory_limit"]),
                                  security=security)
        status.update(phase="loading", dashboard=client.dashboard_link,
                      scheduler=client.scheduler.address)
        if on_connect is not None:
            on_connect(client)
        X, y, Xt, yt, task = data or load_data(spec["data"], seed=seed)
        del data
        if Xt is not None and (np.ndim(Xt) != 2 or Xt.shape[1] != X.shape[1]):
            raise ValidationError(f"The test inputs have shape {tuple(Xt.shape)}, and the "
                                  f"training inputs {X.shape[1]} features.")
        est = make_estimator(spec["model"], task, spec["store"], spec["select"])
        status.update(phase="fitting", task=task, n_train=int(X.shape[0]))
        report = (_performance_report(performance_report) if performance_report
                  else contextlib.nullcontext())
        settings = {"swimdist.store-format": spec["store_format"]}
        if plan is not None:
            settings.update(plan.settings())
        with report, dask.config.set(settings):
            est.fit(X, y)
        status.update(phase="evaluating", fit_info=est.fit_info_, timings=est.timings_)
        selection = None
        if hasattr(est, "best_estimator_"):
            selection = _write_selection(est, out)
            est = est.best_estimator_  # a plain model: evaluated and saved as any fit
            est.timings_ = selection["timings"]
        metrics = {"train": evaluate(est, X, y, task), "timings": est.timings_,
                   "solver": est.fit_info_.get("solver"),
                   "relative_residual": est.fit_info_.get("relative_residual"),
                   "rank": est.fit_info_.get("rank"),
                   "iterations": est.fit_info_.get("iterations"),
                   "stop": est.fit_info_.get("stop"),  # what ended an iterative solver
                   "placement": est.fit_info_.get("placement"),
                   "placement_reason": est.fit_info_.get("placement_reason"),
                   "solver_timings": ({k: round(float(v), 3)
                                       for k, v in est.solve_result_.timings.items()}
                                      if hasattr(est, "solve_result_") else {})}
        cg = {k: est.fit_info_[k] for k in ("cg_passes", "cg_pass_seconds",
                                            "cg_precond_seconds") if k in est.fit_info_}
        if cg:
            metrics["cg"] = cg  # where an iterative stage's time went (normal-tiled)
        if selection is not None:
            metrics["selection"] = {k: selection[k] for k in ("best_width", "best_alpha",
                                                              "best_score")}
        if plan is not None:
            metrics["memory_plan"] = plan.describe()
        if Xt is not None:
            metrics["test"] = evaluate(est, Xt, yt, task)
        status.update(phase="saving", metrics=metrics)
        model_path = _join(out, "model.npz")
        est.save(model_path)
        metrics["wall_time"] = time.perf_counter() - t0
        write_json(_join(out, "metrics.json"), metrics)
        status.update(phase="done", progress=1.0, model=model_path, metrics=metrics)
        return metrics
    except BaseException as exc:
        lost = _scheduler_lost(exc, client, spec, status.data.get("phase"))
        msg = (str(lost or exc) if isinstance(lost or exc, SwimdistError)
               else f"{type(exc).__name__}: {exc}")
        with contextlib.suppress(Exception):
            if isinstance(exc, KeyboardInterrupt):  # Ctrl-C, SIGTERM: resumable, not failed
                status.update(phase="interrupted", error=msg,
                              reason="interrupted (Ctrl-C or a termination signal); run the "
                                     "same job again to resume")
            else:
                status.update(phase="failed", error=msg)
        if lost is not None:
            raise lost from exc
        raise
    finally:
        status.close()
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.close()


def _write_selection(est, out: str) -> dict:
    """``selection.json`` and ``selection.png`` (when matplotlib is there) of a CV fit."""
    from .selection import plot_selection, selection_report

    report = selection_report(est)
    write_json(_join(out, "selection.json"), report)
    png = plot_selection(report, _join(out, "selection.png"))
    logger.info("selection: width %d, alpha %g (validation score %.4f) -> %s%s",
                report["best_width"], report["best_alpha"], report["best_score"],
                _join(out, "selection.json"), f", {png}" if png else "")
    return report


def _scheduler_lost(exc: BaseException, client, spec: dict, phase) -> SchedulerError | None:
    """A :class:`SchedulerError` saying what to do when ``exc`` means the scheduler (or the
    connection to it) was lost mid-job, else None. Feature blocks already written stay in
    the store, verified by their checksums, so running the same job again resumes."""
    from concurrent.futures import CancelledError

    from distributed.comm.core import CommClosedError

    text = str(exc)
    if not (isinstance(exc, CommClosedError) or (isinstance(exc, CancelledError) and (
            "scheduler-connection-lost" in text or "lost the connection" in text))):
        return None
    address = getattr(getattr(client, "scheduler", None), "address", None) or \
        spec["cluster"]["scheduler"] or "the embedded cluster"
    store = spec["store"]
    resume = (f"The feature store {store!r} keeps every block written so far; run the same "
              "job again to resume." if store else "Run the job again.")
    return SchedulerError(f"Lost the connection to the Dask scheduler at {address} during "
                          f"{phase or 'the job'} ({type(exc).__name__}). {resume}")


def _performance_report(path: str):
    from distributed import performance_report

    return performance_report(filename=path)
