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

Part "width" (the seed report's Figure 4.2): MNIST test error against the width M (250 ... 4000,
``--mnist-widths``), SWIMClassifier with distinct pairs and ``--width-solver`` (auto), each
width in a fresh subprocess on a LocalCluster as above.

Figures (PNG, in ``--figures DIR``, default benchmarks/figures; ``--no-figures`` skips them,
and so does a missing matplotlib): ``split_sine_mae.png`` (test MAE against the number of
splits for every neuron order, a panel per M and alpha: the seed report's Figures 4.4 and 4.6),
``split_mnist_error.png`` (MNIST test error against the number of splits) and
``width_mnist_error.png`` (MNIST test error against M).

    flock /tmp/swimdist-bench.lock python benchmarks/bench_split.py [--part sine|mnist|width|all]

Takes about 15 minutes on 2 cores for sine and mnist (sine M=4000 dominates; MNIST from
SWIMDIST_DATA_DIR or ../shared/data/mnist), plus about 3 for the widths.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from _common import REPO, PeakRSS, gb, mnist_dir, print_table  # noqa: E402

ORDERS = ("norm", "norm-desc", "ordered", "random")
RCOND = 1e-10


def _sci(x: float) -> str:
    return f"{x:.2e}"


# --------------------------------------------------------------------------- sine
def sine_case(width: int, alpha: float, max_splits: int, n: int = 5000):
    """All rows of the sine table for one (M, alpha), plus the full solve's row."""
    from swimdist import solve
    from swimdist.datasets import sine
    from swimdist.design import DesignMatrix
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
        design = DesignMatrix(A, bias=True, column_norms=norms)
        res = solve(design, Y, method=method, rcond=RCOND, **kw)
        sec = time.perf_counter() - t0
        c = res.solution
        return {"train": float(np.abs(A @ c - Y).mean()),
                "test": float(np.abs(At @ c - yt[:, None]).mean()),
                "rel": float(res.relative_residual), "sec": sec}

    full = measure("direct")
    rows = []
    for order in ORDERS:
        for k in range(1, max_splits + 1):
            r = measure("split", n_splits=k, split_order=order, seed=0)
            rows.append({"order": order, "k": k, **r})
    return full, rows


def run_sine(widths, alphas, max_splits, figures=None):
    long_rows, summary = [], []
    pivot_rel, pivot_test = [], []
    panels = []
    for width in widths:
        for alpha in alphas:
            t0 = time.perf_counter()
            full, rows = sine_case(width, alpha, max_splits)
            print(f"sine M={width} alpha={alpha}: {time.perf_counter() - t0:.1f} s", flush=True)
            panels.append({"title": f"M = {width}, alpha = {alpha} (full: {_sci(full['test'])})",
                           "splits": list(range(1, max_splits + 1)), "full": full["test"],
                           "values": {o: [r["test"] for r in rows if r["order"] == o]
                                      for o in ORDERS}})
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
    if figures:
        import _plots

        _plots.split_mae(panels, path=os.path.join(figures, "split_sine_mae.png"),
                         title="Split-and-solve on sine (N = 5000 train / 5000 test, tanh, "
                         f"rcond {RCOND:g}):\ntest MAE against the number of splits k, "
                         "per neuron order")


# --------------------------------------------------------------------------- MNIST
def mnist_case(solver: str, k: int, width: int, workers: int, replace: bool = True) -> dict:
    from swimdist import SWIMClassifier
    from swimdist.cluster import connect
    from swimdist.datasets import load_mnist

    X, y, Xt, yt = load_mnist(mnist_dir())
    with PeakRSS() as mem:
        client, cluster = connect(n_workers=workers)
        opts = {"n_splits": k} if solver == "split" else None
        model = SWIMClassifier(hidden_layer_sizes=(width,), solver=solver, rcond=RCOND,
                               random_state=0, solver_options=opts, replace=replace)
        t0 = time.perf_counter()
        model.fit(X, y)
        fit = time.perf_counter() - t0
    err = float(100 * np.mean(model.predict(Xt) != yt))
    train_err = float(100 * np.mean(model.predict(X) != y))
    client.close()
    cluster.close()
    return {"fit": fit, "peak": mem.peak, "base": mem.base, "err": err, "train_err": train_err,
            "rel": float(model.fit_info_["relative_residual"]),
            "solve": model.timings_["solve"], "features": model.timings_["features"],
            "chosen": str(model.fit_info_.get("chosen", model.fit_info_["solver"]))}


def run_mnist(width: int, splits, workers: int, figures=None):
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
    if figures:
        import _plots

        ks = [k for solver, k in cases if solver == "split"]
        _plots.error_curve(
            ks, {"split-and-solve, norm-sorted": [results[("split", k)]["err"] for k in ks]},
            references={f"full direct solve: {ref['err']:.2f} %": ref["err"]},
            title=f"Split-and-solve on MNIST 60k/10k, M = {width}, rcond {RCOND:g}:\n"
            "test error against the number of splits",
            xlabel="number of splits k", path=os.path.join(figures, "split_mnist_error.png"),
            logx=True, annotate="split-and-solve, norm-sorted")


def run_width(widths, solver: str, workers: int, figures=None):
    """MNIST test error against the width M (the seed report's Figure 4.2)."""
    rows, results = [], {}
    for width in widths:
        cmd = [sys.executable, __file__, "--case", json.dumps([solver, 0, width, workers, False])]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(out.stdout[-2000:], out.stderr[-4000:])
            raise SystemExit(f"width case M={width} failed")
        r = results[width] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"mnist M={width} ({r['chosen']}): fit {r['fit']:.1f} s, test error "
              f"{r['err']:.2f} %", flush=True)
        rows.append([width, r["chosen"], f"{r['fit']:.1f}", f"{r['features']:.1f}",
                     f"{r['solve']:.1f}", f"{r['train_err']:.2f}", f"{r['err']:.2f}",
                     _sci(r["rel"]), gb(r["peak"])])
    print_table(f"MNIST 60k/10k against the width M: tanh, distinct pairs, solver={solver}, "
                f"rcond {RCOND:g}, LocalCluster {workers} worker processes x 1 thread",
                ["M", "solver", "fit s", "features s", "solve s", "train err %", "test err %",
                 "rel resid", "peak RSS GB"], rows)
    if figures:
        import _plots

        chosen = sorted({results[w]["chosen"] for w in widths})
        if chosen != [solver]:
            solver = f"{solver} -> {', '.join(chosen)}"
        _plots.error_curve(
            list(widths), {"test (10k)": [results[w]["err"] for w in widths],
                           "train (60k)": [results[w]["train_err"] for w in widths]},
            title="SWIM on MNIST: classification error against the width M\n"
            f"(tanh, distinct pairs, rcond {RCOND:g}, solver {solver})",
            xlabel="hidden neurons M", ylabel="classification error, %",
            path=os.path.join(figures, "width_mnist_error.png"), logx=True, logy=True,
            annotate="test (10k)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["sine", "mnist", "width", "all"], default="all")
    ap.add_argument("--widths", type=int, nargs="+", default=[1000, 4000])
    ap.add_argument("--alphas", type=float, nargs="+", default=[1.0, 5.0, 10.0])
    ap.add_argument("--max-splits", type=int, default=10)
    ap.add_argument("--mnist-width", type=int, default=4000)
    ap.add_argument("--mnist-splits", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--mnist-widths", type=int, nargs="+", default=[250, 500, 1000, 2000, 4000])
    ap.add_argument("--width-solver", default="auto", help="solver of the width part")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--figures", metavar="DIR", default=str(REPO / "benchmarks" / "figures"),
                    help="where the PNG figures go (default: benchmarks/figures)")
    ap.add_argument("--no-figures", action="store_true", help="print the tables only")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(mnist_case(*json.loads(args.case))))
        return
    figures = None if args.no_figures else os.path.abspath(args.figures)
    t0 = time.perf_counter()
    if args.part in ("sine", "all"):
        run_sine(args.widths, [a if a != int(a) else int(a) for a in args.alphas],
                 args.max_splits, figures)
    if args.part in ("mnist", "all"):
        run_mnist(args.mnist_width, args.mnist_splits, args.workers, figures)
    if args.part in ("width", "all"):
        run_width(args.mnist_widths, args.width_solver, args.workers, figures)
    print(f"\nbench_split took {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
