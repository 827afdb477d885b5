"""Fault injection: what a lost worker, scheduler or client costs a fit.

Each fault fires at a chosen moment (the n-th task of a stage starts; see
``swimdist.testing.TaskFault``) during a fit of the sine problem on a LocalCluster of 3 worker
processes (worker faults) or on a `dask scheduler` + 3 `dask worker` processes (scheduler and
client faults). The table says whether the fit completed, whether the model equals the
undisturbed fit's (max |coef difference| <= 1e-10) and the extra wall time over it. For a lost
scheduler or client the job fails; "completed" then refers to running the same job again,
which resumes from the verified feature blocks, and the extra time counts both runs.

    flock /tmp/swimdist-bench.lock python benchmarks/bench_faults.py [--n 20000] [--hidden 300]

About 2 minutes on 2 cores with the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from _common import print_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000, help="training samples")
    ap.add_argument("--hidden", type=int, default=300, help="neurons")
    ap.add_argument("--blocks", type=int, default=8, help="row blocks of the feature matrix")
    ap.add_argument("--repeats", type=int, default=3,
                    help="runs of every worker fault and of the undisturbed fit (medians)")
    args = ap.parse_args()

    from distributed import Client, LocalCluster

    from swimdist import SWIMRegressor, load_model
    from swimdist.datasets import sine
    from swimdist.exceptions import SchedulerError
    from swimdist.service import load_spec, run_job
    from swimdist.testing import ProcessCluster, TaskFault, fault_fired

    rows = -(-args.n // args.blocks)
    options = {"lsrn": {"tol": 1e-10}, "split": {"n_splits": 4}}
    X, y = sine(args.n, alpha=2.0, seed=0)
    tmp = tempfile.mkdtemp(prefix="swimdist-bench-faults-")
    table = []

    def fit(solver: str, store: str):
        est = SWIMRegressor(hidden_layer_sizes=(args.hidden,), solver=solver, random_state=0,
                            chunk_rows=rows, store=store, solver_options=options[solver])
        t0 = time.perf_counter()
        est.fit(X, y)
        return est, time.perf_counter() - t0

    def same(a, b) -> tuple[str, float]:
        d = float(np.abs(a - b).max())
        return ("yes" if d <= 1e-10 else "NO"), d

    # ---------------------------------------------------------------- worker faults
    env = {v: "1" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    with LocalCluster(n_workers=3, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, memory_limit="1GB", env=env) as cluster, \
            Client(cluster) as client:
        ref, ref_t = {}, {}
        for solver in options:
            fit(solver, os.path.join(tmp, f"warm-{solver}"))  # imports, worker warm-up
            runs = [fit(solver, os.path.join(tmp, f"ref-{solver}-{r}"))
                    for r in range(args.repeats)]
            ref[solver] = runs[0][0]
            ref_t[solver] = [t for _, t in runs]
        iters = ref["lsrn"].fit_info_["iterations"]
        cases = [
            ("worker SIGKILL", "feature generation (block 3)", "_write_block", 3, "lsrn",
             "kill"),
            ("worker SIGKILL", "LSRN sketch (block 2)", "_sketch_task", 2, "lsrn", "kill"),
            ("worker SIGKILL", f"LSQR iteration {iters // 2 + 1} of {iters}", "_axpy_block",
             args.blocks * (iters // 2 + 1) + 2, "lsrn", "kill"),
            ("worker SIGKILL", "split block 2 of 4", "_forward", args.blocks + 3, "split",
             "kill"),
            ("worker over memory limit", "feature generation (block 3)", "_write_block", 3,
             "lsrn", "memory"),
        ]
        for i, (fault, stage, function, nth, solver, action) in enumerate(cases):
            times, fired, done, diff, notes = [], 0, "yes", 0.0, []
            for r in range(args.repeats):
                state = os.path.join(tmp, f"fault-{i}-{r}")
                client.register_plugin(TaskFault(function, nth, state, action=action),
                                       name="fault")
                try:
                    est, t = fit(solver, os.path.join(tmp, f"store-{i}-{r}"))
                    times.append(t)
                    diff = max(diff, float(np.abs(est.coef_ - ref[solver].coef_).max()))
                except Exception as exc:  # noqa: BLE001 - reported in the table
                    done = f"NO ({type(exc).__name__})"
                finally:
                    client.unregister_worker_plugin("fault")
                fired += fault_fired(state) is not None
                try:
                    client.wait_for_workers(3, timeout=300)
                except TimeoutError:  # recorded in the table; the fits go on with fewer
                    workers = client.scheduler_info()["workers"].values()
                    notes.append(f"run {r + 1}: a worker was not back after 300 s "
                                 f"({[w['status'] for w in workers]})")
            base = float(np.median(ref_t[solver]))
            table.append([fault, stage, solver, f"{fired}/{args.repeats}", done,
                          f"{'yes' if diff <= 1e-10 else 'NO'} ({diff:.1e})",
                          f"{np.median(times) - base:+.2f} s" if times else "-",
                          f"{base:.2f} s ({min(ref_t[solver]):.2f}-{max(ref_t[solver]):.2f})",
                          "; ".join(notes)])

    # ---------------------------------------------------------------- scheduler, client
    def spec(address, out, store):
        return load_spec(None, {
            "data": {"dataset": "sine", "n_train": args.n, "n_test": 0, "sine_alpha": 2.0},
            "model": {"hidden_layer_sizes": [args.hidden], "solver": "lsrn",
                      "random_state": 0, "chunk_rows": rows, "solver_options": options["lsrn"]},
            "cluster": {"scheduler": address}, "store": store, "output": out})

    with ProcessCluster(tmp, n_workers=3) as pc:
        run_job(spec(pc.address, os.path.join(tmp, "job-warm"), None))
        t0 = time.perf_counter()
        run_job(spec(pc.address, os.path.join(tmp, "job-ref"), None))
        base = time.perf_counter() - t0
        ref_coef = load_model(os.path.join(tmp, "job-ref", "model.npz")).coef_

        # the scheduler dies during feature generation; same job again on a new scheduler
        out, store = os.path.join(tmp, "job-sched"), os.path.join(tmp, "store-sched")
        with Client(pc.address) as c:
            c.register_plugin(TaskFault("_write_block", 4, os.path.join(tmp, "f-sched"),
                                        pid=pc.scheduler.pid), name="fault")
        t0 = time.perf_counter()
        try:
            run_job(spec(pc.address, out, store))
            first = "did not fail"
        except SchedulerError:
            first = "SchedulerError"
        pc.scheduler.wait()
        pc.kill_workers()
        t_restart = time.perf_counter()
        pc.start_scheduler()
        pc.start_workers()
        t_restart = time.perf_counter() - t_restart
        run_job(spec(pc.address, out, store))
        total = time.perf_counter() - t0 - t_restart
        status = json.load(open(os.path.join(out, "status.json")))
        ok, diff = same(load_model(os.path.join(out, "model.npz")).coef_, ref_coef)
        b = status["fit_info"]["blocks"]
        table.append(["scheduler SIGKILL", "feature generation (block 4)", "lsrn",
                      "1/1" if fault_fired(os.path.join(tmp, "f-sched")) else "0/1",
                      "rerun: yes", f"{ok} ({diff:.1e})", f"{total - base:+.2f} s",
                      f"{base:.2f} s", f"job: {first}; rerun reused {b['reused']}/"
                      f"{b['blocks']} blocks"])

        # the training process gets SIGTERM (a pod eviction); same job again
        out, store = os.path.join(tmp, "job-client"), os.path.join(tmp, "store-client")
        argv = [sys.executable, "-m", "swimdist.cli", "train", "--scheduler", pc.address,
                "--n-train", str(args.n), "--n-test", "0", "--sine-alpha", "2.0", "--hidden",
                str(args.hidden), "--solver", "lsrn", "--chunk-rows", str(rows), "--seed", "0",
                "--store", store, "-o", out]
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        with Client(pc.address) as c:
            c.register_plugin(TaskFault("_write_block", 4, os.path.join(tmp, "f-client"),
                                        pid=proc.pid, sig=signal.SIGTERM), name="fault")
            proc.communicate(timeout=600)
            c.unregister_worker_plugin("fault")
        first = json.load(open(os.path.join(out, "status.json")))["phase"]
        run_job(spec(pc.address, out, store))
        total = time.perf_counter() - t0
        status = json.load(open(os.path.join(out, "status.json")))
        ok, diff = same(load_model(os.path.join(out, "model.npz")).coef_, ref_coef)
        b = status["fit_info"]["blocks"]
        table.append(["client SIGTERM", "feature generation (block 4)", "lsrn",
                      "1/1" if fault_fired(os.path.join(tmp, "f-client")) else "0/1",
                      "rerun: yes", f"{ok} ({diff:.1e})", f"{total - base:+.2f} s",
                      f"{base:.2f} s", f"exit {proc.returncode}, status {first}; rerun "
                      f"reused {b['reused']}/{b['blocks']} blocks"])

    print_table(f"Faults during a fit: sine N={args.n}, M={args.hidden}, {args.blocks} row "
                f"blocks, 3 single-threaded workers ({os.cpu_count()} cores)",
                ["fault", "stage", "solver", "fired", "completed", "same model (max |dC|)",
                 "extra time", "undisturbed", "notes"], table)
    print(f"\nWorker faults: extra time = median of {args.repeats} faulted fits - median of "
          f"{args.repeats} undisturbed fits (range in brackets). Scheduler/client loss: failed "
          "run + rerun - one undisturbed job (the client rerun runs in-process, without the "
          "CLI's start-up; the scheduler restart is not counted).")


if __name__ == "__main__":
    main()
