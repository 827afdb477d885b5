"""Contract between the deployment files and the package, with real processes on 127.0.0.1.

The scheduler, worker and training commands are taken from the rendered Helm chart (batch Job
and DaskJob variants) and started as processes, adapted only where a pod differs from a
laptop: ports, local addresses, and the Kubernetes-provided environment ($(POD_NAME),
DASK_SCHEDULER_ADDRESS). The job spec is the chart's ConfigMap rendered with small sizes.
A plain `dask scheduler` + two `dask worker` cluster must train the same model as the
embedded LocalCluster.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "swimdist"
RELEASE = "rel"
N_TRAIN, N_TEST, HIDDEN = 500, 200, 50
SMALL_JOB = {
    "data": {"dataset": "sine", "n_train": N_TRAIN, "n_test": N_TEST},
    "model": {"hidden_layer_sizes": [HIDDEN], "solver": "direct", "random_state": 0},
}
SMALL_WORKER = {
    "replicas": 2,
    "resources": {
        "requests": {"cpu": "1", "memory": "1Gi"},
        "limits": {"cpu": "1", "memory": "1Gi"},
    },
}
START_TIMEOUT = 60  # seconds for a scheduler or worker to come up on a loaded 2-core machine


# --------------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def executable(name: str) -> list[str]:
    """The console script of this interpreter's environment, else `python -m`."""
    script = Path(sys.executable).with_name(name)
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", {"dask": "dask", "swimdist": "swimdist.cli"}[name]]


def base_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "DASK_SCHEDULER_ADDRESS" and not k.startswith("DASK_SWIMDIST__JOB")
    }
    env.update(extra)
    return env


def expand(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) expansion of container args."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in args]


def container_env(c: dict, pod_name: str) -> dict[str, str]:
    """A container's env list as Kubernetes would set it (values and metadata.name)."""
    env = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = str(e["value"])
        elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[e["name"]] = pod_name
    return env


def replace_flag(args: list[str], flag: str, value: str) -> list[str]:
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


def http_get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status, r.read().decode()


def wait_http(url: str, proc: subprocess.Popen, log: Path) -> str:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}):\n{log.read_text()}")
        with contextlib.suppress(OSError):
            status, body = http_get(url)
            if status == 200:
                return body
        time.sleep(0.2)
    raise AssertionError(f"{url} not up after {START_TIMEOUT} s:\n{log.read_text()}")


class Cluster:
    """A scheduler and workers started as processes; stopped in reverse order."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs: list[tuple[subprocess.Popen, Path]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = self.tmp / f"{name}.log"
        with open(log, "w") as f:
            proc = subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=self.tmp)
        self.procs.append((proc, log))
        return proc

    def stop(self) -> None:
        # workers before the scheduler: workers that lose their scheduler first keep
        # retrying to reconnect and take many seconds to shut down
        workers, scheduler = self.procs[1:], self.procs[:1]
        for group in (workers, scheduler):
            for proc, _ in group:
                if proc.poll() is None:
                    proc.terminate()
            for proc, _ in group:
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)


def wait_for_workers(address: str, n: int) -> dict:
    from distributed import Client

    with Client(address, timeout="30s", set_as_default=False) as client:
        client.wait_for_workers(n, timeout=START_TIMEOUT)
        return client.scheduler_info(n_workers=-1)["workers"]


def run_train(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    res = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=240)
    return res


def read_status(output: Path) -> dict:
    return json.loads((output / "status.json").read_text())


def check_trained_model(output: Path, res: subprocess.CompletedProcess) -> dict:
    """status.json says done, model.npz loads and predicts the sine function well."""
    import swimdist
    from swimdist.datasets import sine

    assert res.returncode == 0, res.stdout + res.stderr
    status = read_status(output)
    assert status["phase"] == "done" and status["error"] is None, status
    assert status["progress"] == 1.0
    model = swimdist.load_model(str(output / "model.npz"))
    # the saved model is the evaluated one: the job's test split is sine(seed=random_state+1)
    X_test, y_test = sine(N_TEST, alpha=1.0, seed=1)
    mae = float(np.mean(np.abs(np.asarray(model.predict(X_test)) - y_test)))
    np.testing.assert_allclose(mae, status["metrics"]["test"]["mae"], rtol=1e-9)
    # and it predicts f(x, y) = sin(x + y) on fresh points: 50 neurons give MAE ~ 1e-4
    X, y = sine(1000, alpha=1.0, seed=12345)
    assert np.mean(np.abs(np.asarray(model.predict(X)) - y)) < 1e-3
    return status


# --------------------------------------------------------------------------- the chart
def render_chart(values: dict) -> list[dict]:
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed")
    helm.disable_logging()
    with helm.Chart.load(CHART) as chart:
        out = chart.render(values, name=RELEASE, namespace="ml")
    return [d for p, t in out.items() if p.endswith(".yaml") for d in yaml.safe_load_all(t) if d]


def one(objs: list[dict], kind: str, suffix: str = "") -> dict:
    (obj,) = [o for o in objs if o["kind"] == kind and o["metadata"]["name"].endswith(suffix)]
    return obj


def pod_container(obj: dict) -> dict:
    (c,) = obj["spec"]["template"]["spec"]["containers"]
    return c


def helm_available() -> bool:
    return importlib.util.find_spec("helm_python") is not None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One Dask cluster of real processes on 127.0.0.1 for the whole module.

    With helm-python-sdk: the scheduler and worker commands of the rendered chart (two small
    workers), adapted to local ports. Without it: the same `dask scheduler` and two
    `dask worker` commands as a user types them.
    """
    tmp = tmp_path_factory.mktemp("cluster")
    port, dash = free_port(), free_port()
    local = f"tcp://127.0.0.1:{port}"
    info: dict = {
        "address": local,
        "tmp": tmp,
        "output": tmp / "swimdist-output",
        "objs": None,
        "worker_dash": [],
    }
    workers = []
    if helm_available():
        objs = render_chart(
            {
                "worker": SMALL_WORKER,
                "train": {"spec": {**SMALL_JOB, "output": str(info["output"])}},
            }
        )
        sched_c = pod_container(one(objs, "Deployment", "-scheduler"))
        worker_dep = one(objs, "Deployment", "-worker")
        worker_c = pod_container(worker_dep)
        svc = one(objs, "Service", "-scheduler")
        in_cluster = f"tcp://{svc['metadata']['name']}:{sched_c['ports'][0]['containerPort']}"
        # scheduler: the chart's args with local ports and host
        args = replace_flag(sched_c["args"], "--port", str(port))
        args = replace_flag(args, "--dashboard-address", f"127.0.0.1:{dash}")
        assert args[:2] == ["dask", "scheduler"]
        scheduler = (
            [*executable("dask"), *args[1:], "--host", "127.0.0.1"],
            base_env(**container_env(sched_c, "scheduler-0")),
        )
        health = sched_c["readinessProbe"]["httpGet"]["path"]
        # workers: the chart's args, scheduler Service -> local address, $(POD_NAME) expanded
        for i in range(worker_dep["spec"]["replicas"]):
            pod = f"{worker_dep['metadata']['name']}-{i}"
            env = base_env(**container_env(worker_c, pod))
            args = [a.replace(in_cluster, local) for a in expand(worker_c["args"], env)]
            info["worker_dash"].append(free_port())
            args = replace_flag(args, "--dashboard-address", f"127.0.0.1:{info['worker_dash'][-1]}")
            assert args[:3] == ["dask", "worker", local]
            workers.append((pod, [*executable("dask"), *args[1:], "--host", "127.0.0.1"], env))
        info.update(objs=objs, in_cluster=in_cluster, worker_c=worker_c)
    else:
        scheduler = (
            [
                *executable("dask"),
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--dashboard-address",
                f"127.0.0.1:{dash}",
            ],
            base_env(),
        )
        health = "/health"
        for i in range(2):
            workers.append(
                (
                    f"worker-{i}",
                    [
                        *executable("dask"),
                        "worker",
                        local,
                        "--host",
                        "127.0.0.1",
                        "--nthreads",
                        "1",
                        "--memory-limit",
                        "1GiB",
                        "--dashboard-address",
                        "127.0.0.1:0",
                    ],
                    base_env(),
                )
            )
    procs = Cluster(tmp)
    try:
        proc = procs.start("scheduler", *scheduler)
        for name, argv, env in workers:  # workers retry until the scheduler listens
            procs.start(name, argv, env)
        assert wait_http(f"http://127.0.0.1:{dash}{health}", proc, procs.procs[0][1]) == "ok"
        info["workers"] = wait_for_workers(local, len(workers))
        yield info
    finally:
        procs.stop()


@pytest.fixture
def chart_release(cluster):
    if cluster["objs"] is None:
        pytest.skip("helm-python-sdk is not installed")
    return cluster


def test_chart_workers_get_derived_threads_and_memory(chart_release):
    from dask.utils import parse_bytes

    workers = chart_release["workers"].values()
    assert sorted(w["name"] for w in workers) == [
        f"{RELEASE}-swimdist-worker-{i}" for i in range(2)
    ]
    limits = SMALL_WORKER["resources"]["limits"]
    for w in workers:
        assert w["nthreads"] == int(limits["cpu"])
        assert w["memory_limit"] == parse_bytes(limits["memory"])
    # the workers' liveness probe path answers on their dashboard port
    probe = chart_release["worker_c"]["livenessProbe"]["httpGet"]
    for port in chart_release["worker_dash"]:
        assert http_get(f"http://127.0.0.1:{port}{probe['path']}") == (200, "ok")


def test_chart_job_trains_against_chart_cluster(chart_release):
    objs, tmp = chart_release["objs"], chart_release["tmp"]
    job = one(objs, "Job")
    c = pod_container(job)
    cm = one(objs, "ConfigMap", "-job")
    spec_file = tmp / "job.yaml"
    spec_file.write_text(cm["data"]["job.yaml"])
    args = replace_flag(c["args"], "--config", str(spec_file))
    args = [a.replace(chart_release["in_cluster"], chart_release["address"]) for a in args]
    assert args[:2] == ["swimdist", "train"]
    res = run_train(
        [*executable("swimdist"), *args[1:]], base_env(**container_env(c, "train-0")), tmp
    )
    status = check_trained_model(chart_release["output"], res)
    # it ran on the chart's cluster, not on an embedded one
    assert status["scheduler"] == chart_release["address"]
    assert status["n_train"] == N_TRAIN


def test_chart_job_fails_cleanly_without_scheduler(tmp_path):
    objs = render_chart({"train": {"spec": {**SMALL_JOB, "output": str(tmp_path / "out")}}})
    c = pod_container(one(objs, "Job"))
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(one(objs, "ConfigMap", "-job")["data"]["job.yaml"])
    dead = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    args = replace_flag(replace_flag(c["args"], "--config", str(spec_file)), "--scheduler", dead)
    env = base_env(
        **{**container_env(c, "train-0"), "DASK_SWIMDIST__CLUSTER__CONNECT_TIMEOUT": "1"}
    )
    res = run_train([*executable("swimdist"), *args[1:]], env, tmp_path)
    assert res.returncode != 0
    status = read_status(tmp_path / "out")
    assert status["phase"] == "failed"
    assert dead in status["error"] and dead in res.stderr
    assert not (tmp_path / "out" / "model.npz").exists()


# --------------------------------------------------------------------------- any `dask` cluster
def train_flags(output: Path) -> list[str]:
    return [
        "train",
        "--dataset",
        "sine",
        "--n-train",
        str(N_TRAIN),
        "--n-test",
        str(N_TEST),
        "--hidden",
        str(HIDDEN),
        "--solver",
        "direct",
        "--seed",
        "0",
        "--output",
        str(output),
    ]


def test_remote_cluster_gives_same_model_as_local_cluster(cluster, tmp_path):
    import swimdist

    address = cluster["address"]
    remote, local = tmp_path / "remote", tmp_path / "local"
    # the embedded run (no --scheduler: a LocalCluster sized to the machine) starts first and
    # overlaps the remote run; its worker processes take seconds to start
    embedded = subprocess.Popen(
        [*executable("swimdist"), *train_flags(local)],
        env=base_env(),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        res = run_train(
            [*executable("swimdist"), *train_flags(remote), "--scheduler", address],
            base_env(),
            tmp_path,
        )
        out, err = embedded.communicate(timeout=240)
    finally:
        if embedded.poll() is None:
            embedded.kill()
            embedded.wait()
    assert check_trained_model(remote, res)["scheduler"] == address
    res_local = subprocess.CompletedProcess(embedded.args, embedded.returncode, out, err)
    assert check_trained_model(local, res_local)["scheduler"] != address  # embedded
    a = swimdist.load_model(str(remote / "model.npz"))
    b = swimdist.load_model(str(local / "model.npz"))
    # chunk-keyed randomness: identical hidden layers on any cluster
    for la, lb in zip(a.layers_, b.layers_, strict=True):
        np.testing.assert_array_equal(la.weights, lb.weights)
        np.testing.assert_array_equal(la.biases, lb.biases)
    # same feature matrix and the same direct solve: output weights agree to 1e-10
    scale = max(1.0, float(np.max(np.abs(b.coef_))))
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(a.intercept_, b.intercept_, rtol=0, atol=1e-10 * scale)
    X, _ = swimdist.datasets.sine(1000, alpha=1.0, seed=7)
    np.testing.assert_allclose(a.predict(X), b.predict(X), rtol=0, atol=1e-10)


def test_daskjob_job_uses_dask_scheduler_address(cluster, tmp_path):
    # The dask-kubernetes operator gives the DaskJob's pods DASK_SCHEDULER_ADDRESS instead of
    # a --scheduler flag; the rendered job command must pick it up.
    address = cluster["address"]
    output = tmp_path / "out"
    objs = render_chart(
        {"daskJob": {"enabled": True}, "train": {"spec": {**SMALL_JOB, "output": str(output)}}}
    )
    dj = one(objs, "DaskJob")
    (c,) = dj["spec"]["job"]["spec"]["containers"]
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(one(objs, "ConfigMap", "-job")["data"]["job.yaml"])
    args = replace_flag(c["args"], "--config", str(spec_file))
    assert "--scheduler" not in args
    env = base_env(**container_env(c, "runner"), DASK_SCHEDULER_ADDRESS=address)
    res = run_train([*executable("swimdist"), *args[1:]], env, tmp_path)
    assert check_trained_model(output, res)["scheduler"] == address


def test_embedded_workers_keep_glibc_malloc_tuning():
    # distributed's MALLOC_TRIM_THRESHOLD_ would make every block-sized temporary a fresh
    # mapping in the workers
    from swimdist.cluster import connect

    client, cluster = connect(n_workers=1, memory_limit="1GB")
    try:
        got = client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
        assert list(got.values()) == [None]
    finally:
        client.close()
        cluster.close()
