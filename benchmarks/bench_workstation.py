"""One workstation, out of core: MNIST with wide layers through the CLI in a memory budget.

Runs `swimdist train` as a user would (embedded LocalCluster, features on local disk) and
samples the summed RSS of the command and all its children (the Dask workers) every 20 ms.

    python benchmarks/bench_workstation.py [--widths 20000] [--budget 5GB] [--compare4000]
                                           [--prototype ../shared/bench/prototype_wide.py]

M = 20 000 takes about 7 minutes on 2 cores and ~10 GB of free disk; --compare4000 adds
MNIST M = 4000 with a 2 GB budget next to swimnetworks in memory (about 2 more minutes).
``--prototype`` runs the one-process reference script after it (about 5 more minutes) and
prints the two side by side, and a stage table puts every stage of the swimdist run next to
its limit on this machine (flops at the GEMM rates swimdist measured here, bytes at the
memory bandwidth measured below).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import gb, mnist_dir, print_table  # noqa: E402


def run_measured(cmd: list[str], env: dict | None = None
                 ) -> tuple[float, int, subprocess.CompletedProcess]:
    """Run ``cmd``; return wall seconds, peak RSS of its process tree, and the result."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    peak = 0
    stop = threading.Event()

    def sample():
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            peak = max(peak, total)
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    stop.set()
    th.join()
    return time.perf_counter() - t0, peak, subprocess.CompletedProcess(cmd, proc.returncode,
                                                                      out, err)


def swimdist_case(width: int, budget: str, solver: str, options: list[str], workdir: str,
                  store_format: str = "npy", feature_dtype: str = "float32"):
    out = os.path.join(workdir, f"out-{width}")
    store = os.path.join(workdir, f"store-{width}")
    cmd = [sys.executable, "-m", "swimdist.cli", "train", "--dataset", "mnist", "--data-dir",
           mnist_dir(), "--hidden", str(width), "--distinct", "--memory-limit", budget,
           "--store", store, "--store-format", store_format, "--feature-dtype", feature_dtype,
           "--solver", solver, "-o", out]
    for o in options:
        cmd += ["--solver-option", o]
    wall, peak, r = run_measured(cmd)
    if r.returncode != 0:
        print(r.stderr[-4000:], file=sys.stderr)
        return {"failed": f"exit {r.returncode}", "wall": wall, "peak": peak}
    m = json.load(open(os.path.join(out, "metrics.json")))
    shutil.rmtree(store, ignore_errors=True)
    return {"wall": wall, "fit": m["timings"]["total"], "peak": peak,
            "test": m["test"]["error_pct"], "train": m["train"]["error_pct"],
            "timings": m["timings"], "solver": m["solver"], "stderr": r.stderr,
            "solver_timings": m.get("solver_timings", {}), "iterations": m.get("iterations"),
            "cg": m.get("cg", {})}


REF = """
import sys, time, json, numpy as np
sys.path.insert(0, {here!r})
from _common import mnist_dir
from swimdist.datasets import load_mnist
import swimnetworks as sn
from sklearn.pipeline import Pipeline
X, y, Xt, yt = load_mnist(mnist_dir())
m = Pipeline([("h", sn.Dense(layer_width={width}, activation="tanh", parameter_sampler="tanh",
                             random_seed=0, is_classifier=True)),
              ("l", sn.Linear(regularization_scale=1e-10, is_classifier=True))])
t = time.perf_counter(); m.fit(X, y); fit = time.perf_counter() - t
print(json.dumps({{"fit": fit, "test": float(100 * np.mean(m.predict(Xt).ravel() != yt))}}))
"""


def reference_case(width: int):
    code = REF.format(here=os.path.dirname(os.path.abspath(__file__)), width=width)
    wall, peak, r = run_measured([sys.executable, "-c", code])
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
        raise SystemExit("swimnetworks failed")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    return {"wall": wall, "fit": res["fit"], "peak": peak, "test": res["test"]}


PROTOTYPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
                         "bench", "prototype_wide.py")


def prototype_case(path: str, width: int):
    """The one-process reference: its printed stage times, errors and our RSS sample."""
    import re

    env = dict(os.environ, SWIMDIST_DATA_DIR=mnist_dir())
    wall, peak, r = run_measured([sys.executable, path, "--m", str(width)], env=env)
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
        return {"failed": f"exit {r.returncode}", "wall": wall, "peak": peak}
    out = r.stdout
    stages = dict((k, float(v)) for k, v in re.findall(r"(\w+) ([\d.]+)(?=[,;])",
                                                       out.split("stage times [s]:")[1]))
    fit = float(re.search(r"fit total ([\d.]+)", out).group(1))
    test = float(re.search(r"test error ([\d.]+) %", out).group(1))
    train = float(re.search(r"train error ([\d.]+) %", out).group(1))
    distinct = int(re.search(r"distinct=(\d+)", out).group(1))
    return {"wall": wall, "fit": fit, "peak": peak, "test": test, "train": train,
            "stages": stages, "distinct": distinct}


def memory_bandwidth() -> float:
    """Bytes per second of one core streaming through memory (a float32 -> float64 copy,
    what a CG pass does with every stored feature), best of three."""
    import numpy as np

    a = np.ones(2**27, dtype=np.float32)
    b = np.empty(2**27)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return a.nbytes / best


def gemm_seconds_per_flop() -> tuple[float, float]:
    """Seconds per flop of a Gram-panel-shaped GEMM (2000 x 1600 by 1600 x 20 000) on all
    cores, float64 and float32, best of three (measured here, before the runs)."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    out = []
    with threadpool_limits(os.cpu_count() or 1):
        for dt in (np.float64, np.float32):
            a = np.random.default_rng(0).standard_normal((1600, 20000)).astype(dt)
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                a[:, :2000].T @ a
                best = min(best, time.perf_counter() - t)
            out.append(best / (2 * 1600 * 2000 * 20000))
    return out[0], out[1]


def stage_limits(r: dict, width: int, rates: tuple[float, float],
                 bandwidth: float) -> list[list[str]]:
    """Each stage of a swimdist run next to its limit on this machine."""
    N, d, K, n = 60000, 784, 10, width + 1
    s64, s32 = rates  # seconds per flop
    bw = bandwidth
    t, st = r["timings"], r["solver_timings"]
    steps = int(r.get("iterations") or 0)
    step = N * width * 4 / bw + 4 * N * n * K * s64 + 2 * n * n * K * s64
    rows = [["sample", t["sample"], None, "pairs and their rows only"],
            ["features", t["features"], 2 * N * d * width * s64,
             "2 N d M flops at the float64 GEMM rate (pre-activations in float64)"]]
    if "gram" in st:
        rows.append(["Gram panels", st["gram"], N * n * (n + K) * s32,
                     "N n (n + K) flops (upper panels) at the float32 GEMM rate"])
        rows.append(["factorization", st["factor"], n**3 / 3 * s64,
                     "n^3 / 3 flops at the float64 GEMM rate"])
    if "sketch" in st:
        rows.append(["Nystrom sketch", st["sketch"], 4 * N * n * 1000 * s32,
                     "4 N n r flops (r = 1000) at the float32 GEMM rate"])
        rows.append(["preconditioner", st["factor"], None, "QR, Cholesky, SVD of n x r"])
    rows.append([f"CG ({steps} steps)", st["cg"], (steps + 1) * step,
                 f"per step: the store's {N * width * 4 / 1e9:.1f} GB at {bw / 1e9:.0f} GB/s, "
                 "4 N n K flops on the workers, 2 n^2 K on the client"])
    cg = r.get("cg") or {}
    if cg.get("cg_passes"):
        # the CG stage split: its passes over the store (workers) and the preconditioner's
        # triangular solves (client), each next to its own limit
        k = int(cg["cg_passes"])
        rows.append([f"  CG passes ({k})", cg["cg_pass_seconds"],
                     k * (N * width * 4 / bw + 4 * N * n * K * s64),
                     "per pass: the store's bytes at the bandwidth, 4 N n K flops"])
        rows.append(["  CG preconditioner solves", cg["cg_precond_seconds"],
                     k * n * n * 8 / bw,
                     "per solve: the factor (n^2 / 2 float64) read twice at the bandwidth"])
    out = []
    for name, sec, lim, how in rows:
        out.append([name, f"{sec:.1f}", "" if lim is None else f"{lim:.1f}",
                    "" if lim is None else f"{sec / lim:.2f}", how])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", type=int, nargs="+", default=[20000])
    ap.add_argument("--budget", default="5GB", help="--memory-limit for the wide runs")
    ap.add_argument("--solver", default="auto")
    ap.add_argument("--solver-option", action="append", default=[])
    ap.add_argument("--compare4000", action="store_true")
    ap.add_argument("--workdir", default=None, help="where the feature stores go")
    ap.add_argument("--store-format", default="npy", choices=["npy", "zarr"])
    ap.add_argument("--feature-dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--prototype", nargs="?", const=PROTOTYPE, default=None,
                    help="run the one-process reference script side by side (default path: "
                         "../shared/bench/prototype_wide.py)")
    a = ap.parse_args()
    t_all = time.perf_counter()
    rates, bandwidth = gemm_seconds_per_flop(), memory_bandwidth() * (os.cpu_count() or 1)
    print(f"this machine: GEMM {1e-9 / rates[0]:.0f} GFLOP/s float64, {1e-9 / rates[1]:.0f} "
          f"float32 (all cores); memory {bandwidth / 1e9:.0f} GB/s (one stream per core)",
          flush=True)
    workdir = a.workdir or tempfile.mkdtemp(prefix="swimdist-bench-")
    rows = []

    def row(label, budget, r):
        if "failed" in r:
            rows.append([label, budget, "", f"{r['wall']:.0f}", gb(r["peak"]), "", "",
                         f"FAILED ({r['failed']})"])
        else:
            t = r["timings"]
            rows.append([label, budget, f"{r['fit']:.0f}", f"{r['wall']:.0f}", gb(r["peak"]),
                         f"{r['train']:.2f}", f"{r['test']:.2f}",
                         f"{r['solver']}: sample {t['sample']:.0f} s, features "
                         f"{t['features']:.0f} s, solve {t['solve']:.0f} s ("
                         + ", ".join(f"{k} {v:.0f} s" for k, v in r["solver_timings"].items()
                                     if k not in ("total", "choose"))
                         + f"; {r['iterations']} iterations)"])
            print("\n".join(line for line in r["stderr"].splitlines()
                            if "auto:" in line or "normal-tiled" in line), flush=True)
        print("| " + " | ".join(rows[-1]) + " |", flush=True)

    results = {}
    for w in a.widths:
        results[w] = swimdist_case(w, a.budget, a.solver, a.solver_option, workdir,
                                   a.store_format, a.feature_dtype)
        row(f"swimdist M={w}", a.budget, results[w])
    if a.prototype:
        w = a.widths[-1]
        ref = prototype_case(a.prototype, w)
        if "failed" in ref:
            rows.append([f"prototype M={w}", "none", "", f"{ref['wall']:.0f}", gb(ref["peak"]),
                         "", "", f"FAILED ({ref['failed']})"])
        else:
            rows.append([f"prototype M={w}", "none", f"{ref['fit']:.0f}", f"{ref['wall']:.0f}",
                         gb(ref["peak"]), f"{ref['train']:.2f}", f"{ref['test']:.2f}",
                         f"one numpy process, {ref['distinct']} distinct neurons, float64: "
                         + ", ".join(f"{k} {v:.0f} s" for k, v in ref["stages"].items())])
            mine = results[w]
            if "failed" not in mine:
                rows.append([f"ratio M={w}", "", f"{mine['fit'] / ref['fit']:.2f}",
                             f"{mine['wall'] / ref['wall']:.2f}",
                             f"{mine['peak'] / ref['peak']:.2f}", "", "",
                             "swimdist / prototype (target: fit <= 0.7, peak <= 4 GB, test "
                             "error <= 1.45 %)"])
        print("| " + " | ".join(rows[-1]) + " |", flush=True)
    if a.compare4000:
        row("swimdist M=4000", "2GB", swimdist_case(4000, "2GB", a.solver, a.solver_option,
                                                    workdir, a.store_format, a.feature_dtype))
        ref = reference_case(4000)
        rows.append(["swimnetworks M=4000", "in memory", f"{ref['fit']:.0f}",
                     f"{ref['wall']:.0f}", gb(ref["peak"]), "", f"{ref['test']:.2f}",
                     "gelsd (pairs drawn with replacement)"])
    print_table("MNIST 60k/10k, tanh, distinct neurons, through `swimdist train` on the embedded "
                "cluster (fit s = sample + features + solve; wall s = whole command; peak = "
                "RSS of all processes, GB)",
                ["run", "budget", "fit s", "wall s", "peak GB", "train err %", "test err %",
                 "stages"], rows)
    for w, r in results.items():
        if "failed" not in r:
            print_table(f"Stages of swimdist M={w} against their limits on this machine "
                        "(ratio = seconds / limit)", ["stage", "s", "limit s", "ratio", "limit"],
                        stage_limits(r, w, rates, bandwidth))
    print(f"\n(total benchmark time {time.perf_counter() - t_all:.0f} s)")


if __name__ == "__main__":
    main()
