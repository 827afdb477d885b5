"""Problem makers with known solution and spectrum, and assertion helpers for tests.

Shipped with the package (like opt_einsum's ``testing``) so that users and the test suite
build the same problems.
"""

from __future__ import annotations

import numpy as np


def make_lstsq_problem(n_rows: int, n_cols: int, *, cond: float = 1e6, rank: int | None = None,
                       n_rhs: int = 1, noise: float = 0.0, spectrum: str = "geometric",
                       seed: int = 0) -> dict:
    """A matrix ``A = U diag(s) V^T`` of known spectrum and a right-hand side.

    Parameters
    ----------
    n_rows, n_cols : int
        Shape of ``A`` (``n_rows >= n_cols``).
    cond : float
        ``s[0] / s[rank-1]``; the kept singular values run from 1 down to ``1/cond``.
    rank : int, optional
        Number of nonzero singular values (default ``n_cols``); the rest are exactly 0.
    n_rhs : int
        Number of right-hand sides ``K``.
    noise : float
        Norm fraction of ``Y`` orthogonal to ``range(A)`` (0: consistent system).
    spectrum : {"geometric", "linear", "cluster"}
        How the singular values fall from 1 to ``1/cond``.
    seed : int
        Seed of the generator.

    Returns
    -------
    dict with ``A`` (N, n), ``Y`` (N, K), ``x`` (n, K) the minimum-norm solution,
    ``s`` the singular values, ``residual`` = ``||A x - Y||_F``.
    """
    rng = np.random.default_rng(seed)
    rank = n_cols if rank is None else rank
    U, _ = np.linalg.qr(rng.standard_normal((n_rows, n_cols + n_rhs)))
    V, _ = np.linalg.qr(rng.standard_normal((n_cols, n_cols)))
    if spectrum == "geometric":
        s = np.logspace(0, -np.log10(cond), rank)
    elif spectrum == "linear":
        s = np.linspace(1, 1 / cond, rank)
    elif spectrum == "cluster":
        s = np.r_[np.ones(rank - 1), 1 / cond] if rank > 1 else np.ones(1)
    else:
        raise ValueError(f"unknown spectrum {spectrum!r}; use geometric, linear or cluster")
    s_full = np.r_[s, np.zeros(n_cols - rank)]
    A = (U[:, :n_cols] * s_full) @ V.T
    x = V[:, :rank] @ rng.standard_normal((rank, n_rhs))
    Y = A @ x
    if noise:
        perp = U[:, n_cols:n_cols + n_rhs] if n_rhs <= U.shape[1] - n_cols else 0
        Y = Y + noise * np.linalg.norm(Y, axis=0) * perp
    resid = float(np.linalg.norm(A @ x - Y))
    return {"A": A, "Y": Y, "x": x, "s": s_full, "residual": resid}


def assert_lstsq_close(result, reference, *, rtol: float = 1.5) -> None:
    """Assert ``result``'s relative residual is within ``rtol`` times ``reference``'s.

    A floor of ``1e-15`` keeps consistent systems (reference residual ~0) comparable.
    """
    a = max(result.relative_residual, 1e-15)
    b = max(reference.relative_residual, 1e-15)
    assert a <= rtol * b + 1e-13, (
        f"{result.method}: relative residual {a:.3e} > {rtol} x {reference.method}'s {b:.3e}"
    )


# --------------------------------------------------------------------------- fault injection
import functools  # noqa: E402  (fault injection below is for tests and benchmarks only)
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402

from distributed.diagnostics.plugin import WorkerPlugin  # noqa: E402

FAULT_ACTIONS = ("kill", "memory")


def task_functions(spec, *, limit: int = 5000) -> set[str]:
    """Names of the Python functions a task runs, looking inside fused (blockwise) tasks.

    Dask fuses chains of blockwise tasks into one task named after the last of them (the
    feature writer ``_write_block`` runs inside a task called ``sum-<token>``), so a task's
    key does not say what it runs; its spec does.
    """
    from dask._task_spec import DataNode, Task

    names: set[str] = set()
    stack, seen = [spec], 0
    while stack and seen < limit:
        x = stack.pop()
        seen += 1
        if isinstance(x, Task):
            stack += [x.func, *x.args, *x.kwargs.values()]
        elif isinstance(x, DataNode):
            stack.append(x.value)
        elif isinstance(x, functools.partial):
            stack += [x.func, *x.args, *x.keywords.values()]
        elif isinstance(x, dict):
            stack += list(x.values())
        elif isinstance(x, list | tuple):
            stack += list(x)
        elif callable(x) and hasattr(x, "__name__"):
            names.add(x.__name__)
        if hasattr(x, "funcs"):  # dask's Compose
            stack += list(x.funcs)
    return names


class TaskFault(WorkerPlugin):
    """Worker plugin that injures the worker process starting a chosen task, once.

    The ``nth`` task (1-based, counted over all workers and worker restarts) that runs the
    function named ``function`` (see :func:`task_functions`) triggers the fault the moment
    its worker begins executing it:

    - ``action="kill"``: the worker process sends itself SIGKILL, as when a machine or
      container dies (its nanny starts a fresh worker); with ``pid`` it sends ``sig`` to
      that process instead (a scheduler or a client, to lose it at a chosen moment);
    - ``action="memory"``: the worker allocates and touches memory in steps of
      ``step_bytes`` until its nanny terminates it for exceeding its memory limit (it gives
      up after ``max_bytes``, so a worker without a limit survives).

    The count lives in a file under ``state_dir`` (shared by the worker processes of one
    machine), so the fault is deterministic however the tasks spread over the workers; what
    fired is recorded in ``state_dir/fired.json``. Register the plugin with
    ``client.register_plugin(TaskFault(...), name=...)``.
    """

    def __init__(self, function: str, nth: int, state_dir: str, *, action: str = "kill",
                 pid: int | None = None, sig: int = signal.SIGKILL,
                 step_bytes: int = 64 * 2**20, max_bytes: int = 4 * 2**30):
        if action not in FAULT_ACTIONS:
            raise ValueError(f"unknown action {action!r}; use one of {FAULT_ACTIONS}")
        self.function, self.nth, self.state_dir = function, int(nth), str(state_dir)
        self.action, self.step_bytes, self.max_bytes = action, int(step_bytes), int(max_bytes)
        self.pid, self.sig = pid, int(sig)
        self.worker = None

    def setup(self, worker) -> None:
        self.worker = worker

    def transition(self, key, start, finish, **kwargs) -> None:
        if finish != "executing" or self.worker is None:
            return
        ts = self.worker.state.tasks.get(key)
        if ts is None or self.function not in task_functions(ts.run_spec):
            return
        if not self._count_reaches_nth():
            return
        target = os.getpid() if self.pid is None else int(self.pid)
        record = {"key": str(key), "pid": target, "worker_pid": os.getpid(), "action": self.action,
                  "function": self.function, "nth": self.nth, "time": time.time()}
        with open(os.path.join(self.state_dir, "fired.json"), "w") as f:
            json.dump(record, f)
        if self.action == "kill":
            os.kill(target, self.sig)
            return
        hog, total = [], 0
        while total < self.max_bytes:  # the nanny terminates this process on the way
            hog.append(np.ones(self.step_bytes // 8))
            total += self.step_bytes
            time.sleep(0.02)
        del hog

    def _count_reaches_nth(self) -> bool:
        import fcntl  # POSIX: the count is shared by the worker processes of one machine

        os.makedirs(self.state_dir, exist_ok=True)
        with open(os.path.join(self.state_dir, "count"), "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            n = int(f.read() or 0) + 1
            f.seek(0)
            f.truncate()
            f.write(str(n))
        return n == self.nth


def fault_fired(state_dir: str) -> dict | None:
    """What a :class:`TaskFault` recorded when it fired (None if it has not)."""
    try:
        with open(os.path.join(str(state_dir), "fired.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def fault_count(state_dir: str) -> int:
    """How many matching tasks a :class:`TaskFault` has seen start."""
    try:
        with open(os.path.join(str(state_dir), "count")) as f:
            return int(f.read() or 0)
    except FileNotFoundError:
        return 0


class ProcessCluster:
    """A ``dask scheduler`` and ``dask worker`` processes on 127.0.0.1, for fault tests.

    Unlike a LocalCluster, every part is a separate OS process that a test can kill (the
    scheduler included) and start again on the same address. ``tls`` is ``(ca, cert, key)``
    PEM paths: the cluster then listens on ``tls://`` and requires certificates.
    Use as a context manager; :meth:`close` kills whatever is still running.
    """

    def __init__(self, log_dir: str, *, n_workers: int = 2, tls: tuple | None = None,
                 memory_limit: str = "1GB", start_timeout: float = 60.0):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log_dir, self.tls, self.memory_limit = str(log_dir), tls, memory_limit
        self.timeout = start_timeout
        self.address = f"{'tls' if tls else 'tcp'}://127.0.0.1:{self.port}"
        self.scheduler = None
        self.workers: list = []
        self._logs = 0
        self.n_workers = n_workers

    def _tls_args(self) -> list[str]:
        if not self.tls:
            return []
        ca, cert, key = self.tls
        return ["--tls-ca-file", str(ca), "--tls-cert", str(cert), "--tls-key", str(key)]

    def _start(self, argv: list[str], ready: str):
        import subprocess
        import sys

        self._logs += 1
        log = os.path.join(self.log_dir, f"{argv[0]}-{self._logs}.log")
        env = {k: v for k, v in os.environ.items() if k != "DASK_SCHEDULER_ADDRESS"}
        env.update({v: "1" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                      "MKL_NUM_THREADS")})
        with open(log, "w") as f:
            # own process group: killing it also kills the worker process under a nanny
            proc = subprocess.Popen([sys.executable, "-m", "dask", *argv], stdout=f,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            with open(log) as f:
                text = f.read()
            if ready in text:
                return proc
            if proc.poll() is not None:
                break
            time.sleep(0.1)
        _kill_group(proc)
        with open(log) as f:
            raise RuntimeError(f"dask {argv[0]} did not start:\n{f.read()}")

    def start_scheduler(self):
        """Start (or restart) the scheduler on this cluster's address."""
        self.scheduler = self._start(
            ["scheduler", "--host", "127.0.0.1", "--port", str(self.port),
             "--dashboard-address", "127.0.0.1:0", *self._tls_args()], "Scheduler at:")
        return self.scheduler

    def start_workers(self, n: int | None = None) -> None:
        """Start ``n`` more single-threaded worker processes (each under a nanny)."""
        for _ in range(self.n_workers if n is None else n):
            self.workers.append(self._start(
                ["worker", self.address, "--nthreads", "1", "--host", "127.0.0.1",
                 "--memory-limit", self.memory_limit, "--dashboard-address", "127.0.0.1:0",
                 "--death-timeout", "30", *self._tls_args()], "Registered to:"))

    def kill_workers(self) -> None:
        for p in self.workers:
            _kill_group(p)
        self.workers = []

    def close(self) -> None:
        self.kill_workers()
        if self.scheduler is not None:
            _kill_group(self.scheduler)

    def __enter__(self) -> ProcessCluster:
        self.start_scheduler()
        self.start_workers()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _kill_group(proc) -> None:
    """SIGKILL a process started by :class:`ProcessCluster` and everything it started."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
