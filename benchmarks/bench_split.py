"""Split-and-solve against the full direct solve: the seed report's sine experiment and MNIST.

Part "sine" (the seed report's experiment): f(x, y) = sin(alpha (x + y)) on [0, 1]^2, N = 5000
training points and a separate test set of 5000, one tanh layer of M neurons sampled by
swimdist (seed 0), rcond 1e-10. For every n_splits = 1..10 and every order (norm ascending,
norm descending, as sampled, random): train and test MAE, relative residual and its ratio to
the full direct solve's, time and its ratio. For alpha = 1, 5, 10 and M = 1000, 4000.

Part "mnist": SWIMClassifier on MNIST 60k/10k (10 classes, one-hot), M = 4000, on a LocalCluster
of worker processes: solver="split" with n_splits = 1, 2, 4, 8 against solver="direct". Each
case runs in a fresh subprocess so its peak RSS (summed over the process and all its children,
the Dask workers included) is its own.

    flock /tmp/swimdist-bench.lock python benchmarks/bench_split.py [--part sine|mnist|all]

Takes about 15 minutes on 2 cores (sine M=4000 dominates; MNIST from SWIMDIST_DATA_DIR or
../shared/data/mnist).
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

ORDERS = ("norm", "norm-desc", "ordered", "random")
RCOND = 1e-10


def _sci(x: float) -> str:
    return f"{x:.2e}"


# --------------------------------------------------------------------------- sine
def sine_case(width: int, alpha: float, max_splits: int, n: int = 5000):
    """All rows of the sine table for one (M, alpha), plus the full solve's row."""
    from swimdist import solve
    from swimdist.datasets import sine
    from swimdist.sampling import sample_layers

    X, y = sine(n, alpha=alpha, seed=0)
    Xt, yt = sine(n, alpha=alpha, seed=1)
    Y = y[:, None]
    # The estimator's stages, unrolled so that every solve sees the very same A.
    layer = sample_layers(X, Y, [width], activation="tanh", seed=0)[0]
    A = np.c_[layer.apply(X), np.ones(n)]
    At = np.c_[layer.apply(Xt), np.ones(len(Xt))]
    norms = np.linalg.norm(layer.weights, axis=0)

    def measure(method, **kw):
        t0 = time.perf_counter()
        res = solve(A, Y, method=method, rcond=RCOND, **kw)
        sec = time.perf_counter() - t0
        c = res.solution
        return {"train": float(np.abs(A @ c - Y).mean()),
                "test": float(np.abs(At @ c - yt[:, None]).mean()),
                "rel": float(res.relative_residual), "sec": sec}

    full = measure("direct")
    rows = []
    for order in ORDERS:
        for k in range(1, max_splits + 1):
            r = measure("split", n_splits=k, split_order=order, intercept=True,
                        column_norms=norms, seed=0)
            rows.append({"order": order, "k": k, **r})
    return full, rows


def run_sine(widths, alphas, max_splits):
    long_rows, summary = [], []
    pivot_rel, pivot_test = [], []
    for width in widths:
        for alpha in alphas:
            t0 = time.perf_counter()
            full, rows = sine_case(width, alpha, max_splits)
            print(f"sine M={width} alpha={alpha}: {time.perf_counter() - t0:.1f} s", flush=True)
            long_rows.append([width, alpha, "full direct", "-", _sci(full["train"]),
                              _sci(full["test"]), _sci(full["rel"]), "1.00",
                              f"{full['sec']:.2f}", "1.00"])
            for r in rows:
                long_rows.append([width, alpha, r["order"], r["k"], _sci(r["train"]),
                                  _sci(r["test"]), _sci(r["rel"]), f"{r['rel'] / full['rel']:.2f}",
                                  f"{r['sec']:.2f}", f"{r['sec'] / full['sec']:.2f}"])
            for order in ORDERS:
                mine = [r for r in rows if r["order"] == order]
                pivot_rel.append([width, alpha, order, _sci(full["rel"])]
                                 + [f"{r['rel'] / full['rel']:.2f}" for r in mine])
                pivot_test.append([width, alpha, order, _sci(full["test"])]
                                  + [f"{r['test'] / full['test']:.2f}" for r in mine])
            norm = {r["k"]: r for r in rows if r["order"] == "norm"}
            few = [norm[k] for k in range(2, min(4, max_splits) + 1)]
            best = min(few, key=lambda r: r["rel"]) if few else None
            k4 = norm.get(4)
            summary.append([
                width, alpha, _sci(full["rel"]),
                _sci(k4["rel"]) if k4 else "-",
                f"k={best['k']}: {_sci(best['rel'])}" if best else "-",
                "yes" if k4 and k4["rel"] < full["rel"] else "no",
                "yes" if best and best["rel"] < full["rel"] and best["test"] < full["test"]
                else "no",
            ])
    ks = [f"k={k}" for k in range(1, max_splits + 1)]
    print_table(f"Sine, N=5000 train / 5000 test, tanh, rcond {RCOND:g}: split-and-solve per "
                "n_splits (k) and order vs the full direct solve (gelsd). rel = ||AC-Y||/||Y||; "
                "ratios are split / full.",
                ["M", "alpha", "order", "k", "train MAE", "test MAE", "rel resid", "rel ratio",
                 "time s", "time ratio"], long_rows)
    print_table("Sine: relative residual, split / full (full's value in the 4th column)",
                ["M", "alpha", "order", "full rel"] + ks, pivot_rel)
    print_table("Sine: test MAE, split / full (full's value in the 4th column)",
                ["M", "alpha", "order", "full test MAE"] + ks, pivot_test)
    print_table("Does norm-sorted (ascending) splitting with few splits beat the full solve?",
                ["M", "alpha", "full rel", "norm k=4 rel", "best norm k<=4",
                 "k=4 below full", "some k<=4 below full (rel and test MAE)"], summary)


# --------------------------------------------------------------------------- MNIST
def mnist_case(solver: str, k: int, width: int, workers: int) -> dict:
    from swimdist import SWIMClassifier
    from swimdist.cluster import connect
    from swimdist.datasets import load_mnist

    X, y, Xt, yt = load_mnist(mnist_dir())
    with PeakRSS() as mem:
        client, cluster = connect(n_workers=workers)
        opts = {"n_splits": k} if solver == "split" else None
        model = SWIMClassifier(hidden_layer_sizes=(width,), solver=solver, rcond=RCOND,
                               random_state=0, solver_options=opts)
        t0 = time.perf_counter()
        model.fit(X, y)
        fit = time.perf_counter() - t0
    err = float(100 * np.mean(model.predict(Xt) != yt))
    train_err = float(100 * np.mean(model.predict(X) != y))
    client.close()
    cluster.close()
    return {"fit": fit, "peak": mem.peak, "base": mem.base, "err": err, "train_err": train_err,
            "rel": float(model.fit_info_["relative_residual"]),
            "solve": model.timings_["solve"], "features": model.timings_["features"]}


def run_mnist(width: int, splits, workers: int):
    cases = [("direct", 0)] + [("split", k) for k in splits]
    results = {}
    for solver, k in cases:
        cmd = [sys.executable, __file__, "--case", json.dumps([solver, k, width, workers])]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(out.stdout[-2000:], out.stderr[-4000:])
            raise SystemExit(f"case {solver} k={k} failed")
        results[(solver, k)] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[(solver, k)]
        print(f"mnist {solver} k={k}: fit {r['fit']:.1f} s, test error {r['err']:.2f} %",
              flush=True)
    ref = results[("direct", 0)]
    rows = []
    for solver, k in cases:
        r = results[(solver, k)]
        rows.append(["full direct" if solver == "direct" else f"split k={k}",
                     f"{r['fit']:.1f}", f"{r['fit'] / ref['fit']:.2f}", f"{r['solve']:.1f}",
                     f"{r['train_err']:.2f}", f"{r['err']:.2f}", _sci(r["rel"]), gb(r["peak"])])
    print_table(f"MNIST 60k/10k, M={width} tanh, 10 classes one-hot, rcond {RCOND:g}, "
                f"LocalCluster {workers} worker processes x 1 thread; peak RSS of all processes",
                ["solver", "fit s", "ratio", "solve s", "train err %", "test err %",
                 "rel resid", "peak RSS GB"], rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["sine", "mnist", "all"], default="all")
    ap.add_argument("--widths", type=int, nargs="+", default=[1000, 4000])
    ap.add_argument("--alphas", type=float, nargs="+", default=[1.0, 5.0, 10.0])
    ap.add_argument("--max-splits", type=int, default=10)
    ap.add_argument("--mnist-width", type=int, default=4000)
    ap.add_argument("--mnist-splits", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        solver, k, width, workers = json.loads(args.case)
        print(json.dumps(mnist_case(solver, k, width, workers)))
        return
    t0 = time.perf_counter()
    if args.part in ("sine", "all"):
        run_sine(args.widths, [a if a != int(a) else int(a) for a in args.alphas],
                 args.max_splits)
    if args.part in ("mnist", "all"):
        run_mnist(args.mnist_width, args.mnist_splits, args.workers)
    print(f"\nbench_split took {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
