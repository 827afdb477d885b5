"""``solver="auto"`` on inputs it was not tuned on: gelsd's time, auto's choice and its cost.

Cases are generated from seed 0 (features from swimdist's own sampling, rcond 1e-10); none of
them is one of ``bench_fast``'s:

- ``mnist-*``: MNIST 60k/10k with tanh and relu layers of 1000..4000 neurons, drawn with
  replacement (duplicate neurons left in A, as a user who passes the features to ``solve``
  has them) or without (``nodup``). Test figure: test error in percent.
- ``sine-*``: ``sin(alpha (x + y))`` at alpha 1, 5, 10 with shapes unlike bench_fast's
  (N/n from 3 to 6). Test figure: MAE on 5000 separate points.
- ``tall-*``: regressions with N/n from 30 to 100: a tanh layer on a 4-D smooth target with
  ``Y = A c + 1e-8`` noise (a consistent system), a relu layer on Friedman's #1 function, a
  tanh layer on a 2-D Gaussian bump, and a two-class +-1 problem.
- ``wide``: N/n = 2, tanh, a 3-D smooth target.

Every solver runs in a fresh process on the in-memory numpy A: ``direct`` (gelsd, the
reference) and ``auto``; the rates ``auto`` uses are measured before the first case (the
cached file is removed first, so the calibration is this run's). Columns: gelsd's seconds,
``auto``'s choice, ``auto``'s time as a multiple of gelsd's, the residual ratio and the test
figure of both.

Targets: auto <= 0.5x gelsd on every classification case and every case with N/n >= 8,
<= 1.0x elsewhere; residual <= 1.01x; test error within 0.02 points (classification).

    flock /tmp/swimdist-bench.lock python benchmarks/bench_anyinput.py [--cases ...]

About 5 minutes on 2 cores (MNIST from SWIMDIST_DATA_DIR or ../shared/data/mnist).
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

import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from _common import mnist_dir, print_table  # noqa: E402

RCOND = 1e-10
#: name -> (kind, parameters)
CASES = {
    "mnist-tanh-1000": ("mnist", dict(M=1000, activation="tanh", replace=True)),
    "mnist-relu-1500": ("mnist", dict(M=1500, activation="relu", replace=True)),
    "mnist-relu-2500-nodup": ("mnist", dict(M=2500, activation="relu", replace=False)),
    "mnist-tanh-3000-nodup": ("mnist", dict(M=3000, activation="tanh", replace=False)),
    "mnist-relu-4000": ("mnist", dict(M=4000, activation="relu", replace=True)),
    "sine-1": ("sine", dict(alpha=1.0, N=3000, M=800)),
    "sine-5": ("sine", dict(alpha=5.0, N=7200, M=1200)),
    "sine-10": ("sine", dict(alpha=10.0, N=4000, M=1300)),
    "tall-tanh-consistent": ("tall", dict(target="consistent", N=30000, M=600, d=4,
                                          activation="tanh")),
    "tall-relu-friedman": ("tall", dict(target="friedman", N=50000, M=500, d=5,
                                        activation="relu")),
    "tall-tanh-bump": ("tall", dict(target="bump", N=24000, M=800, d=2, activation="tanh")),
    "tall-relu-twoclass": ("tall", dict(target="twoclass", N=40000, M=1000, d=6,
                                        activation="relu")),
    "wide": ("tall", dict(target="smooth3", N=4000, M=2000, d=3, activation="tanh")),
}


def _target(kind: str, X: np.ndarray, rng) -> np.ndarray:
    if kind == "friedman":
        return (10 * np.sin(np.pi * X[:, 0] * X[:, 1]) + 20 * (X[:, 2] - 0.5) ** 2
                + 10 * X[:, 3] + 5 * X[:, 4])
    if kind == "bump":
        return np.exp(-20 * ((X - 0.5) ** 2).sum(axis=1))
    if kind == "twoclass":
        return np.where(np.sin(4 * X[:, 0]) + X[:, 1] - X[:, 2] ** 2 > 0.3, 1.0, -1.0)
    return np.sin(X.sum(axis=1)) + X[:, 0] * X[:, -1]


def prepare(case: str, out: str) -> None:
    """Build the train/test feature matrices of ``case`` and save them as .npy in ``out``."""
    from swimdist.features import design_matrix
    from swimdist.sampling import sample_layers

    kind, p = CASES[case]
    rng = np.random.default_rng(0)
    classification = False
    if kind == "mnist":
        from swimdist.datasets import load_mnist

        X, y, Xt, yt = load_mnist(mnist_dir())
        layers = sample_layers(X, y[:, None], [p["M"]], activation=p["activation"],
                               classification=True, seed=0, replace=p["replace"])
        Y = np.eye(10)[y]
        classification = True
    elif kind == "sine":
        from swimdist.datasets import sine

        X, y = sine(p["N"], alpha=p["alpha"], seed=0)
        Xt, yt = sine(5000, alpha=p["alpha"], seed=1)
        layers = sample_layers(X, y[:, None], [p["M"]], activation="tanh", seed=0)
        Y = y[:, None]
    else:
        X = rng.uniform(size=(p["N"], p["d"]))
        Xt = rng.uniform(size=(5000, p["d"]))
        y, yt = _target(p["target"], X, rng), _target(p["target"], Xt, rng)
        classification = p["target"] == "twoclass"
        layers = sample_layers(X, y[:, None], [p["M"]], activation=p["activation"], seed=0,
                               classification=classification)
        Y = y[:, None]
    A = np.asarray(design_matrix(X, layers).compute())
    At = np.asarray(design_matrix(Xt, layers).compute())
    if kind == "tall" and p["target"] == "consistent":
        c = rng.standard_normal((A.shape[1], 1))
        Y = A @ c + 1e-8 * rng.standard_normal((A.shape[0], 1))
        yt = (At @ c)[:, 0]
    np.save(os.path.join(out, "A.npy"), A)
    np.save(os.path.join(out, "At.npy"), At)
    np.save(os.path.join(out, "Y.npy"), Y)
    np.save(os.path.join(out, "y_test.npy"), yt)
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump({"classification": classification, "shape": list(A.shape)}, f)


def _metric(meta: dict, pred: np.ndarray, yt: np.ndarray) -> float:
    if meta["classification"]:
        if pred.shape[1] == 1:
            return float(100 * np.mean(np.sign(pred[:, 0]) != yt))
        return float(100 * np.mean(pred.argmax(axis=1) != yt))
    return float(np.abs(pred[:, 0] - yt).mean())


def run_one(case: str, solver: str, data: str) -> dict:
    """Run ``solver`` on ``case`` in this (fresh) process; return the figures as a dict."""
    from swimdist.lstsq import solve

    with open(os.path.join(data, "meta.json")) as f:
        meta = json.load(f)
    A, Y = np.load(os.path.join(data, "A.npy")), np.load(os.path.join(data, "Y.npy"))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        res = solve(A, Y, method=solver, rcond=RCOND)
        times.append(time.perf_counter() - t0)
        if times[0] > 10:
            break
    out = {"solver": solver, "seconds": statistics.median(times), "rank": res.rank,
           "chosen": res.info.get("chosen", ""), "converged": bool(res.converged),
           "stages": {k: round(v, 2) for k, v in res.timings.items() if k != "total"},
           "attempts": [a["solver"] for a in res.info.get("attempts", [])],
           "predicted": res.info.get("predicted_seconds", {})}
    X = np.asarray(res.solution).reshape(-1, Y.shape[1])
    R = A @ X - Y
    out["residual"] = float(np.sqrt(np.einsum("ij,ij->", R, R)))
    At = np.load(os.path.join(data, "At.npy"))
    out["test"] = _metric(meta, At @ X, np.load(os.path.join(data, "y_test.npy")))
    out["classification"] = meta["classification"]
    out["shape"] = meta["shape"]
    return out


def _child(args) -> dict:
    p = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                       timeout=3600)
    if p.returncode != 0:
        return {"error": (p.stderr or p.stdout).strip().splitlines()[-1:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES))
    ap.add_argument("--keep-rates", action="store_true",
                    help="use the cached rates instead of measuring them first")
    ap.add_argument("--child", nargs=3, metavar=("CASE", "SOLVER", "DIR"), help=argparse.SUPPRESS)
    ap.add_argument("--prepare", nargs=2, metavar=("CASE", "DIR"), help=argparse.SUPPRESS)
    ap.add_argument("--calibrate", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.prepare:
        prepare(*a.prepare)
        print("{}")
        return
    if a.child:
        print(json.dumps(run_one(*a.child)))
        return
    if a.calibrate:
        from swimdist.lstsq.costs import _cache_path, machine_rates

        t0 = time.perf_counter()
        machine_rates(width=1 << 30)  # every width, the wide ones too: no case pays for them
        print(json.dumps({"seconds": time.perf_counter() - t0, "path": str(_cache_path())}))
        return

    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}", flush=True)
    t_start = time.perf_counter()
    if not a.keep_rates:
        from swimdist.lstsq.costs import _cache_path

        _cache_path().unlink(missing_ok=True)
    cal = _child(["--calibrate"])
    print(f"rates measured in {cal.get('seconds', float('nan')):.1f} s", flush=True)
    rows, misses = [], []
    for case in a.cases:
        d = tempfile.mkdtemp(prefix=f"bench_anyinput_{case}_")
        try:
            t0 = time.perf_counter()
            _child(["--prepare", case, d])
            print(f"[{case}] features built in {time.perf_counter() - t0:.0f} s", flush=True)
            ref, auto = _child(["--child", case, "direct", d]), _child(["--child", case, "auto", d])
            if "error" in ref or "error" in auto:
                print(f"[{case}] FAILED {ref.get('error') or auto.get('error')}", flush=True)
                misses.append(f"{case}: failed")
                continue
        finally:
            shutil.rmtree(d, ignore_errors=True)
        N, n = auto["shape"]
        t = auto["seconds"] / ref["seconds"]
        r = auto["residual"] / ref["residual"] if ref["residual"] > 0 else 1.0
        cls = auto["classification"]
        bound = 0.5 if (cls or N / n >= 8) else 1.0
        unit = "%" if cls else ""
        rows.append([case, f"{N} x {n}", f"{N / n:.0f}", f"{ref['seconds']:.2f}",
                     auto["chosen"] + ("" if auto["converged"] else " (unchecked)"),
                     f"{t:.2f}", f"{bound:g}", f"{r:.4f}",
                     f"{ref['test']:.4g}{unit}", f"{auto['test']:.4g}{unit}"])
        stage = ", ".join(f"{k} {v:.2f}" for k, v in auto["stages"].items())
        print(f"[{case}] gelsd {ref['seconds']:.2f} s; auto {auto['seconds']:.2f} s "
              f"({' -> '.join(auto['attempts']) or auto['chosen']}; {stage}); predicted "
              f"{auto['predicted']}", flush=True)
        if t > bound:
            misses.append(f"{case}: time {t:.2f}x > {bound:g} (stages: {stage}; attempts "
                          f"{' -> '.join(auto['attempts'])})")
        if r > 1.01:
            misses.append(f"{case}: residual {r:.4f}x > 1.01")
        if cls and abs(auto["test"] - ref["test"]) > 0.02:
            misses.append(f"{case}: test error {auto['test'] - ref['test']:+.3f} points")
    print_table("auto against gelsd on inputs it was not tuned on (rcond 1e-10)",
                ["case", "A", "N/n", "gelsd s", "auto chose", "auto/gelsd", "target",
                 "residual ratio", "gelsd test", "auto test"], rows)
    print("\nmisses: " + ("none" if not misses else ""))
    for m in misses:
        print(f"  - {m}")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
