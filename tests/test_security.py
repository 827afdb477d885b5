"""Concurrent jobs, untrusted files, confined paths, TLS and the dashboard's exposure.

- A feature store is held by one job at a time; a dead job's lease does not last.
- Models and stores are data only (arrays + JSON): nothing in a file is unpickled or run.
- Paths in a job spec stay inside the configured output root.
- ``swimdist train`` talks to a TLS cluster (certificates made here with ``cryptography``),
  and the cluster refuses clients without a certificate from its CA.
- An embedded cluster listens on 127.0.0.1 only, its dashboard included.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import pickle
import signal
import socket
import ssl
import subprocess
import sys
import time

import dask.config
import numpy as np
import pytest

from swimdist import SWIMRegressor, load_model, models
from swimdist.datasets import sine
from swimdist.exceptions import JobSpecError, SchedulerError, StoreError, ValidationError
from swimdist.service import load_spec, run_job
from swimdist.store import STORE_VERSION, StoreLock
from swimdist.testing import ProcessCluster

SMALL = dict(hidden_layer_sizes=(20,), random_state=0, solver="direct", chunk_rows=100)


def cli(*args, env=None, timeout=180):
    env = {k: v for k, v in (env or os.environ).items() if k != "DASK_SCHEDULER_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "swimdist.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


# --------------------------------------------------------------------------- store locks
HOLD = """
import sys
from swimdist.store import StoreLock
lock = StoreLock(sys.argv[1]).acquire()
print("locked", flush=True)
sys.stdin.read()  # hold the store until the test closes stdin
lock.release()
"""


def test_second_job_on_a_store_is_refused_while_the_first_holds_it(tmp_path):
    store = tmp_path / "store"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(store)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        X, y = sine(300, seed=0)
        pattern = rf"Feature store '{store}' is in use by another job \(pid {holder.pid} on "
        with pytest.raises(StoreError, match=pattern):
            SWIMRegressor(store=str(store), **SMALL).fit(X, y)
        # through the job service: a clear failure in status.json
        out = tmp_path / "out"
        spec = load_spec(None, {"data": {"n_train": 300, "n_test": 0},
                                "model": {"hidden_layer_sizes": [20], "solver": "direct"},
                                "cluster": {"n_workers": 1}, "store": str(store),
                                "output": str(out)})
        with pytest.raises(StoreError, match="in use by another job"):
            run_job(spec)
        status = json.loads((out / "status.json").read_text())
        assert status["phase"] == "failed" and "in use by another job" in status["error"]
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    # once the first job is done, the store is free again
    est = SWIMRegressor(store=str(store), **SMALL).fit(X, y)
    assert est.fit_info_["blocks"]["written"] == 3
    assert not os.path.exists(f"{store}.lock")


def write_lease(store, *, host: str, pid: int, expires_in: float) -> None:
    with open(f"{store}.lock", "w") as f:
        json.dump({"token": "other", "pid": pid, "host": host,
                   "expires": time.time() + expires_in}, f)


def test_dead_jobs_lease_is_not_held_forever(tmp_path):
    store = str(tmp_path / "store")
    # a job on another machine: its lease holds the store until it expires
    write_lease(store, host="node-7", pid=1, expires_in=60)
    with pytest.raises(StoreError, match=r"in use by another job \(pid 1 on node-7\)"):
        StoreLock(store).acquire()
    write_lease(store, host="node-7", pid=1, expires_in=-1)  # it stopped renewing
    StoreLock(store).acquire().release()
    # a job on this machine whose process is gone: taken over at once, lease or not
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lease(store, host=socket.gethostname(), pid=dead.pid, expires_in=3600)
    StoreLock(store).acquire().release()
    assert not os.path.exists(f"{store}.lock")


def test_live_lease_is_renewed_past_its_ttl(tmp_path):
    store = str(tmp_path / "store")
    lock = StoreLock(store, ttl=0.6).acquire()
    try:
        time.sleep(1.5)  # more than twice the ttl: renewed by the holder's thread
        with open(f"{store}.lock") as f:
            assert json.load(f)["expires"] > time.time()
        with pytest.raises(StoreError, match="in use by another job"):
            StoreLock(store).acquire()
    finally:
        lock.release()
    assert not os.path.exists(f"{store}.lock")


def test_two_jobs_with_different_stores_share_one_cluster(tmp_path):
    """Two `swimdist train` processes at once on one cluster, each with its own store,
    both finish with the model a job alone gets."""
    with ProcessCluster(str(tmp_path), n_workers=2) as pc:
        jobs = {}
        for name, seed in (("a", 0), ("b", 1)):
            argv = ["train", "--scheduler", pc.address, "--n-train", "800", "--n-test", "100",
                    "--hidden", "30", "--solver", "direct", "--chunk-rows", "100", "--seed",
                    str(seed), "--store", str(tmp_path / f"store-{name}"), "-o",
                    str(tmp_path / f"out-{name}")]
            jobs[name] = subprocess.Popen([sys.executable, "-m", "swimdist.cli", *argv],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True)
        for p in jobs.values():
            _, err = p.communicate(timeout=180)
            assert p.returncode == 0, err
        # the same jobs one at a time, without a store
        for name, seed in (("a", 0), ("b", 1)):
            spec = load_spec(None, {
                "data": {"n_train": 800, "n_test": 100},
                "model": {"hidden_layer_sizes": [30], "solver": "direct", "random_state": seed,
                          "chunk_rows": 100},
                "cluster": {"scheduler": pc.address}, "output": str(tmp_path / f"ref-{name}")})
            run_job(spec)
    for name in ("a", "b"):
        got = load_model(str(tmp_path / f"out-{name}" / "model.npz"))
        ref = load_model(str(tmp_path / f"ref-{name}" / "model.npz"))
        np.testing.assert_allclose(got.coef_, ref.coef_, rtol=0, atol=1e-10)
        status = json.loads((tmp_path / f"out-{name}" / "status.json").read_text())
        assert status["phase"] == "done" and status["metrics"]["test"]["mae"] < 1e-2
        assert not os.path.exists(tmp_path / f"store-{name}.lock")


# --------------------------------------------------------------------------- untrusted files
class Payload:
    """Unpickling this creates ``path``: proof that a loader unpickled something."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    X, y = sine(300, seed=0)
    path = tmp_path_factory.mktemp("model") / "model.npz"
    SWIMRegressor(**SMALL).fit(X, y).save(str(path))
    return path


def npz_contents(path) -> tuple[dict, dict]:
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return arrays, json.loads(arrays["__meta__"].tobytes())


def evil_files(model_file, d, marker) -> dict[str, str]:
    arrays, meta = npz_contents(model_file)
    files = {}
    files["object array"] = str(d / "object.npz")
    np.savez(files["object array"], **{**arrays, "coef": np.array([Payload(marker)])},
             allow_pickle=True)
    files["pickled metadata"] = str(d / "meta.npz")
    np.savez(files["pickled metadata"], **{**arrays, "__meta__": np.array([Payload(marker)])},
             allow_pickle=True)
    files["pickle file"] = str(d / "pickle.npz")
    with open(files["pickle file"], "wb") as f:
        pickle.dump(Payload(marker), f)
    files["npy pickle"] = str(d / "model.npy")
    np.save(files["npy pickle"], np.array([Payload(marker)]), allow_pickle=True)
    return files


def test_load_model_never_unpickles(model_file, tmp_path):
    marker = tmp_path / "unpickled"
    # control: the payload does work when something does unpickle it
    with open(evil_files(model_file, tmp_path, marker)["pickle file"], "rb") as f:
        pickle.load(f)
    assert marker.exists()
    marker.unlink()
    files = evil_files(model_file, tmp_path, marker)
    for what, path in files.items():
        with pytest.raises(StoreError, match=r"not a (readable )?swimdist model file"):
            load_model(path)
        assert not marker.exists(), f"{what}: load_model unpickled the file's content"
    path = files["object array"]
    for cmd in (["info", path], ["evaluate", "--model", path, "--n-test", "10"]):
        r = cli(*cmd)
        assert r.returncode == 1 and "not a readable swimdist model file" in r.stderr, r.stderr
    assert not marker.exists()


def test_models_are_written_as_data_only(tmp_path):
    with pytest.raises(ValidationError, match="dtype object"):
        models.save_arrays(str(tmp_path / "m.npz"), {"coef": np.array([object()])}, {})
    X, y = sine(300, seed=0)
    path = tmp_path / "model.npz"
    SWIMRegressor(**SMALL).fit(X, y).save(str(path))
    with np.load(path, allow_pickle=False) as z:  # readable without pickle, every array
        assert all(z[k].dtype != object for k in z.files)


def test_model_from_newer_format_version_refused(model_file, tmp_path):
    arrays, meta = npz_contents(model_file)
    meta["version"] = models.MODEL_VERSION + 1
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    path = tmp_path / "future.npz"
    np.savez(path, **arrays)
    with pytest.raises(StoreError, match=rf"format version {models.MODEL_VERSION + 1}, newer "
                                         rf"than this swimdist understands "
                                         rf"\({models.MODEL_VERSION}\); upgrade swimdist"):
        load_model(str(path))


def test_feature_store_from_newer_format_version_refused(tmp_path):
    X, y = sine(300, seed=0)
    store = str(tmp_path / "store")
    SWIMRegressor(store=store, **SMALL).fit(X, y)
    import zarr

    grp = zarr.open_group(store=store, mode="r+")
    meta = dict(grp.attrs["swimdist"])
    meta["version"] = STORE_VERSION + 1
    grp.attrs["swimdist"] = meta
    with pytest.raises(StoreError, match=rf"format version {STORE_VERSION + 1}; this "
                                         rf"swimdist reads versions up to"):
        SWIMRegressor(store=store, **SMALL).fit(X, y)


def test_job_spec_yaml_cannot_run_code(tmp_path):
    marker = tmp_path / "ran"
    spec = tmp_path / "job.yaml"
    spec.write_text(f'model: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(JobSpecError, match="not valid YAML"):
        load_spec(str(spec))
    assert not marker.exists()


# --------------------------------------------------------------------------- output root
@pytest.fixture
def output_root(tmp_path):
    root = tmp_path / "root"
    (root / "jobs").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", root / "link-out")
    with dask.config.set({"swimdist.output-root": str(root)}):
        yield root


@pytest.mark.parametrize("key, path", [
    ("output", "../escaped"),  # parent segments
    ("output", "jobs/../../escaped"),
    ("output", "/etc/swimdist"),  # an absolute path elsewhere
    ("store", "link-out/store"),  # a symlink inside the root that points out
    ("store", "s3://bucket/store"),  # a URL under a local root
    ("store", "."),  # the root itself: the store's lock file would go beside it
])
def test_job_spec_paths_cannot_escape_output_root(output_root, key, path):
    with pytest.raises(JobSpecError, match=rf"{key} .*(outside the output root|is the output "
                                           r"root itself)"):
        load_spec(None, {key: path})


def test_job_spec_paths_inside_output_root_are_resolved_there(output_root):
    spec = load_spec(None, {"output": "jobs/run-1", "store": "jobs/features"})
    assert spec["output"] == str(output_root.resolve() / "jobs" / "run-1")
    assert spec["store"] == str(output_root.resolve() / "jobs" / "features")


@pytest.mark.parametrize("path, ok", [
    ("s3://bucket/jobs/run-1", True),
    ("s3://bucket/jobs-other/run-1", False),  # a shared prefix is not inside
    ("s3://bucket/jobs/../secrets", False),
    ("gs://bucket/jobs/run-1", False),
    ("/tmp/run-1", False),
])
def test_job_spec_paths_under_a_url_output_root(path, ok):
    with dask.config.set({"swimdist.output-root": "s3://bucket/jobs"}):
        if ok:
            assert load_spec(None, {"output": path})["output"] == path
        else:
            with pytest.raises(JobSpecError, match="output"):
                load_spec(None, {"output": path})


def test_cli_output_outside_root_refused_before_anything_is_written(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "escaped"
    root.mkdir()
    env = {**os.environ, "DASK_SWIMDIST__OUTPUT_ROOT": str(root)}
    r = cli("train", "--solver", "direct", "-o", "../escaped", env=env)
    assert r.returncode == 1 and "outside the output root" in r.stderr
    assert not outside.exists()


# --------------------------------------------------------------------------- TLS
def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _write_pem(path, obj) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    if isinstance(obj, x509.Certificate):
        data = obj.public_bytes(serialization.Encoding.PEM)
    else:
        data = obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    path.write_bytes(data)
    return str(path)


def make_ca(d, name: str):
    """A self-signed CA: ``(key, certificate, path of its PEM)``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert, _write_pem(d / f"{name}.pem", cert)


def issue(d, ca, name: str) -> tuple[str, str]:
    """A certificate for 127.0.0.1 signed by ``ca``: ``(cert path, key path)``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_key, ca_cert, _ = ca
    now = datetime.datetime.now(datetime.timezone.utc)
    key = _key()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=2))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    return _write_pem(d / f"{name}.pem", cert), _write_pem(d / f"{name}.key", key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    pytest.importorskip("cryptography")
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d, "swimdist-test-ca")
    rogue = make_ca(d, "rogue-ca")
    return {"ca": ca[2], "cluster": issue(d, ca, "cluster"), "client": issue(d, ca, "client"),
            "rogue": issue(d, rogue, "rogue-client")}


def test_tls_cluster_trains_and_refuses_clients_without_certificate(pki, tmp_path):
    from swimdist.cluster import connect, tls_security

    ca = pki["ca"]
    with ProcessCluster(str(tmp_path), n_workers=2, tls=(ca, *pki["cluster"])) as pc:
        assert pc.address.startswith("tls://127.0.0.1:")
        # swimdist train with the client certificate
        out = tmp_path / "out"
        cert, key = pki["client"]
        r = cli("train", "--scheduler", pc.address, "--tls-ca-file", ca, "--tls-cert", cert,
                "--tls-key", key, "--n-train", "600", "--n-test", "100", "--hidden", "30",
                "--solver", "direct", "-o", str(out))
        assert r.returncode == 0, r.stderr
        status = json.loads((out / "status.json").read_text())
        assert status["phase"] == "done" and status["scheduler"] == pc.address
        assert status["metrics"]["test"]["mae"] < 1e-2
        # without a certificate: refused before connecting, with a message saying why
        r = cli("train", "--scheduler", pc.address, "--solver", "direct", "-o",
                str(tmp_path / "no-cert"))
        assert r.returncode == 1
        assert "uses TLS, and no client certificate is configured" in r.stderr
        status = json.loads((tmp_path / "no-cert" / "status.json").read_text())
        assert status["phase"] == "failed" and "--tls-cert" in status["error"]
        # a certificate from another CA: the scheduler refuses the handshake
        with pytest.raises(SchedulerError, match="Could not reach the Dask scheduler"):
            connect(pc.address, security=tls_security(ca, *pki["rogue"]), timeout=3)
        # plain TCP to the TLS port: refused
        with pytest.raises(SchedulerError, match="Could not reach the Dask scheduler"):
            connect(pc.address.replace("tls://", "tcp://"), timeout=3)
        # a TLS client that trusts the CA but has no certificate: the server ends the
        # connection (TLS 1.3 reports the missing certificate on the first read)
        ctx = ssl.create_default_context(cafile=ca)
        ctx.check_hostname = False
        host, port = pc.address[len("tls://"):].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            with pytest.raises((ssl.SSLError, ConnectionError)):
                with ctx.wrap_socket(raw) as s:
                    s.sendall(b"\0" * 8)
                    assert s.recv(1) == b"", "the scheduler answered a client without a cert"
                    raise ConnectionError("closed by the scheduler")


# --------------------------------------------------------------------------- dashboard
def _listening(pid: int) -> list[str]:
    import psutil

    proc = psutil.Process(pid)
    procs = [proc, *proc.children(recursive=True)]
    return [c.laddr.ip for p in procs for c in p.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN]


def test_embedded_cluster_and_dashboard_listen_on_localhost_only():
    from swimdist.cluster import connect

    client, cluster = connect(n_workers=1)
    try:
        ips = _listening(os.getpid())
        assert client.dashboard_link.startswith("http://127.0.0.1:")
        dash_port = int(client.dashboard_link.split(":")[2].split("/")[0])
        import psutil

        ports = {c.laddr.port: c.laddr.ip for c in psutil.Process(os.getpid())
                 .net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        assert ports[dash_port] == "127.0.0.1"
        assert ips and set(ips) == {"127.0.0.1"}, ips
    finally:
        client.close()
        cluster.close()


def test_sigterm_handler_is_restored_after_a_job(tmp_path):
    from click.testing import CliRunner

    from swimdist.cli import main

    before = signal.getsignal(signal.SIGTERM)
    r = CliRunner().invoke(main, ["train", "--solver", "direct", "--n-train", "200",
                                  "--n-test", "0", "--hidden", "10", "--n-workers", "1",
                                  "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert signal.getsignal(signal.SIGTERM) == before
