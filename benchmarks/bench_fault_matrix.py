"""Fault matrix: a worker SIGKILLed at seeded random moments, across placement x solver x stage.

For every placement of the feature matrix (``memory``: the default, A in worker memory built
from X's blocks scattered from the client; ``temporary``: a temporary Zarr store, forced by a
tiny memory budget; ``zarr`` and ``npy``: persistent stores) and every solver, an undisturbed
fit gives the reference model and counts the tasks of each stage's function (see
``swimdist.testing.TaskFault``). Each trial then draws a stage and a task number ``n`` from a
seeded generator, registers a plugin that SIGKILLs the worker starting the n-th such task,
fits again, and compares the model with the reference (max |coef difference| <= 1e-10).
``persistent-rerun`` trials kill during the block verification of a store built beforehand.
A last group kills a worker during prediction on a dask array.

    flock /tmp/swimdist-bench.lock python benchmarks/bench_fault_matrix.py [--trials 64]

About 10 minutes on 2 cores (3 single-threaded worker processes under nannies).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from _common import print_table  # noqa: E402

# stage name -> task function whose n-th start triggers the kill
STAGES = {
    "features": "_forward",          # feature blocks in worker memory / split's blocks
    "feature-write": "_write_block",  # feature blocks written to a store
    "store-verify": "_verify_block",  # verifying a store's blocks on a rerun
    "gram": "gram_upper",            # normal's one-pass Gram matrix
    "verification": "verify_pass",   # normal's certificate / sketch-direct's refinement
    "sketch": "_sketch_task",        # sketch of A (lsrn, sketch-direct)
    "precond-gram": "_precond_gram",  # sketch-direct's pass over A P
    "lsqr-iteration": "_axpy_block",  # one LSQR iteration's pass
    "gram-panel": "_panel_task",     # normal-tiled's Gram panels
    "cg-step": "_ne_pass",           # normal-tiled's CG passes (in-memory A)
    "cg-step-store": "_store_pass_task",  # normal-tiled's CG passes (A in a store)
}
SOLVERS = {
    "direct": None,
    "normal": {"verify": True},
    "sketch-direct": None,
    "lsrn": {"tol": 1e-10},
    "split": {"n_splits": 3},
    "normal-tiled": {"tile": 20, "max_iter": 10},
    "auto": None,
}
PLACEMENTS = ("memory", "temporary", "zarr", "npy")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4000, help="training samples")
    ap.add_argument("--hidden", type=int, default=60, help="neurons")
    ap.add_argument("--blocks", type=int, default=8, help="row blocks of the feature matrix")
    ap.add_argument("--trials", type=int, default=64, help="faulted fits (>= 60)")
    ap.add_argument("--seed", type=int, default=2026, help="seed of the kill moments")
    ap.add_argument("--only", type=int, nargs="*", default=None,
                    help="run only these trial numbers (1-based; to reproduce one)")
    args = ap.parse_args()

    import dask
    import dask.array as da
    from distributed import Client, LocalCluster

    from swimdist import SWIMRegressor
    from swimdist.datasets import sine
    from swimdist.testing import TaskFault, fault_count, fault_fired

    rows = -(-args.n // args.blocks)
    X, y = sine(args.n, alpha=2.0, seed=0)
    Xt, _ = sine(2000, alpha=2.0, seed=1)
    tmp = tempfile.mkdtemp(prefix="swimdist-fault-matrix-")
    rng = np.random.default_rng(args.seed)
    counter = iter(range(10**9))

    def fit(solver, placement, tag):
        store, settings = None, {}
        if placement == "temporary":
            settings["swimdist.memory-budget"] = 1  # nothing fits: a temporary store
        elif placement in ("zarr", "npy"):
            store = os.path.join(tmp, f"store-{tag}")
            settings["swimdist.store-format"] = placement
        est = SWIMRegressor(hidden_layer_sizes=(args.hidden,), solver=solver, random_state=0,
                            chunk_rows=rows, store=store, solver_options=SOLVERS[solver])
        t0 = time.perf_counter()
        with dask.config.set(settings):
            est.fit(X, y)
        return est, time.perf_counter() - t0

    env = {v: "1" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    with LocalCluster(n_workers=3, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, memory_limit="1.5GB", env=env) as cluster, \
            Client(cluster) as client:

        def with_plugins(plugins, fn):
            for name, plugin in plugins.items():
                client.register_plugin(plugin, name=name)
            try:
                return fn()
            finally:
                for name in plugins:
                    client.unregister_worker_plugin(name)

        # ---------------------------------------------------------- references and counts
        fit("lsrn", "memory", "warm")  # imports and worker warm-up
        refs, counts, combos = {}, {}, []
        for placement in PLACEMENTS:
            for solver in SOLVERS:
                tag = f"ref-{placement}-{solver}"
                dirs = {stage: os.path.join(tmp, f"count-{tag}-{stage}") for stage in STAGES}
                plugins = {f"count-{stage}": TaskFault(fn, 10**9, dirs[stage])
                           for stage, fn in STAGES.items()}
                est, sec = with_plugins(plugins, lambda s=solver, p=placement, t=tag:
                                        fit(s, p, t))
                refs[placement, solver] = (est, sec)
                counts[placement, solver] = {st: fault_count(d) for st, d in dirs.items()
                                             if fault_count(d) > 0 and st != "store-verify"}
                combos.append((placement, solver))
                if placement in ("zarr", "npy") and solver != "split":
                    combos.append((placement + "-rerun", solver))
        print(f"references: {len(refs)} fits, {sum(s for _, s in refs.values()):.1f} s",
              flush=True)

        # ---------------------------------------------------------- faulted trials
        rows_out = collections.defaultdict(lambda: {"trials": 0, "ok": 0, "same": 0,
                                                    "extra": [], "fail": []})
        trials = []
        while len(trials) < args.trials:
            for placement, solver in combos:
                base = placement.replace("-rerun", "")
                stages = counts[base, solver]
                if placement.endswith("-rerun"):
                    stages = {"store-verify": args.blocks}
                if not stages:
                    continue
                stage = sorted(stages)[rng.integers(len(stages))]
                nth = int(rng.integers(1, stages[stage] + 1))
                trials.append((placement, solver, stage, nth))
        trials = trials[:max(args.trials, 60)]
        for i, (placement, solver, stage, nth) in enumerate(trials):
            if args.only and i + 1 not in args.only:
                continue
            print(f"[{i + 1}/{len(trials)}] {placement} {solver} {stage} n={nth} ...", flush=True)
            base = placement.replace("-rerun", "")
            tag = f"trial-{next(counter)}"
            if placement.endswith("-rerun"):
                fit(solver, base, tag)  # build the store undisturbed; the faulted fit reuses it
            state = os.path.join(tmp, f"fault-{tag}")
            key = (placement, solver, stage)
            row = rows_out[key]
            row["trials"] += 1
            try:
                est, sec = with_plugins({"fault": TaskFault(STAGES[stage], nth, state)},
                                        lambda s=solver, p=base, t=tag: fit(s, p, t))
                row["ok"] += 1
                ref, ref_sec = refs[base, solver]
                diff = float(max(np.abs(est.coef_ - ref.coef_).max(),
                                 np.abs(est.intercept_ - ref.intercept_).max()))
                row["same"] += diff <= 1e-10
                if diff > 1e-10:
                    row["fail"].append(f"model differs by {diff:.1e}")
                row["extra"].append(sec - ref_sec)
            except Exception as exc:  # noqa: BLE001 - reported in the table
                row["fail"].append(f"n={nth}: {type(exc).__name__}: {str(exc)[:120]}")
            if fault_fired(state) is None:
                row["fail"].append(f"n={nth}: the fault did not fire")
            try:
                client.wait_for_workers(3, timeout=120)
            except Exception as exc:  # noqa: BLE001 - the cluster itself did not recover
                alive = len(client.scheduler_info()["workers"])
                row["fail"].append(f"n={nth}: only {alive}/3 workers after the trial "
                                   f"({type(exc).__name__})")
                cluster.scale(3)
                client.wait_for_workers(3, timeout=300)
            print(f"[{i + 1}/{len(trials)}] {placement} {solver} {stage} n={nth}: "
                  f"{'ok' if not row['fail'] else row['fail'][-1]}", flush=True)

        # ---------------------------------------------------------- prediction on dask input
        est = refs["memory", "direct"][0]
        Xd = da.from_array(Xt, chunks=(250, -1))
        expect = est.predict(Xt)
        for nth in (1, 4, 7):
            state = os.path.join(tmp, f"fault-predict-{nth}")
            row = rows_out["dask input", "(fitted)", "prediction"]
            row["trials"] += 1
            t0 = time.perf_counter()
            try:
                got = with_plugins({"fault": TaskFault("block", nth, state)},
                                   lambda: est.predict(Xd).compute())
                row["ok"] += 1
                row["same"] += float(np.abs(got - expect).max()) <= 1e-10
                row["extra"].append(time.perf_counter() - t0)
            except Exception as exc:  # noqa: BLE001
                row["fail"].append(f"{type(exc).__name__}: {str(exc)[:120]}")
            client.wait_for_workers(3, timeout=300)

    table = []
    for (placement, solver, stage), r in sorted(rows_out.items()):
        extra = f"{np.median(r['extra']):+.2f} s" if r["extra"] else "-"
        table.append([placement, solver, stage, r["trials"], r["ok"], r["same"], extra,
                      "; ".join(r["fail"]) or "-"])
    total = sum(r["trials"] for r in rows_out.values())
    done = sum(r["ok"] for r in rows_out.values())
    same = sum(r["same"] for r in rows_out.values())
    print_table(f"Fault matrix: sine N={args.n}, M={args.hidden}, {args.blocks} row blocks, "
                f"3 single-threaded workers, seed {args.seed}",
                ["placement", "solver", "stage", "trials", "completed", "same model",
                 "extra time (median)", "failures"], table)
    print(f"\n{total} trials: {done} completed, {same} models equal to the undisturbed one, "
          f"{total - done} failed, {done - same} different.")


if __name__ == "__main__":
    main()
