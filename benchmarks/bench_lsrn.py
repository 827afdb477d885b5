"""LSRN against the other least-squares solvers on SWIM feature matrices: one ratio table.

Cases (features built with swimdist's own sampling and lazy features, tanh, seed 0):

- ``mnist2000``: MNIST 60k/10k, M = 2000 (A: 60 000 x 2001, 10 right-hand sides), N/n = 30;
- ``mnist1000``: MNIST, M = 1000 (A: 60 000 x 1001), the taller case, N/n = 60;
- ``sine``: the seed report's regression, N = 5000, M = 1000, alpha = 1, 5, 10 (N/n = 5);
- ``aspect``: time against the aspect ratio, sine (alpha = 5) with M = ``--aspect-width``
  (500) neurons and N = r M rows for r in ``--aspect-ratios`` (5 10 20 40); cases
  ``ratio<r>-m<M>``.

Solvers: ``direct`` (gelsd, the reference), ``dask-lstsq`` (``dask.array.linalg.lstsq``, TSQR),
``normal`` (the normal equations, one pass), ``scipy-lsqr`` (no preconditioner, one column at a
time, capped), ``lsqr`` (swimdist's LSQR without a preconditioner, all columns in lockstep, same
cap; it records the residual per iteration), LSRN with the Gaussian and the
sparse-sign sketch, each with LSQR and with the Chebyshev semi-iteration (in-process, numpy
``A``), the sparse sign with a loose tolerance (1e-6: enough for classification), and
``lsrn-cluster`` (Gaussian + LSQR on a LocalCluster of 2 worker processes x 1 thread, the
features built and kept on the workers). Every solver runs in a fresh subprocess
and reports the peak RSS summed over that process and its children, sampled every 20 ms.
The residual is ``||A X - Y||_F / ||Y||_F`` computed the same way for every solver.

It also measures the peak memory of the Gaussian sketch of the MNIST M = 2000 matrix against
the size of the sketching matrix G (s x N x 8 bytes) it never builds.

Figures (PNG, in ``--figures DIR``, default benchmarks/figures; ``--no-figures`` skips them,
and so does a missing matplotlib): ``lsrn_residuals_<case>.png``, the relative residual per
iteration of LSQR and LSRN (Gaussian, sparse sign) against the residuals of gelsd and the normal
equations (the seed report's Figure 4.1), for every MNIST and sine case; and
``lsrn_time_vs_aspect.png``, solve time against N/M for the ``aspect`` cases.

    flock /tmp/swimdist-bench.lock python benchmarks/bench_lsrn.py [--cases mnist2000 ...]

About 15-20 minutes on 2 cores (MNIST from SWIMDIST_DATA_DIR or ../shared/data/mnist).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from _common import REPO, PeakRSS, gb, mnist_dir, print_table  # noqa: E402

RCOND = 1e-10
LSQR_CAP = {"mnist": 100, "sine": 1000, "ratio": 1000}  # iteration caps without preconditioner
SOLVERS = [
    "direct",
    "dask-lstsq",
    "normal",
    "scipy-lsqr",
    "lsqr",
    "lsrn-gaussian",
    "lsrn-sparse-sign",
    "lsrn-gaussian-chebyshev",
    "lsrn-sparse-sign-chebyshev",
    "lsrn-sparse-sign-tol1e-6",
    "lsrn-cluster",
]
# what the figures show: residual histories, direct solvers as lines, times against N/M
HISTORY_LABELS = {
    "lsqr": "LSQR, no preconditioner",
    "lsrn-gaussian": "LSRN Gaussian",
    "lsrn-sparse-sign": "LSRN sparse sign",
}
REFERENCE_LABELS = {"direct": "direct (gelsd)", "normal": "normal equations"}
TIME_LABELS = {
    "direct": "direct (gelsd)",
    "normal": "normal equations",
    "dask-lstsq": "dask lstsq (TSQR)",
    "scipy-lsqr": "scipy LSQR, no precond. (capped)",
    "lsrn-gaussian": "LSRN Gaussian",
    "lsrn-sparse-sign": "LSRN sparse sign",
    "lsrn-sparse-sign-chebyshev": "LSRN sparse sign, Chebyshev",
}


def _cap(case: str) -> int:
    """Iteration limit of the unpreconditioned LSQR runs of ``case``."""
    return next(v for k, v in LSQR_CAP.items() if case.startswith(k))


def _ratio_case(case: str) -> tuple[int, int]:
    """``ratio<r>-m<M>`` -> (r, M)."""
    r, m = case.split("-")
    return int(r[len("ratio") :]), int(m[1:])


# ----------------------------------------------------------------------------- data
def prepare(case: str, out: str, quick: bool) -> None:
    """Build the train/test feature matrices of ``case`` and save them as .npy in ``out``."""
    from swimdist.features import design_matrix
    from swimdist.sampling import sample_layers

    if case.startswith("mnist"):
        from swimdist.datasets import load_mnist

        X, y, Xt, yt = load_mnist(mnist_dir())
        if quick:
            X, y, Xt, yt = X[:6000], y[:6000], Xt[:1000], yt[:1000]
        M = int(case[5:]) // (10 if quick else 1)
        layers = sample_layers(X, y[:, None], [M], activation="tanh", classification=True, seed=0)
        Y = np.eye(10)[y]
        np.save(os.path.join(out, "y_test.npy"), yt)
        with open(os.path.join(out, "X.pkl"), "wb") as f:
            pickle.dump((X, layers), f)
    else:
        from swimdist.datasets import sine

        if case.startswith("ratio"):
            ratio, M = _ratio_case(case)
            N, alpha = ratio * M, 5.0
        else:
            N, M, alpha = 5000, 1000, float(case.split("-")[1])
        X, y = sine(N, alpha=alpha, seed=0)
        Xt, yt = sine(2000, alpha=alpha, seed=1)
        layers = sample_layers(X, y[:, None], [M], activation="tanh", seed=0)
        Y = y[:, None]
        np.save(os.path.join(out, "y_test.npy"), yt)
    np.save(os.path.join(out, "A.npy"), np.asarray(design_matrix(X, layers).compute()))
    np.save(os.path.join(out, "At.npy"), np.asarray(design_matrix(Xt, layers).compute()))
    np.save(os.path.join(out, "Y.npy"), Y)


def _metric(case: str, At: np.ndarray, X: np.ndarray, yt: np.ndarray) -> float:
    pred = At @ X
    if case.startswith("mnist"):
        return float(100 * np.mean(pred.argmax(axis=1) != yt))
    return float(np.abs(pred[:, 0] - yt).mean())


# ----------------------------------------------------------------------------- one run
def run_one(case: str, solver: str, data: str) -> dict:
    """Run ``solver`` on ``case`` in this (fresh) process; return the figures as a dict."""
    from swimdist.lstsq import solve

    Y = np.load(os.path.join(data, "Y.npy"))
    out: dict = {"solver": solver, "iterations": ""}
    client = None
    if solver == "lsrn-cluster":
        # A is built and kept on the workers; the client never holds it
        from distributed import Client, LocalCluster

        from swimdist.features import design_matrix

        with open(os.path.join(data, "X.pkl"), "rb") as f:
            Xtr, layers = pickle.load(f)
        cluster = LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            host="127.0.0.1",
            memory_limit="6GB",
        )
        client = Client(cluster)
        A = design_matrix(Xtr, layers).persist()
        from distributed import wait

        wait(A)
        del Xtr
    else:
        A = np.load(os.path.join(data, "A.npy"))
    with warnings.catch_warnings(record=True) as caught, PeakRSS() as mem:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        if solver == "direct":
            res = solve(A, Y, method="direct", rcond=RCOND)
            X = res.solution
            out["rank"] = res.rank
        elif solver == "normal":
            res = solve(A, Y, method="normal", rcond=RCOND)
            X = res.solution
            out["rank"] = res.rank
        elif solver == "lsqr":
            from swimdist.lstsq.lsqr import lsqr

            it = lsqr(A, Y, tol=1e-12, max_iter=_cap(case))
            X = it.z
            out["iterations"] = it.iterations
            out["history"] = it.residual_history
        elif solver == "dask-lstsq":
            import dask.array as da

            rows = 10000 if A.shape[0] > 10000 else A.shape[0]
            Ad = da.from_array(A, chunks=(rows, -1))
            X = da.linalg.lstsq(Ad, da.from_array(Y, chunks=(rows, -1)))[0].compute()
        elif solver == "scipy-lsqr":
            from scipy.sparse.linalg import lsqr

            cols, its = [], []
            for k in range(Y.shape[1]):
                r = lsqr(A, Y[:, k], atol=1e-12, btol=1e-12, iter_lim=_cap(case))
                cols.append(r[0])
                its.append(r[2])
            X = np.stack(cols, axis=1)
            out["iterations"] = f"{max(its)} x {Y.shape[1]}"
        else:
            opts = {"seed": 0}
            if solver.endswith("-tol1e-6"):
                solver, opts["tol"] = solver.removesuffix("-tol1e-6"), 1e-6
            if solver != "lsrn-cluster":
                parts = solver.split("-", 1)[1]
                opts["lsrn_iterations"] = "chebyshev" if parts.endswith("chebyshev") else "lsqr"
                opts["sketch"] = parts.removesuffix("-chebyshev")
            res = solve(A, Y, method="lsrn", rcond=RCOND, **opts)
            X = res.solution
            out["iterations"] = res.iterations
            out["history"] = list(res.residual_history)
            out["rank"] = res.rank
            out["stages"] = {
                k: round(v, 1)
                for k, v in res.timings.items()
                if k in ("persist", "sketch", "svd", "iterate")
            }
            out["converged"] = res.converged
        out["seconds"] = time.perf_counter() - t0
    out["peak_rss"] = mem.peak
    out["base_rss"] = mem.base
    out["warnings"] = sorted({type(w.message).__name__ for w in caught})
    X = np.asarray(X).reshape(-1, Y.shape[1])
    if client is not None:
        from swimdist.lstsq._common import residual_norms

        rn = residual_norms(A, X, Y)
        client.close()
        cluster.close()
    else:
        R = A @ X - Y
        rn = np.sqrt(np.einsum("ij,ij->j", R, R))
    out["residual"] = float(np.linalg.norm(rn) / np.linalg.norm(Y))
    out["shape"] = [int(A.shape[0]), int(A.shape[1]), int(Y.shape[1])]
    At = np.load(os.path.join(data, "At.npy"))
    out["test"] = _metric(case, At, X, np.load(os.path.join(data, "y_test.npy")))
    return out


class _NoCopy:
    """A numpy array seen through ``__getitem__`` only (``da.from_array`` then slices views)."""

    def __init__(self, a: np.ndarray) -> None:
        self.a, self.shape, self.dtype, self.ndim = a, a.shape, a.dtype, a.ndim

    def __getitem__(self, key):
        return self.a[key]


def sketch_memory(data: str) -> dict:
    """Peak RSS of the Gaussian sketch of A (numpy and row-chunked dask) vs the size of G."""
    import dask
    import dask.array as da

    from swimdist.lstsq.sketch import DEFAULT_BLOCK_BYTES, sketch, sketch_size

    A = np.load(os.path.join(data, "A.npy"))
    Y = np.load(os.path.join(data, "Y.npy"))
    s = sketch_size(A.shape[1], 2.0)
    out = {
        "N": A.shape[0],
        "n": A.shape[1],
        "s": s,
        "G_bytes": s * A.shape[0] * 8,
        "A_bytes": A.nbytes,
        "piece_bytes": DEFAULT_BLOCK_BYTES,
    }
    with PeakRSS() as m:
        sketch(A, Y, s=s, kind="gaussian", seed=0)
    out["numpy"] = (m.base, m.peak, m.seconds)
    # dask's from_array copies numpy input (dask 2026.8): wrap A so the blocks are views
    Ad = da.from_array(_NoCopy(A), chunks=(10000, -1), name=False, asarray=True)
    with dask.config.set(scheduler="threads", num_workers=2), PeakRSS() as m:
        sketch(Ad, Y, s=s, kind="gaussian", seed=0)
    out["dask"] = (m.base, m.peak, m.seconds)
    return out


def _child(args, env=None) -> dict:
    cmd = [sys.executable, __file__, *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env)
    if p.returncode != 0:
        return {"error": (p.stderr or p.stdout).strip().splitlines()[-1:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _title(case: str, r: dict) -> str:
    N, n, K = r["shape"]
    if case.startswith("mnist"):
        name = f"MNIST, M = {n - 1}"
    elif case.startswith("ratio"):
        name = f"sine alpha = 5, M = {n - 1}, N/M = {_ratio_case(case)[0]}"
    else:
        name = f"sine alpha = {case.split('-')[1]}, M = {n - 1}"
    rhs = "1 right-hand side" if K == 1 else f"{K} right-hand sides"
    return f"{name}: A {N} x {n}, {rhs}, rcond {RCOND:g}"


def figures(results: dict[str, dict[str, dict]], out: str) -> None:
    """Write the PNG figures of the cases measured (see the module docstring)."""
    import _plots

    out = os.path.abspath(out)
    for case, by_solver in results.items():
        if case.startswith("ratio"):
            continue
        hist = {
            f"{label} ({by_solver[s]['iterations']} it., {by_solver[s]['seconds']:.1f} s)": (
                by_solver[s]["history"]
            )
            for s, label in HISTORY_LABELS.items()
            if s in by_solver and by_solver[s].get("history")
        }
        refs = {
            f"{label}: {by_solver[s]['residual']:.3e} ({by_solver[s]['seconds']:.1f} s)": (
                by_solver[s]["residual"]
            )
            for s, label in REFERENCE_LABELS.items()
            if s in by_solver
        }
        if not hist:
            continue
        title = "Relative residual per iteration\n" + _title(case, next(iter(by_solver.values())))
        if (
            _plots.residual_histories(
                hist, refs, title=title, path=os.path.join(out, f"lsrn_residuals_{case}.png")
            )
            is None
        ):
            return  # no matplotlib: said once, nothing more to draw
    aspect = sorted((c for c in results if c.startswith("ratio")), key=_ratio_case)
    widths = {_ratio_case(c)[1] for c in aspect}
    if len(aspect) >= 2 and len(widths) == 1:
        ratios = [_ratio_case(c)[0] for c in aspect]
        times = {
            label: [results[c].get(s, {}).get("seconds", float("nan")) for c in aspect]
            for s, label in TIME_LABELS.items()
            if any(s in results[c] for c in aspect)
        }
        _plots.times_vs_aspect(
            ratios,
            times,
            title=f"Solve time against N/M (each solver in its own process)\n"
            f"sine alpha = 5, M = {widths.pop()}, N = (N/M) M, rcond {RCOND:g}",
            path=os.path.join(out, "lsrn_time_vs_aspect.png"),
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--cases",
        nargs="+",
        default=["mnist2000", "mnist1000", "sine", "aspect"],
        help="mnist2000, mnist1000, sine (alpha 1, 5, 10), sine-<alpha>, aspect, ratio<r>-m<M>",
    )
    ap.add_argument("--solvers", nargs="+", default=SOLVERS)
    ap.add_argument("--quick", action="store_true", help="subsampled MNIST (script check)")
    ap.add_argument(
        "--aspect-ratios",
        type=int,
        nargs="+",
        default=[5, 10, 20, 40],
        help="N / M of the aspect cases",
    )
    ap.add_argument("--aspect-width", type=int, default=500, help="M of the aspect cases")
    ap.add_argument(
        "--figures",
        metavar="DIR",
        default=str(REPO / "benchmarks" / "figures"),
        help="where the PNG figures go (default: benchmarks/figures)",
    )
    ap.add_argument("--no-figures", action="store_true", help="print the tables only")
    ap.add_argument(
        "--blas-threads",
        type=int,
        default=None,
        help="BLAS threads of every solver process (default: the library's own choice)",
    )
    ap.add_argument("--child", nargs=3, metavar=("CASE", "SOLVER", "DIR"), help=argparse.SUPPRESS)
    ap.add_argument("--prepare", nargs=2, metavar=("CASE", "DIR"), help=argparse.SUPPRESS)
    ap.add_argument("--quick-flag", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sketch-memory", metavar="DIR", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.prepare:
        prepare(a.prepare[0], a.prepare[1], a.quick_flag)
        print("{}")
        return
    if a.child:
        print(json.dumps(run_one(*a.child)))
        return
    if a.sketch_memory:
        print(json.dumps(sketch_memory(a.sketch_memory)))
        return

    t_start = time.perf_counter()
    env = None
    if a.blas_threads:
        env = dict(os.environ)
        for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[k] = str(a.blas_threads)
    print(
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; BLAS threads per "
        f"solver process: {a.blas_threads or 'default'}",
        flush=True,
    )
    cases = []
    for c in a.cases:
        if c == "sine":
            cases += [f"sine-{al}" for al in (1, 5, 10)]
        elif c == "aspect":
            cases += [f"ratio{r}-m{a.aspect_width}" for r in a.aspect_ratios]
        else:
            cases.append(c)
    rows = []
    results: dict[str, dict[str, dict]] = {}
    memrow = None
    for case in cases:
        d = tempfile.mkdtemp(prefix=f"bench_lsrn_{case}_")
        try:
            t0 = time.perf_counter()
            _child(["--prepare", case, d] + (["--quick-flag"] if a.quick else []))
            print(f"[{case}] features built in {time.perf_counter() - t0:.0f} s", flush=True)
            ref = None
            for solver in a.solvers:
                if solver == "lsrn-cluster" and not case.startswith("mnist"):
                    continue
                r = _child(["--child", case, solver, d], env)
                if "error" in r:
                    print(f"[{case}] {solver}: FAILED {r['error']}", flush=True)
                    continue
                if solver == "direct":
                    ref = r
                results.setdefault(case, {})[solver] = r
                ratio = r["seconds"] / ref["seconds"] if ref else float("nan")
                metric = f"{r['test']:.2f} %" if case.startswith("mnist") else f"{r['test']:.2e}"
                rows.append(
                    [
                        case,
                        solver,
                        f"{r['seconds']:.1f}",
                        f"{ratio:.2f}",
                        f"{r['residual']:.3e}",
                        f"{r['residual'] / ref['residual']:.3g}" if ref else "",
                        metric,
                        r["iterations"],
                        gb(r["peak_rss"]),
                        gb(r["peak_rss"] - r["base_rss"]),
                        " ".join(f"{k} {v}" for k, v in r.get("stages", {}).items())
                        + (" NOT CONVERGED" if r.get("converged") is False else "")
                        + (f" warns: {','.join(r['warnings'])}" if r["warnings"] else ""),
                    ]
                )
                print(
                    f"[{case}] {solver}: {r['seconds']:.1f} s, residual {r['residual']:.3e}, "
                    f"test {metric}",
                    flush=True,
                )
            if case == "mnist2000" and "lsrn-gaussian" in a.solvers:
                memrow = _child(["--sketch-memory", d], env)
        finally:
            shutil.rmtree(d, ignore_errors=True)

    print_table(
        "LSRN vs the other solvers (time ratio and residual ratio to direct = gelsd; "
        "test = error % for MNIST, MAE for sine; RSS in GB, all processes)",
        [
            "case",
            "solver",
            "time s",
            "x direct",
            "rel. residual",
            "res / direct",
            "test",
            "iterations",
            "peak RSS",
            "peak - base",
            "stages s / notes",
        ],
        rows,
    )
    if memrow and "error" not in memrow:
        G = memrow["G_bytes"]
        print(
            f"\nGaussian sketch of MNIST M=2000 (A {memrow['N']} x {memrow['n']}, "
            f"{gb(memrow['A_bytes'])} GB; s = {memrow['s']}): G would be s x N x 8 = "
            f"{gb(G)} GB; pieces of at most {memrow['piece_bytes'] / 2**20:.0f} MiB"
        )
        for k, (base, peak, sec) in ((k, memrow[k]) for k in ("numpy", "dask")):
            print(
                f"  {k:5s}: peak RSS {gb(peak)} GB = A-loaded base {gb(base)} GB "
                f"+ {gb(peak - base)} GB during the sketch ({(peak - base) / G:.2f} x G), "
                f"{sec:.1f} s"
            )
    elif memrow:
        print(f"sketch memory run FAILED: {memrow['error']}")
    if not a.no_figures:
        figures(results, a.figures)
    print(
        f"\nbench_lsrn total: {time.perf_counter() - t_start:.0f} s "
        f"(load average at the end {os.getloadavg()[0]:.1f})"
    )


if __name__ == "__main__":
    main()
