"""swimdist vs the reference (swimnetworks) on sine and MNIST: fit time, peak RSS, test error.

Every case runs in a fresh subprocess, so each peak RSS (summed over the process and all its
children, i.e. swimdist's Dask workers too) belongs to that case alone.

    python benchmarks/bench_core.py [--widths 1000 2000] [--solver auto] [--workers 2]

Takes about 5 minutes on 2 cores (MNIST from SWIMDIST_DATA_DIR or ../shared/data/mnist).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from _common import PeakRSS, gb, mnist_dir, print_table  # noqa: E402


def load(dataset: str, alpha: float):
    if dataset == "sine":
        from swimdist.datasets import sine

        X, y = sine(5000, alpha=alpha, seed=0)
        Xt, yt = sine(2000, alpha=alpha, seed=1)
        return X, y, Xt, yt
    from swimdist.datasets import load_mnist

    return load_mnist(mnist_dir())


def metric(dataset, pred, yt) -> float:
    pred = np.asarray(pred).ravel()
    return float(np.abs(pred - yt).mean()) if dataset == "sine" else float(
        100 * np.mean(pred != yt))


def run_case(impl: str, dataset: str, width: int, alpha: float, solver: str, workers: int):
    X, y, Xt, yt = load(dataset, alpha)
    clf = dataset == "mnist"
    with PeakRSS() as mem:
        if impl == "swimnetworks":
            import swimnetworks as sn
            from sklearn.pipeline import Pipeline

            model = Pipeline([
                ("hidden", sn.Dense(layer_width=width, activation="tanh",
                                    parameter_sampler="tanh", random_seed=0, is_classifier=clf)),
                ("linear", sn.Linear(regularization_scale=1e-10, is_classifier=clf)),
            ])
            t0 = time.perf_counter()
            model.fit(X, y if clf else y[:, None])
            fit = time.perf_counter() - t0
            info = "gelsd"
        else:
            from swimdist import SWIMClassifier, SWIMRegressor
            from swimdist.cluster import connect

            client, cluster = connect(n_workers=workers)
            Est = SWIMClassifier if clf else SWIMRegressor
            model = Est(hidden_layer_sizes=(width,), solver=solver, rcond=1e-10, random_state=0)
            t0 = time.perf_counter()
            model.fit(X, y)
            fit = time.perf_counter() - t0
            info = f"{model.fit_info_.get('solver')} {model.fit_info_.get('chosen', '')}".strip()
    err = metric(dataset, model.predict(Xt), yt)
    if impl == "swimdist":
        client.close()
        cluster.close()
    return {"fit": fit, "peak": mem.peak, "err": err, "info": info}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", type=int, nargs="+", default=[1000, 2000])
    ap.add_argument("--solver", default="auto")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case:
        impl, dataset, width, alpha = a.case.split(":")
        print(json.dumps(run_case(impl, dataset, int(width), float(alpha), a.solver, a.workers)))
        return
    t_all = time.perf_counter()
    cases = [("sine", 1000, al) for al in (1.0, 5.0, 10.0)] + [("mnist", w, 0.0)
                                                               for w in a.widths]
    rows = []
    for dataset, width, alpha in cases:
        res = {}
        for impl in ("swimnetworks", "swimdist"):
            out = subprocess.run([sys.executable, __file__, "--case",
                                  f"{impl}:{dataset}:{width}:{alpha}", "--solver", a.solver,
                                  "--workers", str(a.workers)], capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"case {impl} {dataset} {width} failed")
            res[impl] = json.loads(out.stdout.strip().splitlines()[-1])
        r, s = res["swimnetworks"], res["swimdist"]
        name = f"sine a={alpha:g}" if dataset == "sine" else "MNIST"
        unit = "MAE" if dataset == "sine" else "err %"
        fmt = "{:.2e}" if dataset == "sine" else "{:.2f}"
        rows.append([name, width, f"{r['fit']:.2f}", f"{s['fit']:.2f}",
                     f"{s['fit'] / r['fit']:.2f}", gb(r["peak"]), gb(s["peak"]),
                     f"{unit} " + fmt.format(r["err"]), fmt.format(s["err"]), s["info"]])
    print_table(f"swimdist ({a.workers} worker processes, solver={a.solver}) vs swimnetworks; "
                "fit seconds, peak RSS GB of all processes",
                ["case", "M", "ref fit", "swimdist fit", "ratio", "ref peak", "swimdist peak",
                 "ref test", "swimdist test", "solver"], rows)
    print(f"\n(total benchmark time {time.perf_counter() - t_all:.0f} s)")


if __name__ == "__main__":
    main()
