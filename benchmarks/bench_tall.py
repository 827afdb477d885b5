"""Tall data out of core: millions of rows, a handful of inputs, features never stored.

A regression with N = 2 000 000 rows of 16 inputs stored as Zarr (generated from a seed into
a temporary directory: y = sum_k sin(x_k) + 0.01 noise, x uniform in [-1, 1]^16, and a
held-out test set of 100 000 rows), M = 1000 tanh neurons, through `swimdist train` with a
3 GB memory budget for all its processes (embedded LocalCluster), side by side with the
one-process loop it should match: the same W and b (read from the model swimdist wrote), a
pass over X's Zarr row blocks that regenerates A_blk = [tanh(X_blk W + b), 1] and
accumulates G += A_blk^T A_blk, g += A_blk^T y_blk, then the same eigen-cutoff solve as
swimdist's normal equations. Also: the loop on a 200 000-row subset (same W, b) for the test
error a smaller fit reaches, and both at N = 0.5 and 1 million for the rows per second.
Peak = summed RSS of the command and all its children (the Dask workers), sampled every
20 ms (as bench_workstation.py).

    python benchmarks/bench_tall.py [--sizes 500000 1000000 2000000] [--budget 3GB]

About 6 minutes on 2 cores (needs ~1 GB of free disk for the inputs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import gb, print_table  # noqa: E402
from bench_workstation import run_measured  # noqa: E402

D, NOISE, TEST = 16, 0.01, 100_000
CHUNK = 10_000  # Zarr row chunk of the inputs (the feature block height swimdist picks)


def target(x: np.ndarray) -> np.ndarray:
    return np.sin(x).sum(axis=1)


def write_data(path: str, n: int, seed: int) -> None:
    """``X`` (n x 16) and ``y`` into a Zarr group at ``path``, generated block by block."""
    import zarr

    grp = zarr.open_group(store=path, mode="w")
    xa = grp.create_array("X", shape=(n, D), chunks=(CHUNK, D), dtype="float64")
    ya = grp.create_array("y", shape=(n,), chunks=(CHUNK,), dtype="float64")
    rng = np.random.default_rng(seed)
    step = 100 * CHUNK
    for r in range(0, n, step):
        k = min(step, n - r)
        x = rng.uniform(-1.0, 1.0, (k, D))
        xa[r:r + k] = x
        ya[r:r + k] = target(x) + NOISE * rng.standard_normal(k)


def swimdist_run(data: str, test: str, budget: str, width: int, workdir: str, tag: str):
    out = os.path.join(workdir, f"out-{tag}")
    cmd = [sys.executable, "-m", "swimdist.cli", "train", "--dataset", "file", "--input", data,
           "--x-key", "X",
           "--y-key", "y", "--test-input", test, "--task", "regression", "--hidden",
           str(width), "--solver", "normal", "--seed", "0", "--memory-limit", budget,
           "-o", out]
    wall, peak, r = run_measured(cmd)
    if r.returncode != 0:
        print(r.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"swimdist failed (exit {r.returncode})")
    m = json.load(open(os.path.join(out, "metrics.json")))
    lines = [ln for ln in r.stderr.splitlines() if "design matrix" in ln or "memory plan" in ln]
    return {"wall": wall, "peak": peak, "fit": m["timings"]["total"], "timings": m["timings"],
            "mae": m["test"]["mae"], "placement": m.get("placement"), "log": lines,
            "model": os.path.join(out, "model.npz")}


LOOP = """
import json, math, sys, time
import numpy as np, zarr
from swimdist import load_model
m = load_model({model!r})
W, b = m.layers_[0].weights, m.layers_[0].biases
n, rows, N = W.shape[1] + 1, {chunk}, {n}
t0 = time.perf_counter()
grp = zarr.open_group(store={data!r}, mode="r")
G, g, yy = np.zeros((n, n)), np.zeros(n), 0.0
A = np.empty((rows, n)); A[:, -1] = 1.0
for r in range(0, N, rows):
    x, y = grp["X"][r:r + rows], grp["y"][r:r + rows]
    a = A[:len(x)]
    np.matmul(x, W, out=a[:, :-1]); a[:, :-1] += b; np.tanh(a[:, :-1], out=a[:, :-1])
    G += a.T @ a; g += a.T @ y; yy += y @ y
lam, V = np.linalg.eigh(G)
cut = max({rcond}, math.sqrt(16 * n * np.finfo(float).eps))
keep = np.sqrt(np.maximum(lam, 0)) > cut * math.sqrt(lam[-1])
c = V[:, keep] @ ((V[:, keep].T @ g) / lam[keep])
fit = time.perf_counter() - t0
t = zarr.open_group(store={test!r}, mode="r")
xt, yt = t["X"][:], t["y"][:]
pred = np.tanh(xt @ W + b) @ c[:-1] + c[-1]
print(json.dumps({{"fit": fit, "mae": float(np.mean(np.abs(pred - yt)))}}))
"""


def loop_run(model: str, data: str, test: str, n: int):
    code = LOOP.format(model=model, data=data, test=test, n=n, chunk=CHUNK, rcond=1e-10)
    wall, peak, r = run_measured([sys.executable, "-c", code])
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
        raise SystemExit("numpy loop failed")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    return {"wall": wall, "peak": peak, **res}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[500_000, 1_000_000, 2_000_000])
    ap.add_argument("--width", type=int, default=1000)
    ap.add_argument("--budget", default="3GB")
    ap.add_argument("--subset", type=int, default=200_000)
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    t_all = time.perf_counter()
    workdir = a.workdir or tempfile.mkdtemp(prefix="swimdist-tall-")
    test = os.path.join(workdir, "test.zarr")
    write_data(test, TEST, seed=1)
    rows, rates = [], []
    sizes = sorted(a.sizes)
    big = sizes[-1]
    data = {n: os.path.join(workdir, f"train-{n}.zarr") for n in sizes}
    for n in sizes:
        write_data(data[n], n, seed=0)  # same seed: the smaller sets are prefixes
    print(f"(data written in {time.perf_counter() - t_all:.0f} s to {workdir})", flush=True)
    results = {}
    for n in sizes:
        s = swimdist_run(data[n], test, a.budget, a.width, workdir, str(n))
        print("\n".join(s["log"]), flush=True)
        lp = loop_run(s["model"], data[n], test, n)
        results[n] = (s, lp)
        t = s["timings"]
        rates.append([f"{n:,}", f"{s['fit']:.1f}", f"{lp['fit']:.1f}",
                      f"{s['fit'] / lp['fit']:.2f}", f"{n / s['fit']:,.0f}",
                      f"{n / lp['fit']:,.0f}", gb(s["peak"]), gb(lp["peak"]),
                      f"{s['mae']:.2e}", f"{lp['mae']:.2e}", s["placement"],
                      f"sample {t['sample']:.1f}, features {t['features']:.1f}, "
                      f"solve {t['solve']:.1f}"])
        print("| " + " | ".join(rates[-1]) + " |", flush=True)
    s, lp = results[big]
    sub = loop_run(s["model"], data[big], test, a.subset)
    rows.append([f"swimdist train, {a.budget} budget", f"{s['fit']:.1f}",
                 f"{s['fit'] / lp['fit']:.2f}", gb(s["peak"]), f"{s['mae']:.3e}",
                 f"normal equations, A {s['placement']}"])
    rows.append(["numpy loop, one process, regenerate + accumulate", f"{lp['fit']:.1f}", "1.00",
                 gb(lp["peak"]), f"{lp['mae']:.3e}", "same W, b; same cutoff"])
    rows.append([f"numpy loop on the first {a.subset:,} rows", f"{sub['fit']:.1f}",
                 f"{sub['fit'] / lp['fit']:.2f}", gb(sub["peak"]), f"{sub['mae']:.3e}",
                 "same W, b"])
    print_table(f"Tall regression, N = {big:,} x {D} inputs (Zarr), M = {a.width}, tanh, "
                f"held-out {TEST:,} rows (fit s; ratio to the loop; peak = RSS of all "
                "processes, GB)",
                ["run", "fit s", "ratio", "peak GB", "test MAE", "notes"], rows)
    print_table("Rows per second against N (fit; swimdist / loop)",
                ["N", "swimdist s", "loop s", "ratio", "swimdist rows/s", "loop rows/s",
                 "swimdist peak GB", "loop peak GB", "swimdist MAE", "loop MAE", "A",
                 "swimdist stages s"], rates)
    ok = [s["fit"] <= 2 * lp["fit"], s["peak"] <= 3e9, s["mae"] <= sub["mae"]]
    print(f"\ntargets: fit <= 2x loop {ok[0]}, peak <= 3 GB {ok[1]}, "
          f"MAE <= the {a.subset:,}-row fit's {ok[2]}")
    per_row = [results[n][0]["fit"] / n for n in sizes]
    print("swimdist seconds per million rows: "
          + ", ".join(f"{n / 1e6:g}M {1e6 * p:.1f}" for n, p in zip(sizes, per_row,
                                                                     strict=True)))
    if not a.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n(total benchmark time {time.perf_counter() - t_all:.0f} s)")
    return 0 if all(ok) and math.isfinite(s["mae"]) else 1


if __name__ == "__main__":
    sys.exit(main())
