"""Fast by default: ``solver="auto"`` against gelsd and the other solvers, one table per case.

Cases (features built with swimdist's own sampling and features, tanh, seed 0, rcond 1e-10):

- ``mnist``: MNIST 60k/10k, M = 2000 (A: 60 000 x 2001, 10 one-hot right-hand sides; N/n = 30),
  plus the whole fit (sample + features + solve) of ``SWIMClassifier(solver="auto")`` against
  swimnetworks' ``Dense + Linear``;
- ``sine-1``, ``sine-5``, ``sine-10``: ``f(x, y) = sin(alpha (x + y))`` on [0, 1]^2, N = 5000,
  M = 1000 (N/n = 5), test MAE on 5000 separate points;
- ``tall``: the same sine with alpha = 5, N = 40 000, M = 1000 (N/n = 40).

Solvers: ``direct`` (numpy gelsd, the reference), ``normal`` (plain normal equations),
LSRN with the Gaussian and the sparse-sign sketch (``lsrn``), ``split`` (4 sorted blocks),
``sketch-direct``, ``auto``, and ``auto-f32``: ``auto`` with ``A`` stored in float32
(accumulated in float64; residual and test figures use the float64 features). Each runs in a
fresh process on the in-memory numpy ``A``; solves under 20 s are repeated three times
(median). Peak RSS is summed over the process and its children, sampled every 20 ms; "+RSS" is
the increase over the loaded data. The residual is ``||A X - Y||_F`` on the float64 ``A``.

    flock /tmp/swimdist-bench.lock python benchmarks/bench_fast.py [--cases mnist sine tall]

About 10 minutes on 2 cores (MNIST from SWIMDIST_DATA_DIR or ../shared/data/mnist).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from _common import PeakRSS, gb, mnist_dir, print_table  # noqa: E402

RCOND = 1e-10
SOLVERS = [
    "direct",
    "normal",
    "lsrn-gaussian",
    "lsrn-sparse-sign",
    "split",
    "sketch-direct",
    "auto",
    "auto-f32",
]
FITS = ["fit-swimnetworks", "fit-swimdist"]
SINE = {"sine-1": (1.0, 5000), "sine-5": (5.0, 5000), "sine-10": (10.0, 5000), "tall": (5.0, 40000)}


# ----------------------------------------------------------------------------- data
def prepare(case: str, out: str) -> None:
    """Build the train/test feature matrices of ``case`` and save them as .npy in ``out``."""
    from swimdist.features import design_matrix
    from swimdist.sampling import sample_layers

    if case == "mnist":
        from swimdist.datasets import load_mnist

        X, y, Xt, yt = load_mnist(mnist_dir())
        layers = sample_layers(
            X, y[:, None], [2000], activation="tanh", classification=True, seed=0
        )
        Y = np.eye(10)[y]
    else:
        from swimdist.datasets import sine

        alpha, n = SINE[case]
        X, y = sine(n, alpha=alpha, seed=0)
        Xt, yt = sine(5000, alpha=alpha, seed=1)
        layers = sample_layers(X, y[:, None], [1000], activation="tanh", seed=0)
        Y = y[:, None]
    A = np.asarray(design_matrix(X, layers).compute())
    np.save(os.path.join(out, "A.npy"), A)
    np.save(os.path.join(out, "A32.npy"), A.astype(np.float32))
    np.save(os.path.join(out, "At.npy"), np.asarray(design_matrix(Xt, layers).compute()))
    np.save(os.path.join(out, "Y.npy"), Y)
    np.save(os.path.join(out, "y_test.npy"), yt)


def _metric(case: str, pred: np.ndarray, yt: np.ndarray) -> float:
    if case == "mnist":
        return float(100 * np.mean(pred.argmax(axis=1) != yt))
    return float(np.abs(pred[:, 0] - yt).mean())


# ----------------------------------------------------------------------------- one run
def _solve_once(solver: str, A, Y):
    from swimdist.lstsq import solve, solver_options

    if solver == "direct":
        return solve(A, Y, method="direct", rcond=RCOND)
    if solver.startswith("lsrn-"):
        return solve(A, Y, method="lsrn", rcond=RCOND, seed=0, sketch=solver[5:])
    if solver == "auto-f32":
        return solve(A, Y, method="auto", rcond=RCOND, seed=0)
    seed = {"seed": 0} if "seed" in solver_options(solver) else {}
    return solve(A, Y, method=solver, rcond=RCOND, **seed)


def run_one(case: str, solver: str, data: str) -> dict:
    """Run ``solver`` on ``case`` in this (fresh) process; return the figures as a dict."""
    out: dict = {"solver": solver}
    if solver.startswith("fit-"):
        return run_fit(solver, out)
    Y = np.load(os.path.join(data, "Y.npy"))
    A = np.load(os.path.join(data, "A32.npy" if solver == "auto-f32" else "A.npy"))
    times = []
    with warnings.catch_warnings(record=True) as caught, PeakRSS() as mem:
        warnings.simplefilter("always")
        for _ in range(3):
            t0 = time.perf_counter()
            res = _solve_once(solver, A, Y)
            times.append(time.perf_counter() - t0)
            if times[0] > 20:
                break
    out["seconds"] = statistics.median(times)
    out["peak_rss"], out["base_rss"] = mem.peak, mem.base
    out["warnings"] = sorted({type(w.message).__name__ for w in caught})
    out["rank"], out["iterations"] = res.rank, res.iterations
    out["chosen"] = res.info.get("chosen", "")
    out["stages"] = {k: round(v, 2) for k, v in res.timings.items() if k != "total"}
    X = np.asarray(res.solution).reshape(-1, Y.shape[1])
    if solver == "auto-f32":
        A = np.load(os.path.join(data, "A.npy"))
    R = A @ X - Y
    out["residual"] = float(np.sqrt(np.einsum("ij,ij->", R, R)))
    At = np.load(os.path.join(data, "At.npy"))
    out["test"] = _metric(case, At @ X, np.load(os.path.join(data, "y_test.npy")))
    return out


def run_fit(solver: str, out: dict) -> dict:
    """Whole MNIST fit: sample + features + solve, swimnetworks or swimdist."""
    from swimdist.datasets import load_mnist

    X, y, Xt, yt = load_mnist(mnist_dir())
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        if solver == "fit-swimnetworks":
            from sklearn.pipeline import Pipeline
            from swimnetworks import Dense, Linear

            model = Pipeline(
                [
                    (
                        "hidden",
                        Dense(
                            layer_width=2000,
                            activation="tanh",
                            parameter_sampler="tanh",
                            is_classifier=True,
                            random_seed=0,
                        ),
                    ),
                    ("linear", Linear(regularization_scale=RCOND, is_classifier=True)),
                ]
            )
            model.fit(X, y)
            out["seconds"] = time.perf_counter() - t0
            labels = np.asarray(model.transform(Xt)).ravel()
        else:
            from swimdist import SWIMClassifier

            model = SWIMClassifier(
                hidden_layer_sizes=(2000,),
                activation="tanh",
                solver="auto",
                rcond=RCOND,
                random_state=0,
            )
            model.fit(X, y)
            out["seconds"] = time.perf_counter() - t0
            out["stages"] = {k: round(v, 1) for k, v in model.timings_.items() if k != "total"}
            out["chosen"] = model.fit_info_.get("chosen", "")
            labels = np.asarray(model.predict(Xt))
    out["peak_rss"], out["base_rss"] = mem.peak, mem.base
    out["test"] = float(100 * np.mean(labels != yt))
    return out


def _child(args) -> dict:
    cmd = [sys.executable, __file__, *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        return {"error": (p.stderr or p.stdout).strip().splitlines()[-1:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _targets(case: str, auto: dict, ref: dict) -> str:
    """One line: the issue's bounds for ``auto`` against gelsd, met or not."""
    t = auto["seconds"] / ref["seconds"]
    r = auto["residual"] / ref["residual"]
    if case.startswith("sine"):
        m = auto["test"] / ref["test"]
        return f"auto: MAE {m:.2f}x gelsd's (<= 2: {'ok' if m <= 2 else 'MISSED'})"
    if case == "mnist":
        d = auto["test"] - ref["test"]
        acc = f"test error {d:+.2f} points (|.| <= 0.05: {'ok' if abs(d) <= 0.05 else 'MISSED'})"
    else:
        m = auto["test"] / ref["test"]
        acc = f"MAE {m:.2f}x (<= 2: {'ok' if m <= 2 else 'MISSED'})"
    return (
        f"auto: time {t:.2f}x gelsd's (<= 0.5: {'ok' if t <= 0.5 else 'MISSED'}), residual "
        f"{r:.3f}x (<= 1.5: {'ok' if r <= 1.5 else 'MISSED'}), {acc}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=["mnist", "sine", "tall"])
    ap.add_argument("--solvers", nargs="+", default=SOLVERS + FITS)
    ap.add_argument("--child", nargs=3, metavar=("CASE", "SOLVER", "DIR"), help=argparse.SUPPRESS)
    ap.add_argument("--prepare", nargs=2, metavar=("CASE", "DIR"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.prepare:
        prepare(*a.prepare)
        print("{}")
        return
    if a.child:
        print(json.dumps(run_one(*a.child)))
        return

    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}", flush=True)
    cases = []
    for c in a.cases:
        cases += ["sine-1", "sine-5", "sine-10"] if c == "sine" else [c]
    t_start = time.perf_counter()
    for case in cases:
        d = tempfile.mkdtemp(prefix=f"bench_fast_{case}_")
        try:
            t0 = time.perf_counter()
            _child(["--prepare", case, d])
            print(f"[{case}] features built in {time.perf_counter() - t0:.0f} s", flush=True)
            results = {}
            for solver in a.solvers:
                if solver.startswith("fit-") and case != "mnist":
                    continue
                r = _child(["--child", case, solver, d])
                if "error" in r:
                    print(f"[{case}] {solver}: FAILED {r['error']}", flush=True)
                    continue
                results[solver] = r
                print(f"[{case}] {solver}: {r['seconds']:.2f} s", flush=True)
            ref = results.get("direct")
            metric = "test error" if case == "mnist" else "test MAE"
            rows = []
            for solver, r in results.items():
                if solver.startswith("fit-"):
                    continue
                rows.append(
                    [
                        solver + (f" -> {r['chosen']}" if r.get("chosen") else ""),
                        f"{r['seconds']:.2f}",
                        f"{r['seconds'] / ref['seconds']:.2f}" if ref else "",
                        f"{r['residual']:.4e}",
                        f"{r['residual'] / ref['residual']:.3f}" if ref else "",
                        f"{r['test']:.2f} %" if case == "mnist" else f"{r['test']:.3e}",
                        r["rank"],
                        r["iterations"] or "",
                        gb(r["peak_rss"]),
                        gb(r["peak_rss"] - r["base_rss"]),
                        " ".join(f"{k} {v}" for k, v in r["stages"].items()),
                    ]
                )
            A_shape = np.load(os.path.join(d, "A.npy"), mmap_mode="r").shape
            print_table(
                f"{case}: A {A_shape[0]} x {A_shape[1]}, rcond {RCOND:g}",
                [
                    "solver",
                    "time s",
                    "x gelsd",
                    "residual",
                    "x gelsd",
                    metric,
                    "rank",
                    "iter",
                    "peak RSS GB",
                    "+RSS GB",
                    "stages (s)",
                ],
                rows,
            )
            if ref and "auto" in results:
                print(_targets(case, results["auto"], ref))
            fits = [(s, r) for s, r in results.items() if s.startswith("fit-")]
            if fits:
                base = results.get("fit-swimnetworks")
                print_table(
                    "MNIST whole fit (sample + features + solve), M = 2000",
                    ["fit", "time s", "x swimnetworks", "test error", "peak RSS GB", "stages"],
                    [
                        [
                            s + (f" -> {r['chosen']}" if r.get("chosen") else ""),
                            f"{r['seconds']:.1f}",
                            f"{r['seconds'] / base['seconds']:.2f}" if base else "",
                            f"{r['test']:.2f} %",
                            gb(r["peak_rss"]),
                            " ".join(f"{k} {v}" for k, v in r.get("stages", {}).items()),
                        ]
                        for s, r in fits
                    ],
                )
            print(flush=True)
        finally:
            shutil.rmtree(d, ignore_errors=True)
    print(f"total {time.perf_counter() - t_start:.0f} s; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
