"""One workstation, out of core: MNIST with wide layers through the CLI in a memory budget.

Runs `swimdist train` as a user would (embedded LocalCluster, features on local disk) and
samples the summed RSS of the command and all its children (the Dask workers) every 20 ms.

    python benchmarks/bench_workstation.py [--widths 20000] [--budget 5GB] [--compare4000]

M = 20 000 takes about 5 minutes on 2 cores and ~10 GB of free disk; --compare4000 adds
MNIST M = 4000 with a 2 GB budget next to swimnetworks in memory (about 2 more minutes).
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


def run_measured(cmd: list[str]) -> tuple[float, int, subprocess.CompletedProcess]:
    """Run ``cmd``; return wall seconds, peak RSS of its process tree, and the result."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
            "solver_timings": m.get("solver_timings", {}), "iterations": m.get("iterations")}


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
    a = ap.parse_args()
    t_all = time.perf_counter()
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

    for w in a.widths:
        row(f"swimdist M={w}", a.budget,
            swimdist_case(w, a.budget, a.solver, a.solver_option, workdir, a.store_format,
                          a.feature_dtype))
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
    print(f"\n(total benchmark time {time.perf_counter() - t_all:.0f} s)")


if __name__ == "__main__":
    main()
