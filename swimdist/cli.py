"""``swimdist train | evaluate | predict | info | config``: argument parsing only."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import signal
import sys
import threading

import click
import dask.config
import numpy as np
import yaml

from . import __version__, config
from ._io import is_url, local_path
from .exceptions import SwimdistError

_DATA_OPTIONS = [
    click.option("--dataset", type=click.Choice(["sine", "mnist", "file"]), default=None,
                 help="Dataset (default sine)."),
    click.option("--n-train", type=int, default=None, help="sine: training samples."),
    click.option("--n-test", type=int, default=None, help="sine: test samples."),
    click.option("--sine-alpha", type=float, default=None,
                 help="sine: frequency alpha in sin(alpha (x + y))."),
    click.option("--data-dir", default=None, help="mnist: directory with the IDX files."),
    click.option("--download/--no-download", default=None,
                 help="mnist: download missing files (checksummed)."),
    click.option("--input", "path", default=None,
                 help="file: training data (.npy/.npz/.h5/.zarr)."),
    click.option("--test-input", "test_path", default=None, help="file: held-out data."),
    click.option("--x-key", default=None, help="file: name of the inputs array."),
    click.option("--y-key", default=None, help="file: name of the targets array."),
    click.option("--task", type=click.Choice(["regression", "classification"]), default=None),
]


def _data_options(f):
    for opt in reversed(_DATA_OPTIONS):
        f = opt(f)
    return f


def _data_overrides(kw: dict) -> dict:
    keys = ("dataset", "n_train", "n_test", "sine_alpha", "data_dir", "download", "path",
            "test_path", "x_key", "y_key", "task")
    return {k: kw.pop(k) for k in keys if kw.get(k) is not None}


def _fail(exc: BaseException) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(1)


@click.group()
@click.version_option(__version__, prog_name="swimdist")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """swimdist: train SWIM sampled neural networks on Dask."""
    if dask.config.get("distributed.admin.tick.limit", None) is None:
        # The embedded scheduler shares this process with the fit's dense work on the
        # client, which blocks its event loop for seconds by design; distributed would warn
        # about each such pause. Read once, when distributed is first imported (below).
        dask.config.set({"distributed.admin.tick.limit": "60s"})
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("swimdist").setLevel(logging.INFO if verbose == 0 else level)
    if verbose == 0:
        import distributed  # noqa: F401  (configures its loggers; quiet them below)

        for name in list(logging.root.manager.loggerDict):
            if name.split(".")[0] in ("distributed", "tornado", "bokeh"):
                logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger("swimdist").handlers[:] = [_EchoHandler()]
        logging.getLogger("swimdist").propagate = False


class _EchoHandler(logging.Handler):
    """Prints swimdist's own info messages (choices, progress lines) plainly to stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.name in ("swimdist.cluster", "swimdist.design", "swimdist.lstsq",
                           "swimdist.progress") \
                or record.levelno >= 30:
            click.echo(record.getMessage(), err=True)


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML job spec; flags override its values.")
@_data_options
@click.option("--hidden", default=None,
              help="Neurons per hidden layer, comma separated (e.g. 1000 or 500,500).")
@click.option("--activation", default=None, help="tanh or relu.")
@click.option("--sampler", default=None, help="swim, uniform or random.")
@click.option("--solver", default=None, help="Least-squares solver (default auto).")
@click.option("--solver-option", "solver_option", multiple=True, metavar="KEY=VALUE",
              help="Extra solver argument, repeatable (e.g. tile=4000, gram_dtype=float32).")
@click.option("--select", "select", multiple=True, metavar="KEY=VALUE",
              help="Model selection, repeatable: widths=1000:20000:1000 (start:stop:step or a "
                   "comma list), alphas=0,1e-6,1e-4, validation_fraction=0.1 or cv=5. Fits "
                   "every (width, alpha) from one Gram pass, keeps the best as the model and "
                   "writes selection.json (and selection.png with the [plot] extra).")
@click.option("--rcond", type=float, default=None, help="Relative singular-value cutoff.")
@click.option("--alpha", type=float, default=None, help="Tikhonov damping of the output layer.")
@click.option("--seed", "random_state", type=int, default=None, help="Random seed.")
@click.option("--chunk-rows", type=int, default=None, help="Rows per feature block.")
@click.option("--feature-dtype", type=click.Choice(["float64", "float32"]), default=None)
@click.option("--distinct/--with-replacement", "distinct", default=None,
              help="Draw distinct neuron pairs (no duplicate neurons).")
@click.option("--store", default=None,
              help="Feature store path or fsspec URL (default: temporary).")
@click.option("--store-format", type=click.Choice(["zarr", "npy"]), default=None,
              help="Feature store format (npy: memory-mapped files, local disks).")
@click.option("--output", "-o", default=None, help="Output directory (model, status, metrics).")
@click.option("--scheduler", default=None,
              help="Scheduler address (default: DASK_SCHEDULER_ADDRESS or an embedded cluster).")
@click.option("--n-workers", type=int, default=None, help="Embedded cluster: worker processes.")
@click.option("--threads-per-worker", type=int, default=None)
@click.option("--memory-limit", default=None, help="Embedded cluster: total memory, e.g. 6GB.")
@click.option("--tls-ca-file", default=None, help="TLS: CA certificate (PEM).")
@click.option("--tls-cert", default=None, help="TLS: client certificate (PEM).")
@click.option("--tls-key", default=None, help="TLS: client private key (PEM).")
@click.option("--performance-report", type=click.Path(dir_okay=False), default=None,
              help="Write a Dask performance report (HTML) of the fit.")
def train(config_path, **kw) -> None:
    """Train a model; prints its metrics and where it was written."""
    from .service import load_spec, run_job

    report = kw.pop("performance_report")
    over: dict = {}
    data = _data_overrides(kw)
    if data:
        over["data"] = data
    model: dict = {}
    if kw.get("hidden") is not None and not str(kw["hidden"]).strip():
        _fail(SwimdistError("--hidden is empty; give widths such as 1000 or 500,500."))
    if kw.get("hidden"):
        try:
            model["hidden_layer_sizes"] = [int(s) for s in str(kw["hidden"]).split(",")]
        except ValueError:
            _fail(SwimdistError(f"--hidden must be integers separated by commas; got "
                                f"{kw['hidden']!r}."))
    opts = {}
    for item in kw.pop("solver_option") or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            _fail(SwimdistError(f"--solver-option takes KEY=VALUE; got {item!r}."))
        opts[key.strip()] = yaml.safe_load(value)
    if opts:
        model["solver_options"] = opts
    select: dict = {}
    for item in kw.pop("select") or ():
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in ("widths", "alphas", "validation_fraction", "cv"):
            _fail(SwimdistError(f"--select takes widths=..., alphas=..., validation_fraction=... "
                                f"or cv=...; got {item!r}."))
        value = value.strip()
        if key in ("validation_fraction", "cv"):
            try:
                select[key] = float(value) if key == "validation_fraction" else int(value)
            except ValueError:
                _fail(SwimdistError(f"--select {key} must be a number; got {value!r}."))
        else:
            select[key] = value  # a grid: read by the job spec's validation
    if select:
        over["select"] = select
    distinct = kw.pop("distinct")
    if distinct is not None:
        model["replace"] = not distinct
    for k in ("activation", "sampler", "solver", "rcond", "alpha", "random_state", "chunk_rows",
              "feature_dtype"):
        if kw.get(k) is not None:
            model[k] = kw[k]
    if model:
        over["model"] = model
    clus = {k: kw[k] for k in ("scheduler", "n_workers", "threads_per_worker", "memory_limit",
                               "tls_ca_file", "tls_cert", "tls_key") if kw.get(k) is not None}
    if clus:
        over["cluster"] = clus
    for k in ("store", "store_format", "output"):
        if kw.get(k) is not None:
            over[k] = kw[k]
    try:
        spec = load_spec(config_path, over)
        click.echo(f"swimdist {__version__}: training on {spec['data']['dataset']} "
                   f"(hidden {spec['model']['hidden_layer_sizes']}, solver "
                   f"{spec['model']['solver']}) -> {spec['output']}", err=True)
        with dask.config.set({"swimdist.progress": True}), _sigterm_interrupts():
            metrics = run_job(spec, performance_report=report, progress=True,
                              on_connect=lambda client: _announce(client, report))
    except (SwimdistError, OSError) as exc:  # OSError: a full disk, a lost file system
        _fail(exc)
    except MemoryError as exc:
        _fail(SwimdistError(f"Out of memory ({exc or 'an allocation failed'}); give the job a "
                            "--memory-limit so that it plans for the memory it has, or fewer "
                            "neurons."))
    except KeyboardInterrupt as exc:
        click.echo(f"interrupted{': ' + str(exc) if str(exc) else ''}", err=True)
        sys.exit(130)
    _print_metrics(metrics)
    click.echo(f"model written to {os.path.join(spec['output'], 'model.npz')}")


def _announce(client, report: str | None) -> None:
    """The dashboard link, once, and where a record of it goes."""
    click.echo(f"dashboard: {client.dashboard_link}", err=True)
    if report:
        click.echo(f"  a performance report of the fit goes to {report}", err=True)
    else:
        click.echo("  (--performance-report report.html keeps a copy of it as one HTML file)",
                   err=True)


@contextlib.contextmanager
def _sigterm_interrupts():
    """Turn SIGTERM (a pod eviction, ``kill``) into KeyboardInterrupt while a job runs, so
    the job records its failure in status.json and releases its store lock on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"terminated by {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _print_metrics(m: dict) -> None:
    for split in ("train", "test"):
        if split in m:
            vals = ", ".join(f"{k} {v:.4g}" for k, v in m[split].items() if k != "n")
            click.echo(f"{split}: {vals} (n={m[split]['n']})")
    t = m.get("timings", {})
    sel = m.get("selection")
    if sel:
        click.echo(f"selected width {sel['best_width']}, alpha {sel['best_alpha']:g} "
                   f"(validation score {sel['best_score']:.4g}); path {t.get('total', 0):.2f} s "
                   f"(sample {t.get('sample', 0):.2f}, features {t.get('features', 0):.2f}, "
                   f"gram {t.get('gram', 0):.2f}, path {t.get('path', 0):.2f}, validation "
                   f"{t.get('validation', 0):.2f})")
        return
    click.echo(f"solver {m.get('solver')}, rank {m.get('rank')}, relative residual "
               f"{m.get('relative_residual', float('nan')):.3e}; fit {t.get('total', 0):.2f} s "
               f"(sample {t.get('sample', 0):.2f}, features {t.get('features', 0):.2f}, "
               f"solve {t.get('solve', 0):.2f})")


@main.command()
@click.option("--model", "model_path", required=True, help="A model.npz written by train.")
@_data_options
@click.option("--scheduler", default=None, help="Scheduler address (default: in-process).")
def evaluate(model_path, scheduler, **kw) -> None:
    """Evaluate a saved model on a dataset's test split (or the file given)."""
    from .estimators import load_model
    from .service import DEFAULT_SPEC, _merge, evaluate, load_data

    try:
        model = load_model(model_path)
        data = _merge(DEFAULT_SPEC["data"], _data_overrides(kw), "data.")
        X, y, Xt, yt, task = load_data(data)
        if Xt is None:
            Xt, yt = X, y
        own = "classification" if hasattr(model, "classes_") else "regression"
        m = evaluate(model, Xt, yt, task or own)
    except (SwimdistError, OSError) as exc:
        _fail(exc)
    click.echo(", ".join(f"{k} {v:.6g}" for k, v in m.items()))


@main.command()
@click.option("--model", "model_path", required=True, help="A model.npz written by train.")
@click.option("--input", "input_path", required=True, help=".npy/.npz/.h5/.zarr inputs.")
@click.option("--x-key", default="X", help="Array name inside .npz/.h5/.zarr.")
@click.option("--output", "-o", "output_path", required=True,
              help="Where to write predictions (.npy).")
def predict(model_path, input_path, x_key, output_path) -> None:
    """Predict with a saved model and write the predictions as .npy."""
    from ._io import write_atomic
    from .estimators import load_model
    from .inputs import load_array

    try:
        model = load_model(model_path)
        X = load_array(input_path, x_key)
        pred = np.asarray(model.predict(X))
        write_atomic(output_path, lambda f: np.save(f, pred, allow_pickle=False))
    except (SwimdistError, OSError) as exc:
        _fail(exc)
    click.echo(f"wrote {pred.shape[0]} predictions to {output_path}")


@main.command()
@click.argument("path", required=False)
def info(path) -> None:
    """Versions, settings and solvers; with PATH, describe a model file or feature store."""
    import dask
    import distributed
    import scipy
    import zarr

    from .lstsq import SOLVERS

    if path:
        try:
            _describe(path)
        except SwimdistError as exc:
            _fail(exc)
        return
    click.echo(f"swimdist {__version__} (python {platform.python_version()}, dask "
               f"{dask.__version__}, distributed {distributed.__version__}, numpy "
               f"{np.__version__}, scipy {scipy.__version__}, zarr {zarr.__version__})")
    click.echo(f"cores {os.cpu_count()}; solvers: {', '.join(sorted(SOLVERS))}")
    from .cluster import scheduler_address

    click.echo(f"scheduler: {scheduler_address() or 'embedded LocalCluster'}")


def _describe(path: str) -> None:
    """Print a model file's or a feature store's description as YAML."""
    from .models import load_arrays
    from .store import describe_store

    if path.endswith(".npz"):
        arrays, meta = load_arrays(path)
        click.echo(yaml.safe_dump({"model": meta["estimator"], "params": meta["params"],
                                   "n_features_in": meta["n_features_in"],
                                   "fit_info": meta.get("fit_info", {})}, sort_keys=False))
        return
    if not is_url(path) and os.path.isfile(os.path.join(local_path(path), "status.json")):
        _print_status(path)
        return
    click.echo(yaml.safe_dump(describe_store(path), sort_keys=False))


def _print_status(output: str) -> None:
    from .service import read_status

    st = read_status(output)
    keys = ("state", "reason", "phase", "progress", "started", "updated", "pid", "host",
            "error", "model")
    shown = {k: st[k] for k in keys if st.get(k) is not None}
    ev = st.get("stage")
    if isinstance(ev, dict) and ev.get("stage"):
        shown["stage"] = ev["stage"]
        if ev.get("total") is not None:
            shown["done"] = f"{ev.get('done', 0)}/{ev['total']} {ev.get('unit') or ''}".strip()
        else:
            shown["done"] = f"{ev.get('done', 0)} {ev.get('unit') or ''}".strip()
        if ev.get("finished"):
            shown["done"] += " (stopped)" if ev.get("stopped") else " (finished)"
        elif st["state"] == "running" and ev.get("eta") is not None:
            shown["eta"] = _eta_now(ev["eta"], st.get("updated"))
    res = st.get("residual")
    if isinstance(res, dict) and res.get("value") is not None:
        target = res.get("target")
        shown["residual"] = f"{res['value']:.3e} ({res.get('stage')}" + (
            f", target {target:.1e})" if target is not None else ")")
    if st.get("metrics", {}).get("test"):
        shown["test"] = st["metrics"]["test"]
    click.echo(yaml.safe_dump(shown, sort_keys=False).strip())


def _eta_now(eta: float, updated: str | None) -> str:
    """``eta`` seconds as of the record's ``updated`` time, counted down to now."""
    import datetime

    try:
        age = (datetime.datetime.now(datetime.timezone.utc)
               - datetime.datetime.fromisoformat(updated)).total_seconds()
    except (TypeError, ValueError):
        age = 0.0
    from .progress import format_seconds

    return format_seconds(max(0.0, float(eta) - max(0.0, age)))


@main.command()
@click.argument("output")
def status(output) -> None:
    """The state of the job writing to OUTPUT: running, done, failed or interrupted (its
    process is gone; run the same job again to resume it)."""
    try:
        _print_status(output)
    except SwimdistError as exc:
        _fail(exc)


@main.command("config")
@click.argument("key", required=False)
def config_cmd(key) -> None:
    """Print swimdist's settings (all, or KEY such as cluster.memory-limit)."""
    if key:
        missing = object()
        value = config.get(key, missing)
        if value is missing:
            _fail(SwimdistError(f"No setting swimdist.{key}; `swimdist config` lists them all."))
        if isinstance(value, dict | list):
            click.echo(yaml.safe_dump(value, default_flow_style=False).strip())
        else:
            click.echo("null" if value is None else str(value))
    else:
        click.echo(yaml.safe_dump({"swimdist": dask.config.get("swimdist")},
                                  sort_keys=False).strip())


if __name__ == "__main__":  # pragma: no cover
    main()
