"""Faults cost time, never correctness or data.

Worker loss: a worker process is killed (SIGKILL) or pushed over its memory limit at a chosen
moment of a fit -- while it writes a feature block, sketches, runs an LSQR pass or builds a
split-and-solve block -- on a LocalCluster of 3 worker processes. Every block is a
deterministic function of its seed and the store, so the fit completes with the same model
as an undisturbed one. The moment is made deterministic by :class:`swimdist.testing.TaskFault`,
a worker plugin that fires when the n-th task running a given function starts.

Scheduler or client loss: the job fails with a clear error, ``status.json`` says so, the
feature store and any previous model are intact, and running the same job again resumes from
the verified blocks.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from swimdist import SWIMRegressor, load_model
from swimdist.datasets import sine
from swimdist.exceptions import SchedulerError
from swimdist.service import load_spec, run_job
from swimdist.store import store_backend, verify_blocks
from swimdist.testing import ProcessCluster, TaskFault, fault_fired

# Each test starts a 3-process cluster and kills or restarts workers: about 3 minutes in all
# on 2 cores, and worker restarts are at the mercy of the machine's load. Run with -m slow.
pytestmark = pytest.mark.slow

N, HIDDEN, ROWS = 1000, 40, 125  # 8 row blocks
N_BLOCKS = N // ROWS
SOLVER_OPTIONS = {
    # a looser LSQR tolerance keeps the test short; both fits use the same settings
    "lsrn": {"tol": 1e-10},
    "split": {"n_splits": 4},
}


@pytest.fixture(scope="module")
def client3():
    """A LocalCluster of 3 single-threaded worker processes under nannies."""
    from distributed import Client, LocalCluster

    env = {v: "1" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    cluster = LocalCluster(n_workers=3, threads_per_worker=1, processes=True,
                           host="127.0.0.1", dashboard_address=None, memory_limit="600MB",
                           env=env)
    client = Client(cluster)
    yield client
    client.close()
    cluster.close()


@pytest.fixture(scope="module")
def data():
    return sine(N, alpha=2.0, seed=0)


def fit(X, y, solver: str, store: str) -> SWIMRegressor:
    est = SWIMRegressor(hidden_layer_sizes=(HIDDEN,), solver=solver, random_state=0,
                        chunk_rows=ROWS, store=store, solver_options=SOLVER_OPTIONS[solver])
    return est.fit(X, y)


@pytest.fixture(scope="module")
def reference(client3, data, tmp_path_factory):
    """Undisturbed fits on the same cluster, one per solver."""
    d = tmp_path_factory.mktemp("reference")
    return {s: fit(*data, s, str(d / s)) for s in SOLVER_OPTIONS}


def worker_pids(client) -> set[int]:
    return set(client.run(os.getpid).values())


# (stage, function whose n-th task triggers the fault, n, solver)
#   8 row blocks: feature block 3; sketch block 2; LSQR: the start pass takes 8 tasks, so
#   task 21 is in the second iteration; split: block 1 builds 8 row blocks, so task 11 is
#   in block 2.
STAGES = [
    pytest.param("_write_block", 3, "lsrn", id="feature-generation"),
    pytest.param("_sketch_task", 2, "lsrn", id="lsrn-sketch"),
    pytest.param("_axpy_block", 21, "lsrn", id="lsqr-iteration"),
    pytest.param("_forward", 11, "split", id="split-block"),
]


@pytest.mark.parametrize("function, nth, solver", STAGES)
def test_worker_killed_mid_stage_gives_same_model(client3, data, reference, tmp_path, function,
                                                  nth, solver):
    before = worker_pids(client3)
    state = tmp_path / "fault"
    client3.register_plugin(TaskFault(function, nth, str(state)), name="fault")
    try:
        est = fit(*data, solver, str(tmp_path / "store"))
    finally:
        client3.unregister_worker_plugin("fault")
    fired = fault_fired(state)
    assert fired is not None and fired["action"] == "kill", "the fault never fired"
    assert fired["pid"] in before
    ref = reference[solver]
    np.testing.assert_allclose(est.coef_, ref.coef_, rtol=0, atol=1e-10)
    np.testing.assert_allclose(est.intercept_, ref.intercept_, rtol=0, atol=1e-10)
    # the nanny replaced the killed worker process
    client3.wait_for_workers(3, timeout=60)
    after = worker_pids(client3)
    assert fired["pid"] not in after and len(after) == 3
    if solver == "lsrn":
        blocks = est.fit_info_["blocks"]
        # every block is in the store: written by this attempt, or written before the worker
        # died (with X's blocks it held) and verified when the fit sent X again
        assert blocks["written"] + blocks["reused"] == N_BLOCKS
        assert blocks["verified"] == blocks["reused"]
        assert blocks["reused"] == 0 or est.fit_info_["resent"] >= 1


# --------------------------------------------------------------------------- default placement
# store=None keeps A in worker memory, built from X's blocks scattered from the client: a
# worker that dies takes the only copy of its blocks with it, so the fit sends them again.
MEMORY_SOLVERS = {
    "lsrn": {"tol": 1e-10},
    "normal": {"verify": True},  # the certificate's thin verification pass runs too
    "auto": None,
}


def fit_in_memory(X, y, solver: str) -> SWIMRegressor:
    est = SWIMRegressor(hidden_layer_sizes=(HIDDEN,), solver=solver, random_state=0,
                        chunk_rows=ROWS, solver_options=MEMORY_SOLVERS[solver])
    return est.fit(X, y)


@pytest.fixture(scope="module")
def reference_memory(client3, data):
    refs = {s: fit_in_memory(*data, s) for s in MEMORY_SOLVERS}
    assert all(r.fit_info_["placement"] == "memory" for r in refs.values())
    return refs


#   8 row blocks: _forward 3 is the third feature block; the Gram pass has one gram_upper
#   task per block; LSQR's start pass takes 8 tasks, so _axpy_block 21 is in iteration 2.
MEMORY_STAGES = [
    pytest.param("_forward", 3, "lsrn", id="features-lsrn"),
    pytest.param("_sketch_task", 2, "lsrn", id="sketch"),
    pytest.param("_axpy_block", 21, "lsrn", id="lsqr-iteration"),
    pytest.param("gram_upper", 2, "normal", id="gram-pass"),
    pytest.param("verify_pass", 2, "normal", id="verification-pass"),
    pytest.param("_forward", 3, "auto", id="features-auto"),
]


@pytest.mark.parametrize("function, nth, solver", MEMORY_STAGES)
def test_worker_killed_with_the_default_in_memory_placement(client3, data, reference_memory,
                                                            tmp_path, function, nth, solver):
    before = worker_pids(client3)
    state = tmp_path / "fault"
    client3.register_plugin(TaskFault(function, nth, str(state)), name="fault")
    try:
        est = fit_in_memory(*data, solver)
    finally:
        client3.unregister_worker_plugin("fault")
    fired = fault_fired(state)
    assert fired is not None and fired["pid"] in before, "the fault never fired"
    ref = reference_memory[solver]
    np.testing.assert_allclose(est.coef_, ref.coef_, rtol=0, atol=1e-10)
    np.testing.assert_allclose(est.intercept_, ref.intercept_, rtol=0, atol=1e-10)
    assert est.fit_info_["placement"] == "memory"
    client3.wait_for_workers(3, timeout=60)


def test_two_workers_killed_in_sequence(client3, data, reference_memory, tmp_path):
    before = worker_pids(client3)
    first, second = tmp_path / "fault-1", tmp_path / "fault-2"
    # one dies writing feature block 3, another in the second LSQR iteration of the fit
    # that follows (counts run over both attempts)
    client3.register_plugin(TaskFault("_forward", 3, str(first)), name="fault-1")
    client3.register_plugin(TaskFault("_axpy_block", 21, str(second)), name="fault-2")
    try:
        est = fit_in_memory(*data, "lsrn")
    finally:
        client3.unregister_worker_plugin("fault-1")
        client3.unregister_worker_plugin("fault-2")
    one, two = fault_fired(first), fault_fired(second)
    assert one is not None and two is not None, "a fault never fired"
    assert one["pid"] in before and one["pid"] != two["pid"]
    np.testing.assert_allclose(est.coef_, reference_memory["lsrn"].coef_, rtol=0, atol=1e-10)
    assert est.fit_info_["resent"] >= 1
    client3.wait_for_workers(3, timeout=60)


def test_workers_lost_beyond_the_resend_attempts_fail_clearly(client3, data, tmp_path):
    # no re-send allowed: the first worker lost with X's blocks ends the fit with an error
    # that names what happened and what to change, not a FutureCancelledError
    import dask

    from swimdist.exceptions import WorkerLostError

    state = tmp_path / "fault"
    client3.register_plugin(TaskFault("_forward", 3, str(state)), name="fault")
    try:
        with dask.config.set({"swimdist.resend-attempts": 0}), \
                pytest.raises(WorkerLostError, match="died with data sent from the client, after 0 "
                              "re-sends .*memory .*each worker may use 5[0-9]{2} MiB"):
            fit_in_memory(*data, "lsrn")
    finally:
        client3.unregister_worker_plugin("fault")
    assert fault_fired(state) is not None, "the fault never fired"
    client3.wait_for_workers(3, timeout=60)


def test_worker_over_memory_limit_restarted_by_nanny(client3, data, reference, tmp_path):
    before = worker_pids(client3)
    state = tmp_path / "fault"
    # the worker writing feature block 3 allocates until its nanny terminates it (95 % of
    # its 600 MB limit)
    client3.register_plugin(TaskFault("_write_block", 3, str(state), action="memory"),
                            name="fault")
    try:
        est = fit(*data, "lsrn", str(tmp_path / "store"))
    finally:
        client3.unregister_worker_plugin("fault")
    fired = fault_fired(state)
    assert fired is not None and fired["action"] == "memory"
    assert fired["pid"] in before
    np.testing.assert_allclose(est.coef_, reference["lsrn"].coef_, rtol=0, atol=1e-10)
    client3.wait_for_workers(3, timeout=60)
    assert fired["pid"] not in worker_pids(client3)


# --------------------------------------------------------------------------- scheduler, client
def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def store_intact(path: str) -> int:
    """Number of written blocks; asserts that every one of them verifies."""
    backend = store_backend(path)
    meta = backend.meta()
    written = int(np.count_nonzero(backend.crcs()))
    assert verify_blocks(backend, meta["rows_per_block"]) == written
    return written


def job_spec(address: str | None, out, store) -> dict:
    return load_spec(None, {
        "data": {"dataset": "sine", "n_train": N, "n_test": 100},
        "model": {"hidden_layer_sizes": [HIDDEN], "solver": "direct", "random_state": 0,
                  "chunk_rows": ROWS},
        "cluster": {"scheduler": address, "n_workers": 1} if address is None else
                   {"scheduler": address},
        "store": None if store is None else str(store),
        "output": str(out),
    })


def test_scheduler_loss_fails_clearly_then_job_resumes(tmp_path):
    out, store = tmp_path / "out", tmp_path / "store"
    with ProcessCluster(str(tmp_path), n_workers=2) as pc:
        # an earlier run left a model in the output directory
        run_job(job_spec(pc.address, out, None))
        previous = sha256(out / "model.npz")
        previous_coef = load_model(str(out / "model.npz")).coef_
        # the scheduler dies while the workers write feature block 3
        from distributed import Client

        with Client(pc.address, timeout="30s") as c:
            c.register_plugin(TaskFault("_write_block", 3, str(tmp_path / "fault"),
                                        pid=pc.scheduler.pid), name="fault")
        spec = job_spec(pc.address, out, store)
        with pytest.raises(SchedulerError, match=r"Lost the connection to the Dask scheduler "
                                                 r"at tcp://127\.0\.0\.1:\d+ during fitting"):
            run_job(spec)
        assert fault_fired(tmp_path / "fault")["pid"] == pc.scheduler.pid
        status = json.loads((out / "status.json").read_text())
        assert status["phase"] == "failed"
        assert "Lost the connection" in status["error"] and "resume" in status["error"]
        assert sha256(out / "model.npz") == previous  # the previous model is untouched
        written = store_intact(str(store))
        assert not os.path.exists(f"{store}.lock")  # the job released its store
        # the scheduler comes back on the same address, with fresh workers: same job again
        pc.scheduler.wait()
        pc.kill_workers()
        pc.start_scheduler()
        pc.start_workers()
        metrics = run_job(spec)
    status = json.loads((out / "status.json").read_text())
    assert status["phase"] == "done"
    blocks = status["fit_info"]["blocks"]
    assert blocks["verified"] == written >= 2 and blocks["written"] == N_BLOCKS - written
    assert metrics["test"]["mae"] < 1e-3
    # the resumed job gives the model of the undisturbed earlier run
    np.testing.assert_allclose(load_model(str(out / "model.npz")).coef_, previous_coef,
                               rtol=0, atol=1e-10)


def test_client_terminated_fails_clearly_then_job_resumes(tmp_path):
    out, store = tmp_path / "out", tmp_path / "store"
    with ProcessCluster(str(tmp_path), n_workers=2) as pc:
        argv = [sys.executable, "-m", "swimdist.cli", "train", "--scheduler", pc.address,
                "--n-train", str(N), "--n-test", "100", "--hidden", str(HIDDEN),
                "--solver", "direct", "--chunk-rows", str(ROWS), "--seed", "0",
                "--store", str(store), "-o", str(out)]
        env = {k: v for k, v in os.environ.items() if k != "DASK_SCHEDULER_ADDRESS"}
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env)
        # SIGTERM (a pod eviction) reaches the training process while block 3 is written;
        # the process needs seconds to import and connect, long before any block starts
        from distributed import Client

        with Client(pc.address, timeout="30s") as c:
            c.register_plugin(TaskFault("_write_block", 3, str(tmp_path / "fault"),
                                        pid=proc.pid, sig=signal.SIGTERM), name="fault")
            _, err = proc.communicate(timeout=120)
            c.unregister_worker_plugin("fault")
        assert fault_fired(tmp_path / "fault")["pid"] == proc.pid
        assert proc.returncode == 130 and "interrupted: terminated by SIGTERM" in err
        status = json.loads((out / "status.json").read_text())
        assert status["phase"] == "interrupted" and "SIGTERM" in status["error"]
        written = store_intact(str(store))
        assert not os.path.exists(f"{store}.lock")
        # the same job again (in this process) resumes from the verified blocks
        run_job(job_spec(pc.address, out, store))
    status = json.loads((out / "status.json").read_text())
    assert status["phase"] == "done"
    assert status["fit_info"]["blocks"]["verified"] == written >= 1


def test_client_killed_leaves_a_lock_the_next_job_takes_over(tmp_path):
    """SIGKILL gives a job no chance to clean up: its lease names a dead process, so the
    next job on the store takes it over instead of waiting for the lease to expire."""
    store = tmp_path / "store"
    code = ("import os, sys; from swimdist.store import StoreLock; "
            "StoreLock(sys.argv[1], ttl=3600).acquire(); os.kill(os.getpid(), 9)")
    r = subprocess.run([sys.executable, "-c", code, str(store)], timeout=60)
    assert r.returncode == -signal.SIGKILL
    assert os.path.exists(f"{store}.lock")
    X, y = sine(300, seed=0)
    est = SWIMRegressor(hidden_layer_sizes=(10,), random_state=0, solver="direct",
                        store=str(store)).fit(X, y)
    assert est.fit_info_["blocks"]["written"] >= 1
    assert not os.path.exists(f"{store}.lock")
