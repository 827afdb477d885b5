"""The Helm chart in helm/swimdist: lint, render, Kubernetes schemas, values schema, derived args.

Everything here is offline: helm-python-sdk bundles Helm's Go engine (no helm binary, no
cluster), kubernetes-validate ships the Kubernetes OpenAPI schemas of many releases.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed")
kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "swimdist"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
# Oldest and newest Kubernetes releases we promise to render for (Chart.yaml kubeVersion
# allows >= 1.25; both are within kubernetes-validate's bundled schemas).
KUBE_VERSIONS = ("1.29.0", "1.37.0")
RELEASE = "rel"

helm.disable_logging()  # `fail` in templates logs at INFO through Go's logger otherwise


# --------------------------------------------------------------------------- helpers
def load_values(path: Path) -> dict:
    """A values file parsed the way `helm -f` parses it."""
    return helm.values_from_yaml(path.read_text())


def render(values: dict | None = None, *, name: str = RELEASE) -> dict[str, list[dict]]:
    """Rendered objects per template file, NOTES.txt as text under "NOTES"."""
    with helm.Chart.load(CHART) as chart:
        out = chart.render(values or {}, name=name, namespace="ml")
    objs: dict[str, list[dict]] = {}
    for path, text in out.items():
        if path.endswith("NOTES.txt"):
            objs["NOTES"] = text
        else:
            docs = [d for d in yaml.safe_load_all(text) if d]
            if docs:
                objs[Path(path).name] = docs
    return objs


def objects(rendered: dict) -> list[dict]:
    return [d for k, docs in rendered.items() if k != "NOTES" for d in docs]


def by_kind(rendered: dict, kind: str) -> list[dict]:
    return [o for o in objects(rendered) if o["kind"] == kind]


def validate_k8s(obj: dict, version: str) -> None:
    """Validate against the Kubernetes schema (strict: unknown fields are errors).

    The DaskJob CRD is not part of Kubernetes; its embedded PodSpecs and ServiceSpec are
    validated as a Pod and a Service instead.
    """
    if obj["kind"] == "DaskJob":
        spec = obj["spec"]
        cluster = spec["cluster"]["spec"]
        for pod_spec in (
            spec["job"]["spec"],
            cluster["worker"]["spec"],
            cluster["scheduler"]["spec"],
        ):
            kv.validate(
                {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": pod_spec},
                version,
                strict=True,
            )
        kv.validate(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "s"},
                "spec": cluster["scheduler"]["service"],
            },
            version,
            strict=True,
        )
        return
    kv.validate(obj, version, strict=True)


def container(obj: dict) -> dict:
    (c,) = obj["spec"]["template"]["spec"]["containers"]
    return c


def arg_value(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def worker_container(values: dict) -> dict:
    (dep,) = [
        d
        for d in by_kind(render(values), "Deployment")
        if d["metadata"]["name"].endswith("-worker")
    ]
    return container(dep)


def drop_none(d: dict) -> dict:
    return {k: drop_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}


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


# --------------------------------------------------------------------------- lint + render
VALUE_SETS = [pytest.param(None, id="defaults")] + [pytest.param(p, id=p.stem) for p in EXAMPLES]


def test_examples_exist():
    # one per feature: small job, PVC + ingress, object store, DaskJob, cluster without job
    assert {p.stem for p in EXAMPLES} >= {"minimal", "mnist-pvc", "s3", "daskjob", "cluster-only"}


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values_file", VALUE_SETS)
def test_chart_lints_clean(values_file, kube_version):
    values = load_values(values_file) if values_file else None
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{kube_version}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error
    assert report["errors"] == [] and problems == [], (report["errors"], problems)


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values_file", VALUE_SETS)
def test_rendered_objects_validate_against_kubernetes_schema(values_file, kube_version):
    rendered = render(load_values(values_file) if values_file else None)
    objs = objects(rendered)
    assert objs, "nothing rendered"
    for obj in objs:
        validate_k8s(obj, kube_version)
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
        assert len(obj["metadata"]["name"]) <= 63
    assert RELEASE in rendered["NOTES"]


def test_kubernetes_validation_catches_errors():
    # negative control: the validator is strict about types and unknown fields
    (job,) = by_kind(render(), "Job")
    bad_type = json.loads(json.dumps(job))
    bad_type["spec"]["backoffLimit"] = "twice"
    with pytest.raises(kv.ValidationError, match="twice"):
        validate_k8s(bad_type, KUBE_VERSIONS[0])
    unknown = json.loads(json.dumps(job))
    unknown["spec"]["template"]["spec"]["containers"][0]["argz"] = ["x"]
    with pytest.raises(kv.ValidationError, match="argz"):
        validate_k8s(unknown, KUBE_VERSIONS[-1])


def test_long_release_names_stay_within_dns_limits():
    rendered = render(name="a" * 53)
    for obj in objects(rendered):
        assert len(obj["metadata"]["name"]) <= 63, obj["metadata"]["name"]


# --------------------------------------------------------------------------- the default release
def test_default_release_objects():
    rendered = render()
    kinds = sorted(o["kind"] for o in objects(rendered))
    assert kinds == ["ConfigMap", "Deployment", "Deployment", "Job", "Service"]
    (svc,) = by_kind(rendered, "Service")
    assert svc["spec"]["type"] == "ClusterIP"
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {
        "tcp-comm": 8786,
        "http-dashboard": 80,
    }


def test_train_job_runs_swimdist_against_the_chart_scheduler():
    values = load_values(CHART / "values.yaml")
    rendered = render()
    (job,) = by_kind(rendered, "Job")
    (svc,) = by_kind(rendered, "Service")
    (cm,) = by_kind(rendered, "ConfigMap")
    spec = job["spec"]
    assert spec["backoffLimit"] == values["train"]["job"]["backoffLimit"]
    assert spec["ttlSecondsAfterFinished"] == values["train"]["job"]["ttlSecondsAfterFinished"]
    assert spec["activeDeadlineSeconds"] == values["train"]["job"]["activeDeadlineSeconds"]
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    c = container(job)
    assert "command" not in c  # the Dask image's entrypoint (prepare.sh) must stay
    address = f"tcp://{svc['metadata']['name']}:8786"
    assert c["args"] == [
        "swimdist",
        "train",
        "--config",
        "/etc/swimdist/job.yaml",
        "--scheduler",
        address,
    ]
    # the --config path is the ConfigMap's job.yaml, mounted read-only
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "job-spec"]
    (vol,) = [v for v in pod["volumes"] if v["name"] == "job-spec"]
    assert vol["configMap"]["name"] == cm["metadata"]["name"]
    (item,) = vol["configMap"]["items"]
    assert f"{mount['mountPath']}/{item['path']}" == "/etc/swimdist/job.yaml"
    assert item["key"] == "job.yaml" and mount["readOnly"] is True
    # Helm drops null values; swimdist's defaults for them are null as well
    assert yaml.safe_load(cm["data"]["job.yaml"]) == drop_none(values["train"]["spec"])


def test_job_name_changes_with_revision():
    # a Job's pod template is immutable: each `helm upgrade` must create a new Job
    with helm.Chart.load(CHART) as chart:
        names = [
            yaml.safe_load(
                chart.render({}, name=RELEASE, revision=r)["swimdist/templates/train-job.yaml"]
            )["metadata"]["name"]
            for r in (1, 2)
        ]
    assert names[0] != names[1]


def test_every_container_uses_current_dask_cli_and_keeps_entrypoint():
    for values_file in [None, *EXAMPLES]:
        rendered = render(load_values(values_file) if values_file else None)
        text = yaml.safe_dump(objects(rendered))
        assert "dask-scheduler" not in text and "dask-worker" not in text
        for obj in objects(rendered):
            if obj["kind"] == "Deployment":
                c = container(obj)
                assert "command" not in c
                assert c["args"][:2] in (["dask", "scheduler"], ["dask", "worker"])


def test_scheduler_probes_use_health_on_dashboard_port():
    (dep,) = [
        d for d in by_kind(render(), "Deployment") if d["metadata"]["name"].endswith("-scheduler")
    ]
    c = container(dep)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    dash = arg_value(c["args"], "--dashboard-address")
    assert dash == f":{ports['http-dashboard']}"
    assert arg_value(c["args"], "--port") == str(ports["tcp-comm"])
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http-dashboard"}


# --------------------------------------------------------------------------- derived worker args
@pytest.mark.parametrize(
    "worker, nthreads, memory",
    [
        # limits alone: threads = whole cores, memory limit = container limit
        ({}, "2", "8Gi"),
        ({"resources": {"limits": {"cpu": "1500m", "memory": "3G"}}}, "1", "3G"),
        ({"resources": {"limits": {"cpu": 2.5, "memory": "6Gi"}}}, "2", "6Gi"),
        ({"resources": {"limits": {"cpu": "250m", "memory": "512Mi"}}}, "1", "512Mi"),
        # threads may be lowered below the cores (e.g. to leave BLAS threads room)
        ({"threads": 2, "resources": {"limits": {"cpu": "4", "memory": "16Gi"}}}, "2", "16Gi"),
        # no limits: explicit threads / memoryLimit, or nothing (dask decides)
        ({"threads": 3, "memoryLimit": "4GiB", "resources": None}, "3", "4GiB"),
        ({"resources": None}, None, None),
    ],
)
def test_worker_threads_and_memory_follow_resources(worker, nthreads, memory):
    from dask.utils import parse_bytes

    c = worker_container({"worker": worker})
    args = c["args"]
    assert arg_value(args, "--nthreads") == nthreads
    assert arg_value(args, "--memory-limit") == memory
    limits = (c.get("resources") or {}).get("limits")
    if limits:
        # Dask reads the Kubernetes quantity with the same meaning (same byte count), and
        # the threads never exceed the whole cores of the CPU limit
        assert parse_bytes(memory) == k8s_bytes(limits["memory"])
        assert 1 <= int(nthreads) <= max(1, int(k8s_cpu_cores(limits["cpu"])))


def test_worker_threads_beyond_cpu_limit_rejected():
    with pytest.raises(helm.HelmRenderError, match=r"worker.threads=4 exceeds .*cpu=2"):
        render({"worker": {"threads": 4}})


def test_worker_memory_limit_twice_rejected():
    with pytest.raises(helm.HelmRenderError, match=r"worker.memoryLimit=4GiB and .*both set"):
        render({"worker": {"memoryLimit": "4GiB"}})


def test_worker_env_volumes_and_object_store():
    rendered = render(load_values(CHART / "examples" / "s3.yaml"))
    (dep,) = [
        d for d in by_kind(rendered, "Deployment") if d["metadata"]["name"].endswith("-worker")
    ]
    (job,) = by_kind(rendered, "Job")
    for c in (container(dep), container(job)):
        assert c["envFrom"] == [{"secretRef": {"name": "swimdist-s3"}}]
        assert "AWS_ENDPOINT_URL" in {e["name"] for e in c["env"]}
    # credentials never appear in the job spec or any ConfigMap
    for cm in by_kind(rendered, "ConfigMap"):
        assert "AWS_SECRET" not in json.dumps(cm)


def test_pvc_mounted_in_workers_and_job():
    rendered = render(load_values(CHART / "examples" / "mnist-pvc.yaml"))
    (pvc,) = by_kind(rendered, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    pods = [
        d["spec"]["template"]["spec"]
        for d in by_kind(rendered, "Deployment")
        if d["metadata"]["name"].endswith("-worker")
    ]
    pods += [j["spec"]["template"]["spec"] for j in by_kind(rendered, "Job")]
    for pod in pods:
        (vol,) = [v for v in pod["volumes"] if v["name"] == "data"]
        assert vol["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "data"]
        assert mount["mountPath"] == "/data"
    (ing,) = by_kind(rendered, "Ingress")
    assert ing["spec"]["tls"][0]["hosts"] == ["dask.example.com"]


# --------------------------------------------------------------------------- DaskJob
def test_daskjob_replaces_deployments_and_job():
    rendered = render(load_values(CHART / "examples" / "daskjob.yaml"))
    assert sorted(o["kind"] for o in objects(rendered)) == ["ConfigMap", "DaskJob"]
    (dj,) = by_kind(rendered, "DaskJob")
    assert dj["apiVersion"] == "kubernetes.dask.org/v1"
    (job_c,) = dj["spec"]["job"]["spec"]["containers"]
    # the operator sets DASK_SCHEDULER_ADDRESS in the job and worker pods
    assert job_c["args"] == ["swimdist", "train", "--config", "/etc/swimdist/job.yaml"]
    cluster = dj["spec"]["cluster"]["spec"]
    (w,) = cluster["worker"]["spec"]["containers"]
    assert w["args"][:4] == ["dask", "worker", "--name", "$(DASK_WORKER_NAME)"]
    assert cluster["worker"]["replicas"] == 3
    assert (
        cluster["scheduler"]["service"]["selector"]["dask.org/cluster-name"]
        == dj["metadata"]["name"]
    )
    (s,) = cluster["scheduler"]["spec"]["containers"]
    assert s["args"][:2] == ["dask", "scheduler"]
    assert s["livenessProbe"]["httpGet"]["path"] == "/health"


# --------------------------------------------------------------------------- values schema
BAD_VALUES = [
    # (values file text, message fragment naming the key)
    ("worker:\n  replicas: three\n", "/worker/replicas"),
    ("workers:\n  replicas: 2\n", "workers"),  # typo of a top-level key
    ("scheduler:\n  serviceType: Ingress\n", "/scheduler/serviceType"),
    ("scheduler:\n  replicas: 2\n", "/scheduler/replicas"),
    ("worker:\n  threads: 0\n", "/worker/threads"),
    ("worker:\n  resources:\n    limits:\n      memory: lots\n", "/worker/resources/limits/memory"),
    ("train:\n  job:\n    backoffLimit: -1\n", "/train/job/backoffLimit"),
    ("train:\n  job:\n    restartPolicy: Always\n", "/train/job/restartPolicy"),
    ("train:\n  spec:\n    data:\n      dataset: imagenet\n", "/train/spec/data/dataset"),
    ("train:\n  spec:\n    modle: {}\n", "modle"),
    (
        "train:\n  spec:\n    model:\n      hidden_layer_sizes: [0]\n",
        "/train/spec/model/hidden_layer_sizes",
    ),
    ("storage:\n  mountPath: data\n", "/storage/mountPath"),
]


@pytest.mark.parametrize("text, where", BAD_VALUES, ids=[w for _, w in BAD_VALUES])
def test_bad_values_file_rejected_by_schema(tmp_path, text, where):
    path = tmp_path / "bad-values.yaml"
    path.write_text(text)
    values = load_values(path)
    with pytest.raises(helm.HelmValuesError, match=re.escape(where)):
        render(values)
    report = helm.lint(CHART, values, kube_version=f"v{KUBE_VERSIONS[0]}")
    assert any(where in m["error"] for m in report["messages"] if m["severity"] == 3), report


def test_values_schema_job_spec_matches_service_defaults():
    # train.spec in values.schema.json lists exactly the keys swimdist's job spec accepts
    service = pytest.importorskip("swimdist.service")
    schema = json.loads((CHART / "values.schema.json").read_text())
    spec_schema = schema["properties"]["train"]["properties"]["spec"]

    def schema_keys(s, prefix=""):
        out = set()
        for k, v in s["properties"].items():
            out |= schema_keys(v, f"{prefix}{k}.") if "properties" in v else {prefix + k}
        return out

    def spec_keys(d, prefix=""):
        out = set()
        for k, v in d.items():
            nested = isinstance(v, dict) and k != "solver_options"
            out |= spec_keys(v, f"{prefix}{k}.") if nested else {prefix + k}
        return out

    assert schema_keys(spec_schema) == spec_keys(service.DEFAULT_SPEC)


@pytest.mark.parametrize("values_file", VALUE_SETS)
def test_rendered_job_spec_accepted_by_swimdist(tmp_path, values_file):
    service = pytest.importorskip("swimdist.service")
    rendered = render(load_values(values_file) if values_file else None)
    cms = by_kind(rendered, "ConfigMap")
    if not cms:
        pytest.skip("no training job in this release")
    path = tmp_path / "job.yaml"
    path.write_text(cms[0]["data"]["job.yaml"])
    spec = service.load_spec(str(path))
    assert spec["output"] == yaml.safe_load(path.read_text())["output"]


def test_chart_versions_match_package():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    pyproject = (ROOT / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
    assert chart["appVersion"] == version


def test_small_floats_in_values_reach_swimdist_as_numbers(tmp_path):
    # Helm's toYaml writes 1e-08 (no dot), which YAML 1.1 loaders read as a string
    service = pytest.importorskip("swimdist.service")
    model = {"rcond": 1e-8, "alpha": 2.5e-12, "solver": "direct"}
    (cm,) = by_kind(render({"train": {"spec": {"model": model}}}), "ConfigMap")
    assert "1e-08" in cm["data"]["job.yaml"]
    path = tmp_path / "job.yaml"
    path.write_text(cm["data"]["job.yaml"])
    spec = service.load_spec(str(path))
    assert spec["model"]["rcond"] == 1e-8 and spec["model"]["alpha"] == 2.5e-12


# --------------------------------------------------------------------------- TLS, dashboard
TLS_VALUES = {"tls": {"enabled": True, "secretName": "dask-tls"}}
TLS_FLAGS = ["--tls-ca-file", "/etc/dask/tls/ca.crt", "--tls-cert", "/etc/dask/tls/tls.crt",
             "--tls-key", "/etc/dask/tls/tls.key"]


def _flag_block(args: list[str]) -> list[str]:
    i = args.index("--tls-ca-file")
    return args[i:i + 6]


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_tls_release_lints_and_validates(kube_version):
    report = helm.lint(CHART, TLS_VALUES, strict=True, kube_version=f"v{kube_version}")
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == []
    for obj in objects(render(TLS_VALUES)):
        validate_k8s(obj, kube_version)


def test_tls_certificates_reach_scheduler_workers_and_job():
    rendered = render(TLS_VALUES)
    (svc,) = by_kind(rendered, "Service")
    address = f"tls://{svc['metadata']['name']}:8786"
    pods = {d["metadata"]["name"].rsplit("-", 1)[-1]: d for d in by_kind(rendered, "Deployment")}
    (job,) = by_kind(rendered, "Job")
    pods["job"] = job
    for name, obj in pods.items():
        c, pod = container(obj), obj["spec"]["template"]["spec"]
        assert _flag_block(c["args"]) == TLS_FLAGS, name
        (mount,) = [m for m in c["volumeMounts"] if m["name"] == "dask-tls"]
        assert mount == {"name": "dask-tls", "mountPath": "/etc/dask/tls", "readOnly": True}
        (vol,) = [v for v in pod["volumes"] if v["name"] == "dask-tls"]
        assert vol["secret"]["secretName"] == "dask-tls"
        assert vol["secret"]["defaultMode"] == 0o440  # the key is not world-readable
    sched = container(pods["scheduler"])["args"]
    assert arg_value(sched, "--protocol") == "tls"
    assert container(pods["worker"])["args"][2] == address  # dask worker <address>
    assert arg_value(container(job)["args"], "--scheduler") == address
    # probes stay on the dashboard's plain HTTP /health
    assert container(pods["scheduler"])["livenessProbe"]["httpGet"]["path"] == "/health"


def test_tls_off_by_default_and_extra_volumes_kept():
    rendered = render({"worker": {"volumes": [{"name": "x", "emptyDir": {}}],
                                  "volumeMounts": [{"name": "x", "mountPath": "/x"}]}})
    text = json.dumps(objects(rendered))
    assert "tls://" not in text and "--tls-" not in text and "dask-tls" not in text
    rendered = render({**TLS_VALUES,
                       "worker": {"volumes": [{"name": "x", "emptyDir": {}}],
                                  "volumeMounts": [{"name": "x", "mountPath": "/x"}]},
                       "scheduler": {"volumes": [{"name": "y", "emptyDir": {}}],
                                     "volumeMounts": [{"name": "y", "mountPath": "/y"}]}})
    for dep in by_kind(rendered, "Deployment"):
        names = {v["name"] for v in dep["spec"]["template"]["spec"]["volumes"]}
        assert "dask-tls" in names and names & {"x", "y"}


@pytest.mark.parametrize("values, message", [
    ({"tls": {"enabled": True}}, r"tls.secretName is required"),
    ({**TLS_VALUES, "daskJob": {"enabled": True}},
     r"tls.enabled cannot be combined with daskJob.enabled"),
])
def test_tls_misconfiguration_rejected(values, message):
    with pytest.raises(helm.HelmRenderError, match=message):
        render(values)


def test_tls_values_schema():
    with pytest.raises(helm.HelmValuesError, match="/tls/mountPath"):
        render({"tls": {"enabled": True, "secretName": "s", "mountPath": "relative"}})
    with pytest.raises(helm.HelmValuesError, match="tls"):
        render({"tls": {"enable": True}})


@pytest.mark.parametrize("values", [None, TLS_VALUES], ids=["defaults", "tls"])
def test_dashboard_not_exposed_outside_the_cluster_by_default(values):
    rendered = render(values)
    (svc,) = by_kind(rendered, "Service")
    assert svc["spec"]["type"] == "ClusterIP"
    assert "http-dashboard" in {p["name"] for p in svc["spec"]["ports"]}
    assert not any("nodePort" in p for p in svc["spec"]["ports"])
    assert by_kind(rendered, "Ingress") == []
    for obj in objects(rendered):
        spec = obj.get("spec", {}).get("template", {}).get("spec", {})
        assert not spec.get("hostNetwork")
        for c in spec.get("containers", []):
            assert not any("hostPort" in p for p in c.get("ports", []))
